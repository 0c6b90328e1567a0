"""Decoder-only Transformer language model (GPT-style, pre-LN) with a key/value cache.

    logits = model(tokens)["logits"]          # [B, T, vocab]; logits[:, t] predicts tokens[:, t + 1]
    losses = model.loss_fn({"sequences": tokens}, outputs)
    tokens = model.generate(n_samples=4, max_length=128, temperature=0.8, top_p=0.9, rngs=rngs)

Positions are `sinusoidal`, `learned` or `rope`. Generation runs as one compiled loop: the
prompt is prefilled in one pass, then one token per step against a fixed-size key/value cache
(`use_cache=True`), or a full forward pass over the last `sequence_length` tokens per step
(`use_cache=False`, the slow reference, which also slides past the context length).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from chainrule.models.base import AutoregressiveModel, logical
from chainrule.sampling import sample_token

POSITIONAL_ENCODINGS = ("sinusoidal", "learned", "rope")
ACTIVATIONS = {"gelu": nnx.gelu, "relu": nnx.relu, "silu": nnx.silu, "swish": nnx.silu}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


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
    use_bias: bool = True
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        self.hidden_dims = tuple(self.hidden_dims)
        _check(self.embed_dim > 0, f"network.embed_dim must be > 0, got {self.embed_dim}")
        _check(self.num_heads > 0, f"network.num_heads must be > 0, got {self.num_heads}")
        _check(self.embed_dim % self.num_heads == 0,
               f"network.num_heads={self.num_heads} must divide network.embed_dim={self.embed_dim}")
        _check(all(d == self.embed_dim for d in self.hidden_dims),
               f"network.hidden_dims={self.hidden_dims}: every block of a chainrule Transformer has "
               f"width embed_dim={self.embed_dim}; set hidden_dims to ({self.embed_dim}, ...) or ()")
        _check(self.activation in ACTIVATIONS,
               f"network.activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
        _check(self.mlp_ratio > 0, f"network.mlp_ratio must be > 0, got {self.mlp_ratio}")
        _check(self.positional_encoding in POSITIONAL_ENCODINGS,
               f"network.positional_encoding={self.positional_encoding!r}; expected one of "
               f"{list(POSITIONAL_ENCODINGS)}")
        _check(0.0 <= self.dropout_rate < 1.0,
               f"network.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        _check(self.embed_dim // self.num_heads % 2 == 0 or self.positional_encoding != "rope",
               "rope needs an even head dimension (embed_dim / num_heads)")


@dataclasses.dataclass
class TransformerConfig:
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
    dtype: str = "float32"  # compute dtype; parameters stay float32

    def __post_init__(self) -> None:
        if isinstance(self.network, dict):
            self.network = TransformerNetworkConfig(**self.network)
        _check(self.vocab_size is None or self.vocab_size > 0,
               f"vocab_size must be > 0, got {self.vocab_size}")
        _check(self.sequence_length > 0, f"sequence_length must be > 0, got {self.sequence_length}")
        _check(self.num_layers > 0, f"num_layers must be > 0, got {self.num_layers}")
        _check(self.dropout_rate is None or 0.0 <= self.dropout_rate < 1.0,
               f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        _check(self.dtype in DTYPES, f"dtype={self.dtype!r}; expected one of {sorted(DTYPES)}")

    @property
    def effective_dropout(self) -> float:
        return self.network.dropout_rate if self.dropout_rate is None else self.dropout_rate


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


def _dense(rngs, d_in, d_out, axes, *, std=0.02, dtype=jnp.float32, use_bias=True):
    init = logical(nnx.initializers.normal(std), *axes)
    return nnx.Linear(d_in, d_out, kernel_init=init, use_bias=use_bias, dtype=dtype, rngs=rngs)


class CausalSelfAttention(nnx.Module):
    def __init__(self, net: TransformerNetworkConfig, num_layers: int, dtype, *, rngs: nnx.Rngs):
        d, self.num_heads = net.embed_dim, net.num_heads
        self.rope_base = net.rope_base if net.positional_encoding == "rope" else None
        self.qkv = _dense(rngs, d, 3 * d, ("embed", "heads"), dtype=dtype, use_bias=net.use_bias)
        # GPT-2: residual projections scaled by 1/sqrt(2 * layers) keep the residual stream's scale.
        self.proj = _dense(rngs, d, d, ("heads", "embed"), std=0.02 / math.sqrt(2 * num_layers),
                           dtype=dtype, use_bias=net.use_bias)

    def __call__(self, x, positions, kv_cache=None, cache_index=None):
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.num_heads, d // self.num_heads) for a in (q, k, v))
        if self.rope_base is not None:
            q, k = apply_rope(q, positions, self.rope_base), apply_rope(k, positions, self.rope_base)
        if kv_cache is None:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        else:
            # Write this chunk's keys/values at cache_index, attend to every filled slot <= query.
            k_all = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype),
                                                 (0, cache_index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype),
                                                 (0, cache_index, 0, 0))
            slots = jnp.arange(k_all.shape[1])
            mask = slots[None, :] <= (cache_index + jnp.arange(t))[:, None]  # [T, S]
            out = jax.nn.dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                                               mask=mask[None, None])
            kv_cache = (k_all, v_all)
        return self.proj(out.reshape(b, t, d)), kv_cache


class Block(nnx.Module):
    """Pre-LN block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, net: TransformerNetworkConfig, num_layers: int, dropout: float, dtype, *,
                 rngs: nnx.Rngs):
        d, hidden = net.embed_dim, int(net.embed_dim * net.mlp_ratio)
        self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.attn = CausalSelfAttention(net, num_layers, dtype, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.fc = _dense(rngs, d, hidden, ("embed", "mlp"), dtype=dtype, use_bias=net.use_bias)
        self.out = _dense(rngs, hidden, d, ("mlp", "embed"), std=0.02 / math.sqrt(2 * num_layers),
                          dtype=dtype, use_bias=net.use_bias)
        self.activation = ACTIVATIONS[net.activation]
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x, positions, *, deterministic, rngs, kv_cache=None, cache_index=None):
        a, kv_cache = self.attn(self.ln1(x), positions, kv_cache, cache_index)
        x = x + self.dropout(a, deterministic=deterministic, rngs=rngs)
        m = self.out(self.activation(self.fc(self.ln2(x))))
        return x + self.dropout(m, deterministic=deterministic, rngs=rngs), kv_cache


def _bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two so a few compiled shapes serve every length."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


class TransformerAutoregressiveModel(AutoregressiveModel):
    """GPT-style decoder; the guide's `TransformerAutoregressiveModel(config, rngs=rngs)`."""

    data_key = "sequences"

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        if config.vocab_size is None:
            raise ValueError("TransformerConfig.vocab_size is None: set it, or let the data's "
                             "tokenizer set it (train.py does this)")
        self.config = config
        net, d = config.network, config.network.embed_dim
        dtype = DTYPES[config.dtype]
        self.embed_dim = d
        self.token_embed = nnx.Embed(
            config.vocab_size, d, dtype=dtype, rngs=rngs,
            embedding_init=logical(nnx.initializers.normal(0.02), "vocab", "embed"))
        self.pos_embed = (nnx.Embed(config.sequence_length, d, dtype=dtype, rngs=rngs,
                                    embedding_init=nnx.initializers.normal(0.02))
                          if net.positional_encoding == "learned" else None)
        self.embed_dropout = nnx.Dropout(config.effective_dropout)
        self.blocks = nnx.List([Block(net, config.num_layers, config.effective_dropout, dtype,
                                      rngs=rngs) for _ in range(config.num_layers)])
        self.ln_f = nnx.LayerNorm(d, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.lm_head = (None if config.tie_weights else
                        _dense(rngs, d, config.vocab_size, ("embed", "vocab"), dtype=dtype,
                               use_bias=False))

    # ------------------------------------------------------------------ forward
    def __call__(self, tokens, *, rngs=None, training=False, positions=None, cache=None,
                 cache_index=None, **_):
        """Logits for every position. With `cache` (from `init_cache`) and `cache_index`, the
        chunk `tokens` sits at positions cache_index.. and the updated cache is returned too."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        self._check_tokens(tokens)
        b, t = tokens.shape
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
        deterministic = not training
        x = self.token_embed(tokens)
        kind = self.config.network.positional_encoding
        if kind == "learned":
            x = x + self.pos_embed(positions)
        elif kind == "sinusoidal":
            x = x + sinusoidal_embedding(positions, self.embed_dim).astype(x.dtype)
        x = self.embed_dropout(x, deterministic=deterministic, rngs=rngs)
        new_cache = []
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else cache[i]
            x, kv = block(x, positions, deterministic=deterministic, rngs=rngs, kv_cache=kv,
                          cache_index=cache_index)
            new_cache.append(kv)
        x = self.ln_f(x)
        logits = self.token_embed.attend(x) if self.lm_head is None else self.lm_head(x)
        outputs = {"logits": logits.astype(jnp.float32)}
        if cache is not None:
            outputs["cache"] = new_cache
        return outputs

    def _check_tokens(self, tokens) -> None:
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got dtype {tokens.dtype}")
        if isinstance(tokens, jax.core.Tracer):
            return
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = hi if hi >= self.config.vocab_size else lo
            raise ValueError(f"token id {bad} is out of range: expected ids in "
                             f"[0, vocab_size={self.config.vocab_size})")

    def model_inputs(self, batch):
        # The last token is only ever a target: dropping it saves one position of compute.
        return batch[self.data_key][:, :-1]

    def loss_fn(self, batch, outputs, *, rngs=None, **_):
        """Next-token cross-entropy: logits at t against sequences at t + 1, padding left out."""
        sequences = batch[self.data_key]
        length = sequences.shape[1]
        logits = outputs["logits"][:, : length - 1]
        targets = sequences[:, 1:]
        weights = jnp.ones(targets.shape, jnp.float32)
        if "loss_mask" in batch:
            weights = weights * batch["loss_mask"][:, 1:].astype(jnp.float32)
        if self.config.pad_token_id is not None:
            weights = weights * (targets != self.config.pad_token_id)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        count = jnp.maximum(weights.sum(), 1.0)
        nll_loss = (nll * weights).sum() / count
        accuracy = ((logits.argmax(-1) == targets) * weights).sum() / count
        return {"loss": nll_loss, "nll_loss": nll_loss, "perplexity": jnp.exp(nll_loss),
                "accuracy": accuracy, "bits_per_token": nll_loss / math.log(2.0)}

    # --------------------------------------------------------------- generation
    def init_cache(self, batch_size: int, max_length: int):
        """Zeroed key/value cache: one (keys, values) pair [B, S, H, D] per layer."""
        net = self.config.network
        shape = (batch_size, max_length, net.num_heads, net.embed_dim // net.num_heads)
        dtype = DTYPES[self.config.dtype]
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.blocks]

    def generate(self, n_samples: int = 1, max_length: int | None = None, temperature=1.0,
                 top_k=None, top_p=None, rngs: nnx.Rngs | None = None, *, prompt=None,
                 use_cache: bool | None = None) -> jax.Array:
        """Sample `n_samples` sequences of `max_length` tokens (prompt included).

        Without a prompt each sample starts with `config.bos_token_id`. `prompt` is [P] (shared)
        or [n_samples, P]. temperature 0 is greedy; top_k / top_p filter as in
        `chainrule.sampling`. One compiled loop; lengths are bucketed so a new `max_length`
        rarely recompiles.
        """
        max_length = self.config.sequence_length if max_length is None else int(max_length)
        prompt = (jnp.full((1,), self.config.bos_token_id, jnp.int32) if prompt is None
                  else jnp.asarray(prompt, jnp.int32))
        if prompt.ndim == 1:
            prompt = jnp.broadcast_to(prompt, (n_samples, prompt.shape[0]))
        if prompt.shape[0] != n_samples:
            raise ValueError(f"prompt has {prompt.shape[0]} rows but n_samples={n_samples}")
        self._check_tokens(prompt)
        prompt_len = prompt.shape[1]
        if not 0 < prompt_len <= max_length:
            raise ValueError(f"prompt length {prompt_len} must be in [1, max_length={max_length}]")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        # The cache holds at most `sequence_length` positions; longer samples slide a window.
        use_cache = use_cache and max_length <= self.config.sequence_length
        buffer_len = _bucket(max_length)
        if use_cache:
            buffer_len = min(buffer_len, self.config.sequence_length)
        buffer = jnp.zeros((n_samples, buffer_len), jnp.int32)
        buffer = buffer.at[:, :prompt_len].set(prompt)
        key = _draw_key(rngs)
        decode = _decode_cached if use_cache else _decode_windowed
        out = decode(self, buffer, jnp.int32(prompt_len), jnp.int32(max_length), key,
                     jnp.float32(temperature), jnp.int32(top_k or 0),
                     jnp.float32(1.0 if top_p is None else top_p), _bucket(prompt_len, 8))
        return out[:, :max_length]

    def generate_with_cache(self, n_samples: int = 1, max_length: int | None = None,
                            temperature=1.0, top_k=None, top_p=None, prompt=None,
                            rngs: nnx.Rngs | None = None) -> jax.Array:
        """The guide's cached generation: `generate(..., use_cache=True)`."""
        return self.generate(n_samples, max_length, temperature, top_k, top_p, rngs,
                             prompt=prompt, use_cache=True)

    def sample_with_conditioning(self, conditioning, n_samples: int = 1, temperature=1.0,
                                 top_k=None, top_p=None, rngs: nnx.Rngs | None = None,
                                 max_length: int | None = None) -> jax.Array:
        """Continue the prompt `conditioning` ([P] or [1, P]): n_samples completions."""
        prompt = jnp.asarray(conditioning, jnp.int32)
        if prompt.ndim == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.ndim == 2:  # one completion per prompt row
            n_samples = prompt.shape[0]
        return self.generate(n_samples, max_length, temperature, top_k, top_p, rngs,
                             prompt=prompt)


def _draw_key(rngs: nnx.Rngs | None) -> jax.Array:
    if rngs is None:
        return jax.random.key(0)
    if isinstance(rngs, nnx.Rngs):
        return rngs.sample() if "sample" in rngs else rngs()
    return rngs  # a raw key


@functools.partial(nnx.jit, static_argnums=(8,))
def _decode_cached(model, buffer, prompt_len, max_length, key, temperature, top_k, top_p,
                   prefill_len):
    """Prefill the first `prefill_len` slots in one pass, then one token per step."""
    n, size = buffer.shape
    cache = model.init_cache(n, size)
    prefill_len = min(prefill_len, size)
    # Slots >= prompt_len hold garbage after the prefill; each is rewritten before it is read.
    cache = model(buffer[:, :prefill_len], cache=cache, cache_index=0)["cache"]

    def step(t, carry):
        buffer, cache, key = carry
        key, sub = jax.random.split(key)
        token = jax.lax.dynamic_slice_in_dim(buffer, t - 1, 1, axis=1)
        out = model(token, cache=cache, cache_index=t - 1)
        drawn = sample_token(sub, out["logits"][:, -1], temperature=temperature, top_k=top_k,
                             top_p=top_p)
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, drawn[:, None], t, axis=1)
        return buffer, out["cache"], key

    buffer, _, _ = jax.lax.fori_loop(prompt_len, max_length, step, (buffer, cache, key))
    return buffer


@functools.partial(nnx.jit, static_argnums=(8,))
def _decode_windowed(model, buffer, prompt_len, max_length, key, temperature, top_k, top_p,
                     prefill_len):
    """Reference decoder: a full forward pass over the last `sequence_length` tokens per step."""
    del prefill_len
    n, size = buffer.shape
    window = min(model.config.sequence_length, size)

    def step(t, carry):
        buffer, key = carry
        key, sub = jax.random.split(key)
        start = jnp.maximum(t - window, 0)
        context = jax.lax.dynamic_slice_in_dim(buffer, start, window, axis=1)
        logits = model(context)["logits"]
        # Position t is predicted by the logits at t - 1 (not at t).
        last = jax.lax.dynamic_index_in_dim(logits, t - 1 - start, axis=1, keepdims=False)
        drawn = sample_token(sub, last, temperature=temperature, top_k=top_k, top_p=top_p)
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, drawn[:, None], t, axis=1)
        return buffer, key

    buffer, _ = jax.lax.fori_loop(prompt_len, max_length, step, (buffer, key))
    return buffer


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
