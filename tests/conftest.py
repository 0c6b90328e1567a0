"""Shared fixtures: a small CPU-only environment and the path of ../shared/data."""

import os
from pathlib import Path

import jax
import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
