"""LoRA adapters: only they train, they learn, and merging them changes nothing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from chainrule.models import TransformerConfig, TransformerNetworkConfig
from chainrule.models.lora import LoRAConfig, LoRAParam, merge_lora
from chainrule.models.transformer import TransformerAutoregressiveModel


def lora_model(rank=4, targets=("qkv", "proj", "fc", "out"), seed=0):
    net = TransformerNetworkConfig(embed_dim=32, num_heads=2, positional_encoding="learned",
                                   dropout_rate=0.0)
    config = TransformerConfig(vocab_size=16, sequence_length=16, num_layers=2, network=net,
                               lora=LoRAConfig(rank=rank, alpha=8.0, targets=targets))
    model = TransformerAutoregressiveModel(config, rngs=nnx.Rngs(params=seed))
    # Embeddings of a trained model's scale (GPT-2 init's 0.02 caps every tied logit below 1).
    model.token_embed.embedding[...] *= 10.0
    return model


def params(model, kind=nnx.Param):
    return {path: np.asarray(v[...]) for path, v in nnx.state(model, kind).flat_state()}


def train_adapters(model, steps=40):
    """Adam on the adapters alone (what optimizer.trainable=lora builds) on one toy pattern."""
    batch = {"sequences": jnp.tile(jnp.arange(16) % 5, (4, 1))}
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m.train_loss(batch)["loss"],
                                         argnums=nnx.DiffState(0, LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)]


def test_fresh_adapters_change_nothing_and_sit_where_asked():
    model = lora_model(targets=("qkv", "fc"))
    plain = dataclasses.replace(model.config, lora=LoRAConfig())
    base = TransformerAutoregressiveModel(plain, rngs=nnx.Rngs(params=0))
    nnx.update(base, nnx.State.from_flat_path(
        {p: v for p, v in nnx.state(model, nnx.Param).flat_state() if p[-1][:5] != "lora_"}))
    tokens = np.arange(12)[None] % 16
    np.testing.assert_array_equal(np.asarray(model(tokens)["logits"]),
                                  np.asarray(base(tokens)["logits"]))
    names = {path[-2] for path in params(model, LoRAParam)}
    assert names == {"qkv", "fc"}
    assert params(model, LoRAParam)[("blocks", 0, "attn", "qkv", "lora_a")].shape == (32, 4)


def test_only_adapters_train_and_the_loss_falls():
    model = lora_model()
    before = params(model)
    losses = train_adapters(model)
    assert losses[-1] < 0.5 * losses[0]
    after = params(model)
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    assert changed and all(path[-1] == "lora_b" or path[-1] == "lora_a" for path in changed)
    assert any(path[-1] == "lora_b" for path in changed)


def test_merged_equals_unmerged():
    model = lora_model()
    train_adapters(model, steps=10)
    merged = merge_lora(model)
    assert merged.config.lora.rank == 0 and not params(merged, LoRAParam)
    tokens = np.random.default_rng(0).integers(0, 16, (2, 16))
    np.testing.assert_allclose(np.asarray(merged(tokens)["logits"]),
                               np.asarray(model(tokens)["logits"]), atol=1e-5, rtol=0)
    a = np.asarray(model.generate(2, prompt=np.array([1, 2]), max_new_tokens=8, temperature=0.0))
    b = np.asarray(merged.generate(2, prompt=np.array([1, 2]), max_new_tokens=8,
                                   temperature=0.0))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad, match", [({"rank": -1}, "lora.rank"),
                                        ({"targets": ("qkv", "c_attn")}, "lora.targets"),
                                        ({"rank": 4, "alpha": 0.0}, "lora.alpha")])
def test_bad_lora_config_is_one_line(bad, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**bad)


def test_adapter_sizes():
    """rank * (d_in + d_out) per adapted projection, per block."""
    model = lora_model()
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
    d, hidden, rank = 32, 128, 4
    per_block = rank * ((d + 3 * d) + (d + d) + (d + hidden) + (hidden + d))
    assert count == model.config.num_layers * per_block
