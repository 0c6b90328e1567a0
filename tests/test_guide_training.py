"""The user guide's teacher-forcing train step ("Training Autoregressive Models") runs as written,
for every family, with fresh dropout masks at every step.

The step closes over the `rngs` the model was built with and calls the model inside
`nnx.value_and_grad`, where a stream made outside cannot advance (Flax raises TraceContextError:
"Cannot mutate RngCount from a different trace level"). The models then draw from a dropout
stream of their own, which the transform carries because the model is its argument. The
training loop passes its own keys, made inside its compiled step: those are used as before, and
the models' streams are never trained nor checkpointed.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from chainrule.checkpoint import Checkpointer
from chainrule.models import (
    PixelCNN,
    PixelCNNConfig,
    TransformerAR,
    TransformerAutoregressiveModel,
    TransformerConfig,
    TransformerNetworkConfig,
    WaveNet,
    WaveNetConfig,
)
from chainrule.models.base import TRAINABLE
from chainrule.training.nonfinite import state_is_finite
from chainrule.training.restore import checkpointed, with_streams
from chainrule.training.steps import Steps

# The guide's code block, character for character (both copies of the guide hold it).
GUIDE_TRAIN_STEP = '''\
def train_step(model, batch, optimizer_state):
    """Standard teacher forcing training step."""

    def loss_fn(model):
        # Forward pass with ground truth input
        outputs = model(batch['sequences'], training=True, rngs=rngs)

        # Compute loss
        loss_dict = model.loss_fn(batch, outputs, rngs=rngs)

        return loss_dict['loss'], loss_dict

    # Compute gradients
    (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)

    # Update parameters
    optimizer_state = optimizer.update(grads, optimizer_state)

    return loss, metrics, optimizer_state
'''
GUIDES = sorted((Path(__file__).resolve().parents[2] / "shared" / "seeds").glob("*.txt"))


def _transformer(rngs):
    net = TransformerNetworkConfig(embed_dim=16, num_heads=2, dropout_rate=0.1)
    config = TransformerConfig(vocab_size=11, sequence_length=8, network=net, num_layers=1,
                               dropout_rate=0.1)
    return TransformerAutoregressiveModel(config, rngs=rngs)


def _pixelcnn(rngs):
    config = PixelCNNConfig(image_shape=(4, 4, 1), num_levels=4, hidden_channels=8,
                            num_layers=2, num_residual_blocks=1, dropout_rate=0.1)
    return PixelCNN(config, rngs=rngs)


def _wavenet(rngs):
    config = WaveNetConfig(vocab_size=16, residual_channels=8, skip_channels=8, num_blocks=1,
                           layers_per_block=2, dropout_rate=0.1)
    return WaveNet(config, rngs=rngs)


def _transformer_ar(rngs):  # the guide's older flat form
    return TransformerAR(vocab_size=11, sequence_length=8, hidden_dim=16, num_layers=1,
                         num_heads=2, dropout_rate=0.1, rngs=rngs)


# family -> (model builder, the batch key its section of the guide uses, a batch)
FAMILIES = {
    "transformer": (_transformer, "sequences", np.arange(16).reshape(2, 8) % 11),
    "transformer_ar": (_transformer_ar, "sequences", np.arange(16).reshape(2, 8) % 11),
    "pixelcnn": (_pixelcnn, "images", np.arange(32).reshape(2, 4, 4, 1) % 4),
    "wavenet": (_wavenet, "waveform", np.arange(24).reshape(2, 12) % 16),
}


class GuideOptimizer:
    """What the guide's `optimizer_state = optimizer.update(grads, optimizer_state)` needs.

    optax's `update` returns (updates, new state) and applies nothing, and `nnx.Optimizer.update`
    takes (model, grads): as written the line would neither train nor run a second step. This
    minimal wrapper applies optax's updates to the model's parameters and returns the new state.
    """

    def __init__(self, model, tx):
        self.model, self.tx = model, tx

    def init(self):
        return self.tx.init(nnx.state(self.model, nnx.Param))

    def update(self, grads, optimizer_state):
        params = nnx.state(self.model, nnx.Param)
        updates, optimizer_state = self.tx.update(grads, optimizer_state, params)
        nnx.update(self.model, optax.apply_updates(params, updates))
        return optimizer_state


def guide_train_step(data_key: str, rngs: nnx.Rngs, optimizer: GuideOptimizer):
    """The guide's `train_step`, with the names it closes over (`rngs`, `optimizer`); image and
    audio models read their sections' batch key instead of 'sequences'."""
    source = GUIDE_TRAIN_STEP.replace("batch['sequences']", f"batch[{data_key!r}]")
    namespace = {"nnx": nnx, "rngs": rngs, "optimizer": optimizer}
    exec(source, namespace)
    return namespace["train_step"]


def _own_count(model) -> int:
    return int(model.dropout_rngs.dropout.count[...])


@pytest.mark.skipif(not GUIDES, reason="the user guide (../shared/seeds) is not present")
def test_the_snippet_is_the_guides():
    for guide in GUIDES:
        assert GUIDE_TRAIN_STEP in guide.read_text(encoding="utf-8"), guide.name


# transformer_ar (the guide's alias of the Transformer) with the slow tests
@pytest.mark.parametrize("family", [pytest.param(f, marks=[pytest.mark.slow]
                                                 if f == "transformer_ar" else [])
                                    for f in sorted(FAMILIES)])
def test_guide_train_step_runs_with_fresh_dropout_masks(family):
    build, data_key, data = FAMILIES[family]
    rngs = nnx.Rngs(params=0, dropout=1, sample=2)
    model = build(rngs)
    batch = {data_key: jnp.asarray(data, jnp.int32)}
    # Learning rate 0: the parameters stay put, so two steps' losses differ only by their masks.
    optimizer = GuideOptimizer(model, optax.sgd(0.0))
    optimizer_state = optimizer.init()
    train_step = guide_train_step(data_key, rngs, optimizer)

    losses = []
    for _ in range(2):
        loss, metrics, optimizer_state = train_step(model, batch, optimizer_state)
        assert np.isfinite(float(loss)) and float(metrics["loss"]) == float(loss)
        losses.append(float(loss))
    assert losses[0] != losses[1], "two steps drew the same dropout masks"
    assert _own_count(model) > 0  # the model's own stream advanced, carried out of the transform

    # Evaluation draws nothing: the same outputs every call; training outputs differ from them.
    x = batch[data_key]
    evaluated = [model(x, training=False, rngs=rngs)["logits"] for _ in range(2)]
    np.testing.assert_array_equal(evaluated[0], evaluated[1])
    assert not np.array_equal(model(x, training=True, rngs=rngs)["logits"], evaluated[0])


@pytest.mark.slow  # the snippet runs in the fast suite (..._with_fresh_dropout_masks, lr 0)
@pytest.mark.parametrize("family", ["transformer", "pixelcnn", "wavenet"])
def test_guide_train_step_trains(family):
    build, data_key, data = FAMILIES[family]
    rngs = nnx.Rngs(params=0, dropout=1, sample=2)
    model = build(rngs)
    batch = {data_key: jnp.asarray(data, jnp.int32)}
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    optimizer = GuideOptimizer(model, optax.adam(1e-2))
    optimizer_state = optimizer.init()
    train_step = guide_train_step(data_key, rngs, optimizer)
    for _ in range(3):
        _, _, optimizer_state = train_step(model, batch, optimizer_state)
    after = nnx.state(model, nnx.Param)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
    assert any(changed)


@pytest.mark.parametrize("family", ["transformer", "pixelcnn", "wavenet"])
def test_rngs_that_can_be_drawn_from_decide_the_masks(family):
    """Outside a transform (or made inside it) the given rngs are used, as before: the same
    seed gives the same masks and the model's own stream is left alone."""
    build, data_key, data = FAMILIES[family]
    model = build(nnx.Rngs(params=0, dropout=1))
    x = jnp.asarray(data, jnp.int32)
    first, second = (model(x, training=True, rngs=nnx.Rngs(dropout=7))["logits"]
                     for _ in range(2))
    np.testing.assert_array_equal(first, second)
    assert _own_count(model) == 0

    @jax.jit
    def in_trace(state, x, key):  # the training loop's way: split state, Rngs made in the trace
        return nnx.merge(graphdef, state)(x, training=True, rngs=nnx.Rngs(dropout=key))["logits"]

    graphdef, state = nnx.split(model)
    # Compiled, the arithmetic may round differently; a different mask would be far off.
    np.testing.assert_allclose(in_trace(state, x, jax.random.key(7)), first, rtol=1e-5,
                               atol=1e-5)
    assert _own_count(model) == 0


def test_models_keep_their_stream_out_of_parameters_and_the_callers_rngs():
    rngs = nnx.Rngs(params=0)
    model = _transformer(rngs)
    streams = nnx.state(model, nnx.RngState)
    assert len(jax.tree.leaves(streams)) == 2  # one key, one count
    assert model.num_params() == sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # Without a dropout stream the key is derived, not drawn: the parameter stream only
    # advanced for the parameters, so a second model's parameters are what they always were.
    count = int(rngs.params.count[...])
    _transformer(rngs)
    assert int(rngs.params.count[...]) == 2 * count
    # Two models built from one Rngs get different streams.
    rngs = nnx.Rngs(params=0, dropout=1)
    a, b = _transformer(rngs), _transformer(rngs)
    assert not np.array_equal(jax.random.key_data(a.dropout_rngs.dropout.key[...]),
                              jax.random.key_data(b.dropout_rngs.dropout.key[...]))


def test_training_steps_pass_the_stream_through_and_checkpoints_leave_it_out(tmp_path):
    """The compiled train step uses its own keys (the model's stream is untouched), the finite
    check skips PRNG keys, and a checkpoint holds what it held before models had streams."""
    build, data_key, data = FAMILIES["transformer"]
    model = build(nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=TRAINABLE["all"])
    graphdef, state = nnx.split((model, optimizer))
    steps = Steps(graphdef, jax.random.key(3))
    batch = {data_key: jnp.asarray(data, jnp.int32)}
    totals = {k: jnp.zeros((), jnp.float32) for k in steps.metric_names(state, batch)}
    key_before = np.asarray(jax.random.key_data(model.dropout_rngs.dropout.key[...]))
    state, totals = steps.train_step(state, totals, batch, np.int32(0))
    assert float(totals["count"]) == 1.0 and float(totals["nonfinite_steps"]) == 0.0
    assert bool(state_is_finite(state))
    trained, _ = nnx.merge(graphdef, state)
    assert _own_count(trained) == 0
    np.testing.assert_array_equal(jax.random.key_data(trained.dropout_rngs.dropout.key[...]),
                                  key_before)

    saved = checkpointed(state)
    assert not jax.tree.leaves(nnx.filter_state(saved, nnx.RngState))
    assert len(jax.tree.leaves(saved)) == len(jax.tree.leaves(state)) - 2
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"model": saved})
        fresh = build(nnx.Rngs(params=5, dropout=6))
        _, fresh_state = nnx.split((fresh, nnx.Optimizer(fresh, optax.adam(1e-3),
                                                         wrt=nnx.Param)))
        restored = ckpt.restore({"model": checkpointed(fresh_state)})
    model, _ = nnx.merge(graphdef, with_streams(restored.state["model"], fresh_state))
    x = batch[data_key]
    np.testing.assert_array_equal(model(x)["logits"], trained(x)["logits"])
    np.testing.assert_array_equal(jax.random.key_data(model.dropout_rngs.dropout.key[...]),
                                  jax.random.key_data(fresh.dropout_rngs.dropout.key[...]))
