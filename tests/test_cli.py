"""train.py and sample.py as a user runs them: subprocesses on clean run directories."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def run(script, *args, check=True):
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, env=ENV, text=True,
                          capture_output=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke")
    proc = run("train.py", "debug=smoke", f"hydra.run.dir={run_dir}")
    return run_dir, proc


def test_train_smoke_writes_a_complete_run(smoke_run):
    run_dir, proc = smoke_run
    results = json.loads((run_dir / "metrics.json").read_text())
    assert results["final_step"] == 6 and results["val_loss"] > 0
    assert "val_perplexity" in results and "val_bits_per_char" in results
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in x for x in lines) and any("val/loss" in x for x in lines)
    assert (run_dir / "tokenizer.json").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert "results: val_loss=" in proc.stdout


def test_sample_cli_continues_a_prompt(smoke_run):
    run_dir, _ = smoke_run
    proc = run("sample.py", f"checkpoint={run_dir}", "prompt=ROMEO:", "sampler=top_k",
               "sampler.num_samples=2", "sampler.max_length=20")
    assert proc.stdout.count("ROMEO:") >= 2
    written = list((run_dir / "samples").glob("*.txt"))
    assert written and "ROMEO:" in "".join(p.read_text() for p in written)


def test_sample_cli_beam_speculative_and_prompt_file(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    proc = run("sample.py", f"checkpoint={run_dir}", "sampler=beam", "prompt=KING:",
               "sampler.beam_size=3", "sampler.num_samples=2", "sampler.max_new_tokens=6")
    assert proc.stdout.count("beam score") == 2
    # a model drafting for itself: every draft token is accepted
    proc = run("sample.py", f"checkpoint={run_dir}", "sampler=speculative",
               f"sampler.draft_checkpoint={run_dir}", "prompt=KING:", "sampler.num_samples=2",
               "sampler.max_new_tokens=9", "sampler.num_draft_tokens=3")
    assert "acceptance 1.00" in proc.stdout
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET:\n")
    proc = run("sample.py", f"checkpoint={run_dir}", f"prompt_file={prompts}",
               "sampler.num_samples=2", "sampler.max_new_tokens=5", "sampler=greedy")
    assert proc.stdout.count("ROMEO:") == 2 and proc.stdout.count("JULIET:") == 2


def test_rerun_in_the_same_directory_resumes(smoke_run, tmp_path):
    run_dir = tmp_path / "again"
    run("train.py", "debug=smoke", "trainer.steps=3", f"hydra.run.dir={run_dir}")
    proc = run("train.py", "debug=smoke", f"hydra.run.dir={run_dir}")
    assert "resuming" in proc.stdout and "from step 3" in proc.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["final_step"] == 6


@pytest.mark.parametrize("args, expected", [
    (["trainer.stepz=10"], "trainer.stepz is not a config key (did you mean trainer.steps?)"),
    (["trainer.steps=abc"], "trainer.steps: Value 'abc' of type 'str' could not be converted"),
    (["data=text_file", "data.path=/no/such/file.txt"], "/no/such/file.txt"),
    (["hardware=tpu"], "JAX found 'cpu'"),
    (["model.vocab_size=10"], "smaller than the data's vocabulary"),
])
def test_bad_input_exits_2_with_one_line_and_no_run_directory(tmp_path, args, expected):
    """The rows of docs/reliability.md as a user meets them (all rows: test_bad_input.py)."""
    proc = run("train.py", "debug=smoke", f"hydra.run.dir={tmp_path / 'run'}", *args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith("error: ") and expected in proc.stderr
    assert not (tmp_path / "run").exists()


def test_another_family_in_a_run_directory_leaves_it_untouched(smoke_run):
    run_dir, _ = smoke_run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run("train.py", "model=pixelcnn", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [proc.stderr.strip()]
    assert "holds checkpoints of a transformer model, not pixelcnn" in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_sample_cli_rejects_a_directory_without_checkpoints(tmp_path):
    proc = run("sample.py", f"checkpoint={tmp_path}", check=False)
    assert proc.returncode != 0 and "no chainrule checkpoint" in proc.stderr
