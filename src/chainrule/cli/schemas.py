"""Hydra's ConfigStore filled from the one registration of every config schema
(`chainrule.config.register`): `<group>/<name>_schema` for each, plus the two primary
configs, `train_schema`, `sample_schema`, `evaluate_schema`, `export_schema` and `prepare_schema`. The YAML files in conf/ extend these."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

import chainrule.data  # noqa: F401  (importing a family or data module registers its schema)
import chainrule.models  # noqa: F401
from chainrule.config import schemas
from chainrule.data.prepare import PrepareConfig
from chainrule.evaluation.config import EvaluateConfig
from chainrule.sampling.config import SampleConfig
from chainrule.training.config import TrainConfig
from chainrule.training.export import ExportConfig


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="sample_schema", node=SampleConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="export_schema", node=ExportConfig)
    store.store(name="prepare_schema", node=PrepareConfig)
    for schema in schemas():
        store.store(group=schema.group, name=f"{schema.name}_schema", node=schema.type)
