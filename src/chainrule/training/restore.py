"""A trained run loaded from its directory without its data (`load_run`, also exported as
`chainrule.load_run`), and the check a new process makes before it continues a run.

    model, codec, step, config = chainrule.load_run("outputs/2026-12-03/12-00-00")
    samples = model.generate(n_samples=4, rngs=nnx.Rngs(sample=0))
    print(codec.decode(samples[0]))

The model config (as the data completed it) and the codec come from the run's `run.json`, the
weights from a checkpoint: no corpus is read, no tokenizer fitted. Runs written before
`run.json` existed (format 1) are read from their checkpoints' metadata and `tokenizer.json`;
only a format-1 image or audio run rebuilds its data once, to learn its shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
from flax import nnx

from chainrule.checkpoint import Checkpointer, read_meta
from chainrule.config import from_dict, to_dict
from chainrule.data.base import Codec, build_data, load_codec
from chainrule.data.text import TextCodec
from chainrule.data.tokenizers import load_tokenizer
from chainrule.models import AutoregressiveModel, build_model, complete_config, family_name, hf
from chainrule.models.base import TRAINABLE, ModelConfig
from chainrule.rundir import RunDir
from chainrule.training.optim import OptimizerConfig, build_optimizer


class LoadedRun(NamedTuple):
    """A trained run: its model with restored weights, its codec, the checkpoint step and the
    training config it was started with (plain values; `config["_types"]` names the schemas)."""

    model: AutoregressiveModel
    codec: Codec
    step: int
    config: dict[str, Any]


def checkpointed(state: nnx.State) -> nnx.State:
    """What a checkpoint holds of a model + optimizer state: all of it but the models' own
    dropout streams (`nnx.RngState`, see `chainrule.models.base`). Those are never trained (the
    training step passes its own dropout keys), and leaving them out keeps the checkpoint's tree
    what it was before models had them: runs saved then still load and resume."""
    return nnx.filter_state(state, nnx.Not(nnx.RngState))


def with_streams(restored: nnx.State, state: nnx.State) -> nnx.State:
    """A restored `checkpointed` state completed with the dropout streams of `state`, the
    state it was restored into (freshly built: the streams are not saved)."""
    return nnx.merge_state(nnx.filter_state(state, nnx.RngState), restored)


def train_config_record(cfg: Any) -> dict[str, Any]:
    """A TrainConfig as saved with a run: its values, and the type names of the model and
    data schemas (so the run can be rebuilt without knowing its family)."""
    record = to_dict(cfg)
    record["_types"] = {"model": type(cfg.model).__name__, "data": type(cfg.data).__name__}
    return record


def run_record(model_config: ModelConfig, codec: Codec, config: dict[str, Any]) -> dict:
    """What run.json holds: the completed model config, the codec and the training config."""
    return {"family": family_name(model_config),
            "model": {"type": type(model_config).__name__, "config": to_dict(model_config)},
            "codec": codec.to_json(), "config": config}


def read_record(run_dir: RunDir) -> dict[str, Any]:
    """run.json, or for a format-1 run the same record rebuilt from its checkpoints."""
    record = run_dir.read_run()
    if record is not None:
        return record
    meta = read_meta(run_dir.checkpoints) if run_dir.has_checkpoints() else None
    if not meta or "_types" not in meta.get("config", {}):
        raise ValueError(f"no chainrule checkpoint in {run_dir.path}: expected a training run "
                         f"directory with {RunDir.RUN_FILE} and checkpoints/, or a Hugging "
                         f"Face model directory ({hf.CONFIG_FILE} + {hf.WEIGHTS_FILE})")
    return _format1_record(run_dir, meta["config"])


def saved_codec(run_dir: RunDir | None) -> Codec | None:
    """The codec a run directory holds: run.json's, or a format-1 text run's tokenizer.json."""
    if run_dir is None:
        return None
    record = run_dir.read_run()
    if record is not None:
        return load_codec(record["codec"])
    if run_dir.legacy_tokenizer.is_file():
        return TextCodec(load_tokenizer(run_dir.legacy_tokenizer))
    return None


def _format1_record(run_dir: RunDir, saved: dict[str, Any]) -> dict[str, Any]:
    types = saved["_types"]
    # Format 1 kept no codec for images and audio: their data is read once to learn it.
    codec = saved_codec(run_dir) or build_data(from_dict(types["data"], saved["data"])).codec
    model_config = complete_config(from_dict(types["model"], saved["model"]),
                                   codec.model_fields())
    return run_record(model_config, codec, saved)


def check_resumable(cfg: Any, run_dir: str | Path) -> None:
    """Refuse a run directory whose checkpoints `cfg` (a TrainConfig) cannot continue, before
    anything is built or written there: another model family's, or any with resume=false."""
    run_dir = RunDir(run_dir)
    meta = read_meta(run_dir.checkpoints) if run_dir.has_checkpoints() else None
    if meta is None:
        return
    if not cfg.resume:
        raise ValueError(f"{run_dir.path} already holds checkpoints and resume=false: expected "
                         "a new run directory (hydra.run.dir=...), or resume=true to continue it")
    theirs, ours = meta.get("model_family"), family_name(cfg.model)
    if theirs != ours:
        raise ValueError(f"{run_dir.path} holds checkpoints of a {theirs} model, not {ours}: "
                         f"expected a new run directory for model={ours} (hydra.run.dir=...)")


def load_run(run_dir: str | Path, step: int | None = None) -> LoadedRun:
    """The model of a trained run, its codec, the restored step and its training config.

    Weights come from checkpoint `step`, else the best (lowest validation loss), else (none
    recorded, or the best damaged) the newest readable one. No data is read.
    A Hugging Face GPT-2 directory loads too (`load_pretrained`).
    """
    run_dir = RunDir.existing(run_dir)
    if hf.is_pretrained_dir(run_dir.path):
        if step is not None:
            raise ValueError(f"step={step}: {run_dir.path} is a Hugging Face model directory, "
                             "which holds one set of weights; expected no step=")
        return load_pretrained(run_dir.path)
    record = read_record(run_dir)
    model_config = from_dict(record["model"]["type"], record["model"]["config"])
    codec = load_codec(record["codec"])
    saved = record["config"]
    # The optimizer's state is part of the checkpoint's tree: build it to restore into.
    opt_cfg = from_dict(OptimizerConfig.__name__, saved["optimizer"])
    tx = build_optimizer(opt_cfg, saved["trainer"]["steps"])[0]
    model = build_model(model_config, rngs=nnx.Rngs(params=0))
    optimizer = nnx.Optimizer(model, tx, wrt=TRAINABLE[opt_cfg.trainable])
    graphdef, state = nnx.split((model, optimizer))
    abstract = {"model": checkpointed(state), "key": jax.random.key_data(jax.random.key(0))}
    with Checkpointer(run_dir.checkpoints) as checkpointer:
        restored = (checkpointer.restore_best(abstract) if step is None
                    else checkpointer.restore(abstract, step=step))
    if restored is None:
        raise ValueError(f"{run_dir.path} holds no checkpoint yet: expected a run that has "
                         "saved at least one step")
    model, _ = nnx.merge(graphdef, with_streams(restored.state["model"], state))
    return LoadedRun(model, codec, restored.step, saved)


def load_pretrained(path: str | Path) -> LoadedRun:
    """A local Hugging Face GPT-2 directory as a run: its model, its tokenizer.json as the
    codec, step 0 and a config that names where it came from."""
    model = hf.from_pretrained(path)
    codec = TextCodec(hf.pretrained_tokenizer(path, model.config.vocab_size))
    return LoadedRun(model, codec, 0, {"pretrained": str(path), "format": "hf"})
