"""Throughput accounting: units per second, per device, and model FLOPs utilisation (MFU).

FLOPs per step come from XLA's cost analysis of the compiled train step (forward, backward
and optimizer, every device together), so every family is counted the same way without a
hand-written formula. MFU = achieved FLOP/s / (devices x peak FLOP/s of one device), with the
peak taken from the table below (dense bf16 tensor-core figures from the vendors' data
sheets) or from `hardware.peak_tflops_per_device`.
"""

from __future__ import annotations

import dataclasses

# device_kind substring (lower case) -> peak dense bf16 TFLOP/s of one device. Longest match
# wins, so "h100 pcie" is tried before "h100".
PEAK_TFLOPS = {
    "h200": 989.0,
    "h100": 989.0,  # SXM
    "h100 pcie": 756.0,
    "h800": 989.0,
    "gh200": 989.0,
    "a100": 312.0,
    "l4": 121.0,
    "v100": 125.0,  # float16 (no bfloat16 tensor cores)
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v5": 459.0,
    "tpu v6 lite": 918.0,
    "tpu v6e": 918.0,
}


def peak_tflops(device_kind: str, override: float | None = None) -> float | None:
    """Peak TFLOP/s of one device of this kind; None when unknown (CPUs)."""
    if override is not None:
        return override
    kind = device_kind.lower()
    matches = [k for k in PEAK_TFLOPS if k in kind]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


@dataclasses.dataclass
class Throughput:
    """Turns (steps done, seconds) into the perf/* metrics the loop logs."""

    units_per_step: int  # tokens, pixels or audio samples of one global batch
    num_devices: int
    flops_per_step: float | None = None
    peak_tflops_per_device: float | None = None

    def metrics(self, steps: int, seconds: float) -> dict[str, float]:
        step_time = seconds / max(steps, 1)
        out = {"perf/step_time_s": step_time,
               "perf/tokens_per_s": self.units_per_step / step_time,
               "perf/tokens_per_s_per_device": self.units_per_step / step_time / self.num_devices}
        if self.flops_per_step:
            achieved = self.flops_per_step / step_time
            out["perf/tflops_per_s"] = achieved / 1e12
            if self.peak_tflops_per_device:
                out["perf/mfu"] = achieved / (self.num_devices * self.peak_tflops_per_device
                                              * 1e12)
        return out
