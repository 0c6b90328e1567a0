"""Start-up and the device mesh: what `hardware=...` turns into before anything is built.

    hw = fit_to_cores(hw, batch_size)  # num_cpu_devices=-1: one CPU device per core
    start_runtime(hw)        # CPU device count, multi-process start-up, platform check
    mesh = build_mesh(hw)    # a jax Mesh with axes (data, fsdp, tensor), Auto sharding

Both fail with one line that says what was asked for and what was found.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import jax
from jax.sharding import AxisType, Mesh

from chainrule.parallel.config import MESH_AXES, DistributedConfig, HardwareConfig

log = logging.getLogger(__name__)


def _backends_started() -> bool:
    from jax._src import xla_bridge  # no public way to ask without starting them

    return xla_bridge.backends_are_initialized()


def _distributed_wanted(dist: DistributedConfig) -> bool:
    if dist.enabled == "auto":
        slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
        return slurm_tasks > 1 or "JAX_COORDINATOR_ADDRESS" in os.environ
    return dist.enabled == "true"


def cores_available() -> int:
    """CPU cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fit_to_cores(hw: HardwareConfig, batch_size: int) -> HardwareConfig:
    """`hardware.num_cpu_devices=-1`: as many CPU devices as cores, data parallel, capped at the
    largest count that splits `batch_size` (the per-step batch) evenly; any other setting is
    returned as is.

    Why: XLA runs a small model's ops one after another, each too small to keep every core
    busy (experiment=shakespeare_char_cpu: 1.5x faster on 2 cores than one device). Once JAX
    has started (tests, notebooks) the devices it has are used, never more.
    """
    if hw.num_cpu_devices != -1:
        return hw
    if _distributed_wanted(hw.distributed):
        raise ValueError(f"hardware={hw.name}: num_cpu_devices=-1 (a device per core) is for "
                         "single-process runs; set a device count per process")
    started = _backends_started()
    cores = cores_available()
    if started and jax.default_backend() == "cpu":
        cores = min(cores, jax.local_device_count("cpu"))
    n = max(d for d in range(1, cores + 1) if batch_size % d == 0)
    return dataclasses.replace(hw, num_cpu_devices=None if started else n,
                               mesh=dataclasses.replace(hw.mesh, data=n))


def start_runtime(hw: HardwareConfig) -> None:
    """Configure JAX for `hw` and check the platform is there. Call before any JAX work."""
    if hw.num_cpu_devices is not None:
        if _backends_started():
            found = jax.local_device_count("cpu") if jax.default_backend() == "cpu" else 0
            if found != hw.num_cpu_devices:
                raise ValueError(
                    f"hardware={hw.name} asks for {hw.num_cpu_devices} CPU devices but JAX has "
                    f"already started with {found}; start a fresh process (or set XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={hw.num_cpu_devices})")
        else:
            jax.config.update("jax_num_cpu_devices", hw.num_cpu_devices)
    dist = hw.distributed
    if _distributed_wanted(dist) and not jax.distributed.is_initialized():
        try:
            jax.distributed.initialize(
                coordinator_address=dist.coordinator_address,
                num_processes=dist.num_processes, process_id=dist.process_id,
                initialization_timeout=dist.initialization_timeout)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"hardware={hw.name}: multi-process start-up failed "
                             f"(coordinator {dist.coordinator_address or 'from environment'}, "
                             f"{dist.num_processes or '?'} processes): "
                             f"{str(err).strip().splitlines()[0]}") from None
    check_platform(hw)


def check_platform(hw: HardwareConfig) -> None:
    found = jax.default_backend()
    if found != hw.platform:
        devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
        raise ValueError(f"hardware={hw.name} asks for platform '{hw.platform}' but JAX found "
                         f"'{found}' ({jax.device_count()} device(s): {devices})")


def mesh_shape(hw: HardwareConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with -1 filled in; the product must fit in `num_devices`."""
    sizes = {name: getattr(hw.mesh, name) for name in MESH_AXES}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    for name, size in sizes.items():
        if size == -1:
            if num_devices % fixed:
                raise ValueError(f"hardware.mesh={sizes}: {num_devices} devices do not divide "
                                 f"evenly by the fixed axes ({fixed})")
            sizes[name] = num_devices // fixed
    if math.prod(sizes.values()) > num_devices:
        raise ValueError(f"hardware.mesh={sizes} needs {math.prod(sizes.values())} devices but "
                         f"JAX found {num_devices} ({jax.devices()[0].device_kind})")
    return sizes


def build_mesh(hw: HardwareConfig) -> Mesh:
    """The run's mesh over the first devices it needs (every process's, when multi-process)."""
    sizes = mesh_shape(hw, jax.device_count())
    n = math.prod(sizes.values())
    if n < jax.device_count() and jax.process_count() > 1:
        raise ValueError(f"hardware.mesh={sizes} uses {n} of {jax.device_count()} devices; a "
                         "multi-process run must use them all (set one axis to -1)")
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=jax.devices()[:n])


def describe(mesh: Mesh) -> str:
    axes = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    kind = mesh.devices.flat[0].device_kind
    return (f"mesh {axes} ({mesh.size} {kind} device(s), {jax.process_count()} process(es))")
