"""The layout of a run directory: every file name in one place.

    <run dir>/
      run.json        what the run is, complete without its data: the model config as the
                      data completed it, the codec (tokenizer / image levels / μ-law and
                      sample rate), the training config it was started with
      checkpoints/    Orbax steps (parameters, optimizer state, RNG key, data iterator state)
      metrics.jsonl   one line per logged step;  metrics.json: the final results
      samples/        text, PNG grids (+ .npy), WAV files, as people look at them
      failed.json     a sweep job that failed;  .lock: the training process's lock
      .hydra/         Hydra's record of the composed config and overrides

`chainrule.load_run(run_dir)` reads `run.json` and a checkpoint and nothing else. Runs written
before `run.json` existed (format 1) kept the config in their checkpoints' metadata and a text
run's tokenizer in `tokenizer.json`; they still load (`chainrule.training.restore`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2  # 1: no run.json (config in checkpoint metadata, tokenizer.json beside)


class RunDir:
    """Paths of one run directory, and the small files it owns."""

    RUN_FILE = "run.json"
    CHECKPOINTS = "checkpoints"
    METRICS = "metrics.json"
    CURVES = "metrics.jsonl"
    SAMPLES = "samples"
    FAILED = "failed.json"
    LOCK = ".lock"
    LEGACY_TOKENIZER = "tokenizer.json"  # format 1 text runs

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def existing(cls, path: str | Path, what: str = "checkpoint") -> RunDir:
        """A trained run's directory (its checkpoints/ folder is accepted too), or a one-line
        error naming `what=` the user passed."""
        path = Path(path).expanduser()
        if path.name == cls.CHECKPOINTS:
            path = path.parent
        if not path.is_dir():
            raise ValueError(f"{what}={str(path)!r} is not a directory: expected a run "
                             "directory written by train.py")
        return cls(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def run_file(self) -> Path:
        return self.path / self.RUN_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def curves(self) -> Path:
        return self.path / self.CURVES

    @property
    def samples(self) -> Path:
        return self.path / self.SAMPLES

    @property
    def legacy_tokenizer(self) -> Path:
        return self.path / self.LEGACY_TOKENIZER

    def evaluation(self, split: str, step: int, source: str | None = None) -> Path:
        """Where evaluate.py writes its results: eval_<split>[_<source>]_step<N>.json
        (`source` names data other than the run's own)."""
        tag = f"_{source}" if source else ""
        return self.path / f"eval_{split}{tag}_step{step}.json"

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir()

    def write_run(self, record: dict[str, Any]) -> None:
        """run.json, written whole or not at all (a temporary file renamed over it)."""
        write_json_atomic(self.run_file, {"format": FORMAT_VERSION, **record})

    def read_run(self) -> dict[str, Any] | None:
        """run.json's record; None for a run written before it existed (format 1)."""
        if not self.run_file.is_file():
            return None
        try:
            record = json.loads(self.run_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.run_file} is not valid JSON ({err}); expected the record "
                             "train.py writes") from None
        version = record.get("format") if isinstance(record, dict) else None
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{self.run_file} has format {version!r}; this chainrule reads "
                             f"formats up to {FORMAT_VERSION} (a newer chainrule wrote it?)")
        return record

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One training process per run directory: a second one fails instead of interleaving."""
        with open(self.path / self.LOCK, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                raise ValueError(f"another process (pid {handle.read().strip() or '?'}) is "
                                 f"training in {self.path}; wait for it or use another run "
                                 "directory") from None
            handle.truncate(0)
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def write_json_atomic(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write JSON to a temporary file and rename it over `path`: readers and a crash never see
    half a file (the one JSON writer of run directories, tokenizers and results)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
