"""Throughput accounting: units per second, per device, and model FLOPs utilisation (MFU).

FLOPs per step come from XLA's cost analysis of the compiled train step (forward, backward
and optimizer, every device together), so every family is counted the same way without a
hand-written formula. MFU = achieved FLOP/s / (devices x peak FLOP/s of one device), with the
peak taken from the table below (dense bf16 tensor-core figures from the vendors' data
sheets, `chainrule.parallel.devices.PEAK_TFLOPS`) or from `hardware.peak_tflops_per_device`.
"""

from __future__ import annotations

import dataclasses


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
