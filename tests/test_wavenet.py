"""WaveNet: config (both API generations), causality, receptive field, loss, generation."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from chainrule.models.wavenet import WaveNet, WaveNetConfig

TINY = dict(vocab_size=32, residual_channels=8, skip_channels=16, num_blocks=2,
            layers_per_block=3, sequence_length=64)
# The other structures under test (few of them: every new one costs compiles).
WIDE_KERNEL = dict(kernel_size=3, dilation_base=3, use_gated_activation=False)
CONDITIONED = dict(num_classes=3)


def tiny(**overrides) -> WaveNet:
    return WaveNet(WaveNetConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(0))


# Compiled once per model structure and input shape: eager dispatch of every small op is slow.
@nnx.jit
def forward(model, x, labels=None):
    return model(x, global_condition=labels)["logits"]


def codes(shape, vocab=32, seed=0) -> np.ndarray:
    # numpy in, numpy out: eager jax ops on every new shape would each compile.
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


# ----------------------------------------------------------------------------- config


def test_guide_config_and_true_receptive_field():
    config = WaveNetConfig(name="wavenet_audio", vocab_size=256, sequence_length=16000,
                           residual_channels=128, skip_channels=512, num_blocks=3,
                           layers_per_block=10, kernel_size=2, dilation_base=2,
                           use_gated_activation=True)
    assert config.dilations == tuple(2**i for i in range(10)) * 3
    # The guide's "1024 time steps" is one stack; three stacks see 1 + 3 * 1023.
    assert dataclasses.replace(config, num_blocks=1).receptive_field == 1024
    assert config.receptive_field == 3070
    assert WaveNetConfig(kernel_size=3, dilation_base=3, num_blocks=2,
                         layers_per_block=2).receptive_field == 1 + 2 * 2 * (1 + 3)


def test_old_keywords_map_onto_blocks():
    config = WaveNetConfig(num_layers=30, num_stacks=3)
    assert (config.num_blocks, config.layers_per_block) == (3, 10)
    assert config.num_layers is None and config.num_stacks is None  # consumed
    assert dataclasses.replace(config, num_blocks=2).num_blocks == 2  # replace stays consistent
    assert WaveNetConfig(num_layers=12).layers_per_block == 4  # old default num_stacks=3
    with pytest.raises(ValueError, match="num_layers=10 must be a positive multiple of num_st"):
        WaveNetConfig(num_layers=10, num_stacks=3)


def test_old_constructor_form():
    model = nnx.eval_shape(lambda: WaveNet(num_layers=4, num_stacks=2, residual_channels=8,
                                           dilation_channels=12, skip_channels=16, vocab_size=32,
                                           rngs=nnx.Rngs(0)))
    assert [layer.dilation for layer in model.layers] == [1, 2, 1, 2]
    assert model.layers[0].conv.kernel.shape == (2 * 8, 2 * 12)  # gate: 2 x dilation_channels
    assert model.layers[0].out.kernel.shape == (12, 8 + 16)
    graphdef, state = nnx.split(model)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x)["logits"], state,
                            codes((2, 10)))
    assert logits.shape == (2, 10, 32)


@pytest.mark.parametrize("bad, match", [
    (dict(kernel_size=1), "kernel_size must be >= 2"),
    (dict(dropout_rate=1.0), r"dropout_rate must be in \[0, 1\)"),
    (dict(num_classes=0), "num_classes must be None or >= 1"),
    (dict(vocab_size=1), "vocab_size must be None"),
    (dict(residual_channels=0), "residual_channels must be an integer >= 1"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        WaveNetConfig(**bad)


def test_unknown_keyword_and_missing_vocab():
    with pytest.raises(ValueError, match="unknown WaveNet keyword"):
        WaveNet(hidden_dim=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vocab_size is None"):
        WaveNet(WaveNetConfig(vocab_size=None), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- forward


def test_causality():
    model = tiny()
    x = codes((2, 40))
    base = np.asarray(forward(model, x))
    for t in (0, 7, 25):
        changed = x.copy()
        changed[:, t + 1:] = (x[:, t + 1:] + 5) % 32
        out = np.asarray(forward(model, changed))
        np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
        assert not np.allclose(out[:, t + 1], base[:, t + 1])


@pytest.mark.parametrize("overrides", [{}, WIDE_KERNEL])
def test_receptive_field_by_gradients(overrides):
    model = tiny(**overrides)
    rf = model.receptive_field
    length = rf + 10
    t = length - 3
    h = model.embed(codes((1, length)))

    grads = nnx.jit(nnx.grad(lambda h, m: m.logits_from_embeddings(h)[0, t].sum()))(h, model)
    influence = np.abs(np.asarray(grads[0])).sum(-1)
    assert influence[t - rf + 1] > 0 and influence[t] > 0
    assert np.all(influence[: t - rf + 1] == 0)  # too far back
    assert np.all(influence[t + 1:] == 0)  # the future


def test_loss_against_reference():
    model = tiny()
    x = codes((2, 40))
    outputs = {"logits": forward(model, x)}  # what the guide's model(x, rngs=rngs) returns
    losses = model.loss_fn({"waveform": x}, outputs, rngs=nnx.Rngs(0))
    logits = np.asarray(outputs["logits"], np.float64)[:, :-1]
    targets = np.asarray(x)[:, 1:]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    np.testing.assert_allclose(losses["nll_loss"], nll, rtol=1e-5)
    np.testing.assert_allclose(losses["loss"], nll, rtol=1e-5)
    np.testing.assert_allclose(losses["bits_per_sample"], nll / math.log(2), rtol=1e-5)
    np.testing.assert_allclose(losses["accuracy"], (logits.argmax(-1) == targets).mean())
    # The training path feeds waveform[:, :-1] (logits one shorter): same loss.
    train_loss = nnx.jit(lambda m, b: m.train_loss(b, training=False))(model, {"waveform": x})
    np.testing.assert_allclose(train_loss["loss"], nll, rtol=1e-5)


def test_bad_inputs():
    model = tiny()
    with pytest.raises(ValueError, match="integer μ-law codes.*float32"):
        model(jnp.zeros((1, 8), jnp.float32))
    with pytest.raises(ValueError, match="code 32 is out of range"):
        model(jnp.full((1, 8), 32, jnp.int32))
    with pytest.raises(ValueError, match="code -1 is out of range"):
        model(jnp.full((1, 8), -1, jnp.int32))
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        model(jnp.zeros((8,), jnp.int32))
    with pytest.raises(ValueError, match="num_classes=None"):
        model(codes((1, 8)), global_condition=jnp.zeros(1, jnp.int32))
    conditioned = tiny(**CONDITIONED)
    with pytest.raises(ValueError, match="class-conditioned"):
        conditioned(codes((1, 8)))
    with pytest.raises(ValueError, match="global_condition id 3 is out of range"):
        conditioned(codes((1, 8)), global_condition=jnp.array([3]))


def test_conditioning_changes_the_distribution():
    model = tiny(**CONDITIONED)
    x = codes((2, 40))
    probs = [np.asarray(jax.nn.softmax(forward(model, x, np.full(2, c)))) for c in range(3)]
    assert np.abs(probs[0] - probs[1]).max() > 1e-2
    assert np.abs(probs[1] - probs[2]).max() > 1e-2
    np.testing.assert_array_equal(probs[0], jax.nn.softmax(forward(model, x, np.zeros(2, int))))
    # model_kwargs hands the batch labels to the model.
    batch = {"waveform": x, "labels": np.array([0, 1])}
    assert set(model.model_kwargs(batch)) == {"global_condition"}
    assert tiny().model_kwargs(batch) == {}


def test_dropout_only_in_training():
    model = tiny(dropout_rate=0.5, num_blocks=1)
    x = codes((1, 16))
    run = nnx.jit(lambda m, x, training, rngs: m(x, training=training, rngs=rngs)["logits"],
                  static_argnums=2)
    eval_a, eval_b = run(model, x, False, nnx.Rngs(dropout=1)), run(model, x, False, None)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, train_b = run(model, x, True, nnx.Rngs(dropout=1)), run(model, x, True,
                                                                      nnx.Rngs(dropout=2))
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)


def test_overfits_one_batch():
    model = tiny(num_blocks=1)  # receptive field 8
    # A periodic waveform: perfectly predictable from the receptive field.
    wave = ((np.sin(np.arange(97) * 2 * np.pi / 12) + 1) * 15.5).astype(np.int32)
    batch = {"waveform": np.stack([wave[:-1], wave[1:]])}
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(lambda m: m.train_loss(batch, training=True)["loss"])(
            model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, batch)) for _ in range(40)]
    assert losses[-1] < 0.2 * losses[0], losses


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("overrides, n, kwargs", [
    ({}, 2, dict(temperature=0.7, prefix=[3, 4, 5, 6, 7])),
    (CONDITIONED, 3, dict(global_condition=[2, 1, 0])),
    pytest.param(WIDE_KERNEL, 3, dict(temperature=1.2, top_p=0.95, prefix=[[1, 2], [3, 4], [5, 6]]),
                 marks=pytest.mark.slow),
])
def test_fast_generation_equals_naive(overrides, n, kwargs):
    model = tiny(**overrides)
    fast = model.generate(n_samples=n, max_length=40, rngs=nnx.Rngs(sample=7), **kwargs)
    naive = model.generate_naive(n_samples=n, max_length=40, rngs=nnx.Rngs(sample=7), **kwargs)
    assert fast.shape == (n, 40) and fast.dtype == jnp.int32
    fast = np.asarray(fast)
    assert fast.min() >= 0 and fast.max() < 32
    np.testing.assert_array_equal(fast, naive)
    if "prefix" in kwargs:
        prefix = np.broadcast_to(kwargs["prefix"], (n, np.shape(kwargs["prefix"])[-1]))
        np.testing.assert_array_equal(fast[:, : prefix.shape[1]], prefix)


def test_greedy_generation_follows_the_forward_argmax():
    model = tiny()
    prefix = codes((2, 4), seed=3)
    out = np.asarray(model.generate(n_samples=2, max_length=40, temperature=0.0, prefix=prefix))
    logits = np.asarray(forward(model, out))
    np.testing.assert_array_equal(out[:, :4], prefix)
    np.testing.assert_array_equal(out[:, 4:], logits[:, 3:-1].argmax(-1))


def test_generation_keys_and_defaults():
    model = tiny(**CONDITIONED)
    a = np.asarray(model.generate(n_samples=3, rngs=nnx.Rngs(sample=1)))
    assert a.shape == (3, 64)  # default: config.sequence_length
    np.testing.assert_array_equal(a[:, 0], 16)  # one sample of silence, vocab_size // 2
    np.testing.assert_array_equal(a, model.generate(n_samples=3, rngs=nnx.Rngs(sample=1)))
    assert not np.array_equal(a, model.generate(n_samples=3, rngs=nnx.Rngs(sample=2)))
    # Without labels a conditioned model cycles through the classes.
    np.testing.assert_array_equal(a, model.generate(n_samples=3, rngs=nnx.Rngs(sample=1),
                                                    global_condition=[0, 1, 2]))
    assert not np.array_equal(a, model.generate(n_samples=3, rngs=nnx.Rngs(sample=1),
                                                global_condition=[1, 0, 2]))
    # `prompt` is another name for `prefix` (what sample.py passes).
    np.testing.assert_array_equal(
        model.generate(n_samples=3, max_length=20, prompt=[1, 2], rngs=nnx.Rngs(sample=1)),
        model.generate(n_samples=3, max_length=20, prefix=[1, 2], rngs=nnx.Rngs(sample=1)))


def test_generation_compiles_once_per_length_bucket(monkeypatch):
    model = tiny()
    model.generate(n_samples=2, max_length=129, temperature=0.5)  # compiled here (or earlier)
    traces = []
    step = WaveNet.step
    monkeypatch.setattr(WaveNet, "step", lambda self, *a: traces.append(1) or step(self, *a))
    for length in (130, 200, 256):  # the same bucket of 256
        assert model.generate(n_samples=2, max_length=length, temperature=0.9).shape == (2, length)
    assert traces == []  # nor does a new temperature (the knobs are traced values)
    model.generate(n_samples=2, max_length=257, temperature=0.9)  # the next bucket: 512
    assert traces == [1]


def test_bad_generation_arguments():
    model = tiny()
    with pytest.raises(ValueError, match="prefix length 5 exceeds max_length=4"):
        model.generate(max_length=4, prefix=[1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1"):
        model.generate(n_samples=0)
    with pytest.raises(ValueError, match=r"prefix has shape \(3, 2\)"):
        model.generate(n_samples=2, prefix=jnp.zeros((3, 2), jnp.int32))
    with pytest.raises(ValueError, match="prefix code 40 is out of range"):
        model.generate(prefix=[40])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate(temperature=-1.0)
