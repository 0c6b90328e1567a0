"""`train(cfg, run_dir)`: a training run from start (or resume) to its results.

    open_run -> assemble -> resume -> Trainer + hooks -> results (metrics.json, W&B summary)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from chainrule import parallel
from chainrule.checkpoint import Checkpointer
from chainrule.rundir import RunDir
from chainrule.tracking import Tracker
from chainrule.training.config import TrainConfig
from chainrule.training.hooks import Session
from chainrule.training.loop import Trainer
from chainrule.training.run import assemble, open_run, resume


@contextlib.contextmanager
def preemption_flag() -> Iterator[threading.Event]:
    """An Event set on SIGTERM (preemption), so the loop can checkpoint and stop cleanly."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: TrainConfig, run_dir: str | Path, *,
          config_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns the final results (also metrics.json).

    `config_record`: the training config as saved with the run (default: `cfg`'s values; the
    CLI adds the command line's overrides). SIGTERM checkpoints the current step and exits
    (code 143); re-running resumes there.
    """
    run_dir = RunDir(run_dir)
    with open_run(cfg, run_dir) as mesh, preemption_flag() as preempted:
        run = assemble(cfg, run_dir, mesh, config_record=config_record)
        print(f"{run.family}: {run.model.num_params():,} parameters on "
              f"{parallel.describe(mesh)}")
        checkpointer = Checkpointer(run_dir.checkpoints, keep_last=cfg.trainer.keep_checkpoints,
                                    keep_best=1, best_metric="val_loss")
        resumed = resume(run, checkpointer, run_dir)
        tracker = Tracker(run_dir.path, run.config_record, cfg.logger,
                          run_id=resumed.wandb_run_id, is_main_process=jax.process_index() == 0,
                          resume=resumed.step > 0)
        exit_code = 1
        try:
            trainer = Trainer(run, resumed, total_steps=cfg.trainer.steps)
            session = Session(trainer, tracker, checkpointer, resumed, preempted, run_dir)
            session.install()
            trainer.train()
            results = session.finish()
            exit_code = 0
            return results
        finally:
            checkpointer.close()
            tracker.finish(exit_code=exit_code)  # a failed or preempted run is not a success
