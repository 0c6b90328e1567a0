"""Metrics as the loop reports them: sums fetched from the device, turned into means and the
units people read (perplexity, bits per character / dimension)."""

from __future__ import annotations

import math
from typing import Any

import jax


def to_host(tree: dict[str, Any]) -> dict[str, float]:
    """Device scalars -> Python floats (one transfer)."""
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def summarise(totals: dict[str, float], scales: dict[str, float]) -> dict[str, float]:
    """Means of summed metrics; perplexity from the mean loss; per-unit bits from the scales."""
    count = max(totals.pop("count", 1.0), 1.0)
    means = {k: v / count for k, v in totals.items()}
    return derived_metrics(means, scales)


def derived_metrics(means: dict[str, float], scales: dict[str, float]) -> dict[str, float]:
    """Perplexity = exp(mean nll); `{name: s}` in `scales` adds name = nll / ln 2 * s."""
    out = dict(means)
    if "perplexity" in out and "nll_loss" in out:
        out["perplexity"] = math.exp(min(out["nll_loss"], 700.0))
    for name, scale in scales.items():
        if "nll_loss" in out:
            out[name] = out["nll_loss"] / math.log(2.0) * scale
    return out
