"""Small timing helpers shared by the benchmarks: median of repeats, machine description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {os.cpu_count()} cores, "
            f"{cpu}, jax {jax.__version__}")


def timed(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> tuple[float, list]:
    """Median wall seconds of `fn()` (blocked until ready) over `repeats`, after warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def save(name: str, results: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **results}, indent=2))
    print(f"-> {path}")
    return path
