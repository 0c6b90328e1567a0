"""The protocol every chainrule model speaks.

The training loop, the evaluation code, the sampler CLI and the sweeps see only this:

    outputs = model(x, rngs=..., training=...)      # dict with "logits" and anything else
    losses  = model.loss_fn(batch, outputs)          # dict with "loss", "nll_loss", ...
                                                     # (+ "num_scored": targets counted, when
                                                     # a mask leaves some out)
    samples = model.generate(n_samples=..., rngs=..., temperature=..., ...)

`data_key` names the batch entry that holds the modelled data ("sequences", "images",
"waveform"), so generic code can call `model.train_loss(batch)` without knowing the family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

Batch = dict[str, jax.Array]
# Compute dtypes a model config's `dtype` may name; parameters are always float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class ModelConfig:
    """Base of every model config schema. Fields left None that the data decides (the
    vocabulary size, the image shape) are filled by `complete_config` before a model is built."""

    def width(self) -> int | None:
        """The model's hidden width (what the transformer learning-rate schedule scales by)."""
        return None


def complete_config(config: ModelConfig, data_fields: dict[str, Any]) -> ModelConfig:
    """Fill the model fields the data decides (`Codec.model_fields`); refuse contradictions."""
    changes = {}
    for name, value in data_fields.items():
        if not hasattr(config, name):
            continue
        current = getattr(config, name)
        if isinstance(current, list | tuple):
            current, value = tuple(current), tuple(value)
        if current is None:
            changes[name] = value
        elif name == "vocab_size" and current < value:
            raise ValueError(f"model.vocab_size={current} is smaller than the data's vocabulary "
                             f"({value} tokens): token ids would be out of range; remove the "
                             f"override or set model.vocab_size >= {value}")
        elif name != "vocab_size" and current != value:
            raise ValueError(f"model.{name}={current} does not match the data ({value}); remove "
                             f"the override or set model.{name}={value}")
    return dataclasses.replace(config, **changes) if changes else config


class PrefixParam(nnx.Param):
    """Prefix-tuning weights: with `optimizer.trainable=prefix` the only ones trained."""


# What `optimizer.trainable` selects: the variables that get gradients and optimizer state.
TRAINABLE = {"all": nnx.Param, "prefix": PrefixParam}


class AutoregressiveModel(nnx.Module):
    """Base class: a model of p(x) = prod_i p(x_i | x_<i) over discrete symbols."""

    data_key: ClassVar[str] = "sequences"

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None,
                 training: bool = False, **kwargs: Any) -> dict[str, jax.Array]:
        raise NotImplementedError

    def loss_fn(self, batch: Batch, outputs: dict[str, jax.Array], *,
                rngs: nnx.Rngs | None = None, **kwargs: Any) -> dict[str, jax.Array]:
        raise NotImplementedError

    def generate(self, *args: Any, **kwargs: Any) -> jax.Array:
        raise NotImplementedError

    def model_inputs(self, batch: Batch) -> jax.Array:
        """What the training step feeds to `__call__` (families may drop unused positions)."""
        return batch[self.data_key]

    def model_kwargs(self, batch: Batch) -> dict[str, Any]:
        """Extra `__call__` arguments taken from the batch (class labels, speaker ids, ...)."""
        return {}

    def train_loss(self, batch: Batch, *, rngs: nnx.Rngs | None = None,
                   training: bool = True) -> dict[str, jax.Array]:
        """Forward pass and loss in one: what the generic train and eval steps call."""
        outputs = self(self.model_inputs(batch), rngs=rngs, training=training,
                       **self.model_kwargs(batch))
        return self.loss_fn(batch, outputs, rngs=rngs)

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameter count; `non_embedding=True` leaves out token/position embeddings."""
        params = nnx.state(self, nnx.Param)
        total = 0
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            names = "/".join(str(getattr(p, "key", p)) for p in path)
            if non_embedding and "embed" in names.lower():
                continue
            total += leaf.size
        return int(total)


def logical(init, *axes: str | None):
    """Tag an initializer with logical axis names ("embed", "mlp", "heads", "vocab", ...).

    The names are metadata only: nothing is sharded at creation (`eager_sharding=False`). The
    hardware config's axis rules map them to mesh axes when a run is sharded.
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)
