"""Sums over a whole split: one compiled step per batch, float64 totals on the host.

Each batch's loss reports its mean nll over the targets it scores and their count
("num_scored"); the device returns their product (the batch's nll sum, float32 over at most
one batch) and the count, and the host adds them up in float64, so a split of any size is
summed without float32 drift. The model is laid out on the mesh as training lays it out and
every process feeds its own rows of each batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from chainrule import parallel
from chainrule.data.evaluation import EvalSplit
from chainrule.training.steps import SCORED

IN_FLIGHT = 4  # batches dispatched before the host reads a result back (keeps the device busy)


@dataclasses.dataclass
class Totals:
    """Summed over a split: nll in nats (float64), targets scored, batches."""

    nll: float = 0.0
    scored: float = 0.0
    batches: int = 0

    def add(self, nll: float, scored: float) -> None:
        self.nll += float(nll)
        self.scored += float(scored)
        self.batches += 1


def _sums(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    metrics = model.train_loss(batch, training=False)
    if SCORED not in metrics:
        raise ValueError(f"{type(model).__name__}.loss_fn reports no {SCORED!r}: evaluation "
                         "needs the count of targets each batch scores")
    scored = metrics[SCORED].astype(np.float32)
    return metrics["nll_loss"].astype(np.float32) * scored, scored


class Scorer:
    """`scorer(split)` -> Totals for `model` laid out on `mesh` (axis rules `rules`)."""

    def __init__(self, model, mesh: jax.sharding.Mesh, rules: parallel.sharding.Rules):
        self.mesh, self.rules = mesh, rules
        self.graphdef, state = nnx.split(model)
        self.state = parallel.place_state(state, parallel.state_shardings(state, mesh, rules))
        self.step = jax.jit(functools.partial(_sums, self.graphdef),
                            out_shardings=parallel.replicated(mesh))

    def __call__(self, split: EvalSplit, *, progress: bool = True,
                 desc: str = "evaluate") -> Totals:
        totals, pending = Totals(), deque()
        bar = tqdm(total=split.num_batches, desc=desc, unit="batch", disable=not progress,
                   dynamic_ncols=True)
        with bar:
            for host_batch in split.batches():
                batch = parallel.global_batch(host_batch, self.mesh, self.rules)
                pending.append(self.step(self.state, batch))
                if len(pending) > IN_FLIGHT:
                    totals.add(*pending.popleft())
                    bar.update(1)
            while pending:
                totals.add(*pending.popleft())
                bar.update(1)
        return totals
