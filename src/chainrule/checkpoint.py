"""Checkpoints: the one adapter over Orbax.

A checkpoint step holds three items:

    state  a pytree of arrays (model + optimizer state, RNG key data, step), written with
           Orbax's StandardSave (OCDBT/Zarr via TensorStore: nothing is pickled)
    data   the data iterator's JSON state (grain `get_state()`), optional
    meta   JSON facts about the run (W&B run id, model family, the resolved config), optional

plus the metrics it was saved with. Retention keeps the newest `keep_last` steps and the
`keep_best` steps with the best `best_metric`. Orbax writes each step into a temporary
directory and renames it on commit, so a crash mid-save leaves no half step behind; a step
damaged afterwards (lost or truncated files) is detected when `restore()` reads it, and
`restore()` then falls back to the newest step that reads cleanly, with a warning naming the
damaged step; the damaged steps are deleted only when a later save needs their step numbers.
A save that fails (a full disk) removes its partial step and raises CheckpointSaveError; the
steps before it stay as they were.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import operator
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

PyTree = Any
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # how Orbax names a step until its save commits


class CheckpointSaveError(OSError):
    """A step could not be written (disk full, quota, I/O error). The partial step is removed;
    the steps saved before it are untouched and restorable."""


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` hands back."""

    step: int
    state: PyTree
    data_state: dict | None
    meta: dict | None
    metrics: dict[str, float] | None


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def _check_json(name: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be JSON-serialisable (dicts, lists, str, numbers), "
                         f"got {type(value).__name__}: {e}") from None


def _step_number(step: Any) -> int:
    """A step as an int >= 0: python or numpy integers; not floats, not bools."""
    try:
        if isinstance(step, bool):
            raise TypeError
        step = operator.index(step)
    except TypeError:
        raise ValueError(f"step must be an int >= 0, got {step!r}") from None
    if step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return step


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    clean: dict[str, float] = {}
    for name, value in metrics.items():
        try:
            clean[str(name)] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {name!r} must be a number, got {value!r}") from None
    return clean


def _to_abstract(leaf: Any) -> Any:
    """Arrays -> ShapeDtypeStruct keeping their sharding; structs and scalars pass through."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    return ocp.utils.to_shape_dtype_struct(leaf)


class Checkpointer:
    """Save/restore training state with retention, best-metric tracking and damage fallback.

    `restore(step=None)` on a directory with no checkpoint returns None (so callers can write
    `restored = ckpt.restore(abstract) ; if restored is None: start fresh`); an explicit
    `step` that does not exist raises ValueError.
    """

    def __init__(self, directory: str | Path, *, keep_last: int = 3, keep_best: int = 1,
                 best_metric: str = "val_loss", best_mode: str = "min",
                 async_save: bool = False):
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        if not isinstance(keep_best, int) or keep_best < 0:
            raise ValueError(f"keep_best must be an int >= 0, got {keep_best!r}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if not isinstance(best_metric, str) or not best_metric:
            raise ValueError(f"best_metric must be a non-empty metric name, got {best_metric!r}")
        self.directory = Path(directory).expanduser().absolute()
        self.keep_last, self.keep_best = keep_last, keep_best
        self.best_metric, self.best_mode = best_metric, best_mode
        self.async_save = async_save

        policy = ocp_managers.AnyPreservationPolicy([
            ocp_managers.LatestN(n=keep_last),
            # Steps saved without the metric rank last (see _rank_value), so they are kept
            # only while they are among the newest: `keep_checkpoints_without_metrics` off.
            ocp_managers.BestN(get_metric_fn=self._rank_value, reverse=(best_mode == "min"),
                               n=keep_best, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            # best_fn makes Orbax write the metrics next to each step (it skips them without).
            best_fn=self._rank_value,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of saves that died mid-write
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=_item_handlers(),
                                              options=options)
        # Steps `restore()` found unreadable. They stay on disk (the failure may be a passing
        # I/O fault) until a save needs their step numbers: Orbax refuses to save at or below
        # the newest step, so a resumed run would otherwise never checkpoint again.
        self.damaged_steps: set[int] = set()

    def _metric(self, metrics: Mapping[str, Any] | None) -> float | None:
        """The tracked metric of a step, None when absent or not finite."""
        if not metrics or self.best_metric not in metrics:
            return None
        value = float(metrics[self.best_metric])
        return value if math.isfinite(value) else None

    def _rank_value(self, metrics: Mapping[str, Any] | None) -> float:
        """Sort key for BestN: a missing or NaN metric ranks as the worst possible value."""
        value = self._metric(metrics)
        if value is None:
            return math.inf if self.best_mode == "min" else -math.inf
        return value

    # ---- saving ------------------------------------------------------------------------

    def save(self, step: int, state: PyTree, *, data_state: dict | None = None,
             meta: dict | None = None, metrics: dict[str, float] | None = None,
             force: bool = False) -> bool:
        """Save `state` (and the JSON extras) as `step`. Returns False when Orbax skips it
        (a step <= the latest saved one); `force=True` saves regardless of the save policy."""
        step = _step_number(step)
        if data_state is not None:
            _check_json("data_state", data_state)
        if meta is not None:
            _check_json("meta", meta)
        clean_metrics = _numbers(metrics or {})

        for damaged in sorted(s for s in self.damaged_steps if s >= step):
            if damaged in self.all_steps():
                warnings.warn(f"deleting damaged checkpoint step {damaged} in {self.directory} "
                              f"to save step {step}", stacklevel=2)
                self._manager.delete(damaged)
            self.damaged_steps.discard(damaged)

        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        if meta is not None:
            args["meta"] = ocp.args.JsonSave(meta)
        # An empty dict (rather than None) keeps Orbax from warning about missing metrics.
        try:
            return bool(self._manager.save(step, args=ocp.args.Composite(**args),
                                           metrics=clean_metrics, force=force))
        except OSError as e:
            raise self._save_failed(step, e) from e

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        try:
            self._manager.wait_until_finished()
        except OSError as e:
            raise self._save_failed(None, e) from e

    def _save_failed(self, step: int | None, error: OSError) -> CheckpointSaveError:
        """Remove what the failed save wrote (Orbax writes a step into a temporary directory
        and renames it on commit, so nothing committed is touched) and say what is left."""
        for partial in self.directory.glob(f"{'*' if step is None else step}{_TMP_SUFFIX}*"):
            shutil.rmtree(partial, ignore_errors=True)
        latest = self.latest_step()
        kept = ("no earlier checkpoint exists" if latest is None else
                f"the last complete checkpoint, step {latest}, is intact and a re-run of the "
                "same command resumes from it")
        what = "a checkpoint" if step is None else f"checkpoint step {step}"
        reason = error.strerror or _short(error)
        hint = "; free some disk space first" if error.errno == errno.ENOSPC else ""
        err = CheckpointSaveError(f"{what} could not be written to {self.directory} ({reason}); "
                                  f"{kept}{hint}")
        err.errno = error.errno
        return err

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- inspecting --------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step (not checked for damage; `restore()` does that)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step with the best finite `best_metric`; None when no step recorded it."""
        best, best_value = None, None
        for step in self.all_steps():
            try:
                value = self._metric(self._manager.metrics(step))
            except (OSError, ValueError):  # an unreadable metrics file: not a candidate
                continue
            if value is None:
                continue
            better = best_value is None or (
                value < best_value if self.best_mode == "min" else value > best_value)
            if better:
                best, best_value = step, value
        return best

    # ---- restoring ---------------------------------------------------------------------

    def restore(self, abstract_state: PyTree, step: int | None = None) -> Restored | None:
        """Restore into the structure/dtypes/shardings of `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with shardings, so arrays land
        where they belong) or of concrete arrays (their shape/dtype/sharding are used).
        With `step=None` the newest step that reads cleanly is restored (damaged steps are
        skipped with a warning); None when there is no checkpoint at all.
        """
        steps = self.all_steps()
        abstract = jax.tree.map(_to_abstract, abstract_state)
        if step is not None:
            if step not in steps:
                raise ValueError(f"no checkpoint for step {step} in {self.directory}; "
                                 f"available steps: {steps}")
            return self._restore_step(step, abstract)
        if not steps:
            return None
        failures: list[tuple[int, Exception]] = []
        for candidate in reversed(steps):
            try:
                restored = self._restore_step(candidate, abstract)
            except Exception as e:  # damage surfaces as ValueError, JSONDecodeError, OSError...
                failures.append((candidate, e))
                self._damaged(candidate, e, "falling back to an earlier step")
                continue
            return restored
        first_step, first_error = failures[0]
        raise RuntimeError(f"no checkpoint in {self.directory} could be restored (steps "
                           f"{[s for s, _ in failures]}); the error at step {first_step} was: "
                           f"{type(first_error).__name__}: {_short(first_error)}"
                           ) from first_error

    def restore_best(self, abstract_state: PyTree) -> Restored | None:
        """The best step (`best_step`) when it reads cleanly, else what `restore()` gives:
        the newest step that does. None when there is no checkpoint."""
        best = self.best_step()
        if best is not None:
            try:
                return self._restore_step(best, jax.tree.map(_to_abstract, abstract_state))
            except Exception as e:
                self._damaged(best, e, "using the newest readable step instead of the best")
        return self.restore(abstract_state)

    def _damaged(self, step: int, error: Exception, fallback: str) -> None:
        self.damaged_steps.add(step)
        warnings.warn(f"checkpoint step {step} in {self.directory} could not be read "
                      f"({type(error).__name__}: {_short(error)}); it is damaged or incomplete, "
                      f"{fallback}", stacklevel=3)

    def _restore_step(self, step: int, abstract: PyTree) -> Restored:
        present = _items_present(self.directory, step)
        if "state" not in present:
            raise ValueError(f"checkpoint step {step} has no 'state' item (items: {present})")
        args = {"state": ocp.args.StandardRestore(abstract)}
        for item in ("data", "meta"):
            if item in present:
                args[item] = ocp.args.JsonRestore()
        out = self._manager.restore(step, args=ocp.args.Composite(**args))
        metrics = self._manager.metrics(step)
        return Restored(step=step, state=out["state"],
                        data_state=out["data"] if "data" in present else None,
                        meta=out["meta"] if "meta" in present else None,
                        metrics=dict(metrics) if metrics else None)


def _items_present(directory: Path, step: int) -> set[str]:
    """Which of state/data/meta a step holds (Orbax's default step naming: the bare number)."""
    step_dir = directory / str(step)
    return {item for item in ("state", "data", "meta") if (step_dir / item).is_dir()}


def _short(error: Exception, limit: int = 300) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return text if len(text) <= limit else text[:limit] + "..."


def read_meta(directory: str | Path) -> dict | None:
    """The `meta` of the newest checkpoint in `directory` that has a readable one.

    Needs no knowledge of the state's structure (sample.py uses it to learn a run's model
    family and config before building the model). None when there is no checkpoint or none
    carries meta; damaged steps are skipped with a warning.
    """
    directory = Path(directory).expanduser().absolute()
    if not directory.is_dir():
        return None
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(directory, item_handlers=_item_handlers(),
                               options=options) as manager:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                if "meta" not in _items_present(directory, step):
                    continue
                return manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:
                warnings.warn(f"checkpoint step {step} in {directory}: meta could not be read "
                              f"({type(e).__name__}: {_short(e)}); trying an earlier step",
                              stacklevel=2)
    return None
