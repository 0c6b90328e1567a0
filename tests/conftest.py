"""Shared fixtures: a small CPU-only environment and the path of ../shared/data."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# One persistent compilation cache for the whole session, set before JAX starts: the xdist
# workers and every train.py / sample.py subprocess inherit it, so the many tiny runs that
# compile the same programs compile them once. A fresh directory per session (made by the first
# process that loads this file, removed when it exits): no result depends on an earlier run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="chainrule-jax-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
# Prepared data (the text pipeline's token shards) in a fresh cache per session, the same way.
if "CHAINRULE_DATA_CACHE" not in os.environ:
    os.environ["CHAINRULE_DATA_CACHE"] = tempfile.mkdtemp(prefix="chainrule-data-")
    atexit.register(shutil.rmtree, os.environ["CHAINRULE_DATA_CACHE"], True)
# Test programs are tiny: compiling them dominates, so LLVM optimises none of them (the
# results do not change: XLA's own passes still run, and fast math stays off).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# 8 CPU devices in every test process, for the sharding tests (hardware=cpu still uses one;
# computations without a mesh run on the first device, as with one).
jax.config.update("jax_num_cpu_devices", 8)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
