"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders") with cached fast generation (Ramachandran et al. 2017).

p(image) = prod over rows, columns, then channels (R -> G -> B) of a `num_levels`-way softmax.

    config.py   PixelCNNConfig and its checks
    layers.py   masks, masked convolutions, gated layers, the output head
    model.py    PixelCNN: __call__, loss_fn, generate, inpaint, ...
    decode.py   the compiled samplers (cached fast generation, and the naive reference)
"""

from chainrule.models.pixelcnn.config import PixelCNNConfig
from chainrule.models.pixelcnn.layers import (
    Dense,
    GatedLayer,
    OutputHead,
    WeightPool,
    channel_groups,
    conv2d,
)
from chainrule.models.pixelcnn.model import PixelCNN

__all__ = [
    "Dense",
    "GatedLayer",
    "OutputHead",
    "PixelCNN",
    "PixelCNNConfig",
    "WeightPool",
    "channel_groups",
    "conv2d",
]
