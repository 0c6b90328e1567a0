"""One job of a multirun: which sweep it belongs to, the overrides that define it, its failure.

Hydra's launchers keep going when a job raises an `Exception` (the job is marked FAILED and the
basic sweeper re-raises the first failure only once its batch has run; the Optuna sweeper marks
the trial failed), but a `SystemExit` would end the whole sweep. So inside a multirun the
CLI does not exit on bad input: it writes the error to `failed.json` in the job's directory
(what the report reads) and raises `JobFailed`.
"""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path
from typing import Any

from chainrule.rundir import RunDir
from chainrule.tracking import write_json

METRICS_FILE = RunDir.METRICS  # written by the training loop when a job completes
CURVES_FILE = RunDir.CURVES  # one line per logged step
FAILED_FILE = RunDir.FAILED  # written here when a job fails
MAX_WANDB_NAME = 128  # W&B truncates group and run names longer than this


def override_key(override: str) -> str:
    """'model.num_layers=4' -> 'model.num_layers' ('+key=..', '++key=..', '~key' too)."""
    return override.split("=", 1)[0].lstrip("+~")


class JobFailed(RuntimeError):
    """A sweep job failed; its error and traceback are in `failed.json` in its directory."""


@dataclasses.dataclass(frozen=True)
class SweepJob:
    """What identifies one job of a multirun (read from Hydra's runtime config)."""

    num: int
    sweep_dir: Path
    run_dir: Path
    overrides: tuple[str, ...]  # hydra.overrides.task: the command line plus the sweeper's
    sweep: str | None = None  # the `sweep=` preset, when one was used
    cwd: Path = Path(".")
    swept: tuple[str, ...] = ()  # the keys of hydra.sweeper.params (what a preset varies)

    @classmethod
    def from_hydra(cls, hydra_cfg: Any) -> SweepJob:
        return cls(num=int(hydra_cfg.job.num), sweep_dir=Path(hydra_cfg.sweep.dir),
                   run_dir=Path(hydra_cfg.runtime.output_dir),
                   overrides=tuple(hydra_cfg.overrides.task),
                   sweep=hydra_cfg.runtime.choices.get("sweep"),
                   cwd=Path(hydra_cfg.runtime.cwd),
                   swept=tuple(hydra_cfg.sweeper.get("params") or ()))

    @property
    def wandb_group(self) -> str:
        """The sweep directory, relative to where it was launched, without `multirun/`:
        unique per sweep (it holds the launch time) and the same for all of its jobs."""
        path = self.sweep_dir
        if path.is_absolute():
            try:
                path = path.resolve().relative_to(self.cwd.resolve())
            except ValueError:
                pass
        if path.parts[:1] == ("multirun",) and len(path.parts) > 1:
            path = Path(*path.parts[1:])
        return path.as_posix()[-MAX_WANDB_NAME:]

    @property
    def label(self) -> str:
        """`<num>: <overrides>`: those of the sweeper's params when it has some (the values a
        preset varies), else all but the `sweep=` choice."""
        own = [o for o in self.overrides if override_key(o) in self.swept] or \
            [o for o in self.overrides if override_key(o) != "sweep"]
        return f"{self.num}: {' '.join(own)}"

    @property
    def wandb_name(self) -> str:
        return self.label[:MAX_WANDB_NAME]

    def as_dict(self) -> dict[str, Any]:
        return {"num": self.num, "sweep": self.sweep, "sweep_dir": str(self.sweep_dir),
                "wandb_group": self.wandb_group}


def record_failure(job: SweepJob, err: BaseException) -> Path:
    """Write failed.json (error, traceback, overrides) into the job's directory."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    message = str(err).strip() or repr(err)
    path = job.run_dir / FAILED_FILE
    write_json(path, {
        "status": "failed",
        "error_type": type(err).__name__,
        "error": message,
        "traceback": "".join(traceback.format_exception(err)),
        "overrides": list(job.overrides),
        "sweep": job.as_dict(),
        "run_dir": str(job.run_dir),
    })
    return path


def clear_failure(run_dir: Path) -> None:
    """A job that completes on a re-run is no longer failed."""
    (Path(run_dir) / FAILED_FILE).unlink(missing_ok=True)
