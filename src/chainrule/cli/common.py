"""Shared CLI plumbing: one-line errors for bad input and stopped runs, quiet libraries."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from chainrule.rundir import RunDir

# Bad input: the command cannot run as given (exit 2, like a usage error).
BAD_INPUT = (ValueError, FileNotFoundError, OmegaConfBaseException)
# Run directories this process is about to create, each with the top-most directory it creates
# (see `note_new_run_dir`).
_NEW_RUN_DIRS: dict[Path, Path] = {}


def _stopped_run(err: BaseException) -> bool:
    """A run that started and then stopped cleanly: a non-finite step, a checkpoint that
    could not be written. Their modules are loaded by the time they can be raised."""
    loop, checkpoint = (sys.modules.get(f"chainrule.{m}") for m in ("training.loop", "checkpoint"))
    return ((loop is not None and isinstance(err, loop.TrainingError))
            or (checkpoint is not None and isinstance(err, checkpoint.CheckpointSaveError)))


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input exits 2 and a stopped run exits 1, each with one readable line on stderr
    instead of a traceback. Set CHAINRULE_DEBUG=1 to see the traceback."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            bad_input = isinstance(err, BAD_INPUT)
            if os.environ.get("CHAINRULE_DEBUG") or not (bad_input or _stopped_run(err)):
                raise
            print(f"error: {_one_line(err)}", file=sys.stderr)
            sys.exit(2 if bad_input else 1)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def config_error_line(err: BaseException) -> str:
    """One line for a Hydra composition error: what is wrong, and what is expected."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from chainrule.config import unknown_key_message

    cause = err.__cause__
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        known = getattr(cause.object_type, "__dataclass_fields__", None)
        if known:
            return unknown_key_message(cause.full_key, list(known))
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {_one_line(cause)}"
    if isinstance(err, MissingConfigException) and err.options:
        options = [o for o in err.options if not o.endswith("_schema")]
        return f"no config {err.missing_cfg_file!r}; expected one of: {', '.join(options)}"
    if isinstance(err, OverrideParseException):
        return f"cannot parse the override {err.override!r}: {_one_line(err)}"
    return _one_line(err)


def hydra_main(task: Callable[[Any], Any], config_name: str) -> None:
    """`hydra.main` over CONF_DIR (the package's conf/), with Hydra's own config errors (an
    unknown key, a wrong type, an unknown option) as one line and exit code 2 instead of its
    multi-line report."""
    import hydra
    from hydra.errors import HydraException

    from chainrule.cli import CONF_DIR

    condense = not os.environ.get("HYDRA_FULL_ERROR")
    if condense:  # Hydra then raises its errors instead of printing them
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(task)()
    except (HydraException, OmegaConfBaseException) as err:
        if not condense:
            raise
        print(f"error: {config_error_line(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if condense:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def use_compilation_cache(path: str | None) -> None:
    """Keep compiled XLA programs on disk across processes, so a re-run (a resumed training,
    the next sample.py) loads them instead of compiling them. Call before any JAX work.
    JAX_COMPILATION_CACHE_DIR in the environment, where set, wins; `path=None` turns it off."""
    if path is None or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
    # Also the many small programs that build a model eagerly (each well under a second).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def note_new_run_dir(run_dir: Path) -> None:
    """Remember, before Hydra creates it, that `run_dir` does not exist yet."""
    run_dir = Path(os.path.abspath(run_dir))  # as Hydra's runtime.output_dir spells it
    if run_dir.exists():
        return
    top = run_dir
    while not top.parent.exists():
        top = top.parent
    _NEW_RUN_DIRS[run_dir] = top


@contextlib.contextmanager
def discard_new_run_dir_on_bad_input(run_dir: Path) -> Iterator[None]:
    """A run directory this command created is removed again when the command fails on bad
    input before any checkpoint exists, so a failed command leaves nothing behind.

    Only directories noted by `note_new_run_dir` qualify, and only while no other process
    holds the run's lock; an existing run directory is never removed.
    """
    run_dir = Path(os.path.abspath(run_dir))
    top = _NEW_RUN_DIRS.pop(run_dir, None)
    try:
        yield
    except BAD_INPUT:
        if top is not None and not RunDir(run_dir).has_checkpoints():
            _remove_new_dirs(run_dir, top)
        raise


def _remove_new_dirs(run_dir: Path, top: Path) -> None:
    try:
        with RunDir(run_dir).lock():  # no other process is training here
            shutil.rmtree(run_dir)
    except (ValueError, OSError):
        return
    for parent in [p for p in run_dir.parents if p == top or top in p.parents]:
        with contextlib.suppress(OSError):  # not empty: something else lives there
            parent.rmdir()


def quiet_libraries() -> None:
    """Hydra logs at INFO; Orbax (absl) and JAX's backend probing are too chatty there."""
    for name in ("absl", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(name).setLevel(logging.ERROR)
