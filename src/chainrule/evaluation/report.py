"""Totals -> the numbers papers report, in their units.

  every kind  nll (nats per scored target), perplexity, num_scored, nll_sum
  text        bits_per_token; bits_per_char and bits_per_byte: total bits over the characters /
              UTF-8 bytes of the text the scored tokens spell (so BPE and characters compare)
  image       bits_per_dim (per sub-pixel); nats_per_image (binarized MNIST's convention)
  audio       bits_per_sample
"""

from __future__ import annotations

import math
from typing import Any

from chainrule.evaluation.score import Totals

LN2 = math.log(2.0)


def metrics(totals: Totals, counts: dict[str, int], kind: str) -> dict[str, Any]:
    if totals.scored <= 0:
        raise ValueError("the split holds nothing to score (no target with context)")
    nll = totals.nll / totals.scored
    out: dict[str, Any] = {"nll": nll, "perplexity": math.exp(min(nll, 700.0)),
                           "nll_sum": totals.nll, "num_scored": int(totals.scored)}
    bits = totals.nll / LN2
    if kind == "text":
        out["bits_per_token"] = nll / LN2
        out["bits_per_char"] = bits / counts["characters"]
        out["bits_per_byte"] = bits / counts["bytes"]
    elif kind == "image":
        out["bits_per_dim"] = nll / LN2
        out["nats_per_image"] = totals.nll / counts["images"]
    elif kind == "audio":
        out["bits_per_sample"] = nll / LN2
    return {**out, **{k: int(v) for k, v in counts.items()}}
