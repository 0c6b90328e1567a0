"""Logit processors and sampling shared by every model family."""

from chainrule.sampling.processors import (
    greedy,
    penalize_seen,
    process_logits,
    repetition_penalty,
    sample_token,
    temperature_scale,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "greedy",
    "penalize_seen",
    "process_logits",
    "repetition_penalty",
    "sample_token",
    "temperature_scale",
    "top_k_filter",
    "top_p_filter",
]
