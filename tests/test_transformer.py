"""Transformer LM: the guide's API, causality, loss at init, overfitting, cached decoding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from chainrule.models import (
    TransformerAR,
    TransformerAutoregressiveModel,
    TransformerConfig,
    TransformerNetworkConfig,
)


def tiny(vocab=32, seq=32, positional="rope", layers=2, dropout=0.0, **kw):
    net = TransformerNetworkConfig(embed_dim=32, num_heads=4, positional_encoding=positional,
                                   dropout_rate=dropout)
    cfg = TransformerConfig(vocab_size=vocab, sequence_length=seq, network=net, num_layers=layers,
                            **kw)
    return TransformerAutoregressiveModel(cfg, rngs=nnx.Rngs(params=0, dropout=1, sample=2))


def test_guide_quick_start_api():
    rngs = nnx.Rngs(params=0, dropout=1, sample=2)
    network_config = TransformerNetworkConfig(
        name="transformer_network", hidden_dims=(64, 64), activation="gelu", embed_dim=64,
        num_heads=4, mlp_ratio=4.0, positional_encoding="sinusoidal", dropout_rate=0.1)
    config = TransformerConfig(name="text_transformer", vocab_size=100, sequence_length=64,
                               network=network_config, num_layers=2, use_cache=True)
    model = TransformerAutoregressiveModel(config, rngs=rngs)
    sequences = jnp.array([[1, 2, 3, 4, 5]])
    outputs = model(sequences)
    assert outputs["logits"].shape == (1, 5, 100)
    outputs = model(sequences, rngs=rngs, training=True)
    loss_dict = model.loss_fn({"sequences": sequences}, outputs, rngs=rngs)
    assert set(loss_dict) >= {"loss", "nll_loss", "perplexity", "accuracy"}
    np.testing.assert_allclose(loss_dict["perplexity"], np.exp(loss_dict["nll_loss"]), rtol=1e-5)
    model.eval()
    samples = model.generate(n_samples=4, max_length=16, temperature=0.8, rngs=rngs)
    assert samples.shape == (4, 16) and samples.dtype == jnp.int32
    old = TransformerAR(vocab_size=100, sequence_length=32, hidden_dim=32, num_layers=1,
                        num_heads=4, feedforward_dim=64, dropout_rate=0.1, rngs=rngs)
    assert old(sequences)["logits"].shape == (1, 5, 100)
    assert old.blocks[0].fc.kernel.shape == (32, 64)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rope"])
def test_causality(positional):
    model = tiny(positional=positional)
    x = jax.random.randint(jax.random.key(0), (2, 16), 0, 32)
    base = model(x)["logits"]
    for t in (0, 5, 15):
        y = x.at[:, t].set((x[:, t] + 7) % 32)
        out = model(y)["logits"]
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-5)
        assert not np.allclose(out[:, t], base[:, t])  # position t itself does see token t


def test_loss_at_init_is_about_log_vocab():
    model = tiny(vocab=65)
    x = jax.random.randint(jax.random.key(1), (8, 32), 0, 65)
    loss = model.train_loss({"sequences": x}, training=False)["loss"]
    assert abs(float(loss) - math.log(65)) < 0.15


def test_padding_is_left_out_of_the_loss():
    model = tiny(pad_token_id=0)
    x = jnp.array([[5, 6, 7, 8, 0, 0, 0, 0]])
    out = model(x)
    full = model.loss_fn({"sequences": x}, out)["nll_loss"]
    logp = jax.nn.log_softmax(out["logits"][0, :3])
    expected = -np.mean([logp[i, int(x[0, i + 1])] for i in range(3)])
    np.testing.assert_allclose(full, expected, rtol=1e-5)


def test_overfits_one_batch():
    model = tiny(vocab=16)
    x = jax.random.randint(jax.random.key(2), (4, 17), 0, 16)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            return m.train_loss({"sequences": x}, training=False)["loss"]
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(150)]
    assert losses[-1] < 0.2 * losses[0]


def test_bad_tokens_get_clear_errors():
    model = tiny(vocab=32)
    with pytest.raises(ValueError, match="token id 40 is out of range"):
        model(jnp.array([[1, 40]]))
    with pytest.raises(ValueError, match="integers"):
        model(jnp.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="must divide"):
        TransformerNetworkConfig(embed_dim=30, num_heads=4)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rope"])
def test_cached_logits_equal_uncached(positional):
    model = tiny(positional=positional)
    x = jax.random.randint(jax.random.key(3), (2, 20), 0, 32)
    full = model(x)["logits"]
    cache = model.init_cache(2, 32)
    out = model(x[:, :7], cache=cache, cache_index=0)  # prefill
    np.testing.assert_allclose(out["logits"], full[:, :7], atol=1e-5)
    cache = out["cache"]
    for t in range(7, 20):
        out = model(x[:, t:t + 1], cache=cache, cache_index=t)
        np.testing.assert_allclose(out["logits"][:, 0], full[:, t], atol=1e-5)
        cache = out["cache"]


def test_greedy_cached_equals_windowed_and_prompt_is_kept():
    model = tiny()
    prompt = jnp.array([3, 1, 4, 1, 5])
    a = model.generate(3, 24, temperature=0.0, prompt=prompt, use_cache=True)
    b = model.generate(3, 24, temperature=0.0, prompt=prompt, use_cache=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :5], np.broadcast_to(prompt, (3, 5)))
    # past the context, the windowed decoder slides on, and says that it is not cached
    with pytest.warns(UserWarning, match="cannot be used"):
        assert model.generate(2, 50, temperature=0.0).shape == (2, 50)


def test_generation_continues_a_learned_count():
    """x[t+1] = x[t] + 1 mod V: the prompt 5, 6, 7, 8 must go on 9, 10, 11, ...

    Catches decoding that samples position t from the logits at t instead of t - 1.
    """
    vocab = 24
    model = tiny(vocab=vocab, seq=16, layers=1)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    starts = np.arange(vocab)[:, None]
    data = jnp.asarray((starts + np.arange(16)[None]) % vocab, jnp.int32)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(
            lambda m: m.train_loss({"sequences": data}, training=False)["loss"])(model)
        opt.update(model, grads)
        return loss

    for _ in range(200):
        loss = step(model, opt)
    assert float(loss) < 0.05
    for use_cache in (True, False):
        out = model.generate(1, 14, temperature=0.0, prompt=jnp.array([5, 6, 7, 8]),
                             use_cache=use_cache)
        np.testing.assert_array_equal(out[0], np.arange(5, 19) % vocab)
    sampled = model.sample_with_conditioning(jnp.array([[5, 6, 7, 8]]), n_samples=3,
                                             temperature=0.5, rngs=nnx.Rngs(sample=0),
                                             max_length=10)
    np.testing.assert_array_equal(sampled, np.broadcast_to(np.arange(5, 15), (3, 10)))


def test_generation_does_not_recompile_per_length_or_knob():
    from chainrule.models.transformer.decode import _decode_cached

    model = tiny()
    model.generate(2, 20, temperature=0.7, top_k=5)
    model.generate(2, 20, temperature=0.7)  # no top-k/top-p: a loop without the sort
    compiled = _decode_cached._cache_size()
    model.generate(2, 25, temperature=0.3, top_p=0.5)  # same length bucket, other knobs
    model.generate(2, 30, temperature=0.0)
    model.generate(2, 30, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2)
    assert _decode_cached._cache_size() == compiled


def test_windowed_generation_compiles_once_for_every_prompt_length():
    from chainrule.models.transformer.decode import _decode_windowed

    model = tiny()
    model.generate(1, 20, temperature=0.0, prompt=[1], use_cache=False)
    compiled = _decode_windowed._cache_size()
    for prompt in ([1, 2], list(range(1, 11))):  # no prefill: nothing to bucket
        model.generate(1, 20, temperature=0.0, prompt=prompt, use_cache=False)
    assert _decode_windowed._cache_size() == compiled
