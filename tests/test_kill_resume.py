"""A run killed at any point and re-run with the same command ends bitwise where an
uninterrupted run ends (CPU), in the same W&B run, having seen the same batches.

One run directory goes through four interruptions, each a real signal to a real `train.py`
process, each restart the same command: SIGKILL right after checkpoint 4 is committed,
SIGKILL while checkpoint 8 is being written, SIGTERM (preemption) at step 6, SIGKILL at step
10 between checkpoints. The kill points are placed from inside the child by wrapping library
functions (a test-only launcher below), so they are exact and the test does not race.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from chainrule.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[1]

# Runs train.py's main() after arranging one interruption (env KILL="<where>:<step>"), with a
# stand-in W&B client that records the run ids chainrule asks it to create or resume.
LAUNCHER = r"""
import json, os, signal, sys, types, uuid
from pathlib import Path

class Run:
    def __init__(self, run_id):
        self.id, self.summary = run_id, {}
    def define_metric(self, *args, **kwargs): pass
    def log(self, *args, **kwargs): pass
    def finish(self, *args, **kwargs): pass

def init(id=None, dir=None, resume=None, **kwargs):
    run = Run(id or uuid.uuid4().hex[:8])
    with open(Path(dir) / "wandb_inits.jsonl", "a") as f:
        f.write(json.dumps({"asked": id, "got": run.id, "resume": resume}) + "\n")
    return run

sys.modules["wandb"] = types.SimpleNamespace(init=init, Table=lambda **kwargs: kwargs)

import orbax.checkpoint as ocp
from chainrule.checkpoint import Checkpointer
from chainrule.tracking import Tracker

where, _, at = os.environ.get("KILL", "").partition(":")
at = int(at or -1)
die = lambda sig=signal.SIGKILL: os.kill(os.getpid(), sig)

if where == "after_save":  # checkpoint `at` is committed, nothing after it ran
    save = Checkpointer.save
    def after_save(self, step, *args, **kwargs):
        saved = save(self, step, *args, **kwargs)
        if step == at:
            die()
        return saved
    Checkpointer.save = after_save
elif where == "in_save":  # checkpoint `at` is half written: its arrays, not its JSON items
    json_save = ocp.JsonCheckpointHandler.async_save
    async def in_save(self, directory, *args, **kwargs):
        if f"/{at}.orbax-checkpoint-tmp" in str(directory):
            die()
        return await json_save(self, directory, *args, **kwargs)
    ocp.JsonCheckpointHandler.async_save = in_save
elif where in ("at_log", "sigterm_at_log"):  # step `at` has run and is being logged
    log = Tracker.log
    def at_log(self, metrics, step):
        log(self, metrics, step)
        if step == at:
            die(signal.SIGTERM if where == "sigterm_at_log" else signal.SIGKILL)
    Tracker.log = at_log

from chainrule.cli.train import main
sys.argv = ["train.py", *sys.argv[1:]]
main()
"""


def corpus(path: Path) -> Path:
    words = np.array("to be or not that is the question whether tis nobler in mind".split())
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(400)))
    return path


def launch(run_dir: Path, text: Path, cache: Path, kill: str = "") -> subprocess.CompletedProcess:
    args = ["logger=wandb", "data=text_file", f"data.path={text}", "data.sequence_length=32",
            "data.batch_size=4", "data.val_batches=1", "model.num_layers=1",
            "model.network.embed_dim=32", "model.network.num_heads=2",
            "model.network.dropout_rate=0.1",  # dropout keys must follow the step too
            "trainer.steps=12", "trainer.checkpoint_every=4", "trainer.log_every=1",
            "trainer.eval_every=4", "trainer.keep_checkpoints=10", "trainer.progress=false", "sampler.num_samples=1",
            "sampler.max_length=8", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "offline", "KILL": kill,
           # compiled programs are shared between the processes: the same executables
           "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return subprocess.run([sys.executable, "-c", LAUNCHER, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["train/loss"]) for x in lines if "train/loss" in x]


def final_state(run_dir: Path):
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        restored = ckpt.restore(None, step=12)
    return jax.tree.leaves(restored.state)


def test_killed_and_preempted_runs_resume_bitwise_exactly(tmp_path):
    text, cache = corpus(tmp_path / "corpus.txt"), tmp_path / "jax_cache"
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = launch(whole, text, cache)
    assert done.returncode == 0, done.stderr[-3000:]

    # (kill point, exit code, step resumed from, complete checkpoints left behind)
    chain = [("after_save:4", -signal.SIGKILL, None, [4]),
             ("in_save:8", -signal.SIGKILL, 4, [4]),
             ("sigterm_at_log:6", 143, 4, [4, 7]),  # preemption saves the step it is at
             ("at_log:10", -signal.SIGKILL, 7, [4, 7, 8]),
             ("", 0, 8, [4, 7, 8, 12])]
    for kill, code, resumed_from, left in chain:
        proc = launch(broken, text, cache, kill)
        context = f"{kill or 'final run'}: {proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
        assert proc.returncode == code, context
        if resumed_from is not None:
            assert f"resuming {broken} from step {resumed_from}" in proc.stdout, context
        assert steps_on_disk(broken) == left, context
        if code == 143:
            assert "SIGTERM: saved step 7" in proc.stdout + proc.stderr, context
    assert not list((broken / "checkpoints").glob("*.orbax-checkpoint-tmp*"))

    for a, b in zip(final_state(whole), final_state(broken), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Every step's training loss, including those run twice across a kill, is the
    # uninterrupted run's: the same batches in the same order, the same dropout.
    reference = dict(train_losses(whole))
    seen = train_losses(broken)
    assert sorted({s for s, _ in seen}) == list(range(1, 13))
    assert all(loss == reference[step] for step, loss in seen), (seen, reference)
    # One W&B run: the first process created it, every restart asked to resume it.
    inits = [json.loads(x) for x in (broken / "wandb_inits.jsonl").read_text().splitlines()]
    first = inits[0]["got"]
    assert inits[0]["asked"] is None and len(inits) == len(chain)
    assert all(x["asked"] == first == x["got"] and x["resume"] == "allow" for x in inits[1:])
