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
import jax.numpy as jnp

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


def matvec_chain_seconds(mats: list, steps: int = 2000) -> float:
    """Seconds per step to pass one vector through every matrix of `mats` in turn (each
    product reads the rows it needs; float32 arithmetic, tanh between), compiled as one loop:
    the least a batch-1 decode step that reads these weights can take. Median of 5 runs."""
    width = max(w.shape[0] for w in mats)

    def body(_, x):
        for w in mats:
            y = jnp.tanh(x[:, :w.shape[0]] @ w.astype(jnp.float32))
            x = jnp.pad(y, ((0, 0), (0, width - y.shape[1])))
        return x

    loop = jax.jit(lambda x: jax.lax.fori_loop(0, steps, body, x))
    median, _ = timed(lambda: loop(jnp.ones((1, width), jnp.float32)), repeats=5)
    return median / steps


def save(name: str, results: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **results}, indent=2))
    print(f"-> {path}")
    return path
