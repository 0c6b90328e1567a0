"""Model families and their configs, under the names of the user guide.

Each family registers its config schema with the model class it builds (the `model` config
group), so `build_model(config, rngs=...)` picks the family from the config's type and generic
code (train.py, sample.py, sweeps) never names a family.
"""

from __future__ import annotations

from flax import nnx

from chainrule.config import build, register, schema_of
from chainrule.models.base import AutoregressiveModel, ModelConfig, complete_config
from chainrule.models.guide import ConditionalPixelCNN, PrefixTunedTransformer, TransformerAR
from chainrule.models.hf import from_pretrained, save_pretrained
from chainrule.models.lora import LoRAConfig, merge_lora
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
for _config_type, _model_type in MODEL_FAMILIES.items():
    register("model", _config_type.__name__.removesuffix("Config").lower(), _config_type,
             builds=_model_type)


def family_name(config: ModelConfig | type) -> str:
    """The family a model config belongs to: "transformer", "pixelcnn" or "wavenet"."""
    return schema_of(config, "model").name


def build_model(config: ModelConfig, *, rngs: nnx.Rngs) -> AutoregressiveModel:
    return build(config, group="model", rngs=rngs)


__all__ = [
    "AutoregressiveModel",
    "ConditionalPixelCNN",
    "MODEL_FAMILIES",
    "ModelConfig",
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
    "complete_config",
    "family_name",
    "from_pretrained",
    "LoRAConfig",
    "merge_lora",
    "save_pretrained",
]
