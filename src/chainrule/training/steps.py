"""The compiled train and eval steps, generic over model families.

The steps take the flat nnx state (model + optimizer), merge it with the static graph
definition inside `jax.jit` (a trace-time cost only) and return the new state. The state is
donated, so parameters and optimizer moments are updated in place, and its shardings are
fixed on the way in and out, so the steps compile once for the mesh. Metrics are summed on
device and only fetched when the loop logs. A step whose loss or gradient is not finite is
not applied (`chainrule.training.nonfinite`).

Mixed precision lives in the models (`dtype`: activations and matmuls in bfloat16, parameters
and optimizer state float32). Gradient accumulation splits each batch into `accum`
micro-batches inside the step (a `lax.scan`). Where a loss scores only some targets (a mask:
padding, silence), it reports how many (`num_scored`), and micro-batches and validation batches
are weighted by it: the sum of nll over the count of scored targets, divided once, exactly as
one whole batch would give.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from chainrule.training import nonfinite

SCORED = "num_scored"  # a loss's count of scored targets: what batches are weighted by


def split_weight(metrics: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array]:
    """(the metrics without the count, the count; 1 for losses that score every target)."""
    metrics = dict(metrics)
    weight = metrics.pop(SCORED, None)
    return metrics, (jnp.ones((), jnp.float32) if weight is None
                     else jnp.asarray(weight, jnp.float32))


class Steps:
    """train_step(state, totals, batch, step) -> (state, totals); evaluate(state, val) -> means.

    `shardings` (of the state) and `batch_sharding`/`val_sharding` pin the layouts; `None`
    leaves them to JAX (a single device).
    """

    def __init__(self, graphdef, base_key: jax.Array, wrt=nnx.Param, *, accum: int = 1,
                 shardings=None, replicated=None):
        self.graphdef = graphdef
        self.base_key = base_key
        self.wrt = wrt  # which variables are trained (all parameters, or a prefix)
        self.accum = accum
        train_out = None if shardings is None else (shardings, replicated)
        self.train_step = jax.jit(self._train_step, donate_argnums=(0, 1),
                                  out_shardings=train_out)
        self.evaluate = jax.jit(self._evaluate, out_shardings=replicated)

    def _grads(self, graphdef, params, rest, batch, key):
        """Gradients (w.r.t. `params`, the trained variables) and loss metrics for one
        (micro-)batch. Plain `jax.grad` over split state, so it also runs inside `lax.scan`."""

        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest)
            metrics = model.train_loss(batch, rngs=nnx.Rngs(dropout=key), training=True)
            return metrics["loss"], metrics

        grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
        return grads, *split_weight(metrics)

    def _accumulated_grads(self, model, batch, step):
        """Mean gradients and metrics over `accum` micro-batches; dropout keys from the step."""
        key = jax.random.fold_in(self.base_key, step)
        graphdef, params, rest = nnx.split(model, self.wrt, ...)
        if self.accum == 1:
            return self._grads(graphdef, params, rest, batch, key)[:2]
        # Micro-batch i takes rows i, i + accum, ...: each device keeps its own rows, so the
        # split moves no data between devices.
        micro = jax.tree.map(lambda x: jnp.swapaxes(
            x.reshape(x.shape[0] // self.accum, self.accum, *x.shape[1:]), 0, 1), batch)

        def one(carry, xs):  # each micro-batch weighted by its count of scored targets
            total, scored = carry
            i, mb = xs
            grads, metrics, weight = self._grads(graphdef, params, rest, mb,
                                                 jax.random.fold_in(key, i))
            total = jax.tree.map(lambda t, x: t + x * weight, total, (grads, metrics))
            return (total, scored + weight), None

        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(self._grads, graphdef, params, rest, first, key)[:2]
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (total, scored), _ = jax.lax.scan(one, (zeros, jnp.zeros((), jnp.float32)),
                                          (jnp.arange(self.accum), micro))
        return jax.tree.map(lambda x: x / jnp.maximum(scored, 1e-9), total)

    def _train_step(self, state, totals, batch, step):
        before = jax.tree.map(lambda x: x, state)  # merge shares `state`'s variables
        model, optimizer = nnx.merge(self.graphdef, state)
        grads, metrics = self._accumulated_grads(model, batch, step)
        optimizer.update(model, grads)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                       count=jnp.ones((), jnp.float32))
        new_state, finite = nonfinite.guard(before, nnx.state((model, optimizer)),
                                            metrics["loss"], metrics["grad_norm"])
        return new_state, nonfinite.accumulate(totals, metrics, finite, step)

    def metric_names(self, state, batch) -> list[str]:
        """The metrics the train step sums (the model's losses, grad_norm, count), and its
        non-finite step counters."""
        def metrics(state, batch):
            model, _ = nnx.merge(self.graphdef, state)
            return self._grads(*nnx.split(model, self.wrt, ...), batch, self.base_key)[1]

        return [*jax.eval_shape(metrics, state, batch), "grad_norm", "count",
                *nonfinite.COUNTERS]

    def flops_per_step(self, state, totals, batch) -> float | None:
        """XLA's count of the train step's FLOPs, all devices together (from the lowered,
        unpartitioned program; no compile)."""
        try:
            cost = self.train_step.lower(state, totals, batch, np.int32(0)).cost_analysis()
        except Exception:  # cost analysis is best-effort on some backends
            return None
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost["flops"]) if cost and "flops" in cost else None

    def _evaluate(self, state, val):
        """Metrics over stacked validation batches (leading axis = batch index), each batch
        weighted by its count of scored targets: sums divided once, not a mean of means."""
        model, _ = nnx.merge(self.graphdef, state)
        per_batch, weights = jax.lax.map(
            lambda b: split_weight(model.train_loss(b, training=False)), val)
        total = jnp.maximum(weights.sum(), 1e-9)
        return {k: (v * weights).sum() / total for k, v in per_batch.items()}


def stack_batches(batches: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """[{k: [B, ...]}] * N -> {k: [N, B, ...]} (host arrays)."""
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}
