"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with the exact acceptance rule.

A small draft model proposes `num_draft_tokens` tokens; the target scores all of them in one
cached forward pass. Draft token x (drawn from q) is accepted with probability
min(1, p(x) / q(x)); at the first rejection a token is drawn from norm(max(0, p - q)) and the
round ends; if every draft token is accepted, one more is drawn from p. The output is
distributed exactly as sampling from the target alone (p and q being the processed
distributions: temperature, top-k and top-p apply to both); with temperature 0 it is greedy
target decoding.

Both models keep key/value caches. The core runs on one sequence, so each sample accepts at
its own pace, and is vmapped over samples inside one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chainrule.sampling.processors import process_logits


@dataclasses.dataclass
class SpeculativeResult:
    tokens: jax.Array  # int32 [n_samples, prompt + max_new_tokens]
    accepted: jax.Array  # int32 [n_samples]: draft tokens accepted
    drafted: jax.Array  # int32 [n_samples]: draft tokens proposed
    target_calls: jax.Array  # int32 [n_samples]: target forward passes (rounds)

    @property
    def acceptance_rate(self) -> float:
        return float(jnp.sum(self.accepted) / jnp.maximum(jnp.sum(self.drafted), 1))

    @property
    def tokens_per_target_call(self) -> float:
        new = self.accepted + self.target_calls  # each round adds accepted + 1 tokens
        return float(jnp.sum(new) / jnp.maximum(jnp.sum(self.target_calls), 1))


def speculative_sample(target, draft, prompt, max_new_tokens: int, num_draft_tokens: int = 4,
                       temperature: float = 1.0, top_k=None, top_p=None, n_samples: int = 1,
                       rngs: nnx.Rngs | jax.Array | None = None) -> SpeculativeResult:
    """Draw `n_samples` continuations of `prompt` [P] from `target`, drafted by `draft`."""
    prompt = np.asarray(prompt, np.int32).reshape(-1)
    if prompt.size == 0:
        raise ValueError("speculative_sample needs a prompt of at least one token")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"target and draft vocabularies differ ({target.config.vocab_size} vs "
                         f"{draft.config.vocab_size}): they must share a tokenizer")
    if num_draft_tokens < 1 or max_new_tokens < 1:
        raise ValueError("num_draft_tokens and max_new_tokens must be >= 1")
    for m in (target, draft):
        m._check_tokens(prompt[None])
    total = prompt.size + max_new_tokens
    size = 1 << (total + num_draft_tokens + 1 - 1).bit_length()
    context = min(target.config.sequence_length, draft.config.sequence_length)
    if total + num_draft_tokens + 1 > context:
        raise ValueError(f"prompt + max_new_tokens + num_draft_tokens + 1 = "
                         f"{total + num_draft_tokens + 1} exceeds the models' context ({context})")
    size = min(size, context)
    buffer = np.zeros((size,), np.int32)
    buffer[:prompt.size] = prompt
    if rngs is None:
        key = jax.random.key(0)
    elif isinstance(rngs, nnx.Rngs):
        key = rngs.sample() if "sample" in rngs else rngs()
    else:
        key = rngs
    keys = jax.random.split(key, n_samples)
    tokens, accepted, drafted, calls = _speculative(
        target, draft, jnp.asarray(buffer), jnp.int32(prompt.size), jnp.int32(total), keys,
        jnp.float32(temperature), jnp.int32(top_k or 0),
        jnp.float32(1.0 if top_p is None else top_p), num_draft_tokens)
    return SpeculativeResult(tokens[:, :total], accepted, drafted, calls)


def _probs(logits, temperature, top_k, top_p):
    """The processed distribution; temperature 0 is a point mass on the argmax."""
    soft = jax.nn.softmax(process_logits(logits, temperature=temperature, top_k=top_k,
                                         top_p=top_p), axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1])
    return jnp.where(temperature > 0, soft, hard)


@functools.partial(jax.jit, static_argnums=(9,))
def _speculative(target, draft, buffer, prompt_len, total, keys, temperature, top_k, top_p, k):
    t_graph, t_state = nnx.split(target)
    d_graph, d_state = nnx.split(draft)
    size = buffer.shape[0]

    def one(key):
        tgt, drf = nnx.merge(t_graph, t_state), nnx.merge(d_graph, d_state)
        probs = functools.partial(_probs, temperature=temperature, top_k=top_k, top_p=top_p)
        row = buffer[None]
        # Invariant: both caches hold the first n - 1 tokens; token n - 1 is not fed yet.
        t_cache = tgt(row, cache=tgt.init_cache(1, size), cache_index=0)["cache"]
        d_cache = drf(row, cache=drf.init_cache(1, size), cache_index=0)["cache"]

        def round_(state):
            row, n, t_cache, d_cache, key, accepted, calls = state
            key, k_draft, k_accept, k_extra = jax.random.split(key, 4)

            def draft_step(i, carry):  # feeds slot n - 1 + i, proposes slot n + i
                row, d_cache, qs = carry
                token = jax.lax.dynamic_slice_in_dim(row, n - 1 + i, 1, axis=1)
                out = drf(token, cache=d_cache, cache_index=n - 1 + i)
                q = probs(out["logits"][0, -1])
                x = jax.random.categorical(jax.random.fold_in(k_draft, i), jnp.log(q))
                # The (k+1)-th call only feeds the last draft token into the draft cache.
                x = jnp.where(i < k, x, row[0, jnp.minimum(n + i, size - 1)])
                row = jax.lax.dynamic_update_slice_in_dim(row, x.astype(jnp.int32)[None, None],
                                                          n + i, axis=1)
                qs = jnp.where(i < k, jax.lax.dynamic_update_index_in_dim(
                    qs, q, jnp.minimum(i, k - 1), axis=0), qs)
                return row, out["cache"], qs

            qs = jnp.zeros((k, tgt.config.vocab_size), jnp.float32)
            row, d_cache, qs = jax.lax.fori_loop(0, k + 1, draft_step, (row, d_cache, qs))
            chunk = jax.lax.dynamic_slice_in_dim(row, n - 1, k + 1, axis=1)  # x_{n-1}, d_0..
            out = tgt(chunk, cache=t_cache, cache_index=n - 1)
            ps = probs(out["logits"][0])  # [k + 1, V]: p for slots n .. n + k
            drafts = chunk[0, 1:]
            p_d = jnp.take_along_axis(ps[:k], drafts[:, None], axis=1)[:, 0]
            q_d = jnp.take_along_axis(qs, drafts[:, None], axis=1)[:, 0]
            u = jax.random.uniform(k_accept, (k,))
            ok = u < jnp.minimum(1.0, p_d / jnp.maximum(q_d, 1e-30))
            a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))  # leading accepts
            residual = jnp.maximum(ps[jnp.minimum(a, k - 1)] - qs[jnp.minimum(a, k - 1)], 0.0)
            residual = residual / jnp.maximum(residual.sum(), 1e-30)
            final = jnp.where(a < k, residual, ps[k])
            x = jax.random.categorical(k_extra, jnp.log(final)).astype(jnp.int32)
            row = jax.lax.dynamic_update_slice_in_dim(row, x[None, None], n + a, axis=1)
            return row, n + a + 1, out["cache"], d_cache, key, accepted + a, calls + 1

        def unfinished(state):
            return state[1] < total

        state = (row, prompt_len, t_cache, d_cache, key, jnp.int32(0), jnp.int32(0))
        row, _, _, _, _, accepted, calls = jax.lax.while_loop(unfinished, round_, state)
        return row[0], accepted, calls * k, calls

    return jax.vmap(one)(keys)
