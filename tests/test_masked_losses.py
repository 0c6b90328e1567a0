"""Padding is never scored, and batches with different numbers of scored targets combine as
one whole batch would: the sum of nll over the count of scored targets, divided once (audit
findings: the WaveNet loss counted the silence that pads short clips, and evaluation and
gradient accumulation averaged per-batch means)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from chainrule.data.audio import AudioDataConfig, load_clips, mu_law_encode
from chainrule.data.base import build_data
from chainrule.models import WaveNet, WaveNetConfig
from chainrule.training.steps import Steps

LENGTH = 33
MASKS = np.array([[1] * LENGTH, [1] * 20 + [0] * 13, [1] * LENGTH, [1] * 5 + [0] * 28])


def tiny_wavenet() -> WaveNet:
    config = WaveNetConfig(vocab_size=16, residual_channels=8, skip_channels=8, num_blocks=1,
                           layers_per_block=3)
    return WaveNet(config, rngs=nnx.Rngs(params=0))


def masked_batch() -> dict[str, np.ndarray]:
    codes = np.random.default_rng(0).integers(0, 16, (4, LENGTH)).astype(np.int32)
    return {"waveform": np.where(MASKS == 1, codes, 8), "loss_mask": MASKS.astype(np.int32)}


def reference_nll(model: WaveNet, batch: dict[str, np.ndarray]) -> tuple[float, float]:
    """(sum of nll over the scored targets, their count), in float64 with numpy."""
    logits = np.asarray(model(jnp.asarray(batch["waveform"]))["logits"], np.float64)[:, :-1]
    targets, scored = batch["waveform"][:, 1:], batch["loss_mask"][:, 1:] == 1
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return float(nll[scored].sum()), float(scored.sum())


def test_audio_crops_mark_the_silence_that_pads_short_clips():
    config = AudioDataConfig(sequence_length=9000, batch_size=4, val_batches=2)  # clips: 8000
    bundle = build_data(config)
    silence = int(mu_law_encode(np.zeros(1), config.mu)[0])
    clip_lengths = {len(c) for c in load_clips(config)[0]["train"].codes}
    for batch in [next(bundle.train), *bundle.val_batches]:
        mask = batch["loss_mask"]
        assert mask.shape == batch["waveform"].shape
        assert set(mask.sum(1).tolist()) <= clip_lengths  # every real sample, nothing more
        assert (batch["waveform"][mask == 0] == silence).all()
        assert (np.diff(mask, axis=1) <= 0).all()  # the padding is at the end


def test_the_wavenet_loss_leaves_padding_out():
    model, batch = tiny_wavenet(), masked_batch()
    total, count = reference_nll(model, batch)
    losses = model.loss_fn(batch, model(jnp.asarray(batch["waveform"])))
    assert float(losses["nll_loss"]) == pytest.approx(total / count, rel=1e-5)
    assert float(losses["num_scored"]) == count


def test_evaluation_divides_summed_nll_by_the_scored_count():
    model = tiny_wavenet()
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    batch = masked_batch()
    val = {k: np.stack([v[:2], v[2:]]) for k, v in batch.items()}  # 64 and 36 scored targets
    metrics = Steps(graphdef, jax.random.key(0)).evaluate(state, val)
    total, count = reference_nll(model, batch)
    assert float(metrics["nll_loss"]) == pytest.approx(total / count, rel=1e-5)
    halves = [reference_nll(model, {k: v[s] for k, v in batch.items()})
              for s in (slice(0, 2), slice(2, 4))]
    mean_of_means = np.mean([t / c for t, c in halves])
    assert abs(mean_of_means - total / count) > 1e-3  # the old average would be visibly off


def test_gradient_accumulation_with_masks_equals_the_whole_batch():
    model = tiny_wavenet()
    optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    batch = {k: jnp.asarray(v) for k, v in masked_batch().items()}  # micro-batches: rows 0, 2
    results = []                                                     # and 1, 3: 64 vs 23 scored
    for accum in (1, 2):
        steps = Steps(graphdef, jax.random.key(0), accum=accum)
        fresh = jax.tree.map(jnp.copy, state)
        totals = {k: jnp.zeros((), jnp.float32) for k in steps.metric_names(fresh, batch)}
        new_state, totals = steps.train_step(fresh, totals, batch, np.int32(1))
        results.append((jax.tree.leaves(nnx.state(nnx.merge(graphdef, new_state)[0],
                                                   nnx.Param)), float(totals["loss"])))
    (whole, whole_loss), (accumulated, accumulated_loss) = results
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-5)
    for a, b in zip(whole, accumulated, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
