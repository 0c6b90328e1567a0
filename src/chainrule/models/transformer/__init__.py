"""Decoder-only Transformer language model (GPT-style, pre-LN) with a key/value cache.

    logits = model(tokens)["logits"]          # [B, T, vocab]; logits[:, t] predicts tokens[:, t + 1]
    losses = model.loss_fn({"sequences": tokens}, outputs)
    tokens = model.generate(n_samples=4, max_length=128, temperature=0.8, top_p=0.9, rngs=rngs)

Positions are `sinusoidal`, `learned` or `rope`. Generation runs as one compiled loop: the
prompt is prefilled in one pass, then one token per step against a fixed-size key/value cache
(`use_cache=True`), or a full forward pass over the last `sequence_length` tokens per step
(`use_cache=False`, the slow reference, which also slides past the context length).

    config.py   TransformerConfig, TransformerNetworkConfig and their checks
    layers.py   positions (sinusoidal, rope), CausalSelfAttention, Block
    model.py    TransformerAutoregressiveModel: __call__, loss_fn, generate, ...
    decode.py   the key/value cache and the compiled decode loops
"""

from chainrule.models.transformer.config import (
    ACTIVATIONS,
    POSITIONAL_ENCODINGS,
    TransformerConfig,
    TransformerNetworkConfig,
)
from chainrule.models.transformer.decode import Knobs
from chainrule.models.transformer.layers import (
    Block,
    CausalSelfAttention,
    apply_rope,
    sinusoidal_embedding,
)
from chainrule.models.transformer.model import TransformerAutoregressiveModel

__all__ = [
    "ACTIVATIONS",
    "POSITIONAL_ENCODINGS",
    "Block",
    "CausalSelfAttention",
    "Knobs",
    "TransformerAutoregressiveModel",
    "TransformerConfig",
    "TransformerNetworkConfig",
    "apply_rope",
    "sinusoidal_embedding",
]
