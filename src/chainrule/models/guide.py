"""The user guide's aliases: names the guide uses beyond the model families' own classes.

    TransformerAR(vocab_size, sequence_length, hidden_dim, ..., rngs=rngs)   the older flat form
    PrefixTunedTransformer(config, prefix_length=10, rngs=rngs)             prefix tuning
    ConditionalPixelCNN(config, num_classes=10, rngs=rngs)                  class labels

All three build the ordinary models (`TransformerAutoregressiveModel`, `PixelCNN`) from their
configs. This module imports the model packages; they never import it.

The guide's other compatibility names belong to classes the guide constructs or calls directly,
so they stay where those classes are:
  - `PixelCNN(image_shape=..., num_layers=..., rngs=rngs)`: the PixelCNN constructor takes any
    `PixelCNNConfig` field as a keyword (pixelcnn/model.py).
  - `WaveNet(num_layers=30, num_stacks=3, ..., rngs=rngs)`: the WaveNet constructor takes any
    `WaveNetConfig` field as a keyword, and the config maps the older `num_layers` /
    `num_stacks` onto `num_blocks` / `layers_per_block` (wavenet.py).
  - `TransformerNetworkConfig.hidden_dims` and `TransformerConfig.dropout_rate`: config fields
    (transformer/config.py).
  - `generate(conditioning=...)`, `generate_with_cache`, `sample_with_conditioning` and
    `beam_search(..., rngs=)`: methods of `TransformerAutoregressiveModel` (transformer/model.py).
  - `DeviceManager`: `chainrule.parallel` (the guide imports it from a module of its own).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from chainrule.models.pixelcnn import PixelCNN, PixelCNNConfig
from chainrule.models.transformer import (
    TransformerAutoregressiveModel,
    TransformerConfig,
    TransformerNetworkConfig,
)


def TransformerAR(vocab_size: int, sequence_length: int = 512, hidden_dim: int = 512,
                  num_layers: int = 6, num_heads: int = 8, feedforward_dim: int | None = None,
                  dropout_rate: float = 0.1, positional_encoding: str = "sinusoidal",
                  *, rngs: nnx.Rngs, **kwargs: Any) -> TransformerAutoregressiveModel:
    """The older guide's keyword form, building the same model from flat arguments."""
    network = TransformerNetworkConfig(
        embed_dim=hidden_dim, num_heads=num_heads, dropout_rate=dropout_rate,
        mlp_ratio=(feedforward_dim or 4 * hidden_dim) / hidden_dim,
        positional_encoding=positional_encoding)
    config = TransformerConfig(vocab_size=vocab_size, sequence_length=sequence_length,
                               network=network, num_layers=num_layers, **kwargs)
    return TransformerAutoregressiveModel(config, rngs=rngs)


class PrefixTunedTransformer(TransformerAutoregressiveModel):
    """The guide's prefix-tuning class: a Transformer with `prefix_length` learned key/value
    prefixes in every attention layer (Li & Liang 2021). Train only them with
    `nnx.Optimizer(model, tx, wrt=PrefixParam)` (or `optimizer.trainable=prefix` in train.py)."""

    def __init__(self, config: TransformerConfig, *, prefix_length: int = 10, rngs: nnx.Rngs):
        if prefix_length < 1:
            raise ValueError(f"prefix_length must be >= 1, got {prefix_length}")
        super().__init__(dataclasses.replace(config, prefix_length=prefix_length), rngs=rngs)
        self.prefix_length = prefix_length

    def forward_with_prefix(self, x, rngs=None, **kwargs):
        """The guide's name for the forward pass: the prefixes are always attended to."""
        return self(x, rngs=rngs, **kwargs)


class ConditionalPixelCNN(PixelCNN):
    """The guide's class-conditional PixelCNN: `PixelCNN` with `num_classes` classes (default:
    the config's, else 10); labels come in as `class_labels` / the batch's "labels"."""

    def __init__(self, config: PixelCNNConfig | None = None, *, num_classes: int | None = None,
                 rngs: nnx.Rngs, **keywords: Any):
        config = config or PixelCNNConfig()
        num_classes = num_classes or config.num_classes or 10
        super().__init__(dataclasses.replace(config, num_classes=num_classes), rngs=rngs,
                         **keywords)


__all__ = ["ConditionalPixelCNN", "PrefixTunedTransformer", "TransformerAR"]
