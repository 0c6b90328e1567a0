"""Logit processors: temperature, top-k, top-p (nucleus), repetition penalty, greedy.

Every knob is a traced value, not a static one, so one compiled decoding loop serves every
setting (changing `top_k` from 40 to 50 does not recompile). Conventions shared by all
samplers and all model families:

- `temperature == 0` means greedy (argmax); otherwise logits are divided by it.
- `top_k <= 0` (or None) means no top-k filter; else exactly k candidates survive (ties broken
  by index, so the count is exact).
- `top_p >= 1` (or None) means no nucleus filter; else the smallest set of most likely tokens
  whose probability reaches `top_p` survives.
- `repetition_penalty == 1` means off; else logits of already-seen tokens are divided by it when
  positive and multiplied by it when negative (CTRL, Keskar et al. 2019).

Filtered logits are set to -inf; shapes are [..., vocab].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def _as(x, default, dtype):
    return jnp.asarray(default if x is None else x, dtype)


def temperature_scale(logits: jax.Array, temperature) -> jax.Array:
    """Divide by the temperature (a temperature of 0 leaves the logits for greedy)."""
    t = _as(temperature, 1.0, logits.dtype)
    return logits / jnp.where(t > 0, t, 1.0)


def _descending_ranks(logits: jax.Array) -> jax.Array:
    """rank[i] = position of token i when sorted by decreasing logit (0 = most likely)."""
    order = jnp.argsort(-logits, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def top_k_filter(logits: jax.Array, top_k) -> jax.Array:
    """Keep exactly the `top_k` most likely tokens (all of them when top_k <= 0)."""
    k = _as(top_k, 0, jnp.int32)
    keep = (_descending_ranks(logits) < k) | (k <= 0)
    return jnp.where(keep, logits, NEG_INF)


def top_p_filter(logits: jax.Array, top_p) -> jax.Array:
    """Keep the smallest set of most likely tokens whose total probability reaches `top_p`."""
    p = _as(top_p, 1.0, jnp.float32)
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # exclusive cumsum
    # The most likely token always stays, so top_p=0 is greedy rather than an empty set.
    keep_sorted = (mass_before < p) | (jnp.arange(logits.shape[-1]) == 0)
    keep = jnp.zeros_like(keep_sorted)
    keep = jnp.put_along_axis(keep, order, keep_sorted, axis=-1, inplace=False)
    return jnp.where(keep | (p >= 1.0), logits, NEG_INF)


def penalize_seen(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """Repetition penalty given a [..., vocab] mask of the tokens already present."""
    penalty = _as(penalty, 1.0, logits.dtype)
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def repetition_penalty(logits: jax.Array, previous_tokens: jax.Array, penalty,
                       valid: jax.Array | None = None) -> jax.Array:
    """Penalise tokens already present in `previous_tokens` [..., T] (`valid` masks positions)."""
    hits = jax.nn.one_hot(previous_tokens, logits.shape[-1], dtype=jnp.bool_)
    if valid is not None:
        hits = hits & valid[..., None]
    return penalize_seen(logits, jnp.any(hits, axis=-2), penalty)


def process_logits(logits: jax.Array, *, temperature=1.0, top_k=None, top_p=None,
                   filters: bool | None = None) -> jax.Array:
    """Temperature, then top-k, then top-p: the order every chainrule sampler uses.

    Equal to `top_p_filter(top_k_filter(temperature_scale(...)))`, with one sort shared by both
    filters, and no sort at all when both are off (a `lax.cond` on the traced knobs).
    `filters` (static) says in advance whether top-k/top-p may be on: False leaves the sort
    out of the program (a compiled loop without it builds faster), True keeps it unconditional.
    """
    logits = temperature_scale(logits.astype(jnp.float32), temperature)
    k = _as(top_k, 0, jnp.int32)
    p = _as(top_p, 1.0, jnp.float32)

    def filtered(logits):
        order = jnp.argsort(-logits, axis=-1, stable=True)
        ranked = jnp.take_along_axis(logits, order, axis=-1)
        keep = (jnp.arange(logits.shape[-1]) < k) | (k <= 0)
        probs = jax.nn.softmax(jnp.where(keep, ranked, NEG_INF), axis=-1)
        first = jnp.arange(logits.shape[-1]) == 0  # the most likely token always stays
        keep = keep & ((jnp.cumsum(probs, axis=-1) - probs < p) | (p >= 1.0) | first)
        keep = jnp.put_along_axis(jnp.zeros_like(keep), order, keep, axis=-1, inplace=False)
        return jnp.where(keep, logits, NEG_INF)

    if filters is None:
        return jax.lax.cond((k > 0) | (p < 1.0), filtered, lambda x: x, logits)
    return filtered(logits) if filters else logits


def greedy(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample_token(key: jax.Array, logits: jax.Array, *, temperature=1.0, top_k=None,
                 top_p=None, filters: bool | None = None) -> jax.Array:
    """Draw one token per row of `logits` [..., vocab]; temperature 0 is greedy. `filters`:
    as in `process_logits`."""
    filtered = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                              filters=filters)
    drawn = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    t = _as(temperature, 1.0, jnp.float32)
    return jnp.where(t > 0, drawn, greedy(logits))
