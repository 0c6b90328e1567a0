"""The Transformer's layers: positions (sinusoidal, rope), causal self-attention (with the
key/value cache and prefix-tuning prefixes) and the pre-LN block."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from chainrule.models.base import PrefixParam, logical
from chainrule.models.lora import Linear, LoRAConfig
from chainrule.models.transformer.config import ACTIVATIONS, TransformerNetworkConfig


def sinusoidal_embedding(positions: jax.Array, dim: int) -> jax.Array:
    """The fixed encoding of Vaswani et al. for integer `positions` [..., T] -> [..., T, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * freqs
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, dim - 2 * half)])


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding on x [B, T, H, D] at integer positions [B, T]."""
    d = x.shape[-1]
    freqs = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions[..., None, None].astype(jnp.float32) * freqs  # [B, T, 1, D/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = x[..., 0::2].astype(jnp.float32), x[..., 1::2].astype(jnp.float32)
    rotated = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def _masked_attention(q, keys_t, values, mask):
    """Softmax attention of q [N, T, D] over transposed keys [N, D, S] and values [N, S, D]
    where `mask` [N, T, S] is true; scores and softmax in float32. -> [N, T, D]."""
    scores = jnp.einsum("ntd,nds->nts", q, keys_t, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores / math.sqrt(q.shape[-1]), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("nts,nsd->ntd", weights, values)


def _dense(rngs, d_in, d_out, axes, *, std=0.02, dtype=jnp.float32, use_bias=True,
           lora: LoRAConfig | None = None, target: str = ""):
    """A linear layer, with a LoRA adapter when `lora` names its `target`."""
    init = logical(nnx.initializers.normal(std), *axes)
    rank = lora.rank_for(target) if lora is not None else 0
    return Linear(d_in, d_out, kernel_init=init, use_bias=use_bias, dtype=dtype, rngs=rngs,
                  lora_rank=rank, lora_scale=lora.scale if rank else 0.0)


class CausalSelfAttention(nnx.Module):
    def __init__(self, net: TransformerNetworkConfig, num_layers: int, dtype, prefix_length: int,
                 *, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        d, self.num_heads = net.embed_dim, net.num_heads
        self.rope_base = net.rope_base if net.positional_encoding == "rope" else None
        self.qkv = _dense(rngs, d, 3 * d, ("embed", "heads"), dtype=dtype, use_bias=net.use_bias,
                          lora=lora, target="qkv")
        # GPT-2: residual projections scaled by 1/sqrt(2 * layers) keep the residual stream's scale.
        self.proj = _dense(rngs, d, d, ("heads", "embed"), std=0.02 / math.sqrt(2 * num_layers),
                           dtype=dtype, use_bias=net.use_bias, lora=lora, target="proj")
        # Li & Liang (2021): learned keys/values that every query may attend to.
        shape = (prefix_length, self.num_heads, d // self.num_heads)
        self.prefix_k = (PrefixParam(jax.random.normal(rngs.params(), shape) * 0.5)
                         if prefix_length else None)
        self.prefix_v = (PrefixParam(jax.random.normal(rngs.params(), shape) * 0.5)
                         if prefix_length else None)

    def __call__(self, x, positions, kv_cache=None, cache_index=None, valid_from=None):
        """Causal attention over this chunk (and the cache's filled slots when cached).

        `valid_from` [B]: key slots before it are padding (left-padded prompts) and are masked.
        """
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.num_heads, d // self.num_heads) for a in (q, k, v))
        if self.rope_base is not None:
            q, k = apply_rope(q, positions, self.rope_base), apply_rope(k, positions, self.rope_base)
        if kv_cache is None and valid_from is None and self.prefix_k is None:
            # The training path: plain causal attention over the chunk.
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            return self.proj(out.reshape(b, t, d)), None
        # Decoding, padded prompts, prefixes. Heads are folded into the batch, keys stored
        # transposed: keys [B*H, D, S], values [B*H, S, D], so both attention products are plain
        # batched matmuls and XLA updates the cache in place inside the decode loop (with
        # [B, S, H, D] it copied the whole cache several times per token).
        n, hd = b * self.num_heads, d // self.num_heads
        q = q.transpose(0, 2, 1, 3).reshape(n, t, hd)
        k = k.transpose(0, 2, 3, 1).reshape(n, hd, t)
        v = v.transpose(0, 2, 1, 3).reshape(n, t, hd)
        if kv_cache is None:
            keys, values, first_query = k, v, 0
        else:
            # Write this chunk's keys/values at cache_index; attend to filled slots <= query.
            keys = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype),
                                                (0, 0, cache_index))
            values = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype),
                                                  (0, cache_index, 0))
            kv_cache, first_query = (keys, values), cache_index
        slots = jnp.arange(keys.shape[2])
        mask = (slots[None, :] <= (first_query + jnp.arange(t))[:, None])[None, None]  # [1,1,T,S]
        if valid_from is not None:
            mask = mask & (slots >= valid_from[:, None, None, None])
        if self.prefix_k is not None:
            p, h = self.prefix_k.shape[0], self.num_heads
            prefix_k = jnp.broadcast_to(self.prefix_k[...].transpose(1, 2, 0), (b, h, hd, p))
            prefix_v = jnp.broadcast_to(self.prefix_v[...].transpose(1, 0, 2), (b, h, p, hd))
            keys = jnp.concatenate([prefix_k.reshape(n, hd, p).astype(keys.dtype), keys], axis=2)
            values = jnp.concatenate([prefix_v.reshape(n, p, hd).astype(values.dtype), values],
                                     axis=1)
            mask = jnp.concatenate([jnp.ones(mask.shape[:3] + (p,), bool), mask], axis=-1)
        mask = jnp.broadcast_to(mask, (b, self.num_heads, t, mask.shape[-1])).reshape(n, t, -1)
        out = _masked_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask)
        out = out.reshape(b, self.num_heads, t, hd).transpose(0, 2, 1, 3)
        return self.proj(out.reshape(b, t, d)), kv_cache


class Block(nnx.Module):
    """Pre-LN block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, net: TransformerNetworkConfig, num_layers: int, dropout: float, dtype,
                 prefix_length: int = 0, *, rngs: nnx.Rngs, lora: LoRAConfig | None = None):
        d, hidden = net.embed_dim, int(net.embed_dim * net.mlp_ratio)
        eps, bias = net.layer_norm_epsilon, net.use_bias
        self.ln1 = nnx.LayerNorm(d, epsilon=eps, use_bias=bias, dtype=dtype, rngs=rngs)
        self.attn = CausalSelfAttention(net, num_layers, dtype, prefix_length, rngs=rngs,
                                        lora=lora)
        self.ln2 = nnx.LayerNorm(d, epsilon=eps, use_bias=bias, dtype=dtype, rngs=rngs)
        self.fc = _dense(rngs, d, hidden, ("embed", "mlp"), dtype=dtype, use_bias=bias,
                         lora=lora, target="fc")
        self.out = _dense(rngs, hidden, d, ("mlp", "embed"), std=0.02 / math.sqrt(2 * num_layers),
                          dtype=dtype, use_bias=bias, lora=lora, target="out")
        self.activation = ACTIVATIONS[net.activation]
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x, positions, *, deterministic, rngs, kv_cache=None, cache_index=None,
                 valid_from=None):
        a, kv_cache = self.attn(self.ln1(x), positions, kv_cache, cache_index, valid_from)
        x = x + self.dropout(a, deterministic=deterministic, rngs=rngs)
        m = self.out(self.activation(self.fc(self.ln2(x))))
        return x + self.dropout(m, deterministic=deterministic, rngs=rngs), kv_cache


@functools.partial(nnx.remat, static_argnums=(5,))
def _remat_block(block, x, positions, valid_from, rngs, deterministic):
    """A block whose activations are recomputed in the backward pass instead of stored."""
    return block(x, positions, deterministic=deterministic, rngs=rngs, valid_from=valid_from)[0]
