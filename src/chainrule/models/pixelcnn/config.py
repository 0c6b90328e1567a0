"""The PixelCNN's config and its checks."""

from __future__ import annotations

import dataclasses

from chainrule.config import check
from chainrule.models.base import DTYPES, ModelConfig


@dataclasses.dataclass
class PixelCNNConfig(ModelConfig):
    """A gated PixelCNN over integer images [H, W, C] with values in [0, num_levels)."""

    name: str = "pixelcnn"
    # (height, width, channels) and softmax size per sub-pixel (2 for binarized, 256 for 8-bit);
    # None: the data decides (training fills both in from the data pipeline).
    image_shape: tuple[int, int, int] | None = (28, 28, 1)
    num_levels: int | None = 256
    hidden_channels: int = 128
    num_layers: int = 7  # gated masked-conv layers (vertical + horizontal stack pairs)
    num_residual_blocks: int = 5  # masked 1x1 residual blocks in the output head
    kernel_size: int = 3  # odd; each layer widens the receptive field by kernel_size // 2
    dropout_rate: float = 0.1
    num_classes: int | None = None  # class-conditional when set (labels from the batch)
    dtype: str | None = None  # compute dtype (None: float32, or hardware.compute_dtype)
    remat: bool = False  # recompute each gated layer's activations in the backward pass

    def width(self) -> int:
        return self.hidden_channels

    def __post_init__(self) -> None:
        check(self.dtype is None or self.dtype in DTYPES,
               f"dtype={self.dtype!r}; expected one of {sorted(DTYPES)} (or null)")
        if self.image_shape is not None:
            shape = tuple(int(d) for d in self.image_shape)
            check(len(shape) == 3 and min(shape) > 0, f"image_shape={tuple(self.image_shape)}: "
                                                       "expected (height, width, channels) > 0")
            self.image_shape = shape
            check(self.hidden_channels >= shape[2],
                   f"hidden_channels={self.hidden_channels} must be >= the {shape[2]} image "
                   "channels (one hidden channel group per colour channel)")
        check(self.num_levels is None or self.num_levels >= 2,
               f"num_levels must be >= 2 (or None: the data's), got {self.num_levels}")
        check(self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}")
        check(self.num_residual_blocks >= 0,
               f"num_residual_blocks must be >= 0, got {self.num_residual_blocks}")
        check(self.kernel_size >= 3 and self.kernel_size % 2 == 1,
               f"kernel_size must be odd and >= 3, got {self.kernel_size}")
        check(0.0 <= self.dropout_rate < 1.0,
               f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        check(self.num_classes is None or self.num_classes >= 1,
               f"num_classes must be None or >= 1, got {self.num_classes}")

    @property
    def receptive_field(self) -> int:
        """Rows above (and columns left/right) that the logits at a pixel can see."""
        return self.num_layers * (self.kernel_size // 2)
