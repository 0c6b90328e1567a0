"""From logical axis names to shardings on the mesh: parameters, optimizer state, batches.

Models tag parameter dimensions with logical names (`chainrule.models.base.logical`); the
hardware config's `axis_rules` map each name to mesh axes (MaxText's scheme). A dimension that
the mapped axes do not divide evenly (a 65-token vocabulary on 8 devices, a 1-channel image
input) is left whole rather than failing: Flax's rule resolution does not know the shapes, so
the resolution here does it with them. Optimizer moments inherit their parameter's names
(`nnx.Optimizer` copies the metadata), so FSDP shards them too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Rules = dict[str, tuple[str, ...]]


def normalise_rules(axis_rules: dict[str, Any]) -> Rules:
    """{"batch": ["data", "fsdp"], "embed": "fsdp", "kv": None} -> name -> tuple of axes."""
    out = {}
    for name, axes in axis_rules.items():
        if axes is None:
            out[name] = ()
        elif isinstance(axes, str):
            out[name] = (axes,)
        else:
            out[name] = tuple(a for a in axes if a is not None)
    return out


def spec_for(names: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh: Mesh,
             rules: Rules) -> P:
    """The PartitionSpec of one array: each named dimension takes its rule's mesh axes (those
    of size > 1 not used by an earlier dimension), trimmed until they divide the dimension."""
    if not names:
        return P()
    spec, used = [], set()
    for dim, name in zip(shape, names, strict=False):
        axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _names(var: nnx.Variable) -> tuple | None:
    sharding = var.get_metadata().get("out_sharding")
    return tuple(sharding) if sharding else None


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for an nnx State (arrays or abstract), in the State's own structure."""

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            return leaf.replace(NamedSharding(mesh, spec_for(_names(leaf), value.shape, mesh,
                                                             rules)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(create: Callable[[], Any], mesh: Mesh, rules: Rules):
    """(graphdef, state, shardings) of the objects `create()` builds, the state created
    directly in its shards by one compiled program (no device ever holds it whole)."""
    if mesh.size == 1:
        # One device: eager creation reuses the op caches of earlier models (a compiled init
        # is a new program per model, seconds on a small CPU).
        graphdef, state = nnx.split(create())
        shardings = state_shardings(state, mesh, rules)
        return graphdef, jax.device_put(state, shardings), shardings
    graphdefs = []

    def init():
        graphdef, state = nnx.split(create())
        graphdefs.append(graphdef)
        return state

    # jax.eval_shape, not nnx.eval_shape: the latter resolves the logical names against the
    # mesh itself, without the rules.
    shardings = state_shardings(jax.eval_shape(init), mesh, rules)
    state = jax.jit(init, out_shardings=shardings)()
    return graphdefs[0], state, shardings


def place_state(state: Any, shardings: Any) -> Any:
    """A state every process holds whole (weights read from a checkpoint) -> global arrays laid
    out by `shardings`. Unlike `jax.device_put`, this works across processes: each one builds
    the shards its own devices hold from its copy."""

    def one(value, sharding):
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):  # RNG streams: as data
            data = one(jax.random.key_data(value), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, state, shardings)


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
    return tuple(a for a in rules.get("batch", ()) if mesh.shape[a] > 1)


def batch_sharding(mesh: Mesh, rules: Rules, *, leading: int = 0) -> NamedSharding:
    """Batch dimension (after `leading` unsharded ones) split over the rule's mesh axes."""
    axes = batch_axes(mesh, rules)
    return NamedSharding(mesh, P(*([None] * leading), axes or None))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules, *,
                 leading: int = 0) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays over the mesh (one call per array; in
    a single process it is a sharded device_put)."""
    sharding = batch_sharding(mesh, rules, leading=leading)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(value, sharding: NamedSharding) -> jax.Array:
    """A host value that every process holds alike -> one array on every device."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(value))
