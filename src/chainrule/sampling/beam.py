"""Beam search over a cached decoder with a length penalty, compiled as one loop.

Works with any model that speaks the cached-decoding extra of the protocol:
`init_cache(batch, length)`, `reorder_cache(cache, index)` and
`model(tokens, cache=, cache_index=)` -> {"logits", "cache"}.

It follows GNMT (Wu et al. 2016) and Hugging Face's beam search. A hypothesis scores the sum
of the log-probabilities of its generated tokens divided by GNMT's length penalty
((5 + length) / 6) ** alpha, where alpha = `length_penalty` (0 = raw log-probability) and
`length` counts the generated tokens, `eos_id` included (Hugging Face divides by
length ** alpha instead). Two sets are kept:

  live beams  the `beam_size` best unfinished extensions (no `eos_id`), by log-probability
              (they all have the same length, so the penalty would not reorder them). They
              are the batch; the caches follow their parent beams.
  pool        the `beam_size` best finished hypotheses seen so far, by normalised score. Each
              step offers it the `eos_id` extension of every live beam (a superset of Hugging
              Face's, which looks for eos among its best 2 * beam_size candidates), so a
              finished hypothesis never takes a live beam's place.

At `max_length` the live beams are candidates too, normalised at that length (without an eos
they are the only ones). The search stops early once the pool is full and no live beam can
beat its worst entry. Log-probabilities are <= 0, so a live beam scoring s (<= 0) at length L
ends at some s' <= s and length L' in [L + 1, max_length - prompt], and since the penalty is
monotone in the length, s' / penalty(L') <= s / max(penalty(L + 1), penalty(max_length -
prompt)). That bound holds for every alpha, so stopping early never changes the result
(bounding by the current length's penalty, like Hugging Face's `early_stopping=False`, can stop
too soon when alpha > 0).

Only hypotheses that exist are returned: when fewer than `beam_size` distinct ones exist
(a short `max_length` over a small vocabulary) there are fewer rows, never a -inf score.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def beam_search(model, prompt=None, *, beam_size: int = 4, max_length: int | None = None,
                length_penalty: float = 0.0, eos_id: int | None = None):
    """(sequences int32 [n, max_length], normalised scores float32 [n]), best first, with
    n = min(beam_size, the number of hypotheses that exist). A finished hypothesis keeps its
    `eos_id`, then padding (`pad_token_id` or 0) to `max_length`."""
    seqs, scores, _ = _search(model, prompt, beam_size, max_length, length_penalty, eos_id)
    return seqs, scores


def _search(model, prompt, beam_size, max_length, length_penalty, eos_id, early_stop=True):
    """`beam_search`'s result and the slot the loop stopped at (max_length unless it stopped
    early; `early_stop=False` runs every step, for tests)."""
    config = model.config
    prompt = np.asarray([config.bos_token_id] if prompt is None else prompt, np.int32)
    if prompt.ndim == 2 and prompt.shape[0] == 1:
        prompt = prompt[0]
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError(f"beam_search takes one prompt of shape [P], got {prompt.shape}")
    model._check_tokens(prompt[None])
    max_length = config.sequence_length if max_length is None else int(max_length)
    if not prompt.size < max_length <= config.sequence_length:
        raise ValueError(f"max_length={max_length} must exceed the prompt ({prompt.size} tokens) "
                         f"and fit the context ({config.sequence_length})")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    eos = config.eos_token_id if eos_id is None else eos_id
    if eos is not None and not 0 <= eos < config.vocab_size:
        raise ValueError(f"eos_id={eos} is out of range [0, vocab_size={config.vocab_size})")
    pad = 0 if config.pad_token_id is None else config.pad_token_id
    size = min(1 << (max_length - 1).bit_length(), config.sequence_length)
    buffer = np.zeros((beam_size, size), np.int32)
    buffer[:, :prompt.size] = prompt
    seqs, scores, stopped = _beam_loop(
        model, jnp.asarray(buffer), jnp.int32(prompt.size), jnp.int32(max_length),
        jnp.int32(-1 if eos is None else eos), jnp.int32(pad), jnp.float32(length_penalty),
        early_stop=early_stop)
    n = int(np.isfinite(np.asarray(scores)).sum())  # one read, after the loop
    return seqs[:n, :max_length], scores[:n], int(stopped)


def _best(k, seqs, scores):
    """The k best rows of (seqs, scores), best first (ties: the earlier row)."""
    scores, index = jax.lax.top_k(scores, k)
    return seqs[index], scores


@functools.partial(jax.jit, static_argnames="early_stop")
def _beam_loop(model, buffer, start, end, eos, pad, alpha, *, early_stop):
    k, size = buffer.shape
    vocab = model.config.vocab_size
    is_eos = jnp.arange(vocab) == eos  # all False without an eos (eos = -1)

    def penalty(length):
        return ((5.0 + length) / 6.0) ** alpha

    cache = model.init_cache(k, size)
    cache = model(buffer, cache=cache, cache_index=0)["cache"]  # prefill (slots >= start rewritten)
    # Only the first beam is live at the start, so the first expansion has no duplicates.
    live = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)
    pool = (buffer, jnp.full((k,), -jnp.inf))  # finished sequences, normalised scores

    def step(state):
        t, buffer, cache, live, pool, _ = state
        token = jax.lax.dynamic_slice_in_dim(buffer, t - 1, 1, axis=1)
        out = model(token, cache=cache, cache_index=t - 1)
        logp = jax.nn.log_softmax(out["logits"][:, -1].astype(jnp.float32), axis=-1)
        total = live[:, None] + logp  # [k, vocab]: every extension of every live beam
        length = t - start + 1  # generated tokens once slot t is written
        # Every live beam's eos extension is offered to the pool: eos at t, padding after.
        ended = jnp.where(eos >= 0, total[:, jnp.maximum(eos, 0)], -jnp.inf) / penalty(length)
        slots = jnp.arange(size)[None]
        ended_seqs = jnp.where(slots == t, eos, jnp.where(slots > t, pad, buffer))
        pool = _best(k, jnp.concatenate([pool[0], ended_seqs]),
                     jnp.concatenate([pool[1], ended]))
        # The live beams: the k best unfinished extensions.
        live, index = jax.lax.top_k(jnp.where(is_eos[None], -jnp.inf, total).reshape(-1), k)
        parent, token = index // vocab, (index % vocab).astype(jnp.int32)
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer[parent], token[:, None], t, axis=1)
        cache = model.reorder_cache(out["cache"], parent)
        # A live beam's descendants end with length in [length + 1, end - start] and a
        # log-probability <= its own (<= 0): none can beat the worst of a full pool when
        # best / (the largest penalty over those lengths) < worst.
        reach = jnp.max(live) / jnp.maximum(penalty(length + 1), penalty(end - start))
        hopeless = ((reach < pool[1][-1]) | (jnp.max(live) == -jnp.inf)) & early_stop
        return t + 1, buffer, cache, live, pool, hopeless

    def running(state):
        t, *_, hopeless = state
        return (t < end) & ~hopeless

    t, buffer, _, live, pool, _ = jax.lax.while_loop(
        running, step, (start, buffer, cache, live, pool, jnp.bool_(False)))
    # At max_length the live beams are hypotheses too (after an early stop they are not).
    final = jnp.where(t == end, live / penalty(end - start), -jnp.inf)
    seqs, scores = _best(k, jnp.concatenate([pool[0], buffer]),
                         jnp.concatenate([pool[1], final]))
    return seqs, scores, t
