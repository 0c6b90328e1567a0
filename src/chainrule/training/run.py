"""Run assembly: everything a training run is made of, built in one place.

    hardware = check_run(cfg, run_dir)          # start-up checks; writes nothing (CLI preflight)
    with open_run(cfg, run_dir) as mesh:        # + mesh, batch layout, the run's lock
        run = assemble(cfg, run_dir, mesh)      # data, completed model config -> run.json,
                                                # model + optimizer sharded, compiled steps
        resumed = resume(run, checkpointer)     # params, optimizer, step, key, data position

The CLI, the loop, tests and benchmarks use these; nothing else assembles a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from chainrule import parallel
from chainrule.checkpoint import Checkpointer
from chainrule.data.base import DataBundle, build_data
from chainrule.data.text import TextCodec
from chainrule.models import AutoregressiveModel, build_model, complete_config, family_name, hf
from chainrule.models.base import TRAINABLE, ModelConfig
from chainrule.parallel.config import HardwareConfig
from chainrule.rundir import RunDir
from chainrule.training.config import TrainConfig
from chainrule.training.optim import build_optimizer
from chainrule.training.restore import (
    check_resumable,
    checkpointed,
    load_run,
    run_record,
    saved_codec,
    train_config_record,
    with_streams,
)
from chainrule.training.steps import Steps


def check_run(cfg: TrainConfig, run_dir: str | Path | None) -> HardwareConfig:
    """Every check that needs no data and writes nothing: the hardware (JAX starts here, as
    `hardware=` asks) and the run directory's checkpoints (family, resume)."""
    accum = cfg.trainer.grad_accum_steps
    hardware = parallel.fit_to_cores(cfg.hardware, cfg.data.batch_size // accum)
    parallel.start_runtime(hardware)
    if run_dir is not None:
        check_resumable(cfg, run_dir)
    check_pretrained(cfg)
    return hardware


def check_pretrained(cfg: TrainConfig) -> None:
    """init_from=<Hugging Face dir>: the run takes that GPT-2's architecture and tokenizer, so
    the data must use a bpe tokenizer (the checkpoint's) and fit its context."""
    if not cfg.init_from or not hf.is_pretrained_dir(cfg.init_from):
        return
    arch = hf.with_architecture(cfg.model, cfg.init_from)
    hf.pretrained_tokenizer(cfg.init_from, arch.vocab_size)
    if getattr(cfg.data, "tokenizer", None) != "bpe":
        raise ValueError(f"init_from={cfg.init_from} brings its own tokenizer (tokenizer.json): "
                         f"expected data.tokenizer=bpe, got {getattr(cfg.data, 'tokenizer', None)!r}")
    if cfg.data.sequence_length > arch.sequence_length:
        raise ValueError(f"data.sequence_length={cfg.data.sequence_length} is longer than the "
                         f"context of init_from={cfg.init_from} ({arch.sequence_length} "
                         "positions); expected at most that")


def check_batch_layout(batch_size: int, accum: int, shards: int) -> None:
    """The global batch must split into micro-batches and then evenly over the devices."""
    if batch_size % (accum * shards):
        raise ValueError(f"data.batch_size={batch_size} does not split into "
                         f"trainer.grad_accum_steps={accum} micro-batches over {shards} "
                         f"data-parallel device(s); expected a multiple of {accum * shards}")


@contextlib.contextmanager
def open_run(cfg: TrainConfig, run_dir: RunDir) -> Iterator[jax.sharding.Mesh]:
    """Checks, the mesh (set as JAX's current mesh) and the run directory, locked by this
    process (process 0 of a multi-process run) while the block runs."""
    hardware = check_run(cfg, run_dir.path)
    mesh = parallel.build_mesh(hardware)
    rules = parallel.normalise_rules(cfg.hardware.axis_rules)
    check_batch_layout(cfg.data.batch_size, cfg.trainer.grad_accum_steps,
                       parallel.batch_shards(mesh, rules))
    run_dir.path.mkdir(parents=True, exist_ok=True)
    lock = run_dir.lock() if jax.process_index() == 0 else contextlib.nullcontext()
    with lock, jax.set_mesh(mesh):
        yield mesh


@dataclasses.dataclass
class Run:
    """A run's working parts on its mesh: what the loop drives, and what tests and
    benchmarks use to run the same compiled steps without the loop."""

    cfg: TrainConfig
    mesh: jax.sharding.Mesh
    rules: parallel.sharding.Rules
    data: DataBundle
    model_config: ModelConfig
    family: str
    graphdef: Any
    state: Any  # model + optimizer, sharded on the mesh
    shardings: Any
    steps: Steps
    schedule: Any
    config_record: dict[str, Any]  # the training config as saved with the run
    _metric_names: list[str] | None = None

    @property
    def model(self) -> AutoregressiveModel:
        return nnx.merge(self.graphdef, self.state)[0]

    def batch(self, host_batch: dict, *, leading: int = 0) -> dict[str, jax.Array]:
        """This process's rows -> the global batch on the mesh."""
        return parallel.global_batch(host_batch, self.mesh, self.rules, leading=leading)

    def replicate(self, value) -> jax.Array:
        return parallel.replicate(value, parallel.replicated(self.mesh))

    def zero_totals(self, batch) -> dict[str, jax.Array]:
        """Zeroed sums of the metrics the train step reports (names found by tracing once)."""
        if self._metric_names is None:
            self._metric_names = self.steps.metric_names(self.state, batch)
        return {k: self.replicate(np.float32(0)) for k in self._metric_names}

    def key_data(self, key: jax.Array) -> jax.Array:
        """An RNG key as data, the same on every device (and process): what is checkpointed."""
        return self.replicate(jax.random.key_data(key))


def build_run_data(cfg: TrainConfig, run_dir: RunDir | None) -> tuple[DataBundle, ModelConfig]:
    """This process's data pipeline, and the model config completed by its codec."""
    # A resumed run keeps the codec it has (a text run its tokenizer); a run started from a
    # Hugging Face checkpoint takes its architecture and tokenizer.
    codec, model_config = saved_codec(run_dir), cfg.model
    if cfg.init_from and hf.is_pretrained_dir(cfg.init_from):
        model_config = hf.with_architecture(cfg.model, cfg.init_from)
        codec = codec or TextCodec(hf.pretrained_tokenizer(cfg.init_from,
                                                           model_config.vocab_size))
    data = build_data(cfg.data, codec=codec, process_index=jax.process_index(),
                      process_count=jax.process_count())
    return data, complete_config(model_config, data.codec.model_fields())


def assemble(cfg: TrainConfig, run_dir: RunDir | None, mesh: jax.sharding.Mesh, *,
             config_record: dict[str, Any] | None = None) -> Run:
    """Data, model, optimizer and compiled steps for `cfg` on `mesh` (inside its context).

    With a run directory, process 0 records the run there (`run.json`: the completed model
    config, the codec and `config_record`, by default the config's values) before anything
    is trained, so the run can be loaded without its data from then on.
    """
    rules = parallel.normalise_rules(cfg.hardware.axis_rules)
    data, model_config = build_run_data(cfg, run_dir)
    config_record = config_record or train_config_record(cfg)
    if run_dir is not None and jax.process_index() == 0:
        run_dir.write_run(run_record(model_config, data.codec, config_record))
    if getattr(model_config, "dtype", "float32") is None:  # None: the hardware decides
        model_config = dataclasses.replace(model_config, dtype=cfg.hardware.compute_dtype)
    wrt = TRAINABLE[cfg.optimizer.trainable]
    tx, schedule = build_optimizer(cfg.optimizer, cfg.trainer.steps, model_config.width())

    def create():
        model = build_model(model_config, rngs=nnx.Rngs(params=cfg.seed))
        return model, nnx.Optimizer(model, tx, wrt=wrt)

    graphdef, state, shardings = parallel.create_sharded(create, mesh, rules)
    model, optimizer = nnx.merge(graphdef, state)
    if not jax.tree.leaves(nnx.state(model, wrt)):
        raise ValueError(f"optimizer.trainable={cfg.optimizer.trainable} but the model has no "
                         f"such parameters (prefix tuning needs model.prefix_length > 0, LoRA "
                         f"model.lora.rank > 0)")
    if cfg.init_from:
        init_weights(model, cfg.init_from)
        state = jax.device_put(nnx.state((model, optimizer)), shardings)
    steps = Steps(graphdef, jax.random.fold_in(jax.random.key(cfg.seed), 1), wrt,
                  accum=cfg.trainer.grad_accum_steps, shardings=shardings,
                  replicated=parallel.replicated(mesh))
    return Run(cfg, mesh, rules, data, model_config, family_name(model_config), graphdef,
               state, shardings, steps, schedule, config_record)


def init_weights(model: AutoregressiveModel, run_dir: str) -> None:
    """Copy another run's weights into `model`; weights it lacks (a new prefix) stay fresh."""
    source, _, step, _ = load_run(run_dir)
    theirs = dict(nnx.state(source, nnx.Param).flat_state())
    fitting = {path: theirs[path] for path, ours in nnx.state(model, nnx.Param).flat_state()
               if path in theirs and theirs[path].shape == ours.shape}
    if not fitting:
        raise ValueError(f"init_from={run_dir}: no parameter of that run fits this model")
    nnx.update(model, nnx.State.from_flat_path(fitting))
    print(f"initialised {len(fitting)} parameter arrays from {run_dir} (step {step})")


@dataclasses.dataclass
class Resumed:
    """Where a run goes on from: step 0 and a fresh key for a new run."""

    step: int
    state: Any
    key: jax.Array
    wandb_run_id: str | None = None
    best_val_loss: float = math.inf


def resume(run: Run, checkpointer: Checkpointer, run_dir: RunDir) -> Resumed:
    """The newest readable checkpoint restored into the run (parameters, optimizer, RNG key,
    the train iterator's position), or a fresh start when there is none or resume=false."""
    key = jax.random.key(run.cfg.seed)
    if not run.cfg.resume or checkpointer.latest_step() is None:
        return Resumed(0, run.state, key)
    restored = checkpointer.restore({"model": checkpointed(run.state),
                                     "key": run.key_data(key)})
    if restored.meta.get("model_family") != run.family:
        raise ValueError(f"{run_dir.path} holds a checkpoint of a "
                         f"{restored.meta.get('model_family')} model, not {run.family}: use "
                         "another run directory")
    run.data.train.set_state(restored.data_state)
    print(f"resuming {run_dir.path} from step {restored.step}")
    return Resumed(restored.step, with_streams(restored.state["model"], run.state),
                   jax.random.wrap_key_data(restored.state["key"]),
                   restored.meta.get("wandb_run_id"),
                   restored.meta.get("best_val_loss", math.inf))
