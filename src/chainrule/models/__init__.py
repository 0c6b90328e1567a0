"""Model families and their configs, under the names of the user guide.

`build_model(config, rngs=...)` picks the family from the config's type, so generic code
(train.py, sample.py, sweeps) never names a family.
"""

from __future__ import annotations

from flax import nnx

from chainrule.models.base import AutoregressiveModel
from chainrule.models.guide import ConditionalPixelCNN, PrefixTunedTransformer, TransformerAR
from chainrule.models.pixelcnn import PixelCNN, PixelCNNConfig
from chainrule.models.transformer import (
    TransformerAutoregressiveModel,
    TransformerConfig,
    TransformerNetworkConfig,
)
from chainrule.models.wavenet import WaveNet, WaveNetConfig

MODEL_FAMILIES: dict[type, type[AutoregressiveModel]] = {
    TransformerConfig: TransformerAutoregressiveModel,
    PixelCNNConfig: PixelCNN,
    WaveNetConfig: WaveNet,
}


def family_name(config) -> str:
    return type(config).__name__.removesuffix("Config").lower()


def build_model(config, *, rngs: nnx.Rngs) -> AutoregressiveModel:
    try:
        cls = MODEL_FAMILIES[type(config)]
    except KeyError:
        known = ", ".join(t.__name__ for t in MODEL_FAMILIES)
        raise ValueError(f"no model family for config type {type(config).__name__}; "
                         f"known: {known}") from None
    return cls(config, rngs=rngs)


__all__ = [
    "AutoregressiveModel",
    "ConditionalPixelCNN",
    "MODEL_FAMILIES",
    "PixelCNN",
    "PixelCNNConfig",
    "PrefixTunedTransformer",
    "TransformerAR",
    "TransformerAutoregressiveModel",
    "TransformerConfig",
    "TransformerNetworkConfig",
    "WaveNet",
    "WaveNetConfig",
    "build_model",
    "family_name",
]
