"""Preemption, concurrent runs and non-finite losses never lose or corrupt a run."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chainrule.training.loop import TrainingError, run_lock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
TINY = ["debug=smoke", "model.num_layers=1", "model.network.embed_dim=32",
        "model.network.num_heads=2", "data.sequence_length=32"]


def test_sigterm_checkpoints_the_current_step_and_the_rerun_finishes(tmp_path):
    args = [sys.executable, "train.py", *TINY, "trainer.steps=100000", "trainer.log_every=50",
            "trainer.eval_every=100000", "trainer.checkpoint_every=100000",
            f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)  # the first log line means training is under way
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-2000:]
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 50, out[-2000:]
    assert f"saved step {saved[-1]}" in out
    done = subprocess.run(args[:3] + TINY[1:] + [f"trainer.steps={saved[-1] + 4}",
                                                 f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"from step {saved[-1]}" in done.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["final_step"] == saved[-1] + 4


def test_a_second_process_cannot_train_in_a_locked_run_directory(tmp_path):
    with open(tmp_path / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write("12345")
        handle.flush()
        proc = subprocess.run([sys.executable, "train.py", *TINY, f"hydra.run.dir={tmp_path}"],
                              cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "another process (pid 12345) is training" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_lock_is_released_after_a_run(tmp_path):
    with run_lock(tmp_path):
        pass
    with run_lock(tmp_path):  # would raise if the first were still held
        pass


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    from test_train import tiny_config

    from chainrule.checkpoint import Checkpointer
    from chainrule.training.loop import train

    cfg = tiny_config(steps=4)
    train(cfg, tmp_path)  # a good run: checkpoints at steps 4
    cfg = tiny_config(steps=8)
    cfg.optimizer.learning_rate = 1e30  # the same run resumed, diverging at once
    with pytest.raises(TrainingError, match=r"step \d+: the (training loss|gradient norm) is "
                       r"(nan|inf).*stopped without saving; the last checkpoint, step 4, is kept"):
        train(cfg, tmp_path)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 4
