"""What `hardware=...` holds: platform, device mesh, logical axis rules, precision, start-up.

`HardwareConfig` is the schema of the `hardware` config group (conf/hardware/*.yaml); the
mesh, the shardings and the multi-process start-up are built from it in `parallel.mesh`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from chainrule.config import check, register

MESH_AXES = ("data", "fsdp", "tensor")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

# MaxText-style logical axis rules: the models name their parameter dimensions ("embed",
# "mlp", ...) and these map the names to mesh axes. Data parallel shards the batch over `data`;
# FSDP shards parameters (and optimizer state) along "embed" over `fsdp` and the batch over it
# too; tensor parallel splits attention heads, MLP width, vocabulary and channels over `tensor`.
DEFAULT_AXIS_RULES = {
    "batch": ["data", "fsdp"],
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
    "channels": "tensor",
}


@dataclasses.dataclass
class MeshConfig:
    """Devices per mesh axis; -1 (at most one axis) takes the devices the others leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        for name, size in sizes.items():
            check(size == -1 or size >= 1,
                   f"hardware.mesh.{name}={size}; expected a device count >= 1, or -1 (fill)")
        check(list(sizes.values()).count(-1) <= 1,
               f"hardware.mesh={sizes}: at most one axis may be -1 (fill with the rest)")


@dataclasses.dataclass
class DistributedConfig:
    """Multi-process start-up (`jax.distributed.initialize`). `enabled: auto` starts it when
    the environment describes a multi-process job (SLURM with more than one task, or
    JAX_COORDINATOR_ADDRESS); unset fields are then read from the environment by JAX."""

    enabled: str = "false"  # "true" | "false" | "auto"
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int = 300  # seconds to wait for every process

    def __post_init__(self) -> None:
        self.enabled = str(self.enabled).lower()
        check(self.enabled in ("true", "false", "auto"),
               f"hardware.distributed.enabled={self.enabled!r}; expected true, false or auto")
        check(self.num_processes is None or self.num_processes >= 1,
               f"hardware.distributed.num_processes must be >= 1, got {self.num_processes}")
        check(self.process_id is None or self.process_id >= 0,
               f"hardware.distributed.process_id must be >= 0, got {self.process_id}")
        if self.num_processes is not None and self.process_id is not None:
            check(self.process_id < self.num_processes,
                   f"hardware.distributed.process_id={self.process_id} must be < "
                   f"num_processes={self.num_processes}")


@dataclasses.dataclass
class HardwareConfig:
    """Where and how a run executes: platform, device mesh, axis rules, precision, start-up.

    `platform` must be what JAX finds (cpu, gpu, tpu). `num_cpu_devices` splits the host CPU
    into that many JAX devices (to try sharding anywhere; it must be set before JAX starts, as
    train.py does); -1 means one device per core, data parallel (`parallel.fit_to_cores`).
    `compute_dtype` is the dtype of activations and matmuls; parameters and optimizer state
    stay float32. `peak_tflops_per_device` overrides the table used for MFU.
    """

    name: str = "cpu"
    platform: str = "cpu"
    mesh: MeshConfig = dataclasses.field(default_factory=lambda: MeshConfig(data=1))
    axis_rules: dict[str, Any] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_AXIS_RULES))
    compute_dtype: str = "float32"
    num_cpu_devices: int | None = None
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    peak_tflops_per_device: float | None = None

    def __post_init__(self) -> None:
        check(self.platform in ("cpu", "gpu", "tpu"),
               f"hardware.platform={self.platform!r}; expected cpu, gpu or tpu")
        check(self.compute_dtype in COMPUTE_DTYPES,
               f"hardware.compute_dtype={self.compute_dtype!r}; expected one of {COMPUTE_DTYPES}")
        check(self.num_cpu_devices is None or self.num_cpu_devices >= 1
               or self.num_cpu_devices == -1,
               f"hardware.num_cpu_devices must be >= 1 or -1 (one per core), got "
               f"{self.num_cpu_devices}")
        check(self.num_cpu_devices != -1 or (self.mesh.data == -1 and self.mesh.fsdp == 1
                                              and self.mesh.tensor == 1),
               f"hardware.num_cpu_devices=-1 (one device per core) splits the batch over the "
               f"cores: expected mesh {{data: -1, fsdp: 1, tensor: 1}}, got {self.mesh}")
        check(self.num_cpu_devices is None or self.platform == "cpu",
               f"hardware.num_cpu_devices is for platform cpu, not {self.platform!r}")
        for logical, axes in self.axis_rules.items():
            names = [axes] if isinstance(axes, str) or axes is None else list(axes)
            bad = [a for a in names if a is not None and a not in MESH_AXES]
            check(not bad, f"hardware.axis_rules.{logical}={axes}: {bad} are not mesh axes; "
                            f"expected names from {MESH_AXES} (or null)")
        check(self.peak_tflops_per_device is None or self.peak_tflops_per_device > 0,
               f"hardware.peak_tflops_per_device must be > 0, got {self.peak_tflops_per_device}")

register("hardware", "hardware", HardwareConfig)
