"""The hooks of a training run, each with its interval, and the run's final results.

    every step          preemption (SIGTERM: checkpoint this step, exit 143), the progress bar
    trainer.log_every   train metrics, learning rate, throughput -> tracker
    trainer.eval_every  validation metrics -> tracker (the best is remembered)
    trainer.sample_every  sample previews, decoded by the data's codec -> tracker
    trainer.checkpoint_every  a checkpoint (never of a non-finite state)

Everything family-specific comes from the run's data bundle (metric scales, the codec that
turns samples into text, images or audio) or the model; nothing here names a family.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from chainrule.checkpoint import Checkpointer
from chainrule.models import AutoregressiveModel
from chainrule.parallel.devices import peak_tflops
from chainrule.rundir import RunDir
from chainrule.sampling.draw import draw
from chainrule.tracking import Tracker
from chainrule.training.loop import Preempted, StepInfo, Trainer, TrainingError
from chainrule.training.metrics import derived_metrics, summarise, to_host
from chainrule.training.nonfinite import NonFinite, state_is_finite
from chainrule.training.restore import checkpointed
from chainrule.training.run import Resumed
from chainrule.training.steps import stack_batches
from chainrule.training.throughput import Throughput


def local_model(graphdef, state) -> AutoregressiveModel:
    """The model for generation: as it is in one process; with several, every process
    gathers the whole of each parameter (a collective: all must call it) and samples alone.
    The models' own dropout streams are replicated (and their PRNG keys cannot be gathered
    into numpy): each process takes its local copy."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        streams = jax.tree.map(lambda x: x.addressable_data(0),
                               nnx.filter_state(state, nnx.RngState))
        state = nnx.merge_state(
            multihost_utils.process_allgather(checkpointed(state), tiled=True), streams)
    return nnx.merge(graphdef, state)[0]


def generate_samples(model: AutoregressiveModel, codec, sampler, key) -> list:
    """Preview samples for the logs, decoded for people (speculative needs a draft model, so
    previews use its token-by-token knobs instead)."""
    if sampler.name == "speculative":
        sampler = dataclasses.replace(sampler, name="temperature")
    samples, _ = draw(model, sampler, key=key)
    return [codec.decode(s) for s in samples]


class Session:
    """One training run's hooks around a `Trainer`, and what they share: the tracker, the
    checkpointer, the RNG key, the best validation loss and the results so far."""

    def __init__(self, trainer: Trainer, tracker: Tracker, checkpointer: Checkpointer,
                 resumed: Resumed, preempted: threading.Event, run_dir: RunDir):
        self.trainer, self.tracker, self.checkpointer = trainer, tracker, checkpointer
        self.run = trainer.run
        self.cfg = self.run.cfg
        self.key = resumed.key
        self.best_val = resumed.best_val_loss
        self.preempted = preempted
        self.run_dir = run_dir
        self.results: dict[str, Any] = {}
        self.last_val: dict[str, float] | None = None
        self.val = self.run.batch(stack_batches(self.run.data.val_batches), leading=1)
        self.throughput = self._throughput()
        self.bar = tqdm(total=self.cfg.trainer.steps, initial=resumed.step,
                        disable=not self.cfg.trainer.progress, desc=f"train {self.run.family}",
                        unit="step", dynamic_ncols=True)
        self.last_log = (time.perf_counter(), resumed.step)
        trainer.take_data_wait()  # the first batch, fetched before the clock started
        self.started = time.perf_counter()

    def _throughput(self) -> Throughput:
        run, trainer = self.run, self.trainer
        mesh = run.mesh
        return Throughput(
            units_per_step=int(np.prod(run.model.model_inputs(trainer.batch).shape)),
            num_devices=mesh.size,
            flops_per_step=run.steps.flops_per_step(trainer.state, trainer.totals,
                                                    trainer.batch),
            peak_tflops_per_device=peak_tflops(mesh.devices.flat[0].device_kind,
                                               self.cfg.hardware.peak_tflops_per_device))

    def install(self) -> None:
        """The hooks, in the order they run after a step."""
        t = self.cfg.trainer
        add = self.trainer.add_hook
        add(self.preempt_if_asked, every=1)
        add(lambda info: self.bar.update(1), every=1)
        add(self.log_train_metrics, every=t.log_every)
        add(self.evaluate, every=t.eval_every)
        add(self.preview_samples, every=t.sample_every, at_end=False)  # the end has its own
        add(self.save, every=t.checkpoint_every)

    # ---- hooks ----------------------------------------------------------------------------

    def preempt_if_asked(self, info: StepInfo) -> None:
        if not self.preempted.is_set():
            return
        self._save(info.step, None, info.data_state)
        self.checkpointer.wait()
        self.bar.write(f"SIGTERM: saved step {info.step} in {self.run_dir.path}; re-run to "
                       "resume")
        raise Preempted(info.step)

    def log_train_metrics(self, info: StepInfo) -> None:
        host_totals = to_host(self.trainer.totals)
        last_time, last_step = self.last_log
        faults = self._check_nonfinite(host_totals, window=info.step - last_step)
        metrics = summarise(host_totals, self.run.data.metric_scales)
        self.trainer.reset_totals()
        now = time.perf_counter()
        logged = {f"train/{k}": v for k, v in metrics.items()}
        if self.cfg.trainer.on_nonfinite == "skip":
            logged["train/skipped_steps"] = faults.count
            if faults.count:
                self.bar.write(f"skipped non-finite steps: {faults.describe()}")
        logged["train/lr"] = float(self.run.schedule(info.step - 1))
        logged.update(self.throughput.metrics(info.step - last_step, now - last_time))
        logged["perf/data_wait_fraction"] = self.trainer.take_data_wait() / (now - last_time)
        self.tracker.log(logged, info.step)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        self.last_log = (now, info.step)
        self.results["train_loss"] = metrics["loss"]
        self.results["tokens_per_s"] = logged["perf/tokens_per_s"]
        self.results["data_wait_fraction"] = logged["perf/data_wait_fraction"]

    def evaluate(self, info: StepInfo) -> None:
        info.val_metrics = self._validation_metrics(info.step)
        shown = sorted((k for k in info.val_metrics if k != "nll_loss"), key=lambda k: k != "loss")
        self.bar.write(f"step {info.step}: " + ", ".join(
            f"val {k} {info.val_metrics[k]:.4f}" for k in shown))

    def preview_samples(self, info: StepInfo) -> None:
        self._log_samples(jax.random.fold_in(self.key, -info.step), info.step)

    def save(self, info: StepInfo) -> None:
        self._save(info.step, info.val_metrics, info.data_state)

    # ---- what the hooks share ------------------------------------------------------------

    def _validation_metrics(self, step: int) -> dict[str, float]:
        run = self.run
        metrics = derived_metrics(to_host(run.steps.evaluate(self.trainer.state, self.val)),
                                  run.data.val_metric_scales or run.data.metric_scales)
        if not math.isfinite(metrics["loss"]):
            raise self._stop_without_saving(f"step {step}: the validation loss is "
                                            f"{metrics['loss']}")
        self.best_val = min(self.best_val, metrics["loss"])
        self.tracker.log({f"val/{k}": v for k, v in metrics.items()}, step)
        self.last_val = metrics
        return metrics

    def _log_samples(self, key: jax.Array, step: int) -> None:
        run = self.run
        model = local_model(run.graphdef, self.trainer.state)
        samples = generate_samples(model, run.data.codec, self.cfg.sampler, key)
        self.tracker.log_samples(run.data.codec.kind, samples, step, **run.data.codec.media)

    def _stop_without_saving(self, reason: str) -> TrainingError:
        kept = self.checkpointer.latest_step()
        return TrainingError(f"{reason}; stopped without saving; " + (
            "no checkpoint was written yet" if kept is None
            else f"the last checkpoint, step {kept}, is kept"))

    def _check_nonfinite(self, host_totals: dict[str, float],
                         window: int | None = None) -> NonFinite:
        """Pops the non-finite counters from fetched totals; stops the run under
        on_nonfinite=stop, or when all `window` steps since the last log were skipped."""
        faults = NonFinite.take(host_totals)
        if faults.count and self.cfg.trainer.on_nonfinite == "stop":
            raise self._stop_without_saving(f"{faults.describe()} (trainer.on_nonfinite=stop)")
        if faults.count and faults.count == window:
            raise self._stop_without_saving(f"{faults.describe()}: all {window} steps since "
                                            "the last log were skipped")
        return faults

    def _save(self, step: int, val_metrics: dict | None, data_state: dict) -> None:
        # A bad state never replaces the last good checkpoint: under `stop` no non-finite step
        # since the last log, and never a non-finite array (an update that overflowed).
        state = self.trainer.state
        if self.cfg.trainer.on_nonfinite == "stop":
            self._check_nonfinite(to_host(self.trainer.totals))
        if not state_is_finite(state):
            raise self._stop_without_saving(f"step {step}: the parameters or optimizer state "
                                            "are not finite (an update overflowed)")
        meta = {"model_family": self.run.family, "wandb_run_id": self.tracker.run_id,
                "best_val_loss": self.best_val, "config": self.run.config_record}
        metrics = {"val_loss": val_metrics["loss"]} if val_metrics else None
        self.checkpointer.save(step, {"model": checkpointed(state),
                                      "key": self.run.key_data(self.key)},
                               data_state=data_state, meta=meta, metrics=metrics, force=True)

    # ---- the end -------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """After the last step: final validation (unless the last step had it), samples, the
        results (returned, in the tracker's summary and metrics.json)."""
        self.bar.close()
        self.checkpointer.wait()
        run, trainer = self.run, self.trainer
        final_step = max(self.cfg.trainer.steps, trainer.start_step)
        ran_to_end = trainer.start_step < self.cfg.trainer.steps
        final_val = (self.last_val if ran_to_end and self.last_val is not None
                     else self._validation_metrics(final_step))
        self._log_samples(jax.random.fold_in(self.key, 2), final_step)
        model = run.model
        flops = self.throughput.flops_per_step
        self.results.update({
            "model_family": run.family,
            "final_step": final_step,
            "val_loss": final_val["loss"],
            "best_val_loss": self.best_val,
            **{f"val_{k}": v for k, v in final_val.items() if k != "loss"},
            "num_params": model.num_params(),
            "num_params_non_embedding": model.num_params(non_embedding=True),
            "tokens_seen": self.throughput.units_per_step * final_step,
            "flops_per_step": flops,
            "train_flops": None if flops is None else flops * final_step,
            "num_devices": run.mesh.size,
            "wall_time_s": time.perf_counter() - self.started,
            "run_dir": str(self.run_dir.path),
            "wandb_run_id": self.tracker.run_id,
            "experiment": self.cfg.experiment,
        })
        self.tracker.summary(self.results)
        return self.results

