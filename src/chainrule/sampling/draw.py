"""One entry point from a `SamplerConfig` to samples, for any model family and strategy.

Used by the training loop's previews and by sample.py. Token-by-token strategies call the
model's `generate`; `beam` and `speculative` need a token model (with `beam_search` and a
key/value cache).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx


def draw(model, sampler, *, key: jax.Array, prompts: list[np.ndarray] | None = None,
         draft=None) -> tuple[list[np.ndarray], list[str]]:
    """(samples, notes): one array per sample and a short note each (score, acceptance)."""
    if sampler.name in ("beam", "speculative") and not hasattr(model, "beam_search"):
        raise ValueError(f"sampler={sampler.name} is for token models (Transformer); this "
                         f"model is a {type(model).__name__}")
    if sampler.name == "beam":
        return _beam(model, sampler, prompts)
    if sampler.name == "speculative":
        return _speculative(model, draft, sampler, prompts, key)
    kwargs: dict[str, Any] = sampler.kwargs()
    n = sampler.num_samples
    if prompts is not None:  # token models: every prompt n times, one ragged batch
        kwargs.update(prompt=[p for p in prompts for _ in range(n)],
                      min_new_tokens=sampler.min_new_tokens,
                      stop_tokens=sampler.stop_tokens,
                      repetition_penalty=sampler.repetition_penalty)
        n = len(prompts) * n
    if sampler.max_new_tokens is not None:
        kwargs["max_new_tokens"] = sampler.max_new_tokens
    elif sampler.max_length is not None:
        kwargs["max_length"] = sampler.max_length
    samples = np.asarray(model.generate(n_samples=n, rngs=nnx.Rngs(sample=key), **kwargs))
    return list(samples), [""] * len(samples)


def _new_tokens(model, sampler, prompt_len: int) -> int:
    if sampler.max_new_tokens is not None:
        return sampler.max_new_tokens
    total = sampler.max_length or model.config.sequence_length
    return total - prompt_len


def _beam(model, sampler, prompts):
    samples, notes = [], []
    for prompt in prompts or [None]:
        length = 1 if prompt is None else len(prompt)
        seqs, scores = model.beam_search(prompt=prompt, beam_size=sampler.beam_size,
                                         max_length=length + _new_tokens(model, sampler, length),
                                         length_penalty=sampler.length_penalty)
        keep = min(sampler.num_samples, sampler.beam_size)
        samples += list(np.asarray(seqs)[:keep])
        notes += [f"beam score {float(s):.3f}" for s in np.asarray(scores)[:keep]]
    return samples, notes


def _speculative(model, draft, sampler, prompts, key):
    from chainrule.sampling.speculative import speculative_sample

    if draft is None:
        raise ValueError("sampler=speculative needs a draft model (sampler.draft_checkpoint=)")
    samples, notes = [], []
    for i, prompt in enumerate(prompts or [np.array([model.config.bos_token_id])]):
        result = speculative_sample(
            model, draft, prompt, _new_tokens(model, sampler, len(prompt)),
            num_draft_tokens=sampler.num_draft_tokens, temperature=sampler.temperature,
            top_k=sampler.top_k, top_p=sampler.top_p, n_samples=sampler.num_samples,
            rngs=jax.random.fold_in(key, i))
        samples += list(np.asarray(result.tokens))
        notes += [f"acceptance {result.acceptance_rate:.2f}, "
                  f"{result.tokens_per_target_call:.2f} tokens per target pass"] * len(
                      result.tokens)
    return samples, notes
