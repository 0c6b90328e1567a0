"""A sweep directory read back: its jobs, what each was given, how each ended.

A job is any directory under the sweep that holds Hydra's `.hydra/overrides.yaml`. It is
`ok` when it wrote metrics.json, `failed` when it wrote failed.json (chainrule.sweeps.job),
and `incomplete` otherwise (still running, or killed). Only the files are read, so a report
works on a sweep copied from a cluster, and on one still running.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from chainrule.sweeps.job import CURVES_FILE, FAILED_FILE, METRICS_FILE, override_key

STATUSES = ("ok", "failed", "incomplete")


def override_value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def as_number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclasses.dataclass
class Job:
    """One job of a sweep, as its directory tells it."""

    run_dir: Path
    num: int | None
    overrides: tuple[str, ...]
    status: str
    metrics: dict[str, Any]  # metrics.json ({} unless ok)
    error: str | None = None  # failed.json's error_type: error

    def value(self, key: str) -> str | None:
        """The value this job's overrides give `key` (None if they do not set it)."""
        for override in self.overrides:
            if override_key(override) == key:
                return override_value(override)
        return None

    def metric(self, name: str) -> float | None:
        return as_number(self.metrics.get(name))

    def curves(self) -> dict[str, tuple[list[int], list[float]]]:
        """Every logged series of metrics.jsonl: name -> (steps, values), one value per step
        (a resumed run logs some steps twice: the later line wins)."""
        path = self.run_dir / CURVES_FILE
        series: dict[str, dict[int, float]] = {}
        if not path.is_file():
            return {}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            step = record.pop("step", None)
            record.pop("time", None)
            for name, value in record.items():
                if step is not None and isinstance(value, int | float):
                    series.setdefault(name, {})[int(step)] = float(value)
        return {name: (sorted(points), [points[s] for s in sorted(points)])
                for name, points in series.items()}


@dataclasses.dataclass
class Sweep:
    directory: Path
    jobs: list[Job]

    @property
    def name(self) -> str:
        """The `sweep=` preset the jobs share, else the directory's name."""
        names = {job.value("sweep") for job in self.jobs} - {None}
        return names.pop() if len(names) == 1 else self.directory.name

    def count(self, status: str) -> int:
        return sum(job.status == status for job in self.jobs)

    @property
    def varying(self) -> list[str]:
        """Override keys whose values differ between jobs, in command-line order."""
        keys: list[str] = []
        for job in self.jobs:
            keys += [k for k in map(override_key, job.overrides) if k not in keys]
        return [k for k in keys if len({job.value(k) for job in self.jobs}) > 1]

    @property
    def shared_overrides(self) -> list[str]:
        """Overrides every job was given alike."""
        if not self.jobs:
            return []
        varying = set(self.varying)
        return [o for o in self.jobs[0].overrides if override_key(o) not in varying]

    def label(self, job: Job) -> str:
        """A short name for a job: its values of the varying overrides ("4/128"), in the
        order of `label_keys`."""
        return "/".join(str(job.value(k)) for k in self.varying) or f"job {job.num}"

    @property
    def label_keys(self) -> str:
        """What the parts of a label are ("num_layers/embed_dim")."""
        return "/".join(k.rsplit(".", 1)[-1] for k in self.varying) or "job"


def _job_num(run_dir: Path) -> int | None:
    try:
        hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())
        return int(hydra_cfg["hydra"]["job"]["num"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return int(run_dir.name) if run_dir.name.isdigit() else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def load_job(run_dir: Path) -> Job:
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    metrics = _read_json(run_dir / METRICS_FILE)
    failed = _read_json(run_dir / FAILED_FILE)
    if metrics is not None:
        return Job(run_dir, _job_num(run_dir), tuple(overrides), "ok", metrics)
    if failed is not None:
        error = f"{failed.get('error_type', 'Error')}: {failed.get('error', '?')}"
        return Job(run_dir, _job_num(run_dir), tuple(overrides), "failed", {}, error)
    return Job(run_dir, _job_num(run_dir), tuple(overrides), "incomplete", {})


def job_dirs(directory: Path) -> list[Path]:
    return sorted(p.parent.parent for p in Path(directory).rglob(".hydra/overrides.yaml"))


def load_sweep(directory: str | Path) -> Sweep:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"sweep directory {directory} does not exist")
    jobs = [load_job(d) for d in job_dirs(directory)]
    if not jobs:
        raise ValueError(f"{directory} holds no Hydra job (no */.hydra/overrides.yaml): "
                         f"expected a multirun directory such as multirun/<date>/<time>")
    jobs.sort(key=lambda j: (j.num is None, j.num if j.num is not None else 0, str(j.run_dir)))
    return Sweep(directory, jobs)


def latest_sweep(root: str | Path = "multirun") -> Path:
    """The sweep directory under `root` whose newest job started last."""
    candidates: dict[Path, float] = {}
    for run_dir in job_dirs(Path(root)):
        started = (run_dir / ".hydra" / "overrides.yaml").stat().st_mtime
        sweep_dir = run_dir.parent
        candidates[sweep_dir] = max(candidates.get(sweep_dir, 0.0), started)
    if not candidates:
        raise FileNotFoundError(f"no sweep under {root}/: run one first (make sweep, or "
                                f"python train.py -m ...)")
    return max(candidates, key=candidates.get)


def numeric_points(jobs: Sequence[Job], x_of, y_of) -> tuple[list[Job], list[float],
                                                              list[float]]:
    """The ok jobs whose x and y are finite and positive (what a log-log plot can show)."""
    kept, xs, ys = [], [], []
    for job in jobs:
        x, y = x_of(job), y_of(job)
        if job.status == "ok" and x is not None and y is not None and x > 0 and y > 0:
            kept.append(job)
            xs.append(x)
            ys.append(y)
    return kept, xs, ys
