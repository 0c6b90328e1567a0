"""Beam search over a cached decoder, compiled as one loop.

Works with any model that speaks the cached-decoding extra of the protocol:
`init_cache(batch, length)`, `reorder_cache(cache, index)` and
`model(tokens, cache=, cache_index=)` -> {"logits", "cache"}.

The beams are the batch. Each step scores every (beam, token) extension by the sum of
log-probabilities of the generated tokens and keeps the best `beam_size`; the caches follow
their parent beams. A beam that emits `eos_id` is finished: it keeps its score and only ever
extends by padding (at no cost), so it competes with live beams until better ones push it out.
At the end, scores are divided by the GNMT length penalty ((5 + length) / 6) ** alpha
(alpha = `length_penalty`, 0 = raw log-probability) and the beams are sorted, best first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def beam_search(model, prompt=None, *, beam_size: int = 4, max_length: int | None = None,
                length_penalty: float = 0.0, eos_id: int | None = None):
    """(sequences int32 [beam_size, max_length], scores float32 [beam_size]), best first."""
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
    pad = 0 if config.pad_token_id is None else config.pad_token_id
    size = min(1 << (max_length - 1).bit_length(), config.sequence_length)
    buffer = np.zeros((beam_size, size), np.int32)
    buffer[:, :prompt.size] = prompt
    seqs, scores = _beam_loop(model, jnp.asarray(buffer), jnp.int32(prompt.size),
                              jnp.int32(max_length), jnp.int32(-1 if eos is None else eos),
                              jnp.int32(pad), jnp.float32(length_penalty))
    return seqs[:, :max_length], scores


@jax.jit
def _beam_loop(model, buffer, start, end, eos, pad, alpha):
    k, size = buffer.shape
    vocab = model.config.vocab_size
    cache = model.init_cache(k, size)
    cache = model(buffer, cache=cache, cache_index=0)["cache"]  # prefill (slots >= start rewritten)
    # Only the first beam is live at the start, so the first expansion has no duplicates.
    scores = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)
    finished = jnp.zeros((k,), bool)
    lengths = jnp.zeros((k,), jnp.int32)

    def step(t, state):
        buffer, cache, scores, finished, lengths = state
        token = jax.lax.dynamic_slice_in_dim(buffer, t - 1, 1, axis=1)
        out = model(token, cache=cache, cache_index=t - 1)
        logp = jax.nn.log_softmax(out["logits"][:, -1].astype(jnp.float32), axis=-1)
        # A finished beam extends only by padding, at no cost.
        only_pad = jnp.where(jnp.arange(vocab) == pad, 0.0, -jnp.inf)
        logp = jnp.where(finished[:, None], only_pad[None, :], logp)
        flat = (scores[:, None] + logp).reshape(-1)
        scores, index = jax.lax.top_k(flat, k)
        parent, token = index // vocab, (index % vocab).astype(jnp.int32)
        buffer = buffer[parent]
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, token[:, None], t, axis=1)
        cache = model.reorder_cache(out["cache"], parent)
        lengths = lengths[parent] + (~finished[parent]).astype(jnp.int32)
        finished = finished[parent] | (token == eos)
        return buffer, cache, scores, finished, lengths

    buffer, _, scores, _, lengths = jax.lax.fori_loop(
        start, end, step, (buffer, cache, scores, finished, lengths))
    normalised = scores / (((5.0 + lengths) / 6.0) ** alpha)
    order = jnp.argsort(-normalised, stable=True)
    return buffer[order], normalised[order]
