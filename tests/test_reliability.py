"""Faults never lose or corrupt a run: non-finite steps, damaged checkpoints, a full disk,
a checkpoint of another model family, concurrent runs; and no load path unpickles.

Kill-and-resume and preemption (real signals to real processes) are in test_kill_resume.py.
Faults are injected in the test, never through production hooks: a monkeypatched gradient
function inside the compiled step, a monkeypatched Orbax handler, a truncated file.
"""

import _pickle
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import tiny_config

from chainrule.checkpoint import Checkpointer, CheckpointSaveError
from chainrule.cli.common import fail_cleanly
from chainrule.data.images import ImageDataConfig
from chainrule.models import PixelCNNConfig
from chainrule.rundir import RunDir
from chainrule.tracking import LoggerConfig
from chainrule.training.config import TrainConfig, TrainerConfig
from chainrule.training.loop import TrainingError
from chainrule.training.optim import OptimizerConfig
from chainrule.training.steps import Steps
from chainrule.training.train import train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
TINY = ["debug=smoke", "model.num_layers=1", "model.network.embed_dim=32",
        "model.network.num_heads=2", "data.sequence_length=32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 8-step run with checkpoints at steps 4 and 8 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("trained")
    train(tiny_config(steps=8), run_dir)
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def saved_states(run_dir: Path) -> dict[int, list]:
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        return {s: jax.tree.leaves(ckpt.restore(None, step=s).state) for s in ckpt.all_steps()}


def assert_bitwise_equal(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def file_digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- non-finite steps


def poison(monkeypatch, at_step: int, fault: str) -> None:
    """Inject a numerical fault at `at_step`, inside the compiled step: "nan_loss" (NaN loss,
    Inf gradients: a bad batch), "inf_grad" (finite loss, Inf gradients) or "overflow"
    (finite but huge gradients at `at_step`, none before, which an unclipped SGD step with a
    huge learning rate turns into Inf parameters)."""
    grads_fn = Steps._accumulated_grads

    def poisoned(self, model, batch, step):
        grads, metrics = grads_fn(self, model, batch, step)
        bad = step == at_step
        if fault == "overflow":
            return jax.tree.map(lambda g: jnp.where(bad, g * 1e15, 0.0 * g), grads), metrics
        grads = jax.tree.map(lambda g: jnp.where(bad, jnp.inf, g), grads)
        if fault == "nan_loss":
            metrics = dict(metrics, loss=jnp.where(bad, jnp.nan, metrics["loss"]))
        return grads, metrics

    monkeypatch.setattr(Steps, "_accumulated_grads", poisoned)


def test_a_skipped_nonfinite_step_leaves_the_state_as_it_was(tmp_path, monkeypatch):
    poison(monkeypatch, at_step=3, fault="nan_loss")
    cfg = tiny_config(steps=3, on_nonfinite="skip")
    cfg.trainer.checkpoint_every, cfg.trainer.log_every = 1, 3
    results = train(cfg, tmp_path)
    states = saved_states(tmp_path)
    assert sorted(states) == [1, 2, 3]
    assert_bitwise_equal(states[2], states[3])  # parameters, moments, step counter, key
    assert not all(np.array_equal(a, b) for a, b in zip(states[1], states[2], strict=True))
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in logged if "train/loss" in x][-1]
    assert last["step"] == 3 and last["train/skipped_steps"] == 1
    assert math.isfinite(last["train/loss"]) and math.isfinite(results["val_loss"])


@pytest.mark.parametrize("fault, at_step, trainer, saved, message", [
    # found when the loss is next logged (step 6)
    ("nan_loss", 5, {"log_every": 2, "checkpoint_every": 4}, [4],
     r"^step 5: the training loss is nan \(trainer.on_nonfinite=stop\); stopped without "
     r"saving; the last checkpoint, step 4, is kept$"),
    # found before the checkpoint of step 4, which is not written
    ("inf_grad", 4, {"log_every": 3, "checkpoint_every": 2}, [2],
     r"^step 4: the gradient norm is inf \(loss \d\.\d+\) .*the last checkpoint, step 2, is kept"),
    # finite loss and gradient, Inf parameters: found before the checkpoint of step 4
    ("overflow", 4, {"log_every": 5, "checkpoint_every": 2}, [2],
     r"^step 4: the parameters or optimizer state are not finite \(an update overflowed\); "
     r"stopped without saving; the last checkpoint, step 2, is kept$"),
])
def test_a_nonfinite_step_stops_the_run_naming_the_step_and_metric(
        tmp_path, monkeypatch, fault, at_step, trainer, saved, message):
    poison(monkeypatch, at_step, fault)
    cfg = tiny_config(steps=8)
    cfg.trainer.eval_every = 8
    for name, value in trainer.items():
        setattr(cfg.trainer, name, value)
    if fault == "overflow":
        cfg.optimizer = OptimizerConfig(name="sgd", learning_rate=1e30, momentum=0.0,
                                        schedule="constant", warmup_steps=0,
                                        grad_clip_norm=None)
    with pytest.raises(TrainingError, match=message):
        train(cfg, tmp_path)
    states = saved_states(tmp_path)
    assert sorted(states) == saved
    assert all(np.all(np.isfinite(x)) for x in states[saved[-1]] if x.dtype.kind == "f")


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    before = file_digests(run_dir / "checkpoints")
    cfg = tiny_config(steps=12)
    cfg.optimizer.learning_rate, cfg.optimizer.decay_steps = 1e30, None  # diverging at once
    with pytest.raises(TrainingError, match=r"^step (9|10): the (training loss|gradient norm) is "
                                            r"(nan|inf).*the last checkpoint, step 8, is kept"):
        train(cfg, run_dir)
    assert file_digests(run_dir / "checkpoints") == before


# ---------------------------------------------------------------------------- checkpoints


class _NoUnpickling:
    """While active, any unpickling fails the test: pickle's and _pickle's load, loads and
    Unpickler are replaced, and an audit hook refuses the lookup of any pickled global
    (which catches unpicklers bound before the patch, too)."""

    active = False

    @staticmethod
    def hook(event: str, args: tuple) -> None:
        if _NoUnpickling.active and event == "pickle.find_class":
            raise AssertionError(f"unpickling {args} on a load path")


sys.addaudithook(_NoUnpickling.hook)


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling on a load path")

    def np_load(*args, allow_pickle=False, **kwargs):
        return refuse() if allow_pickle else np_load.original(*args, **kwargs)

    np_load.original = np.load
    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(np, "load", np_load)
    _NoUnpickling.active = True
    yield
    _NoUnpickling.active = False


def test_a_damaged_latest_checkpoint_is_skipped_redone_exactly_and_nothing_unpickles(
        trained, tmp_path, capsys, no_unpickling):
    run_dir = copy_run(trained, tmp_path)
    undamaged = saved_states(run_dir)[8]
    data = max((p for p in (run_dir / "checkpoints" / "8" / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)  # the largest array file, cut in half
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])

    with pytest.warns(UserWarning) as warned:
        train(tiny_config(steps=8), run_dir)  # the same command again
    messages = [str(w.message) for w in warned]
    assert any(re.match(r"checkpoint step 8 .* damaged or incomplete", m) for m in messages)
    assert any(m.startswith("deleting damaged checkpoint step 8") for m in messages)
    assert f"resuming {run_dir} from step 4" in capsys.readouterr().out
    assert_bitwise_equal(saved_states(run_dir)[8], undamaged)

    from hydra import compose, initialize_config_dir

    from chainrule.cli import CONF_DIR
    from chainrule.cli.sample import run as sample
    from chainrule.cli.schemas import register_configs

    register_configs()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=[f"checkpoint={run_dir}", "prompt=KING:",
                                           "sampler.num_samples=1", "sampler.max_new_tokens=4"])
    sample(cfg)
    assert re.search(r"1 samples from step (4|8)", capsys.readouterr().out)


def test_the_unpickling_guard_catches_unpickling(no_unpickling):
    blob = pickle.dumps(Path("x"))
    with pytest.raises(AssertionError, match="unpickling"):
        pickle.loads(blob)
    with pytest.raises(AssertionError, match="unpickling"):
        pickle._Unpickler(io.BytesIO(blob)).load()  # not patched: the audit hook stops it
    with pytest.raises(AssertionError, match="unpickling"):
        np.load(io.BytesIO(), allow_pickle=True)


def test_a_full_disk_stops_the_run_and_leaves_the_last_checkpoint_usable(tmp_path, monkeypatch):
    save = ocp.StandardCheckpointHandler.async_save

    async def disk_full(self, directory, *args, **kwargs):
        if "/8.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await save(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", disk_full)
    with pytest.raises(CheckpointSaveError, match=r"checkpoint step 8 could not be written to .*"
                                                  r"\(No space left on device\); the last complete "
                                                  r"checkpoint, step 4, is intact"):
        train(tiny_config(steps=8), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]  # no leftovers
    with Checkpointer(tmp_path / "checkpoints") as ckpt, warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = ckpt.restore(None)
    assert restored.step == 4 and restored.data_state and restored.meta["model_family"]


def test_the_cli_reports_a_stopped_run_in_one_line(capsys):
    for error in (TrainingError("step 5: the training loss is nan; stopped without saving\nx"),
                  CheckpointSaveError("checkpoint step 8 could not be written")):
        def fails(error=error):
            raise error

        with pytest.raises(SystemExit) as exit_info:
            fail_cleanly(fails)()
        assert exit_info.value.code == 1
        assert capsys.readouterr().err == f"error: {str(error).splitlines()[0]}\n"


def test_another_familys_run_directory_is_refused_and_left_untouched(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    before = file_digests(run_dir)
    cfg = TrainConfig(model=PixelCNNConfig(image_shape=(8, 8, 1), num_levels=17),
                      data=ImageDataConfig(), logger=LoggerConfig(backend="none"),
                      trainer=TrainerConfig(steps=8, progress=False))
    with pytest.raises(ValueError, match=r"holds checkpoints of a transformer model, not "
                                         r"pixelcnn: expected a new run directory"):
        train(cfg, run_dir)
    cfg = tiny_config(steps=12)
    cfg.resume = False
    with pytest.raises(ValueError, match="already holds checkpoints and resume=false"):
        train(cfg, run_dir)
    assert file_digests(run_dir) == before


# ---------------------------------------------------------------------------- concurrency


def test_a_second_process_cannot_train_in_a_locked_run_directory(tmp_path):
    with open(tmp_path / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write("12345")
        handle.flush()
        proc = subprocess.run([sys.executable, "train.py", *TINY, f"hydra.run.dir={tmp_path}"],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "another process (pid 12345) is training" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_lock_is_released_after_a_run(tmp_path):
    with RunDir(tmp_path).lock():
        pass
    with RunDir(tmp_path).lock():  # would raise if the first were still held
        pass
