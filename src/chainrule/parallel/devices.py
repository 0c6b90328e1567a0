"""`DeviceManager`: the user guide's way to ask which accelerator a program runs on.

    from chainrule.parallel import DeviceManager
    device = DeviceManager().get_device()          # the first GPU/TPU, else the CPU
    model = jax.device_put(model, device)          # nnx modules are pytrees

Training runs do not need it (the `hardware` config group builds a mesh); it is for notebooks
and scripts that place a model and a batch by hand.
"""

from __future__ import annotations

import jax

PREFERENCE = ("tpu", "gpu", "cpu")

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




class DeviceManager:
    """The devices JAX can see, best platform first (TPU, then GPU, then CPU)."""

    def __init__(self, platform: str | None = None):
        if platform is not None and platform not in PREFERENCE:
            raise ValueError(f"platform={platform!r}; expected one of {PREFERENCE} or None")
        self.platform = platform or self._best_platform()
        try:
            self.devices = jax.devices(self.platform)
        except RuntimeError:
            found = ", ".join(sorted({d.platform for d in jax.devices()}))
            raise ValueError(f"no {self.platform} device: JAX found {found}") from None

    @staticmethod
    def _best_platform() -> str:
        for platform in PREFERENCE:
            try:
                if jax.devices(platform):
                    return platform
            except RuntimeError:  # that backend is not installed or has no device
                continue
        return jax.default_backend()

    def get_device(self, index: int = 0) -> jax.Device:
        """One device of the chosen platform (the first by default)."""
        if not 0 <= index < len(self.devices):
            raise ValueError(f"device index {index} out of range: {len(self.devices)} "
                             f"{self.platform} device(s)")
        return self.devices[index]

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def peak_tflops(self) -> float | None:
        """Peak bf16 TFLOP/s of one device (for MFU), None when unknown (CPUs)."""
        return peak_tflops(self.device_kind)

    def __repr__(self) -> str:
        return f"DeviceManager({self.num_devices} x {self.device_kind} ({self.platform}))"
