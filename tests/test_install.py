"""The package as a user installs it: a wheel built from the source, installed into a folder of
its own, its console scripts run from a directory that is not the repository. The configs
(conf/, with the experiment presets and the sweeps) must come from the wheel."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "src" / "chainrule" / "conf"
# What the build backend reads (pyproject.toml names README.md and src/); copied, so that the
# build's own build/ and *.egg-info land in the copy, not in the checkout.
BUILD_INPUTS = ["pyproject.toml", "README.md", "src"]
NO_BACKEND = ("No matching distribution found for setuptools",
              "Could not find a version that satisfies the requirement setuptools")


def build_wheel(tmp: Path) -> Path:
    source = tmp / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        else:
            shutil.copy(REPO / name, source / name)
    dist = tmp / "dist"
    # pip's default isolated build, as `pip install .` does: build-system.requires is fetched
    # (the venv's own setuptools may be older than the one pyproject.toml needs).
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist),
                           str(source)], cwd=tmp, text=True, capture_output=True, timeout=600)
    if proc.returncode != 0 and any(s in proc.stdout + proc.stderr for s in NO_BACKEND):
        pytest.skip(f"the build backend cannot be fetched here: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = dist.glob("chainrule-*.whl")
    return wheel


def test_the_installed_wheel_trains_and_samples_from_anywhere(tmp_path):
    wheel = build_wheel(tmp_path)
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    in_repo = {f"chainrule/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert shipped == in_repo  # every config, once, under the package (no top-level copies)
    assert any(n.startswith("chainrule/conf/experiment/") for n in shipped)
    assert any(n.startswith("chainrule/conf/sweep/") for n in shipped)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    bin_dir = site / "bin"
    elsewhere = tmp_path / "elsewhere"  # the user's cwd: not the repository
    elsewhere.mkdir()
    # The installed copy first on the path (dependencies still come from the running venv,
    # whose editable chainrule, if any, comes after it).
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled",
           "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}

    def run(*args):
        proc = subprocess.run([*args], cwd=elsewhere, env=env, text=True, capture_output=True,
                              timeout=600)
        assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        return proc

    found = run(sys.executable, "-c", "import chainrule; print(chainrule.__file__)")
    assert Path(found.stdout.strip()).resolve().is_relative_to(site.resolve())

    run_dir = tmp_path / "run"
    train = run(str(bin_dir / "chainrule-train"), "debug=smoke", f"hydra.run.dir={run_dir}")
    assert "results: val_loss=" in train.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["final_step"] == 6
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    runtime = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]
    main_conf = [s["path"] for s in runtime["config_sources"] if s["provider"] == "main"]
    assert [Path(p).resolve() for p in main_conf] == [(site / "chainrule" / "conf").resolve()]
    assert Path(runtime["cwd"]).resolve() == elsewhere.resolve()

    sample = run(str(bin_dir / "chainrule-sample"), f"checkpoint={run_dir}",
                 "sampler.max_new_tokens=8", "sampler.num_samples=1")
    summary = sample.stdout.strip().splitlines()[-1]
    assert summary.startswith("1 samples from step 6; written: ")
    written = [Path(p) for p in summary.split("written: ", 1)[1].split(", ")]
    assert written and all(p.is_file() and p.parent == run_dir / "samples" for p in written)

    evaluated = run(str(bin_dir / "chainrule-evaluate"), f"checkpoint={run_dir}", "split=val",
                    "progress=false")
    assert evaluated.stdout.startswith("val split, step 6: nll ")
    assert json.loads((run_dir / "eval_val_step6.json").read_text())["num_scored"] > 0

    # The presets and the sweeps come with the wheel (shipped: the file list above); composed:
    job = yaml.safe_load(run(str(bin_dir / "chainrule-train"), "experiment=pixelcnn_digits",
                             "--cfg", "job").stdout)
    assert job["model"]["name"] == "pixelcnn" and job["data"]["source"] == "digits"
    hydra = yaml.safe_load(run(str(bin_dir / "chainrule-train"), "sweep=transformer_scaling_cpu",
                               "--cfg", "hydra").stdout)["hydra"]
    assert hydra["sweeper"]["params"] == {"model.num_layers": "1,2,4",
                                          "model.network.embed_dim": "32,64,128"}
    assert hydra["sweep"]["dir"].startswith("multirun/transformer_scaling_cpu/")
