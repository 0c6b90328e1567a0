"""The training loop: a compiled step per batch, then the hooks that are due.

    trainer = Trainer(run, resumed, total_steps=cfg.trainer.steps)
    trainer.add_hook(log, every=50)            # each hook: fn(StepInfo), its own interval
    trainer.train()

It knows no model family and no file: logging, evaluation, sample previews, checkpointing and
preemption are hooks (`chainrule.training.hooks`), which `chainrule.training.train` wires up
for a run directory. Each step's batch is fetched while the device runs the step before it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from chainrule.training.run import Resumed, Run


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after step `step`: the train iterator's position before the next
    batch (what a checkpoint must hold to resume bitwise), and what earlier hooks of the
    same step found (the validation metrics)."""

    step: int
    data_state: dict[str, Any]
    val_metrics: dict[str, float] | None = None


@dataclasses.dataclass
class Hook:
    """`fn(info)` every `every` steps (0: never), and at the last step when `at_end`."""

    fn: Callable[[StepInfo], None]
    every: int
    at_end: bool = True

    def due(self, step: int, last: int) -> bool:
        if step == last:
            return self.at_end
        return self.every > 0 and step % self.every == 0


class Trainer:
    """Runs the compiled train step from `resumed.step + 1` to `total_steps`."""

    def __init__(self, run: Run, resumed: Resumed, *, total_steps: int):
        self.run = run
        self.state = resumed.state
        self.start_step = resumed.step
        self.total_steps = total_steps
        self.hooks: list[Hook] = []
        self.data_wait_s = 0.0  # host seconds spent waiting for the data since last taken
        self.batch = self.next_batch()
        self.totals = run.zero_totals(self.batch)  # metric sums on device since the last log

    def add_hook(self, fn: Callable[[StepInfo], None], *, every: int,
                 at_end: bool = True) -> None:
        self.hooks.append(Hook(fn, every, at_end))

    def next_batch(self) -> dict[str, jax.Array]:
        start = time.perf_counter()
        host_batch = next(self.run.data.train)
        self.data_wait_s += time.perf_counter() - start
        return self.run.batch(host_batch)

    def take_data_wait(self) -> float:
        """Seconds the host waited for batches since the last call (the loader starving the
        step shows here, as `perf/data_wait_fraction` of the wall time)."""
        waited, self.data_wait_s = self.data_wait_s, 0.0
        return waited

    def reset_totals(self) -> None:
        self.totals = self.run.zero_totals(self.batch)

    def train(self) -> None:
        """The steps; a hook may stop the run by raising."""
        for step in range(self.start_step + 1, self.total_steps + 1):
            self.state, self.totals = self.run.steps.train_step(
                self.state, self.totals, self.batch, np.int32(step))
            info = StepInfo(step, self.run.data.train.get_state())
            self.batch = self.next_batch()  # the host fetches it while the step runs
            for hook in self.hooks:
                if hook.due(step, self.total_steps):
                    hook.fn(info)


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, ...); the last good checkpoint is kept."""


class Preempted(SystemExit):
    """Raised after the preemption checkpoint; exits with 143 like an unhandled SIGTERM."""

    def __init__(self, step: int):
        super().__init__(143)
        self.step = step
