"""The Transformer's decode engine: the key/value cache, and the compiled loops that fill a
token buffer one slot per step, cached (`_decode_cached`, in stretches that attend only to the
slots filled so far) or windowed (`_decode_windowed`, a full forward pass per step: the slow
reference, which also slides past the context length). `TransformerAutoregressiveModel.generate`
prepares the buffer and calls them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from chainrule.models.base import DTYPES
from chainrule.models.transformer.config import TransformerConfig
from chainrule.sampling import penalize_seen, sample_token


def _bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two so a few compiled shapes serve every length."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def init_cache(config: TransformerConfig, batch_size: int, max_length: int):
    """Zeroed key/value cache, one (keys [B*H, D, S], values [B*H, S, D]) pair per layer:
    heads folded into the batch, keys transposed (see `CausalSelfAttention`)."""
    net = config.network
    n, hd = batch_size * net.num_heads, net.embed_dim // net.num_heads
    dtype = DTYPES[config.dtype or "float32"]
    return [(jnp.zeros((n, hd, max_length), dtype), jnp.zeros((n, max_length, hd), dtype))
            for _ in range(config.num_layers)]


def reorder_cache(config: TransformerConfig, cache, index: jax.Array):
    """The cache of the sequences `index` [B'] (beam search follows its parents)."""
    heads = config.network.num_heads
    rows = (index[:, None] * heads + jnp.arange(heads)).reshape(-1)
    return jax.tree.map(lambda c: c[rows], cache)


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
