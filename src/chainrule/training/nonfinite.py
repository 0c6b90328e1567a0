"""Non-finite steps: a NaN or Inf never reaches the training state or a checkpoint.

Inside the compiled train step, `guard` keeps the state a step started from when the step's
loss or gradient norm is not finite (one `jnp.where` per array, no host round trip), and
`accumulate` leaves such a step out of the metric sums while counting it. The host sees the
counters only when it already fetches the totals (to log, or before a checkpoint):
`NonFinite.take` reads them, and the loop then stops (trainer.on_nonfinite=stop, the default)
or carries on having skipped the step (trainer.on_nonfinite=skip). An update that overflows
with a finite loss and gradient is caught by `state_is_finite` before every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# Totals entries that are counters, not metric sums ("first_*" hold the first bad step's values).
COUNTERS = ("nonfinite_steps", "first_nonfinite_step", "first_nonfinite_loss",
            "first_nonfinite_grad_norm")


def guard(old_state, new_state, loss: jax.Array, grad_norm: jax.Array):
    """(state, finite): `new_state` when the step is finite, else `old_state` unchanged."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
    return state, finite


@jax.jit
def state_is_finite(tree) -> jax.Array:
    """True when every floating-point array of `tree` is finite. x * 0 is 0 for finite x and
    NaN for Inf or NaN, so one sum of them tells, with no overflow and one scalar out."""
    zeros = [jnp.sum(x * 0) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.isfinite(sum(zeros, jnp.zeros((), jnp.float32)))


def accumulate(totals: dict, metrics: dict, finite: jax.Array, step: jax.Array) -> dict:
    """Add a step's metrics to the sums (a non-finite step adds nothing but its counter)."""
    out = {k: totals[k] + jnp.where(finite, metrics[k].astype(jnp.float32), 0.0)
           for k in totals if k not in COUNTERS}
    first = (~finite) & (totals["nonfinite_steps"] == 0)
    out["nonfinite_steps"] = totals["nonfinite_steps"] + jnp.where(finite, 0.0, 1.0)
    for key, value in (("first_nonfinite_step", step), ("first_nonfinite_loss", metrics["loss"]),
                       ("first_nonfinite_grad_norm", metrics["grad_norm"])):
        out[key] = jnp.where(first, value.astype(jnp.float32), totals[key])
    return out


@dataclasses.dataclass
class NonFinite:
    """The non-finite steps since the totals were last reset (fetched to the host)."""

    count: int
    first_step: int
    loss: float
    grad_norm: float

    @classmethod
    def take(cls, host_totals: dict[str, float]) -> NonFinite:
        """Pop the counters out of fetched totals (what is left are the metric sums)."""
        values = {k: host_totals.pop(k) for k in COUNTERS}
        return cls(count=int(values["nonfinite_steps"]),
                   first_step=int(values["first_nonfinite_step"]),
                   loss=values["first_nonfinite_loss"],
                   grad_norm=values["first_nonfinite_grad_norm"])

    def describe(self) -> str:
        """What went wrong at the first non-finite step, naming the metric."""
        if math.isfinite(self.loss):
            what = f"the gradient norm is {self.grad_norm} (loss {self.loss:.4g})"
        else:
            what = f"the training loss is {self.loss}"
        more = f" ({self.count} non-finite steps in all)" if self.count > 1 else ""
        return f"step {self.first_step}: {what}{more}"
