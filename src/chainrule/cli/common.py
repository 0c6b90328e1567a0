"""Shared CLI plumbing: one-line errors for bad input, config types by name."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from omegaconf.errors import OmegaConfBaseException


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input (ValueError, config errors) exits 2 with one readable line, not a traceback.

    Set CHAINRULE_DEBUG=1 to see the traceback.
    """

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, OmegaConfBaseException) as err:
            if os.environ.get("CHAINRULE_DEBUG"):
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def quiet_libraries() -> None:
    """Hydra logs at INFO; Orbax (absl) and JAX's backend probing are too chatty there."""
    for name in ("absl", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(name).setLevel(logging.ERROR)
