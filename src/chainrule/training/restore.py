"""Rebuild a trained run from its directory: config, data pipeline, model weights."""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx
from omegaconf import OmegaConf

from chainrule.checkpoint import Checkpointer, read_meta


def config_types() -> dict[str, type]:
    from chainrule.config import _schemas

    return {cls.__name__: cls for group in _schemas().values() for cls in group.values()}


def rebuild(type_name: str, values: dict):
    """A dataclass config from its type name and saved values (checks run again)."""
    cls = config_types()[type_name]
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))


def run_config(cfg) -> dict:
    """What a run saves of its TrainConfig with every checkpoint, for `load_run` to rebuild
    the model and data from: the values, and the type names of the model and data schemas."""
    record = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    record["_types"] = {"model": type(cfg.model).__name__, "data": type(cfg.data).__name__}
    return record


def check_resumable(cfg, run_dir: str | Path) -> None:
    """Refuse a run directory whose checkpoints `cfg` (a TrainConfig) cannot continue, before
    anything is built or written there: another model family's, or any with resume=false."""
    from chainrule.models import family_name

    ckpt_dir = Path(run_dir) / "checkpoints"
    meta = read_meta(ckpt_dir) if ckpt_dir.is_dir() else None
    if meta is None:
        return
    if not cfg.resume:
        raise ValueError(f"{run_dir} already holds checkpoints and resume=false: expected a new "
                         "run directory (hydra.run.dir=...), or resume=true to continue it")
    theirs, ours = meta.get("model_family"), family_name(cfg.model)
    if theirs != ours:
        raise ValueError(f"{run_dir} holds checkpoints of a {theirs} model, not {ours}: expected "
                         f"a new run directory for model={ours} (hydra.run.dir=...)")


def load_run(run_dir: str | Path, step: int | None = None):
    """(model, data bundle, restored step, saved config dict) of a trained run.

    The run's saved config rebuilds the model and its data pipeline (with the tokenizer saved
    in the run); weights come from checkpoint `step`, else the best, else (none recorded, or
    the best damaged) the newest readable one.
    """
    from chainrule.config import OptimizerConfig
    from chainrule.data.base import build_data
    from chainrule.models import build_model
    from chainrule.training.loop import apply_data_overrides
    from chainrule.training.optim import build_optimizer

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    meta = read_meta(ckpt_dir) if ckpt_dir.is_dir() else None
    if not meta or "_types" not in meta.get("config", {}):
        raise ValueError(f"no chainrule checkpoint in {run_dir}: expected a training run "
                         f"directory with checkpoints/")
    saved = meta["config"]
    types = saved["_types"]
    data = build_data(rebuild(types["data"], saved["data"]), run_dir=run_dir)
    model_cfg = apply_data_overrides(rebuild(types["model"], saved["model"]),
                                     data.model_overrides)
    model = build_model(model_cfg, rngs=nnx.Rngs(params=0))
    opt_cfg = OptimizerConfig(**saved["optimizer"])
    tx = build_optimizer(opt_cfg, saved["trainer"]["steps"])[0]
    from chainrule.models.base import TRAINABLE

    optimizer = nnx.Optimizer(model, tx, wrt=TRAINABLE[opt_cfg.trainable])
    graphdef, state = nnx.split((model, optimizer))
    abstract = {"model": state, "key": jax.random.key_data(jax.random.key(0))}
    with Checkpointer(ckpt_dir) as checkpointer:
        restored = (checkpointer.restore_best(abstract) if step is None
                    else checkpointer.restore(abstract, step=step))
    model, _ = nnx.merge(graphdef, restored.state["model"])
    return model, data, restored.step, saved
