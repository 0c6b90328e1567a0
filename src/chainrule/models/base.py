"""The protocol every chainrule model speaks.

The training loop, the evaluation code, the sampler CLI and the sweeps see only this:

    outputs = model(x, rngs=..., training=...)      # dict with "logits" and anything else
    losses  = model.loss_fn(batch, outputs)          # dict with "loss", "nll_loss", ...
                                                     # (+ "num_scored": targets counted, when
                                                     # a mask leaves some out)
    samples = model.generate(n_samples=..., rngs=..., temperature=..., ...)

`data_key` names the batch entry that holds the modelled data ("sequences", "images",
"waveform"), so generic code can call `model.train_loss(batch)` without knowing the family.

Dropout keys come from the `rngs` a training forward pass is given. Every model also keeps a
dropout stream of its own (`dropout_rngs`, made when it is built), used only when the given
`rngs` cannot be drawn from where the model runs: the user guide's train step closes over its
`rngs` inside `nnx.value_and_grad`, and a stream made outside a transform cannot advance inside
it. The model is the transform's argument, so its own stream does advance there: each step still
gets fresh masks. The stream is state (`nnx.RngState`) but not a parameter: it is not counted,
trained or checkpointed (`chainrule.training.restore.checkpointed`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from chainrule.models.lora import LoRAParam

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
TRAINABLE = {"all": nnx.Param, "prefix": PrefixParam, "lora": LoRAParam}


# Folded into the constructor's parameter key to derive a model's own dropout key when its
# `rngs` have no dropout stream (b"drop").
_OWN_DROPOUT = 0x64726F70


def _own_dropout_key(rngs: nnx.Rngs) -> jax.Array:
    """The key of a model's own dropout stream. From a "dropout" stream: one draw of it (what
    `nnx.Dropout(rate, rngs=rngs)` takes). Without one (the training loop builds models from
    `nnx.Rngs(params=seed)`): derived from the parameter stream without drawing from it, so the
    parameters of this model and of later ones built from `rngs` are what they were."""
    if "dropout" in rngs:
        return rngs.dropout()
    stream = rngs["params"]  # or the default stream
    return jax.random.fold_in(jax.random.fold_in(stream.key[...], stream.count[...]),
                              _OWN_DROPOUT)


def _drawable(rngs: nnx.Rngs | nnx.RngStream | jax.Array) -> bool:
    """Whether dropout keys can be drawn from `rngs` here: a raw key always can; a stream
    created in an outer trace cannot advance its count in this one (Flax raises
    TraceContextError). Rngs without a dropout stream pass (the layers say what is missing)."""
    if isinstance(rngs, nnx.Rngs):
        if "dropout" not in rngs and "default" not in rngs:
            return True
        rngs = rngs["dropout"]
    if isinstance(rngs, nnx.RngStream):
        return getattr(rngs.count, "_can_update", True)
    return True


class AutoregressiveModel(nnx.Module):
    """Base class: a model of p(x) = prod_i p(x_i | x_<i) over discrete symbols.

    Families call `_keep_dropout_stream(rngs)` at the end of `__init__` and pass the `rngs` of
    a forward pass through `_training_rngs` before their dropout layers see them.
    """

    data_key: ClassVar[str] = "sequences"

    def _keep_dropout_stream(self, rngs: nnx.Rngs) -> None:
        """Give the model its own dropout stream (see the module docstring)."""
        self.dropout_rngs = nnx.Rngs(dropout=_own_dropout_key(rngs))

    def _training_rngs(self, rngs, training: bool):
        """The rngs dropout draws from: `rngs` as given, unless it is a stream of an outer
        trace (the guide's train step), then the model's own stream."""
        if not training or rngs is None or _drawable(rngs):
            return rngs
        return self.dropout_rngs

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
