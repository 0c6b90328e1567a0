"""`evaluate(config)`: a trained run scored on every element of a split, in paper units.

    results = evaluate(EvaluateConfig(checkpoint="outputs/...", split="test"))
    results["bits_per_char"], results["nats_per_image"], results["bits_per_sample"], ...

The run directory alone gives the model, its codec and its training config (`load_run`); the
data config is the run's own, with `data` changes applied, or another source entirely. The
results are written to the run directory (eval_<split>_step<N>.json) and, when the run logged
to W&B, into its summary as eval/<split>/<metric>.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import jax

from chainrule import parallel
from chainrule.checkpoint import read_meta
from chainrule.config import from_dict, schema_type, to_dict, unknown_key_message
from chainrule.data.base import DataConfig
from chainrule.data.evaluation import build_eval
from chainrule.evaluation.config import EvaluateConfig
from chainrule.evaluation.report import metrics
from chainrule.evaluation.score import Scorer
from chainrule.models.hf import is_pretrained_dir
from chainrule.rundir import RunDir, write_json_atomic
from chainrule.tracking import LoggerConfig, Tracker
from chainrule.training.restore import load_run, read_record

BATCH_FACTOR = 4  # evaluation batches hold this many training batches: no backward pass
# Data keys that say how the model sees its data: another source is read the run's way.
MODEL_FACING = ("sequence_length", "tokenizer", "bpe_vocab_size", "num_levels", "mu",
                "sample_rate")


def data_config(saved: dict[str, Any], change: Any) -> DataConfig:
    """The data to score: the run's own (`change` None), with keys changed (a dict), or
    another source (a DataConfig), read as the run read its own (window, tokenizer, levels)."""
    type_name, values = saved["_types"]["data"], saved["data"]
    if change is None:
        return from_dict(type_name, values)
    if isinstance(change, DataConfig):
        same = {k: values[k] for k in MODEL_FACING if k in values and hasattr(change, k)}
        return dataclasses.replace(change, **same)
    known = [f.name for f in dataclasses.fields(schema_type(type_name))]
    for key in change:
        if key not in known:
            raise ValueError(unknown_key_message(f"data.{key}", known))
    return from_dict(type_name, {**values, **dict(change)})


def source_tag(saved: dict[str, Any], data: DataConfig) -> str | None:
    """None for the run's own data; else a short name for the file of results."""
    own = saved["data"]
    source, path = getattr(data, "source", None), getattr(data, "path", None)
    if source == own.get("source") and path == own.get("path"):
        return None
    return Path(path).stem if path else source


def _mesh(config: EvaluateConfig, batch_size: int):
    hardware = parallel.fit_to_cores(config.hardware, batch_size)
    parallel.start_runtime(hardware)
    mesh = parallel.build_mesh(hardware)
    return mesh, parallel.normalise_rules(config.hardware.axis_rules)


def _fit_batch(size: int, mesh, rules) -> int:
    """`size` rounded up so that it splits evenly over the data devices and the processes
    (each process feeds its own rows). Call once the runtime has started."""
    step = math.lcm(parallel.batch_shards(mesh, rules), jax.process_count())
    return -(-size // step) * step


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    run_dir = RunDir.existing(config.checkpoint)
    if is_pretrained_dir(run_dir.path):
        raise ValueError(f"checkpoint={config.checkpoint} is a Hugging Face model directory: it "
                         "holds no data config to score; evaluate a run trained from it "
                         "(train.py init_from=...)")
    saved = read_record(run_dir)["config"]
    data = data_config(saved, config.data)
    requested = config.batch_size or BATCH_FACTOR * saved["data"]["batch_size"]
    mesh, rules = _mesh(config, requested)
    batch_size = _fit_batch(requested, mesh, rules)
    loaded = load_run(run_dir.path, config.step)
    # Every process reads the checkpoints' metadata (Orbax synchronises the processes there).
    wandb_run = wandb_target(run_dir, saved) if config.wandb else None
    split = build_eval(data, codec=loaded.codec, split=config.split, batch_size=batch_size,
                       stride=config.stride, process_index=jax.process_index(),
                       process_count=jax.process_count())
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        totals = Scorer(loaded.model, mesh, rules)(
            split, progress=config.progress and jax.process_index() == 0,
            desc=f"evaluate {config.split}")
    seconds = time.perf_counter() - start
    results = {"split": config.split, "step": loaded.step, "checkpoint": str(run_dir.path),
               **metrics(totals, split.counts, loaded.codec.kind),
               "batch_size": batch_size, "batches": totals.batches, "seconds": seconds,
               "scored_per_s": totals.scored / max(seconds, 1e-9),
               "about": split.info, "data": to_dict(data)}
    tag = source_tag(saved, data)
    path = Path(config.output) if config.output else run_dir.evaluation(config.split,
                                                                         loaded.step, tag)
    if jax.process_index() == 0:
        write_json_atomic(path, results)
        if wandb_run is not None:
            add_to_wandb_summary(run_dir, *wandb_run, results,
                                 f"{config.split}{'_' + tag if tag else ''}")
    return {**results, "path": str(path)}


def wandb_target(run_dir: RunDir, saved: dict[str, Any]) -> tuple[LoggerConfig, str] | None:
    """(the run's logger config, the id of the W&B run the training logged to, from the
    checkpoints' metadata); None when it did not log to W&B."""
    logger = from_dict(LoggerConfig.__name__, saved.get("logger", {}))
    run_id = (read_meta(run_dir.checkpoints) or {}).get("wandb_run_id")
    return None if logger.backend != "wandb" or run_id is None else (logger, run_id)


def add_to_wandb_summary(run_dir: RunDir, logger: LoggerConfig, run_id: str,
                         results: dict[str, Any], name: str) -> None:
    """eval/<name>/<metric> into the summary of the W&B run `run_id`."""
    numbers = {f"eval/{name}/{k}": v for k, v in results.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    with Tracker(run_dir.path, {}, logger, run_id=run_id, resume=True) as tracker:
        tracker.update_summary(numbers)
