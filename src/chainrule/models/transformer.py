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
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from chainrule.models.base import DTYPES, AutoregressiveModel, PrefixParam, logical
from chainrule.sampling import penalize_seen, sample_token

POSITIONAL_ENCODINGS = ("sinusoidal", "learned", "rope")
ACTIVATIONS = {"gelu": nnx.gelu, "relu": nnx.relu, "silu": nnx.silu, "swish": nnx.silu}


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
    use_bias: bool = True  # biases in the linear layers and layer norms (nanoGPT: bias=False)
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
    eos_token_id: int | None = None  # generation stops a sample at it (also stop_tokens=)
    prefix_length: int = 0  # learnable key/value prefix per layer (prefix tuning); 0 = none
    dtype: str | None = None  # compute dtype (None: float32, or hardware.compute_dtype in
    #                           train.py); parameters and optimizer state stay float32
    remat: bool = False  # recompute each block's activations in the backward pass (memory)

    def __post_init__(self) -> None:
        if isinstance(self.network, dict):
            self.network = TransformerNetworkConfig(**self.network)
        _check(self.vocab_size is None or self.vocab_size > 0,
               f"vocab_size must be > 0, got {self.vocab_size}")
        _check(self.sequence_length > 0, f"sequence_length must be > 0, got {self.sequence_length}")
        _check(self.num_layers > 0, f"num_layers must be > 0, got {self.num_layers}")
        _check(self.dropout_rate is None or 0.0 <= self.dropout_rate < 1.0,
               f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        _check(self.dtype is None or self.dtype in DTYPES,
               f"dtype={self.dtype!r}; expected one of {sorted(DTYPES)} (or null)")
        _check(self.prefix_length >= 0, f"prefix_length must be >= 0, got {self.prefix_length}")

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


def _masked_attention(q, keys_t, values, mask):
    """Softmax attention of q [N, T, D] over transposed keys [N, D, S] and values [N, S, D]
    where `mask` [N, T, S] is true; scores and softmax in float32. -> [N, T, D]."""
    scores = jnp.einsum("ntd,nds->nts", q, keys_t, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores / math.sqrt(q.shape[-1]), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("nts,nsd->ntd", weights, values)


def _dense(rngs, d_in, d_out, axes, *, std=0.02, dtype=jnp.float32, use_bias=True):
    init = logical(nnx.initializers.normal(std), *axes)
    return nnx.Linear(d_in, d_out, kernel_init=init, use_bias=use_bias, dtype=dtype, rngs=rngs)


class CausalSelfAttention(nnx.Module):
    def __init__(self, net: TransformerNetworkConfig, num_layers: int, dtype, prefix_length: int,
                 *, rngs: nnx.Rngs):
        d, self.num_heads = net.embed_dim, net.num_heads
        self.rope_base = net.rope_base if net.positional_encoding == "rope" else None
        self.qkv = _dense(rngs, d, 3 * d, ("embed", "heads"), dtype=dtype, use_bias=net.use_bias)
        # GPT-2: residual projections scaled by 1/sqrt(2 * layers) keep the residual stream's scale.
        self.proj = _dense(rngs, d, d, ("heads", "embed"), std=0.02 / math.sqrt(2 * num_layers),
                           dtype=dtype, use_bias=net.use_bias)
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
                 prefix_length: int = 0, *, rngs: nnx.Rngs):
        d, hidden = net.embed_dim, int(net.embed_dim * net.mlp_ratio)
        self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, use_bias=net.use_bias, dtype=dtype, rngs=rngs)
        self.attn = CausalSelfAttention(net, num_layers, dtype, prefix_length, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, use_bias=net.use_bias, dtype=dtype, rngs=rngs)
        self.fc = _dense(rngs, d, hidden, ("embed", "mlp"), dtype=dtype, use_bias=net.use_bias)
        self.out = _dense(rngs, hidden, d, ("mlp", "embed"), std=0.02 / math.sqrt(2 * num_layers),
                          dtype=dtype, use_bias=net.use_bias)
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
        dtype = DTYPES[config.dtype or "float32"]
        self.embed_dim = d
        self.token_embed = nnx.Embed(
            config.vocab_size, d, dtype=dtype, rngs=rngs,
            embedding_init=logical(nnx.initializers.normal(0.02), "vocab", "embed"))
        self.pos_embed = (nnx.Embed(config.sequence_length, d, dtype=dtype, rngs=rngs,
                                    embedding_init=nnx.initializers.normal(0.02))
                          if net.positional_encoding == "learned" else None)
        self.embed_dropout = nnx.Dropout(config.effective_dropout)
        self.blocks = nnx.List([Block(net, config.num_layers, config.effective_dropout, dtype,
                                      config.prefix_length, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.ln_f = nnx.LayerNorm(d, epsilon=1e-5, use_bias=net.use_bias, dtype=dtype,
                                 rngs=rngs)
        self.lm_head = (None if config.tie_weights else
                        _dense(rngs, d, config.vocab_size, ("embed", "vocab"), dtype=dtype,
                               use_bias=False))

    # ------------------------------------------------------------------ forward
    def __call__(self, tokens, *, rngs=None, training=False, positions=None, cache=None,
                 cache_index=None, valid_from=None, **_):
        """Logits for every position. With `cache` (from `init_cache`) and `cache_index`, the
        chunk `tokens` sits at slots cache_index.. and the updated cache is returned too.
        `positions` [B, T] default to the slots; `valid_from` [B] masks left padding."""
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
            if self.config.remat and cache is None:
                x = _remat_block(block, x, positions, valid_from, rngs, deterministic)
                continue
            kv = None if cache is None else cache[i]
            x, kv = block(x, positions, deterministic=deterministic, rngs=rngs, kv_cache=kv,
                          cache_index=cache_index, valid_from=valid_from)
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
        """Zeroed key/value cache, one (keys [B*H, D, S], values [B*H, S, D]) pair per layer:
        heads folded into the batch, keys transposed (see `CausalSelfAttention`)."""
        net = self.config.network
        n, hd = batch_size * net.num_heads, net.embed_dim // net.num_heads
        dtype = DTYPES[self.config.dtype or "float32"]
        return [(jnp.zeros((n, hd, max_length), dtype), jnp.zeros((n, max_length, hd), dtype))
                for _ in self.blocks]

    def reorder_cache(self, cache, index: jax.Array):
        """The cache of the sequences `index` [B'] (beam search follows its parents)."""
        heads = self.config.network.num_heads
        rows = (index[:, None] * heads + jnp.arange(heads)).reshape(-1)
        return jax.tree.map(lambda c: c[rows], cache)

    def generate(self, n_samples: int = 1, max_length: int | None = None, temperature=1.0,
                 top_k=None, top_p=None, rngs: nnx.Rngs | None = None, *, prompt=None,
                 max_new_tokens: int | None = None, min_new_tokens: int = 0,
                 eos_id: int | None = None, stop_tokens=(), repetition_penalty=1.0,
                 use_cache: bool | None = None, conditioning=None) -> jax.Array:
        """Sample sequences; returns int32 [n, length] with each prompt at the start of its row.

        prompt: None (each sample starts with `config.bos_token_id`), [P] (shared by all
        samples), [n, P], or a list of n sequences of different lengths (ragged; rows come back
        with their prompt first and padding, `pad_token_id` or 0, at the end).
        length: `max_length` tokens in all (prompt included; default the model's context) or
        the longest prompt + `max_new_tokens`. A sample stops at `eos_id` (default
        `config.eos_token_id`) or any of `stop_tokens`, which it keeps; padding follows.
        `min_new_tokens` forbids stopping earlier. temperature 0 is greedy; top_k, top_p and
        `repetition_penalty` filter as in `chainrule.sampling`.

        `conditioning` is another name for `prompt` (the guide's speculative sketch uses it).

        One compiled loop: the prompts are prefilled in one pass, then one token per step
        against the key/value cache (`use_cache`, default `config.use_cache`) or, as the slow
        reference, a full pass over the last `sequence_length` tokens. Knobs are traced (only
        turning top-k/top-p on or off selects another compiled loop) and lengths bucketed to
        powers of two, so new settings rarely recompile.
        """
        if conditioning is not None:
            if prompt is not None:
                raise ValueError("pass prompt or conditioning (the same thing), not both")
            prompt = conditioning
        prompts, lengths = self._prompt_batch(prompt, n_samples)
        n, width = prompts.shape
        if max_new_tokens is not None:
            total = width + int(max_new_tokens)
        else:
            total = self.config.sequence_length if max_length is None else int(max_length)
        if not width <= total:
            raise ValueError(f"the prompt ({width} tokens) is longer than max_length={total}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        # The cache holds at most `sequence_length` slots; longer samples slide a window of
        # full forward passes, tens of times slower: say so rather than slow down silently.
        if use_cache and total > self.config.sequence_length:
            warnings.warn(f"generating {total} tokens with a context of "
                          f"{self.config.sequence_length}: past the context the key/value cache "
                          "cannot be used, so every token is a full forward pass over a sliding "
                          f"window (max_length <= {self.config.sequence_length} stays cached)",
                          stacklevel=2)
            use_cache = False
        size = _bucket(total)
        if use_cache:
            size = min(size, self.config.sequence_length)
        offsets = width - lengths  # left padding per row
        buffer = np.zeros((n, size), np.int32)
        for i in range(n):
            buffer[i, offsets[i]:width] = prompts[i, :lengths[i]]
        eos_id = self.config.eos_token_id if eos_id is None else eos_id
        stops = sorted({int(s) for s in stop_tokens} | ({int(eos_id)} if eos_id is not None
                                                        else set()))
        stop_ids = np.full((8 * (len(stops) // 8 + 1),), -1, np.int32)  # bucketed, -1 unused
        stop_ids[:len(stops)] = stops
        pad = 0 if self.config.pad_token_id is None else self.config.pad_token_id
        # Host (numpy) values go to the compiled loop with the call: no dispatch per value.
        knobs = Knobs(np.float32(temperature), np.int32(top_k or 0),
                      np.float32(1.0 if top_p is None else top_p),
                      np.float32(repetition_penalty), np.int32(min_new_tokens), stop_ids,
                      np.int32(pad))
        decode = _decode_cached if use_cache else _decode_windowed
        # Whether top-k/top-p are on is compiled in (the sort stays out of a loop that never
        # filters); their values are traced, so changing them does not recompile.
        filters = bool((top_k or 0) > 0) or bool(top_p is not None and top_p < 1.0)
        # A 1-token prompt needs no prefill pass: the loop's first step reads it (and a program
        # without the prefill's copy of the model compiles ~30% faster: the first sample). The
        # windowed decoder has no prefill: 0 keeps one compiled program for every prompt.
        prefill = 0 if width == 1 or not use_cache else min(_bucket(width, 8), size)
        out = decode(self, buffer, offsets.astype(np.int32), np.int32(width), np.int32(total),
                     _draw_key(rngs), knobs, prefill, filters)
        out = np.asarray(out[:, :total])
        if offsets.any():  # ragged prompts: shift each row so its prompt comes first
            out = np.stack([np.concatenate([row[o:], np.full(o, pad, np.int32)])
                            for row, o in zip(out, offsets, strict=True)])
        return jnp.asarray(out)

    def _prompt_batch(self, prompt, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """Prompts as a right-padded [n, P] array and their lengths, validated."""
        if prompt is None:
            prompt = [self.config.bos_token_id]
        if isinstance(prompt, list | tuple) and prompt and np.ndim(prompt[0]) == 1:
            rows = [np.asarray(p, np.int32) for p in prompt]  # ragged
        else:
            arr = np.asarray(prompt)
            if arr.ndim == 1:
                arr = np.broadcast_to(arr, (n_samples, arr.shape[0]))
            if arr.ndim != 2:
                raise ValueError(f"prompt must be [P], [n, P] or a list of sequences, got shape "
                                 f"{arr.shape}")
            rows = list(arr)
        lengths = np.array([len(r) for r in rows], np.int32)
        if lengths.min() < 1:
            raise ValueError("every prompt needs at least one token")
        batch = np.zeros((len(rows), lengths.max()), np.int32)
        for i, r in enumerate(rows):
            if not np.issubdtype(np.asarray(r).dtype, np.integer):
                raise ValueError(f"prompt token ids must be integers, got {np.asarray(r).dtype}")
            batch[i, :len(r)] = r
        self._check_tokens(batch)
        return batch, lengths

    def generate_with_cache(self, n_samples: int = 1, max_length: int | None = None,
                            temperature=1.0, top_k=None, top_p=None, prompt=None,
                            rngs: nnx.Rngs | None = None, **kwargs) -> jax.Array:
        """The guide's cached generation: `generate(..., use_cache=True)`."""
        return self.generate(n_samples, max_length, temperature, top_k, top_p, rngs,
                             prompt=prompt, use_cache=True, **kwargs)

    def sample_with_conditioning(self, conditioning, n_samples: int = 1, temperature=1.0,
                                 top_k=None, top_p=None, rngs: nnx.Rngs | None = None,
                                 max_length: int | None = None, **kwargs) -> jax.Array:
        """Continue the prompt `conditioning`: [P] or [1, P] gives n_samples completions of it;
        [B, P] or a list of B prompts gives one completion each."""
        if not isinstance(conditioning, list | tuple):
            conditioning = np.asarray(conditioning, np.int32)
            if conditioning.ndim == 2 and conditioning.shape[0] == 1:
                conditioning = conditioning[0]
            elif conditioning.ndim == 2:
                n_samples = conditioning.shape[0]
        else:
            n_samples = len(conditioning)
        return self.generate(n_samples, max_length, temperature, top_k, top_p, rngs,
                             prompt=conditioning, **kwargs)

    def beam_search(self, prompt=None, beam_size: int = 4, max_length: int | None = None,
                    length_penalty: float = 0.0, eos_id: int | None = None,
                    rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
        """(sequences [beam_size, max_length], scores [beam_size]), best first; see
        `chainrule.sampling.beam.beam_search` (rngs is accepted for the guide's API: beam
        search draws nothing)."""
        from chainrule.sampling.beam import beam_search

        return beam_search(self, prompt, beam_size=beam_size, max_length=max_length,
                           length_penalty=length_penalty, eos_id=eos_id)


class Knobs(NamedTuple):
    """Sampling settings as traced values: changing them never recompiles."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    min_new_tokens: jax.Array
    stop_ids: jax.Array  # [S] padded with -1
    pad_id: jax.Array


def _draw_key(rngs: nnx.Rngs | None) -> jax.Array:
    if rngs is None:
        return jax.random.key(0)
    if isinstance(rngs, nnx.Rngs):
        return rngs.sample() if "sample" in rngs else rngs()
    return rngs  # a raw key


def _choose(logits, key, seen, new_count, knobs: Knobs, filters: bool | None = None):
    """Penalise repeats, forbid stopping before min_new_tokens, then draw (`filters`: whether
    top-k/top-p may be on, static; see `process_logits`)."""
    logits = penalize_seen(logits, seen, knobs.repetition_penalty)
    is_stop = jnp.any(jnp.arange(logits.shape[-1])[:, None] == knobs.stop_ids[None, :], axis=-1)
    logits = jnp.where(is_stop & (new_count < knobs.min_new_tokens), -jnp.inf, logits)
    return sample_token(key, logits, temperature=knobs.temperature, top_k=knobs.top_k,
                        top_p=knobs.top_p, filters=filters)


def _decode_loop(buffer, offsets, start, end, key, knobs: Knobs, vocab: int, next_logits,
                 carry, stops=None, narrow=None, widen=None, filters: bool | None = None):
    """Fill slots start..end-1 of `buffer`; `next_logits(t, buffer, carry)` gives the logits
    for slot t (computed at slot t - 1). Stops early once every row has hit a stop token.

    `stops` (static, increasing, the last = buffer size) splits the steps into stretches
    t < stop, each a loop of its own that sees `narrow(carry, stop)`, merged back with
    `widen(carry, part)`: a cache narrowed to the slots filled so far keeps each step's
    attention proportional to the position, not to the whole cache."""
    n, size = buffer.shape
    rows = jnp.arange(n)
    slots = jnp.arange(size)
    in_prompt = (slots[None, :] >= offsets[:, None]) & (slots[None, :] < start)
    seen = jnp.zeros((n, vocab), bool).at[rows[:, None], buffer].max(in_prompt)

    def body(state):
        t, buffer, carry, key, done, seen = state
        key, sub = jax.random.split(key)
        logits, carry = next_logits(t, buffer, carry)
        token = _choose(logits, sub, seen, t - start, knobs, filters)
        token = jnp.where(done, knobs.pad_id, token)
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, token[:, None], t, axis=1)
        done = done | jnp.any(token[:, None] == knobs.stop_ids[None, :], axis=-1)
        return t + 1, buffer, carry, key, done, seen.at[rows, token].set(True)

    state = (start, buffer, carry, key, jnp.zeros((n,), bool), seen)
    for stop in stops or [size]:
        def cond(state, stop=stop):
            return (state[0] < jnp.minimum(end, stop)) & ~jnp.all(state[4])

        part = state[2] if narrow is None else narrow(state[2], stop)
        t, buffer, part, *rest = jax.lax.while_loop(cond, body, (state[0], state[1], part,
                                                                 *state[3:]))
        state = (t, buffer, part if widen is None else widen(state[2], part), *rest)
    return state[1]


@functools.partial(jax.jit, static_argnums=(7, 8))
def _decode_cached(model, buffer, offsets, start, end, key, knobs, prefill_len, filters):
    """Prefill the first `prefill_len` slots in one pass (none: the loop starts from an empty
    cache), then one token per step."""
    n, size = buffer.shape
    positions = jnp.maximum(jnp.arange(size)[None, :] - offsets[:, None], 0)
    cache = model.init_cache(n, size)
    if prefill_len:
        # Slots >= start hold garbage after the prefill; each is rewritten before it is read.
        cache = model(buffer[:, :prefill_len], positions=positions[:, :prefill_len],
                      cache=cache, cache_index=0, valid_from=offsets)["cache"]

    def next_logits(t, buffer, cache):
        token = jax.lax.dynamic_slice_in_dim(buffer, t - 1, 1, axis=1)
        pos = jax.lax.dynamic_slice_in_dim(positions, t - 1, 1, axis=1)
        out = model(token, positions=pos, cache=cache, cache_index=t - 1, valid_from=offsets)
        return out["logits"][:, -1], out["cache"]

    # Stretches ending at 256, 512, ... slots: each attends over the cache filled so far.
    stops = [s for s in (1 << i for i in range(8, size.bit_length())) if s < size] + [size]

    def narrow(cache, stop):
        return [(k[:, :, :stop], v[:, :stop]) for k, v in cache]

    def widen(cache, part):
        return [(jax.lax.dynamic_update_slice(k, kp, (0, 0, 0)),
                 jax.lax.dynamic_update_slice(v, vp, (0, 0, 0)))
                for (k, v), (kp, vp) in zip(cache, part, strict=True)]

    return _decode_loop(buffer, offsets, start, end, key, knobs, model.config.vocab_size,
                        next_logits, cache, stops, narrow, widen, filters)


@functools.partial(jax.jit, static_argnums=(7, 8))
def _decode_windowed(model, buffer, offsets, start, end, key, knobs, prefill_len, filters):
    """Reference decoder: a full forward pass over the last `sequence_length` slots per step."""
    del prefill_len
    n, size = buffer.shape
    window = min(model.config.sequence_length, size)

    def next_logits(t, buffer, carry):
        first = jnp.maximum(t - window, 0)
        context = jax.lax.dynamic_slice_in_dim(buffer, first, window, axis=1)
        slots = first + jnp.arange(window)
        # Positions count from each row's first real token inside the window.
        row_start = jnp.maximum(offsets, first)
        positions = jnp.maximum(slots[None, :] - row_start[:, None], 0)
        logits = model(context, positions=positions, valid_from=row_start - first)["logits"]
        # Slot t is predicted by the logits at slot t - 1 (not at t).
        return jax.lax.dynamic_index_in_dim(logits, t - 1 - first, axis=1, keepdims=False), carry

    return _decode_loop(buffer, offsets, start, end, key, knobs, model.config.vocab_size,
                        next_logits, None, filters=filters)
