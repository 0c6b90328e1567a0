"""The training loop: data -> model -> compiled steps -> logs, evals, samples, checkpoints.

It knows no model family: models speak the protocol of `chainrule.models.base`, data
pipelines return a `DataBundle`, and everything family-specific (what a sample looks like,
which extra metrics make sense) comes from those two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from chainrule import parallel
from chainrule.checkpoint import Checkpointer
from chainrule.config import TrainConfig
from chainrule.data.base import DataBundle, build_data
from chainrule.models import AutoregressiveModel, build_model, family_name
from chainrule.models.base import TRAINABLE
from chainrule.sampling.draw import draw
from chainrule.tracking import Tracker
from chainrule.training.nonfinite import NonFinite, state_is_finite
from chainrule.training.optim import build_optimizer
from chainrule.training.restore import check_resumable, run_config
from chainrule.training.steps import Steps, stack_batches
from chainrule.training.throughput import Throughput, peak_tflops


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, ...); the last good checkpoint is kept."""


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One training process per run directory: a second one fails instead of interleaving."""
    path = run_dir / ".lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise ValueError(f"another process (pid {handle.read().strip() or '?'}) is training "
                             f"in {run_dir}; wait for it or use another run directory") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def preemption_flag():
    """An Event set on SIGTERM (preemption), so the loop can checkpoint and stop cleanly."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint; exits with 143 like an unhandled SIGTERM."""

    def __init__(self, step: int):
        super().__init__(143)
        self.step = step


def apply_data_overrides(model_config: Any, overrides: dict[str, Any]) -> Any:
    """Fill model fields the data decides (vocab size, image shape); refuse contradictions."""
    changes = {}
    for name, value in overrides.items():
        if not hasattr(model_config, name):
            continue
        current = getattr(model_config, name)
        if isinstance(current, list | tuple):
            current = tuple(current)
            value = tuple(value)
        if current is None:
            changes[name] = value
        elif name == "vocab_size" and current < value:
            raise ValueError(f"model.vocab_size={current} is smaller than the data's vocabulary "
                             f"({value} tokens): token ids would be out of range; remove the "
                             f"override or set model.vocab_size >= {value}")
        elif name != "vocab_size" and current != value:
            raise ValueError(f"model.{name}={current} does not match the data ({value}); remove "
                             f"the override or set model.{name}={value}")
    return dataclasses.replace(model_config, **changes) if changes else model_config


def build_run(cfg: TrainConfig, run_dir: Path | None):
    """The data pipeline (this process's shard) and the model config it completes."""
    data = build_data(cfg.data, run_dir=run_dir, process_index=jax.process_index(),
                      process_count=jax.process_count())
    model_config = apply_data_overrides(cfg.model, data.model_overrides)
    if getattr(model_config, "dtype", "float32") is None:  # None: the hardware decides
        model_config = dataclasses.replace(model_config, dtype=cfg.hardware.compute_dtype)
    return data, model_config


def check_batch_layout(batch_size: int, accum: int, shards: int) -> None:
    """The global batch must split into micro-batches and then evenly over the devices."""
    if batch_size % (accum * shards):
        raise ValueError(f"data.batch_size={batch_size} does not split into "
                         f"trainer.grad_accum_steps={accum} micro-batches over {shards} "
                         f"data-parallel device(s); expected a multiple of {accum * shards}")


def init_weights(model: AutoregressiveModel, run_dir: str) -> None:
    """Copy another run's weights into `model`; weights it lacks (a new prefix) stay fresh."""
    from chainrule.training.restore import load_run

    source, _, step, _ = load_run(Path(run_dir))
    theirs = dict(nnx.state(source, nnx.Param).flat_state())
    fitting = {path: theirs[path] for path, ours in nnx.state(model, nnx.Param).flat_state()
               if path in theirs and theirs[path].shape == ours.shape}
    if not fitting:
        raise ValueError(f"init_from={run_dir}: no parameter of that run fits this model")
    nnx.update(model, nnx.State.from_flat_path(fitting))
    print(f"initialised {len(fitting)} parameter arrays from {run_dir} (step {step})")


def summarise(totals: dict[str, float], scales: dict[str, float]) -> dict[str, float]:
    """Means of summed metrics; perplexity from the mean loss; per-unit bits from the scales."""
    count = max(totals.pop("count", 1.0), 1.0)
    means = {k: v / count for k, v in totals.items()}
    return derived_metrics(means, scales)


def derived_metrics(means: dict[str, float], scales: dict[str, float]) -> dict[str, float]:
    out = dict(means)
    if "perplexity" in out and "nll_loss" in out:
        out["perplexity"] = math.exp(min(out["nll_loss"], 700.0))
    for name, scale in scales.items():
        if "nll_loss" in out:
            out[name] = out["nll_loss"] / math.log(2.0) * scale
    return out


def _host(tree) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def local_model(graphdef, state) -> AutoregressiveModel:
    """The model for generation: as it is in one process; with several, every process
    gathers the whole of each parameter (a collective: all must call it) and samples alone."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        state = multihost_utils.process_allgather(state, tiled=True)
    return nnx.merge(graphdef, state)[0]


def generate_samples(model: AutoregressiveModel, data: DataBundle, sampler, key) -> list:
    """Preview samples for the logs, decoded for people (speculative needs a draft model, so
    previews use its token-by-token knobs instead)."""
    if sampler.name == "speculative":
        sampler = dataclasses.replace(sampler, name="temperature")
    samples, _ = draw(model, sampler, key=key)
    return [data.decode(s) if data.decode else s for s in samples]


def train(cfg: TrainConfig, run_dir: Path, *, config_dict: dict | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns the final results (also metrics.json).

    SIGTERM checkpoints the current step and exits (code 143); re-running resumes there.
    """
    run_dir = Path(run_dir)
    hw = parallel.fit_to_cores(cfg.hardware, cfg.data.batch_size // cfg.trainer.grad_accum_steps)
    parallel.start_runtime(hw)
    mesh = parallel.build_mesh(hw)
    check_batch_layout(cfg.data.batch_size, cfg.trainer.grad_accum_steps,
                       parallel.batch_shards(mesh, parallel.normalise_rules(cfg.hardware.axis_rules)))
    check_resumable(cfg, run_dir)  # before anything is written there
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_lock(run_dir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock, preemption_flag() as preempted, jax.set_mesh(mesh):
        return _train(cfg, run_dir, config_dict, preempted, mesh)


@dataclasses.dataclass
class Setup:
    """A run's working parts, built from its config on its mesh: what `train` drives, and
    what tests and benchmarks use to run the same compiled steps without the loop."""

    mesh: Any
    rules: parallel.sharding.Rules
    data: DataBundle
    model_config: Any
    family: str
    graphdef: Any
    state: Any  # model + optimizer, sharded on the mesh
    shardings: Any
    steps: Steps
    schedule: Any
    _metric_names: list[str] | None = None

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


def prepare(cfg: TrainConfig, run_dir: Path | None, mesh) -> Setup:
    """Data, model, optimizer and compiled steps for `cfg` on `mesh` (inside its context)."""
    rules = parallel.normalise_rules(cfg.hardware.axis_rules)
    data, model_config = build_run(cfg, run_dir)
    wrt = TRAINABLE[cfg.optimizer.trainable]
    tx, schedule = build_optimizer(cfg.optimizer, cfg.trainer.steps)

    def create():
        model = build_model(model_config, rngs=nnx.Rngs(params=cfg.seed))
        return model, nnx.Optimizer(model, tx, wrt=wrt)

    graphdef, state, shardings = parallel.create_sharded(create, mesh, rules)
    model, optimizer = nnx.merge(graphdef, state)
    if not jax.tree.leaves(nnx.state(model, wrt)):
        raise ValueError(f"optimizer.trainable={cfg.optimizer.trainable} but the model has no "
                         f"such parameters (prefix tuning needs model.prefix_length > 0)")
    if cfg.init_from:
        init_weights(model, cfg.init_from)
        state = jax.device_put(nnx.state((model, optimizer)), shardings)
    steps = Steps(graphdef, jax.random.fold_in(jax.random.key(cfg.seed), 1), wrt,
                  accum=cfg.trainer.grad_accum_steps, shardings=shardings,
                  replicated=parallel.replicated(mesh))
    return Setup(mesh, rules, data, model_config, family_name(model_config), graphdef, state,
                 shardings, steps, schedule)


def _train(cfg: TrainConfig, run_dir: Path, config_dict: dict | None,
           preempted: threading.Event, mesh) -> dict[str, Any]:
    trainer = cfg.trainer
    config_dict = config_dict or run_config(cfg)  # what load_run rebuilds the run from
    setup = prepare(cfg, run_dir, mesh)
    data, family, graphdef, state = setup.data, setup.family, setup.graphdef, setup.state
    steps, schedule = setup.steps, setup.schedule
    model = nnx.merge(graphdef, state)[0]
    base_key = jax.random.key(cfg.seed)

    def key_data(key):  # the RNG key as data, the same on every device (and process)
        return setup.replicate(jax.random.key_data(key))

    print(f"{family}: {model.num_params():,} parameters on {parallel.describe(mesh)}")

    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=trainer.keep_checkpoints,
                                keep_best=1, best_metric="val_loss")
    start_step, run_id, best_val = 0, None, math.inf
    if cfg.resume and checkpointer.latest_step() is not None:
        restored = checkpointer.restore({"model": state, "key": key_data(base_key)})
        if restored.meta.get("model_family") != family:
            raise ValueError(f"{run_dir} holds a checkpoint of a {restored.meta.get('model_family')}"
                             f" model, not {family}: use another run directory")
        state = restored.state["model"]
        base_key = jax.random.wrap_key_data(restored.state["key"])
        data.train.set_state(restored.data_state)
        start_step = restored.step
        run_id = restored.meta.get("wandb_run_id")
        best_val = restored.meta.get("best_val_loss", math.inf)
        print(f"resuming {run_dir} from step {start_step}")

    n_params = model.num_params()
    main_process = jax.process_index() == 0
    tracker = Tracker(run_dir, config_dict, cfg.logger, run_id=run_id,
                      is_main_process=main_process, resume=start_step > 0)
    val = setup.batch(stack_batches(data.val_batches), leading=1)
    scales = data.metric_scales
    results: dict[str, Any] = {}
    t_start = time.perf_counter()

    def stop_without_saving(reason: str) -> TrainingError:
        kept = checkpointer.latest_step()
        return TrainingError(f"{reason}; stopped without saving; " + (
            "no checkpoint was written yet" if kept is None
            else f"the last checkpoint, step {kept}, is kept"))

    def check_nonfinite(host_totals: dict[str, float], window: int | None = None) -> NonFinite:
        """Pops the non-finite counters from fetched totals; stops the run under
        on_nonfinite=stop, or when all `window` steps since the last log were skipped."""
        faults = NonFinite.take(host_totals)
        if faults.count and trainer.on_nonfinite == "stop":
            raise stop_without_saving(f"{faults.describe()} (trainer.on_nonfinite=stop)")
        if faults.count and faults.count == window:
            raise stop_without_saving(f"{faults.describe()}: all {window} steps since the last "
                                      "log were skipped")
        return faults

    def save(step: int, val_metrics: dict | None, data_state: dict) -> None:
        # A bad state never replaces the last good checkpoint: under `stop` no non-finite step
        # since the last log, and never a non-finite array (an update that overflowed).
        if trainer.on_nonfinite == "stop":
            check_nonfinite(_host(totals))
        if not state_is_finite(state):
            raise stop_without_saving(f"step {step}: the parameters or optimizer state are not "
                                      "finite (an update overflowed)")
        meta = {"model_family": family, "wandb_run_id": tracker.run_id,
                "best_val_loss": best_val, "config": config_dict}
        metrics = {"val_loss": val_metrics["loss"]} if val_metrics else None
        checkpointer.save(step, {"model": state, "key": key_data(base_key)},
                          data_state=data_state, meta=meta, metrics=metrics,
                          force=True)

    def evaluate(step: int) -> dict[str, float]:
        nonlocal best_val
        metrics = derived_metrics(_host(steps.evaluate(state, val)), scales)
        if not math.isfinite(metrics["loss"]):
            raise stop_without_saving(f"step {step}: the validation loss is {metrics['loss']}")
        best_val = min(best_val, metrics["loss"])
        tracker.log({f"val/{k}": v for k, v in metrics.items()}, step)
        return metrics

    exit_code = 1
    try:
        batch = setup.batch(next(data.train))
        totals = setup.zero_totals(batch)
        throughput = Throughput(
            units_per_step=int(np.prod(model.model_inputs(batch).shape)),
            num_devices=mesh.size, flops_per_step=steps.flops_per_step(state, totals, batch),
            peak_tflops_per_device=peak_tflops(mesh.devices.flat[0].device_kind,
                                               cfg.hardware.peak_tflops_per_device))
        bar = tqdm(total=trainer.steps, initial=start_step, disable=not trainer.progress,
                   desc=f"train {family}", unit="step", dynamic_ncols=True)
        last_log_time, last_log_step = time.perf_counter(), start_step
        val_metrics = None
        for step in range(start_step + 1, trainer.steps + 1):
            state, totals = steps.train_step(state, totals, batch, np.int32(step))
            if preempted.is_set():
                save(step, None, data.train.get_state())
                checkpointer.wait()
                bar.write(f"SIGTERM: saved step {step} in {run_dir}; re-run to resume")
                raise Preempted(step)
            checkpoint_now = step % trainer.checkpoint_every == 0 or step == trainer.steps
            if checkpoint_now:  # the position before the next batch is what a resume needs
                data_state = data.train.get_state()
            # The host fetches the next batch while the step runs.
            batch = setup.batch(next(data.train))
            bar.update(1)
            if step % trainer.log_every == 0 or step == trainer.steps:
                host_totals = _host(totals)
                faults = check_nonfinite(host_totals, window=step - last_log_step)
                train_metrics = summarise(host_totals, scales)
                totals = setup.zero_totals(batch)
                now = time.perf_counter()
                elapsed = now - last_log_time
                done = step - last_log_step
                logged = {f"train/{k}": v for k, v in train_metrics.items()}
                if trainer.on_nonfinite == "skip":
                    logged["train/skipped_steps"] = faults.count
                    if faults.count:
                        bar.write(f"skipped non-finite steps: {faults.describe()}")
                logged["train/lr"] = float(schedule(step - 1))
                logged.update(throughput.metrics(done, elapsed))
                tracker.log(logged, step)
                bar.set_postfix(loss=f"{train_metrics['loss']:.4f}", refresh=False)
                last_log_time, last_log_step = now, step
                results["train_loss"] = train_metrics["loss"]
                results["tokens_per_s"] = logged["perf/tokens_per_s"]
            val_metrics = None
            if step % trainer.eval_every == 0 or step == trainer.steps:
                val_metrics = evaluate(step)
                bar.write(f"step {step}: " + ", ".join(
                    f"val {k} {v:.4f}" for k, v in val_metrics.items()
                    if k in ("loss", "perplexity", "bits_per_char", "bits_per_dim", "accuracy")))
            if trainer.sample_every and step % trainer.sample_every == 0 and step < trainer.steps:
                tracker.log_samples(data.sample_kind, generate_samples(
                    local_model(graphdef, state), data, cfg.sampler,
                    jax.random.fold_in(base_key, -step)), step,
                    sample_rate=data.info.get("sample_rate"))
            if checkpoint_now:
                save(step, val_metrics, data_state)
        bar.close()
        checkpointer.wait()

        final_step = max(trainer.steps, start_step)
        final_val = evaluate(final_step) if val_metrics is None else val_metrics
        samples = generate_samples(local_model(graphdef, state), data, cfg.sampler,
                                   jax.random.fold_in(base_key, 2))
        tracker.log_samples(data.sample_kind, samples, final_step,
                            sample_rate=data.info.get("sample_rate"))
        results.update({
            "model_family": family,
            "final_step": final_step,
            "val_loss": final_val["loss"],
            "best_val_loss": best_val,
            **{f"val_{k}": v for k, v in final_val.items() if k != "loss"},
            "num_params": n_params,
            "num_params_non_embedding": model.num_params(non_embedding=True),
            "tokens_seen": throughput.units_per_step * final_step,
            "flops_per_step": throughput.flops_per_step,
            "train_flops": (None if throughput.flops_per_step is None
                            else throughput.flops_per_step * final_step),
            "num_devices": mesh.size,
            "wall_time_s": time.perf_counter() - t_start,
            "run_dir": str(run_dir),
            "wandb_run_id": tracker.run_id,
            "experiment": cfg.experiment,
        })
        tracker.summary(results)
        exit_code = 0
        return results
    finally:
        checkpointer.close()
        tracker.finish(exit_code=exit_code)  # a failed or preempted run is not a success


def dump_results(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, default=str)
