"""Config schemas: dataclasses that are both the Python API and Hydra's structured configs.

Each config dataclass lives beside the code it configures (`TransformerConfig` in models,
`TextDataConfig` in data, `OptimizerConfig` in training, `SamplerConfig` in sampling,
`HardwareConfig` in parallel, ...) and registers itself here once, with its Hydra group, its
schema name and what it builds:

    register("optimizer", "optimizer", OptimizerConfig, builds=build_optimizer)

From that one registration the CLI stores `<group>/<name>_schema` in Hydra's ConfigStore (so
a misspelled key or a wrong type fails at composition), generic code builds whatever a config
describes (`build(config, ...)`) without naming a family, and a run directory's saved config
is turned back into its dataclass by type name (`schema_type`). This module sits at the
bottom of the house: it imports nothing of chainrule.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf


def check(condition: bool, message: str) -> None:
    """Config checks read as assertions: `check(x > 0, "data.x must be > 0, got ...")`."""
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class Schema:
    """One registered config type: its Hydra group and name, and what it builds (or None)."""

    group: str
    name: str
    type: type
    builds: Callable[..., Any] | None = None


_SCHEMAS: dict[type, Schema] = {}


def register(group: str, name: str, config_type: type, *,
             builds: Callable[..., Any] | None = None) -> type:
    """Record `config_type` as the schema `<group>/<name>_schema` that builds `builds`."""
    if not dataclasses.is_dataclass(config_type):
        raise TypeError(f"{config_type!r} is not a dataclass; only dataclasses are schemas")
    _SCHEMAS[config_type] = Schema(group, name, config_type, builds)
    return config_type


def schemas(group: str | None = None) -> list[Schema]:
    """Every registered schema (of one group), in registration order."""
    return [s for s in _SCHEMAS.values() if group is None or s.group == group]


def schema_of(config: Any, group: str | None = None) -> Schema:
    """The registration of a config instance (or type); a clear error for unknown types."""
    config_type = config if isinstance(config, type) else type(config)
    found = _SCHEMAS.get(config_type)
    if found is None or (group is not None and found.group != group):
        known = ", ".join(s.type.__name__ for s in schemas(group))
        what = f"{group} config" if group else "config"
        raise ValueError(f"{config_type.__name__} is not a registered {what} type; "
                         f"known: {known}")
    return found


def schema_type(type_name: str) -> type:
    """A registered config type by its class name (how run directories record it)."""
    for schema in _SCHEMAS.values():
        if schema.type.__name__ == type_name:
            return schema.type
    raise ValueError(f"unknown config type {type_name!r}; known: "
                     f"{', '.join(s.type.__name__ for s in _SCHEMAS.values())}")


def build(config: Any, *args: Any, group: str | None = None, **kwargs: Any) -> Any:
    """What `config` describes: its registered builder called with (config, *args, **kwargs)."""
    schema = schema_of(config, group)
    if schema.builds is None:
        raise ValueError(f"{type(config).__name__} builds nothing by itself")
    return schema.builds(config, *args, **kwargs)


def from_dict(type_name: str, values: dict[str, Any]) -> Any:
    """A config dataclass from its type name and saved values (every check runs again)."""
    cls = schema_type(type_name)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able values (tuples become lists)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def to_object(node: Any) -> Any:
    """A composed config node back to its dataclass, with every __post_init__ check run."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_object(node)
    return node


def unknown_key_message(full_key: str, known: list[str]) -> str:
    """One line for a key a schema does not have, suggesting the closest known one."""
    prefix, _, key = full_key.rpartition(".")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
    return f"{full_key} is not a config key{hint}; expected one of: {', '.join(known)}"


def check_known_keys(node: DictConfig, path: str = "") -> None:
    """Refuse keys a schema does not have: Hydra lets `+key=value` add them, and turning the
    config into dataclasses would then drop them without a word."""
    schema = OmegaConf.get_type(node)
    known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) \
        else None
    for key in node:
        full_key = f"{path}{key}"
        if known is not None and key not in known:
            raise ValueError(unknown_key_message(full_key, known))
        child = node[key]
        if isinstance(child, DictConfig):
            check_known_keys(child, f"{full_key}.")


def resolve(cfg: DictConfig) -> Any:
    """A composed config as its dataclasses (raises ValueError on bad values or keys)."""
    obj = to_object(cfg)
    check_known_keys(cfg)
    return obj
