"""The Transformer's configs and their checks: `TransformerConfig` (the model) holds a
`TransformerNetworkConfig` (the per-block network)."""

from __future__ import annotations

import dataclasses
import functools

from flax import nnx

from chainrule.config import check
from chainrule.models.base import DTYPES, ModelConfig
from chainrule.models.lora import LoRAConfig

POSITIONAL_ENCODINGS = ("sinusoidal", "learned", "rope")
# "gelu" is the tanh approximation (GPT-2's "gelu_new"); "gelu_exact" the erf form.
ACTIVATIONS = {"gelu": nnx.gelu, "gelu_exact": functools.partial(nnx.gelu, approximate=False),
               "relu": nnx.relu, "silu": nnx.silu, "swish": nnx.silu}



@dataclasses.dataclass
class TransformerNetworkConfig:
    """The per-block network: width, heads, MLP, positions, dropout."""

    name: str = "transformer_network"
    hidden_dims: tuple[int, ...] = ()  # the guide's per-layer widths; all must equal embed_dim
    activation: str = "gelu"
    embed_dim: int = 512
    num_heads: int = 8
    mlp_ratio: float = 4.0
    positional_encoding: str = "sinusoidal"
    dropout_rate: float = 0.1
    use_bias: bool = True  # biases in the linear layers and layer norms (nanoGPT: bias=False)
    rope_base: float = 10000.0
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        self.hidden_dims = tuple(self.hidden_dims)
        check(self.layer_norm_epsilon > 0,
              f"network.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        check(self.embed_dim > 0, f"network.embed_dim must be > 0, got {self.embed_dim}")
        check(self.num_heads > 0, f"network.num_heads must be > 0, got {self.num_heads}")
        check(self.embed_dim % self.num_heads == 0,
               f"network.num_heads={self.num_heads} must divide network.embed_dim={self.embed_dim}")
        check(all(d == self.embed_dim for d in self.hidden_dims),
               f"network.hidden_dims={self.hidden_dims}: every block of a chainrule Transformer has "
               f"width embed_dim={self.embed_dim}; set hidden_dims to ({self.embed_dim}, ...) or ()")
        check(self.activation in ACTIVATIONS,
               f"network.activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        check(self.mlp_ratio > 0, f"network.mlp_ratio must be > 0, got {self.mlp_ratio}")
        check(self.positional_encoding in POSITIONAL_ENCODINGS,
               f"network.positional_encoding={self.positional_encoding!r}; expected one of "
               f"{list(POSITIONAL_ENCODINGS)}")
        check(0.0 <= self.dropout_rate < 1.0,
               f"network.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        check(self.embed_dim // self.num_heads % 2 == 0 or self.positional_encoding != "rope",
               "rope needs an even head dimension (embed_dim / num_heads)")


@dataclasses.dataclass
class TransformerConfig(ModelConfig):
    """A Transformer language model. `vocab_size=None` means: taken from the data's tokenizer."""

    name: str = "transformer"
    vocab_size: int | None = None
    sequence_length: int = 256
    network: TransformerNetworkConfig = dataclasses.field(default_factory=TransformerNetworkConfig)
    num_layers: int = 6
    dropout_rate: float | None = None  # overrides network.dropout_rate when set (guide's API)
    use_cache: bool = True
    tie_weights: bool = True
    pad_token_id: int | None = None  # targets equal to it are left out of the loss
    bos_token_id: int = 0  # first token of an unprompted sample
    eos_token_id: int | None = None  # generation stops a sample at it (also stop_tokens=)
    prefix_length: int = 0  # learnable key/value prefix per layer (prefix tuning); 0 = none
    dtype: str | None = None  # compute dtype (None: float32, or hardware.compute_dtype in
    #                           train.py); parameters and optimizer state stay float32
    remat: bool = False  # recompute each block's activations in the backward pass (memory)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)  # rank 0: no adapters

    def width(self) -> int:
        return self.network.embed_dim

    def __post_init__(self) -> None:
        if isinstance(self.network, dict):
            self.network = TransformerNetworkConfig(**self.network)
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**self.lora)
        check(self.vocab_size is None or self.vocab_size > 0,
               f"vocab_size must be > 0, got {self.vocab_size}")
        check(self.sequence_length > 0, f"sequence_length must be > 0, got {self.sequence_length}")
        check(self.num_layers > 0, f"num_layers must be > 0, got {self.num_layers}")
        check(self.dropout_rate is None or 0.0 <= self.dropout_rate < 1.0,
               f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        check(self.dtype is None or self.dtype in DTYPES,
               f"dtype={self.dtype!r}; expected one of {sorted(DTYPES)} (or null)")
        check(self.prefix_length >= 0, f"prefix_length must be >= 0, got {self.prefix_length}")

    @property
    def effective_dropout(self) -> float:
        return self.network.dropout_rate if self.dropout_rate is None else self.dropout_rate
