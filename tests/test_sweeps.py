"""Sweeps: every preset composes, a multirun records each job (failures included), and the
report turns a sweep directory into a table, fits and plots."""

import csv
import itertools
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from PIL import Image

from chainrule.cli import CONF_DIR
from chainrule.cli.schemas import register_configs
from chainrule.config import resolve
from chainrule.sweeps.job import SweepJob
from chainrule.sweeps.report import build_report, fit_scaling
from chainrule.sweeps.results import latest_sweep, load_sweep

register_configs()
REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.stem for p in (Path(CONF_DIR) / "sweep").glob("*.yaml"))
ENV = {**os.environ, "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
# A job of seconds: one layer, 16-character contexts, 4 steps.
TINY = ["debug=smoke", "model.num_layers=1", "model.network.num_heads=4", "data.sequence_length=16",
        "trainer.steps=4",
        "trainer.eval_every=2", "trainer.checkpoint_every=4", "sampler.max_length=8",
        "sampler.num_samples=1"]


def compose_train(overrides, hydra=False):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra)


def sweep_values(key, value):
    """The values a sweeper param takes: every choice, or the two ends of an interval."""
    override = OverridesParser.create().parse_override(f"{key}={value}")
    if override.is_discrete_sweep():
        return [yaml.safe_load(v) for v in override.sweep_string_iterator()]
    interval = override.value()
    return [interval.start, interval.end]


# ---- the presets ---------------------------------------------------------------------------

def test_cpu_and_full_size_presets_come_in_pairs():
    assert {"transformer_scaling", "pixelcnn_scaling", "wavenet_scaling", "lr_search"} <= \
        set(SWEEPS)
    for name in SWEEPS:
        assert (name.removesuffix("_cpu") in SWEEPS) and (f"{name.removesuffix('_cpu')}_cpu"
                                                         in SWEEPS), name


@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_of_every_sweep_composes_and_validates(name):
    cfg = compose_train([f"sweep={name}"], hydra=True)
    assert OmegaConf.to_container(cfg.hydra.sweep)["dir"].startswith(f"multirun/{name}/")
    params = cfg.hydra.sweeper.params
    assert params, f"sweep={name} sets no hydra.sweeper.params"
    if "lr_search" in name:  # Optuna, TPE, seeded
        assert "optuna" in cfg.hydra.sweeper._target_.lower()
        assert "TPESampler" in cfg.hydra.sweeper.sampler._target_
        assert cfg.hydra.sweeper.sampler.seed is not None
    base = compose_train([f"sweep={name}"])
    grid = [[(k, v) for v in sweep_values(k, value)] for k, value in params.items()]
    for job in itertools.product(*grid):  # every job of a grid, an interval's two ends
        job_cfg = base.copy()  # = composing with the job's overrides, without Hydra's 0.2 s
        for key, value in job:
            OmegaConf.update(job_cfg, key, value, merge=False)
        train_cfg = resolve(job_cfg)
        assert train_cfg.trainer.steps > 0
        assert all(OmegaConf.select(job_cfg, k) == v for k, v in job)


@pytest.mark.parametrize("launcher, target", [
    ("basic", "BasicLauncher"), ("joblib", "JoblibLauncher"),
    ("submitit_local", "LocalLauncher"), ("submitit_slurm", "SlurmLauncher"),
    ("slurm", "SlurmLauncher"),
])
def test_launchers_compose(launcher, target):
    cfg = compose_train(["sweep=transformer_scaling_cpu", f"hydra/launcher={launcher}"],
                        hydra=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":  # chainrule's preset: one GPU per job, requeued on timeout
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.max_num_timeout > 0


def test_a_sweep_preset_without_multirun_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "sweep=transformer_scaling_cpu",
                           f"hydra.run.dir={tmp_path}"], cwd=REPO, env=ENV, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 2 and "add -m" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


# ---- a multirun, end to end ----------------------------------------------------------------

@pytest.fixture(scope="module")
def multirun(tmp_path_factory):
    """3 jobs of the Transformer preset, the middle one failing at validation (a width that
    4 heads do not divide): the jobs after it must still run."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "sweep=transformer_scaling_cpu", *TINY,
         "model.network.embed_dim=16,18,32", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env=ENV, text=True, capture_output=True, timeout=600)
    return sweep_dir, proc


def test_multirun_records_every_job_and_keeps_going_after_a_failure(multirun):
    sweep_dir, proc = multirun
    assert proc.returncode == 1, proc.stderr[-3000:]  # Hydra re-raises the failure at the end
    assert "job 1 failed" in proc.stderr and "Traceback" in proc.stderr
    for num, width in ((0, 16), (2, 32)):
        results = json.loads((sweep_dir / str(num) / "metrics.json").read_text())
        assert f"model.network.embed_dim={width}" in results["overrides"]
        assert results["sweep"]["num"] == num and results["sweep"]["sweep"] == \
            "transformer_scaling_cpu"
        for key in ("val_loss", "best_val_loss", "val_perplexity", "val_bits_per_char",
                    "num_params", "num_params_non_embedding", "train_flops", "tokens_seen",
                    "wall_time_s"):
            assert results[key] > 0, key
        assert results["run_dir"] == str(sweep_dir / str(num))
    failed = json.loads((sweep_dir / "1" / "failed.json").read_text())
    assert failed["error_type"] == "ValueError" and "embed_dim=18" in failed["error"]
    assert "model.network.embed_dim=18" in failed["overrides"]
    assert not (sweep_dir / "1" / "metrics.json").exists()


def test_report_cli_aggregates_the_multirun(multirun, tmp_path):
    sweep_dir, _ = multirun
    proc = subprocess.run([sys.executable, "-m", "chainrule.sweeps", str(sweep_dir),
                           "--out", str(tmp_path)], cwd=REPO, env=ENV, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| job | model.network.embed_dim | status |" in proc.stdout
    for name in ("loss_vs_params.png", "loss_vs_compute.png", "loss_curves.png"):
        assert Image.open(tmp_path / name).size[0] > 100
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert [r["model.network.embed_dim"] for r in rows] == ["16", "18", "32"]
    assert "must divide" in rows[1]["error"]
    report = (tmp_path / "report.md").read_text()
    assert "2 ok, 1 failed" in report and "embed_dim=18" in report


# ---- the report on a sweep of known numbers ------------------------------------------------

def fake_sweep(root: Path, laws=((1, 16), (1, 32), (2, 32), (2, 64))):
    """A sweep directory as the CLI leaves it, with losses on L = 5 * N^-0.1 exactly."""
    for num, (layers, width) in enumerate(laws):
        run_dir = root / str(num)
        (run_dir / ".hydra").mkdir(parents=True)
        overrides = ["sweep=demo", f"model.num_layers={layers}",
                     f"model.network.embed_dim={width}"]
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"job": {"num": num}}}))
        n = 12 * layers * width ** 2
        loss = 5.0 * n ** -0.1
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "time": 0.0, "train/loss": loss + 1 / s}) + "\n"
            for s in (10, 20)) + json.dumps({"step": 20, "time": 0.0, "val/loss": loss}) + "\n")
        (run_dir / "metrics.json").write_text(json.dumps({
            "val_loss": loss, "best_val_loss": loss, "val_bits_per_char": loss / 0.69,
            "num_params": n + 1000, "num_params_non_embedding": n,
            "train_flops": 6.0 * n * 1e5, "tokens_seen": 1e5, "wall_time_s": 1.0,
            "overrides": overrides}))
    return root


def test_report_fits_the_known_exponent_and_lists_jobs_without_results(tmp_path):
    sweep_dir = fake_sweep(tmp_path / "sweep")
    (sweep_dir / "4" / ".hydra").mkdir(parents=True)  # failed
    (sweep_dir / "4" / ".hydra" / "overrides.yaml").write_text(
        "- sweep=demo\n- model.num_layers=9\n- model.network.embed_dim=9\n")
    (sweep_dir / "4" / "failed.json").write_text(json.dumps(
        {"error_type": "TrainingError", "error": "training loss became nan"}))
    (sweep_dir / "5" / ".hydra").mkdir(parents=True)  # still running
    (sweep_dir / "5" / ".hydra" / "overrides.yaml").write_text(
        "- sweep=demo\n- model.num_layers=4\n- model.network.embed_dim=64\n")

    (sweep_dir / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  model.num_layers: 2\nbest_value: 2.5\n")
    report = build_report(sweep_dir)
    assert "Optuna's best trial: `model.num_layers=2` with objective 2.5" in report.markdown
    assert report.sweep.name == "demo"
    assert report.sweep.varying == ["model.num_layers", "model.network.embed_dim"]
    assert [j.status for j in report.sweep.jobs] == ["ok"] * 4 + ["failed", "incomplete"]
    assert report.fits.params.alpha == pytest.approx(0.1, rel=1e-6)
    assert report.fits.params.n_points == 4
    assert report.fits.compute.alpha == pytest.approx(0.1, rel=1e-6)  # C = 6 N D, D fixed
    assert report.fits.params_offset.irreducible == pytest.approx(0.0, abs=1e-3)
    assert "4 ok, 1 failed, 1 incomplete" in report.markdown
    assert "TrainingError: training loss became nan" in report.markdown
    assert "alpha = 0.1000 ± 0.000" in report.markdown
    fits = json.loads((sweep_dir / "report" / "fits.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"{c} in fits.json"))
    assert fits["loss_vs_params"]["alpha"] == pytest.approx(0.1, rel=1e-6)
    for name in ("loss_vs_params", "loss_vs_compute", "loss_curves", "loss_vs_overrides"):
        assert Image.open(report.paths[name]).format == "PNG"
    curves = report.sweep.jobs[0].curves()
    assert curves["train/loss"][0] == [10, 20] and len(curves["val/loss"][1]) == 1


def test_report_chooses_the_metric_and_refuses_unknown_ones(tmp_path):
    sweep_dir = fake_sweep(tmp_path / "sweep")
    fits = fit_scaling(load_sweep(sweep_dir), "val_bits_per_char", "num_params")
    assert fits.params.alpha > 0.1  # 1000 embedding parameters more weigh most on the small
    fits = fit_scaling(load_sweep(sweep_dir), "val_bits_per_char", "num_params_non_embedding")
    assert fits.params.alpha == pytest.approx(0.1, rel=1e-6)  # the same law, scaled
    assert fits.params.a == pytest.approx(5.0 / 0.69, rel=1e-6)
    with pytest.raises(ValueError, match="val_bits_per_dim.*expected one of.*val_loss"):
        build_report(sweep_dir, tmp_path / "out", metric="val_bits_per_dim")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no Hydra job"):
        build_report(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "nowhere")


def test_latest_sweep_is_the_one_that_started_last(tmp_path):
    old = fake_sweep(tmp_path / "multirun" / "a")
    new = fake_sweep(tmp_path / "multirun" / "b")
    os.utime(old / "0" / ".hydra" / "overrides.yaml", (2e9, 2e9))
    assert latest_sweep(tmp_path / "multirun") == old
    os.utime(new / "1" / ".hydra" / "overrides.yaml", (3e9, 3e9))
    assert latest_sweep(tmp_path / "multirun") == new
    with pytest.raises(FileNotFoundError, match="no sweep"):
        latest_sweep(tmp_path / "empty")
    assert len(load_sweep(new).jobs) == 4


def test_wandb_group_and_name_identify_the_sweep_and_the_job(tmp_path):
    job = SweepJob(num=3, sweep_dir=tmp_path / "multirun" / "scaling" / "2026-01-01_10-00-00",
                   run_dir=tmp_path / "x" / "3", cwd=tmp_path, sweep="scaling",
                   overrides=("sweep=scaling", "logger=wandb", "model.num_layers=4"),
                   swept=("model.num_layers",))
    assert job.wandb_group == "scaling/2026-01-01_10-00-00"
    assert job.wandb_name == "3: model.num_layers=4"
    ad_hoc = SweepJob(num=0, sweep_dir=Path("multirun/2026-01-01/10-00-00"), run_dir=Path("."),
                      overrides=("sweep=s", "seed=1"))
    assert ad_hoc.wandb_group == "2026-01-01/10-00-00" and ad_hoc.wandb_name == "0: seed=1"


# ---- launchers (slow: each job is a fresh process) -----------------------------------------

def multirun_in(sweep_dir, *args):
    proc = subprocess.Popen([sys.executable, "train.py", "-m", *TINY, *args,
                             f"hydra.sweep.dir={sweep_dir}"], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=900)
    return proc.pid, proc.returncode, out, err


@pytest.mark.slow
def test_parallel_joblib_jobs_never_share_a_run_directory(tmp_path):
    pid, code, _, err = multirun_in(tmp_path, "model.network.embed_dim=16,32",
                                    "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert code == 0, err[-3000:]
    run_dirs = [tmp_path / "0", tmp_path / "1"]
    # Each job trained in its own worker process (the pid its run lock holds) ...
    pids = {(d / ".lock").read_text() for d in run_dirs}
    assert len(pids) == 2 and str(pid) not in pids
    for run_dir, width in zip(run_dirs, (16, 32), strict=True):
        results = json.loads((run_dir / "metrics.json").read_text())
        assert results["run_dir"] == str(run_dir)
        assert f"model.network.embed_dim={width}" in results["overrides"]
        # ... and wrote only its own log: each step once, nothing interleaved.
        steps = [json.loads(line)["step"] for line in
                 (run_dir / "metrics.jsonl").read_text().splitlines()
                 if "train/loss" in line]
        assert steps == [2, 4]


@pytest.mark.slow
def test_submitit_local_launcher_runs_jobs_and_records_a_failure(tmp_path):
    _, code, _, err = multirun_in(tmp_path, "model.network.embed_dim=16,18",
                                  "hydra/launcher=submitit_local")
    assert code == 1 and "job 1 failed" in err
    assert json.loads((tmp_path / "0" / "metrics.json").read_text())["val_loss"] > 0
    assert "must divide" in json.loads((tmp_path / "1" / "failed.json").read_text())["error"]
    assert (tmp_path / ".submitit").is_dir()


def wandb_records(path):
    """The protobuf records of an offline .wandb file (a LevelDB-style log: 32 KiB blocks
    after a 7-byte file header, each record chunk with a 7-byte header of its own)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks = Path(path).read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL or LAST chunk ends a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            yield record
            chunks = b""


@pytest.mark.slow
def test_each_job_is_one_wandb_run_in_the_sweeps_group(tmp_path):
    _, code, _, err = multirun_in(tmp_path, "sweep=transformer_scaling_cpu", "logger=wandb",
                                  "logger.mode=offline", "model.num_layers=1",
                                  "model.network.embed_dim=16,32", "trainer.eval_every=4")
    assert code == 0, err[-3000:]
    runs = {}
    for num in (0, 1):
        (path,) = (tmp_path / str(num) / "wandb").glob("offline-run-*/run-*.wandb")
        records = list(wandb_records(path))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert run.run_group == str(tmp_path)  # the sweep directory (outside the cwd here)
        assert run.display_name == f"{num}: model.num_layers=1 model.network.embed_dim={16 * (num + 1)}"
        assert config["overrides"] == json.loads(
            (tmp_path / str(num) / "metrics.json").read_text())["overrides"]
        assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] \
            == [0]  # finished before the next job started
        runs[run.run_id] = num
    assert len(runs) == 2


@pytest.mark.slow
def test_optuna_search_goes_on_past_failed_trials(tmp_path):
    """Seeded TPE: 3 trials over a learning rate and a width 4 heads may not divide (18)."""
    _, code, out, err = multirun_in(tmp_path, "sweep=lr_search_cpu", "hydra.sweeper.n_trials=3",
                                    "hydra.sweeper.n_jobs=3", "model.network.embed_dim=choice(16,18)")
    assert code == 0, err[-3000:]
    assert "setup plugin" not in out + err  # alembic's INFO chatter is silenced
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_params"]["model.network.embed_dim"] == 16
    outcomes = sorted(p.name for p in tmp_path.glob("*/*.json"))
    assert outcomes.count("metrics.json") >= 1 and outcomes.count("failed.json") >= 1
    report = build_report(tmp_path)
    counts = f"{outcomes.count('metrics.json')} ok, {outcomes.count('failed.json')} failed"
    assert "Optuna's best trial" in report.markdown and counts in report.markdown
