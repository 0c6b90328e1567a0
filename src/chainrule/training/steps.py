"""Compiled train and eval steps over (model, optimizer) state, for any model family.

The step functions are pure: they take the flat nnx state, merge it with the static graph
definition inside `jax.jit` (a trace-time cost only) and return the new state. The state is
donated, so parameters and optimizer moments are updated in place. Metrics are summed on
device and only fetched when the loop logs. A step whose loss or gradient is not finite is
not applied (`chainrule.training.nonfinite`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from chainrule.training import nonfinite


class Steps:
    """train_step(state, totals, batch, step) -> (state, totals); eval(state, val) -> means."""

    def __init__(self, graphdef, base_key: jax.Array, wrt=nnx.Param):
        self.graphdef = graphdef
        self.base_key = base_key
        self.wrt = wrt  # which variables are trained (all parameters, or a prefix)
        self.train_step = jax.jit(self._train_step, donate_argnums=(0, 1))
        self.evaluate = jax.jit(self._evaluate)

    def _grads(self, model, batch, step):
        """Gradients and loss metrics for one batch; dropout keys derive from the step."""
        key = jax.random.fold_in(self.base_key, step)

        def loss_fn(model):
            rngs = nnx.Rngs(dropout=key)  # made inside the transform: nnx tracks its trace
            metrics = model.train_loss(batch, rngs=rngs, training=True)
            return metrics["loss"], metrics

        grads, metrics = nnx.grad(loss_fn, argnums=nnx.DiffState(0, self.wrt),
                                  has_aux=True)(model)
        return grads, metrics

    def _train_step(self, state, totals, batch, step):
        before = jax.tree.map(lambda x: x, state)  # merge shares `state`'s variables
        model, optimizer = nnx.merge(self.graphdef, state)
        grads, metrics = self._grads(model, batch, step)
        optimizer.update(model, grads)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                       count=jnp.ones((), jnp.float32))
        new_state, finite = nonfinite.guard(before, nnx.state((model, optimizer)),
                                            metrics["loss"], metrics["grad_norm"])
        return new_state, nonfinite.accumulate(totals, metrics, finite, step)

    def zero_totals(self, state, batch) -> dict[str, jax.Array]:
        """Zeroed metric sums with the structure the train step produces."""
        def metrics(state, batch):
            model, _ = nnx.merge(self.graphdef, state)
            return self._grads(model, batch, jnp.int32(0))[1]

        shapes = jax.eval_shape(metrics, state, batch)
        totals = {k: jnp.zeros((), jnp.float32) for k in shapes}
        totals["grad_norm"] = jnp.zeros((), jnp.float32)
        totals["count"] = jnp.zeros((), jnp.float32)
        return totals | nonfinite.zero_counters()

    def flops_per_step(self, state, totals, batch) -> float | None:
        """XLA's count of the train step's FLOPs (from the lowered program; no compile)."""
        try:
            cost = self.train_step.lower(state, totals, batch, jnp.int32(0)).cost_analysis()
        except Exception:  # cost analysis is best-effort on some backends
            return None
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost["flops"]) if cost and "flops" in cost else None

    def _evaluate(self, state, val):
        """Mean metrics over stacked validation batches (leading axis = batch index)."""
        model, _ = nnx.merge(self.graphdef, state)
        per_batch = jax.lax.map(lambda b: model.train_loss(b, training=False), val)
        return jax.tree.map(jnp.mean, per_batch)


def stack_batches(batches: list[dict[str, Any]]) -> dict[str, jax.Array]:
    """[{k: [B, ...]}] * N -> {k: [N, B, ...]} on device, once."""
    return {k: jnp.stack([jnp.asarray(b[k]) for b in batches]) for k in batches[0]}
