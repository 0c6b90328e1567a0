"""Low-rank adapters (Hu et al. 2021, LoRA) on linear projections.

    y = x W + b + (alpha / rank) * (x A) B        A [d_in, rank], B [rank, d_out]

`Linear` is `nnx.Linear` with an optional adapter beside its kernel (`lora_a`, `lora_b`, of
type `LoRAParam`); with rank 0 it is exactly `nnx.Linear`, with the same parameters and paths.
B starts at zero, so a fresh adapter leaves the model's outputs as they were.
`optimizer.trainable=lora` trains the adapters only (the base stays frozen); `merge_lora`
folds them into the kernels (W + alpha / rank * A B) for export and decoding at full speed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from chainrule.config import check

# The projections of a Transformer block that may carry adapters: attention's fused
# query/key/value and output projections, the MLP's two layers.
TARGETS = ("qkv", "proj", "fc", "out")


@dataclasses.dataclass
class LoRAConfig:
    """Adapters on the `targets` projections of every block; rank 0: none."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        check(self.rank >= 0, f"model.lora.rank must be >= 0 (0: no adapters), got {self.rank}")
        check(self.alpha > 0, f"model.lora.alpha must be > 0, got {self.alpha}")
        unknown = [t for t in self.targets if t not in TARGETS]
        check(not unknown and bool(self.targets),
              f"model.lora.targets={list(self.targets)}: expected a non-empty subset of "
              f"{list(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    def rank_for(self, target: str) -> int:
        return self.rank if target in self.targets else 0


class LoRAParam(nnx.Param):
    """Adapter weights: with `optimizer.trainable=lora` the only ones trained."""


class Linear(nnx.Linear):
    """`nnx.Linear` plus an optional low-rank adapter (`lora_rank` > 0)."""

    def __init__(self, in_features: int, out_features: int, *, lora_rank: int = 0,
                 lora_scale: float = 0.0, rngs: nnx.Rngs, **kwargs):
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        self.lora_scale = lora_scale
        if lora_rank:
            # A as nn.Linear's default (Kaiming-uniform, what PEFT uses), B zero.
            bound = 1.0 / math.sqrt(in_features)
            self.lora_a = LoRAParam(jax.random.uniform(
                rngs.params(), (in_features, lora_rank), jnp.float32, -bound, bound))
            self.lora_b = LoRAParam(jnp.zeros((lora_rank, out_features), jnp.float32))
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        if self.lora_a is None:
            return y
        a, b = self.lora_a[...].astype(y.dtype), self.lora_b[...].astype(y.dtype)
        return y + (x.astype(y.dtype) @ a @ b) * jnp.asarray(self.lora_scale, y.dtype)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of `model` with every adapter folded into its kernel and none left: the same
    function (to float32 rounding), the base architecture's parameters, plain `nnx.Linear`
    speed. `model.config.lora` says the scale; a model without adapters comes back as is."""
    lora = model.config.lora
    if not lora.rank:
        return model
    flat = dict(nnx.state(model, nnx.Param).flat_state())
    merged_params = {}
    for path, variable in flat.items():
        name = path[-1]
        if name in ("lora_a", "lora_b"):
            continue
        value = variable[...]
        if name == "kernel" and path[:-1] + ("lora_a",) in flat:
            a, b = flat[path[:-1] + ("lora_a",)][...], flat[path[:-1] + ("lora_b",)][...]
            value = value + lora.scale * (a @ b)
        merged_params[path] = value
    config = dataclasses.replace(model.config, lora=LoRAConfig())
    merged = type(model)(config, rngs=nnx.Rngs(params=0))
    ours = nnx.state(merged, nnx.Param).flat_state()
    nnx.update(merged, nnx.State.from_flat_path(
        {path: variable.replace(merged_params[path]) for path, variable in ours}))
    return merged
