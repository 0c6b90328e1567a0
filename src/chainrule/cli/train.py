"""`python train.py [group=option ...] [key=value ...]`: compose, validate, train.

The return value (final validation loss) is what Hydra sweepers (Optuna) minimise. With `-m`
every job is one W&B run in a group named after the sweep, and a failing job is recorded in
its directory (`failed.json`) instead of ending the sweep (chainrule.sweeps.job).

Bad input fails before the run directory is touched: Hydra itself rejects unknown keys and
wrong types; the `Preflight` callback checks values, the hardware and the run directory's
checkpoints before Hydra creates or writes into the directory; what only the data can tell
(a missing file, token ids beyond the vocabulary) fails before any checkpoint, and a run
directory this command created is then removed again.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

from chainrule.cli.common import (
    discard_new_run_dir_on_bad_input,
    fail_cleanly,
    hydra_main,
    note_new_run_dir,
    quiet_libraries,
    use_compilation_cache,
)
from chainrule.cli.schemas import register_configs
from chainrule.config import resolve
from chainrule.rundir import RunDir
from chainrule.sweeps.job import JobFailed, SweepJob, clear_failure, record_failure
from chainrule.tracking import write_json
from chainrule.training.config import TrainConfig


@fail_cleanly
def preflight(cfg: DictConfig, run_dir: Path) -> TrainConfig:
    """Every check that needs no data: config values, hardware (JAX starts here, as
    hardware= asks), the run directory's checkpoints (family, resume). Writes nothing."""
    quiet_libraries()
    train_cfg = resolve(cfg)
    from chainrule.training.run import check_run

    use_compilation_cache(train_cfg.compilation_cache_dir)
    check_run(train_cfg, run_dir)  # the same checks the run makes when it opens
    return train_cfg


class Preflight(Callback):
    """Hydra callback (conf/train.yaml): `preflight` before Hydra creates the run directory
    and writes its .hydra/ record and log there (single runs; sweep jobs check in the job)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(str(config.hydra.run.dir))
        task = copy.deepcopy(config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        preflight(task, run_dir)
        note_new_run_dir(run_dir)


def train_run(cfg: DictConfig, job: SweepJob | None) -> float:
    quiet_libraries()
    hydra_cfg = HydraConfig.get()
    if job is None and hydra_cfg.runtime.choices.get("sweep"):
        raise ValueError(f"sweep={hydra_cfg.runtime.choices['sweep']} defines a multirun: add "
                         f"-m (python train.py -m sweep=...)")
    if job is not None:  # one W&B group per sweep, one run per job
        if cfg.logger.get("group") is None:
            cfg.logger.group = job.wandb_group
        if cfg.logger.get("name") is None:
            cfg.logger.name = job.wandb_name
    train_cfg = resolve(cfg)  # every dataclass check runs here, before any compute
    from chainrule.training.restore import train_config_record
    from chainrule.training.train import train

    run_dir = RunDir(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    record = train_config_record(train_cfg)
    record["overrides"] = overrides
    if job is not None:
        record["sweep"] = job.as_dict()
    with discard_new_run_dir_on_bad_input(run_dir.path):
        results = train(train_cfg, run_dir.path, config_record=record)
    # The overrides make metrics.json self-describing: a sweep report needs nothing else.
    results = {**results, "overrides": overrides,
               **({"sweep": job.as_dict()} if job is not None else {})}
    write_json(run_dir.metrics, results)
    print(f"run directory: {run_dir.path}")
    shown = sorted((k for k in results if k.startswith("val_") and k != "val_nll_loss"),
                   key=lambda k: k != "val_loss") + ["tokens_per_s", "wall_time_s"]
    print("results: " + ", ".join(f"{k}={results[k]:.4g}" for k in shown
                                  if isinstance(results.get(k), int | float)))
    return float(results["val_loss"])


def run_job(cfg: DictConfig, job: SweepJob) -> float:
    """One job of a multirun: a failure is written to failed.json and raised as JobFailed,
    which Hydra's launchers record without stopping the other jobs."""
    try:
        loss = train_run(cfg, job)
    except Exception as err:
        path = record_failure(job, err)
        first_line = (str(err).strip().splitlines() or [repr(err)])[0]
        print(f"error: job {job.label} failed: {first_line} [{path}]", file=sys.stderr,
              flush=True)
        if os.environ.get("CHAINRULE_DEBUG"):
            raise
        raise JobFailed(f"job {job.num} failed: {type(err).__name__}: {first_line} "
                        f"(traceback in {path})") from None
    clear_failure(job.run_dir)
    return loss


def run(cfg: DictConfig) -> float:
    """Hydra's task function: a single run, or one job of a multirun (-m)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return run_job(cfg, SweepJob.from_hydra(hydra_cfg))
    return fail_cleanly(train_run)(cfg, None)


def main() -> None:
    register_configs()
    hydra_main(run, "train")


if __name__ == "__main__":
    main()
