"""Where a run executes: start-up, the device mesh, and shardings from logical axis names."""

from chainrule.parallel.config import DistributedConfig, HardwareConfig, MeshConfig
from chainrule.parallel.devices import DeviceManager
from chainrule.parallel.mesh import (
    build_mesh,
    check_platform,
    describe,
    fit_to_cores,
    start_runtime,
)
from chainrule.parallel.sharding import (
    batch_shards,
    create_sharded,
    global_batch,
    normalise_rules,
    place_state,
    replicate,
    replicated,
    state_shardings,
)

__all__ = ["DeviceManager", "DistributedConfig", "HardwareConfig", "MeshConfig", "batch_shards", "build_mesh", "check_platform", "create_sharded", "describe",
           "fit_to_cores", "global_batch", "normalise_rules", "place_state", "replicate", "replicated", "start_runtime", "state_shardings"]
