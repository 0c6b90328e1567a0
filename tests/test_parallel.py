"""Sharded training: every layout gives the same losses as one device, for every family.

The test processes have 8 CPU devices (conftest.py); `hardware.mesh` picks the layout.
"""

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir

from chainrule.checkpoint import Checkpointer
from chainrule.cli import CONF_DIR
from chainrule.cli.schemas import register_configs
from chainrule.config import resolve
from chainrule.data.audio import AudioDataConfig
from chainrule.data.images import ImageDataConfig
from chainrule.data.text import TextDataConfig
from chainrule.models import (
    PixelCNNConfig,
    TransformerConfig,
    TransformerNetworkConfig,
    WaveNetConfig,
    build_model,
)
from chainrule.parallel import HardwareConfig, MeshConfig, build_mesh, normalise_rules
from chainrule.parallel.devices import peak_tflops
from chainrule.parallel.sharding import spec_for
from chainrule.tracking import LoggerConfig
from chainrule.training.config import TrainConfig, TrainerConfig
from chainrule.training.optim import OptimizerConfig
from chainrule.training.run import assemble
from chainrule.training.throughput import Throughput
from chainrule.training.train import train

register_configs()
REPO = Path(__file__).resolve().parents[1]
FAMILIES = {
    "transformer": lambda: (
        TransformerConfig(sequence_length=16, num_layers=2, network=TransformerNetworkConfig(
            embed_dim=32, num_heads=4, dropout_rate=0.0)),
        TextDataConfig(sequence_length=16, batch_size=8, val_batches=1)),
    "pixelcnn": lambda: (
        PixelCNNConfig(image_shape=(8, 8, 1), num_levels=17, hidden_channels=16, num_layers=2,
                       num_residual_blocks=1, dropout_rate=0.0),
        ImageDataConfig(source="digits", batch_size=8, val_batches=1)),
    "wavenet": lambda: (
        WaveNetConfig(vocab_size=None, sequence_length=64, residual_channels=8, skip_channels=16,
                      num_blocks=1, layers_per_block=3),
        AudioDataConfig(sequence_length=64, batch_size=8, val_batches=1)),
}
LAYOUTS = {
    "data": MeshConfig(data=8),
    "fsdp": MeshConfig(data=1, fsdp=8),
    "data x tensor": MeshConfig(data=4, tensor=2),
}


def config(family, mesh=None, steps=3, **hardware) -> TrainConfig:
    model, data = FAMILIES[family]()
    return TrainConfig(
        model=model, data=data,
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1, decay_steps=10),
        logger=LoggerConfig(backend="none"),
        hardware=HardwareConfig(name="test", mesh=mesh or MeshConfig(data=1), **hardware),
        trainer=TrainerConfig(steps=steps, log_every=1, eval_every=steps,
                              checkpoint_every=steps, progress=False))


def step_losses(run_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in lines if "train/loss" in r}


def train_steps(cfg: TrainConfig, steps: int = 3) -> list[float]:
    """The loss of each of the first `steps` steps, through the loop's own compiled steps."""
    mesh = build_mesh(cfg.hardware)
    with jax.set_mesh(mesh):
        setup = assemble(cfg, None, mesh)
        state, losses = setup.state, []
        for step in range(1, steps + 1):
            batch = setup.batch(next(setup.data.train))
            state, totals = setup.steps.train_step(state, setup.zero_totals(batch), batch,
                                                   np.int32(step))
            losses.append(float(totals["loss"]))
    return losses


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_layout_trains_like_one_device(family):
    expected = train_steps(config(family))
    assert expected[-1] < expected[0]  # it trains
    for name, mesh in LAYOUTS.items():
        np.testing.assert_allclose(train_steps(config(family, mesh)), expected, atol=1e-5,
                                   rtol=0, err_msg=name)


def test_parameters_and_moments_are_sharded_by_the_axis_rules(tmp_path):
    train(config("transformer", MeshConfig(data=2, fsdp=2, tensor=2), steps=1), tmp_path)
    hw = HardwareConfig(mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    mesh, rules = build_mesh(hw), normalise_rules(hw.axis_rules)
    # (embed, mlp) -> (fsdp, tensor); a 65-token vocabulary does not split in 2: left whole
    assert spec_for(("embed", "mlp"), (32, 128), mesh, rules) == jax.P("fsdp", "tensor")
    assert spec_for(("vocab", "embed"), (65, 32), mesh, rules) == jax.P(None, "fsdp")
    assert spec_for(("batch", None), (8, 16), mesh, rules) == jax.P(("data", "fsdp"), None)
    assert spec_for(None, (7,), mesh, rules) == jax.P()
    # the checkpoint of a sharded run holds whole float32 arrays, moments included
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        leaves = jax.tree.leaves(ckpt.restore(None).state)
    assert all(leaf.dtype in (np.float32, np.int32, np.uint32) for leaf in leaves)


def test_checkpoint_from_eight_devices_continues_on_one(tmp_path):
    fsdp = MeshConfig(data=1, fsdp=8)
    train(config("transformer", fsdp, steps=6), tmp_path / "whole")
    train(config("transformer", fsdp, steps=3), tmp_path / "moved")
    train(config("transformer", steps=6), tmp_path / "moved")  # resumes on one device
    whole, moved = step_losses(tmp_path / "whole"), step_losses(tmp_path / "moved")
    for step in (4, 5, 6):
        assert moved[step] == pytest.approx(whole[step], abs=1e-5), step


def test_gradient_accumulation_equals_the_whole_batch():
    cfg = config("transformer", MeshConfig(data=2))
    cfg.trainer.grad_accum_steps = 4
    np.testing.assert_allclose(train_steps(cfg), train_steps(config("transformer")), atol=1e-5,
                               rtol=0)


def test_batch_that_does_not_split_is_refused_before_any_work(tmp_path):
    cfg = config("transformer", MeshConfig(data=8))
    cfg.data.batch_size = 12
    with pytest.raises(ValueError, match="data.batch_size=12 does not split"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bfloat16_trains_with_float32_parameters(tmp_path):
    cfg = config("transformer", steps=12, compute_dtype="bfloat16")
    cfg.optimizer = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant")
    train(cfg, tmp_path)
    losses = step_losses(tmp_path)
    assert np.mean([losses[s] for s in (10, 11, 12)]) < losses[1] - 0.3
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        restored = ckpt.restore(None)
    params = [x for x in jax.tree.leaves(restored.state["model"]) if x.ndim >= 1]
    assert params and all(p.dtype == np.float32 for p in params)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_computes_in_bfloat16_and_returns_float32_logits(family):
    model_cfg, _ = FAMILIES[family]()
    if family == "wavenet":
        model_cfg = dataclasses.replace(model_cfg, vocab_size=256)
    if family == "transformer":
        model_cfg = dataclasses.replace(model_cfg, vocab_size=65)
    model = build_model(dataclasses.replace(model_cfg, dtype="bfloat16"),
                        rngs=nnx.Rngs(params=0))
    x = {"transformer": np.ones((2, 16), np.int32), "pixelcnn": np.ones((2, 8, 8, 1), np.int32),
         "wavenet": np.ones((2, 64), np.int32)}[family]
    forward = nnx.jit(lambda m, x: m(x)["logits"])
    assert forward(model, x).dtype == np.float32
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == np.float32 for p in params)
    assert "bf16" in forward.lower(model, x).as_text()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_remat_gives_the_same_gradients(family):
    model_cfg, _ = FAMILIES[family]()
    extra = {"transformer": {"vocab_size": 65}, "wavenet": {"vocab_size": 256}}.get(family, {})
    x = {"transformer": np.arange(34).reshape(2, 17) % 65,
         "pixelcnn": np.arange(128).reshape(2, 8, 8, 1) % 17,
         "wavenet": np.arange(130).reshape(2, 65) % 256}[family].astype(np.int32)
    grads = []
    for remat in (False, True):
        model = build_model(dataclasses.replace(model_cfg, remat=remat, **extra),
                            rngs=nnx.Rngs(params=0))
        batch = {model.data_key: x}
        loss = nnx.jit(nnx.grad(lambda m, batch: m.train_loss(batch)["loss"]))
        grads.append(loss(model, batch))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_throughput_accounting():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("TPU v5 lite") == 197.0
    assert peak_tflops("cpu") is None
    assert peak_tflops("cpu", override=2.0) == 2.0
    perf = Throughput(units_per_step=1000, num_devices=4, flops_per_step=8e12,
                      peak_tflops_per_device=1.0).metrics(steps=10, seconds=5.0)
    assert perf["perf/step_time_s"] == 0.5
    assert perf["perf/tokens_per_s"] == 2000 and perf["perf/tokens_per_s_per_device"] == 500
    assert math.isclose(perf["perf/mfu"], 8e12 / 0.5 / 4e12)  # 16 TFLOP/s of 4 TFLOP/s peak


def test_mesh_shape_and_errors():
    from chainrule.parallel.mesh import mesh_shape

    hw = HardwareConfig(mesh=MeshConfig(data=-1, tensor=2))
    assert mesh_shape(hw, 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="needs 16 devices but JAX found 8"):
        mesh_shape(HardwareConfig(mesh=MeshConfig(data=2, fsdp=8)), 8)
    with pytest.raises(ValueError, match="do not divide evenly"):
        mesh_shape(HardwareConfig(mesh=MeshConfig(data=-1, fsdp=3)), 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match=r"\['model'\] are not mesh axes"):
        HardwareConfig(axis_rules={"embed": "model"})


def test_a_device_per_core_takes_the_largest_count_that_splits_the_batch(monkeypatch, tmp_path):
    from chainrule.parallel import mesh as mesh_module

    assert jax.device_count() == 8  # JAX has started, with conftest.py's 8 CPU devices
    per_core = HardwareConfig(name="cpu_cores", num_cpu_devices=-1, mesh=MeshConfig(data=-1))
    for cores, batch, expected in [(2, 12, 2), (5, 12, 4), (8, 12, 6), (16, 16, 8), (3, 7, 1)]:
        monkeypatch.setattr(mesh_module, "cores_available", lambda cores=cores: cores)
        fitted = mesh_module.fit_to_cores(per_core, batch)
        # Never more devices than JAX has started with; the count is left as it is.
        assert (fitted.mesh.data, fitted.num_cpu_devices) == (expected, None)
    assert mesh_module.fit_to_cores(HardwareConfig(), 12) == HardwareConfig()  # not -1: as is
    with pytest.raises(ValueError, match="num_cpu_devices=-1 .* expected mesh"):
        HardwareConfig(num_cpu_devices=-1, mesh=MeshConfig(data=1, fsdp=2))

    monkeypatch.setattr(mesh_module, "cores_available", lambda: 3)
    cfg = config("transformer", MeshConfig(data=-1), steps=2, num_cpu_devices=-1)
    cfg.data.batch_size = 6
    results = train(cfg, tmp_path / "run")
    assert results["num_devices"] == 3 and math.isfinite(results["val_loss"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_PROCESS_RUN = ["logger=none", "trainer.steps=4", "trainer.log_every=1", "trainer.eval_every=2",
                   "trainer.checkpoint_every=2", "trainer.progress=false", "model.num_layers=1",
                   "model.network.embed_dim=32", "model.network.num_heads=2",
                   "data.sequence_length=16", "data.batch_size=8", "data.val_batches=1",
                   "sampler.num_samples=2", "sampler.max_length=20"]


def test_two_processes_on_loopback_train_like_one(tmp_path):
    """2 processes x 4 CPU devices (jax.distributed over loopback) == 1 process x 8 devices."""
    run_dir = tmp_path / "two"
    args = [sys.executable, "train.py", "hardware=multihost", "hardware.platform=cpu",
            "hardware.num_cpu_devices=4", "hardware.compute_dtype=float32",
            f"hardware.distributed.coordinator_address=127.0.0.1:{free_port()}",
            "hardware.distributed.num_processes=2", f"hydra.run.dir={run_dir}",
            *TWO_PROCESS_RUN]
    env = {**os.environ, "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([*args, f"hardware.distributed.process_id={i}"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = resolve(compose("train", overrides=["hardware=cpu_mesh", *TWO_PROCESS_RUN]))
    one = train(cfg, tmp_path / "one")
    assert one["num_devices"] == 8
    two, expected = step_losses(run_dir), step_losses(tmp_path / "one")
    assert sorted(two) == [1, 2, 3, 4]  # one writer: every step logged once
    for step, loss in expected.items():
        assert two[step] == pytest.approx(loss, abs=1e-5), step
    results = json.loads((run_dir / "metrics.json").read_text())
    assert results["val_loss"] == pytest.approx(one["val_loss"], abs=1e-5)
    assert results["num_devices"] == 8
    assert len(list((run_dir / "samples").iterdir())) == len(
        list((tmp_path / "one" / "samples").iterdir()))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["2", "4"]

    # evaluate.py across the same two processes scores the split as one process does.
    # (the last 0.1% of the text as its test part: a few batches)
    eval_args = [sys.executable, "evaluate.py", f"checkpoint={run_dir}", "split=test",
                 "data.test_fraction=0.001", "batch_size=16", "hardware=multihost", "hardware.platform=cpu",
                 "hardware.num_cpu_devices=4", "hardware.compute_dtype=float32",
                 f"hardware.distributed.coordinator_address=127.0.0.1:{free_port()}",
                 "hardware.distributed.num_processes=2", "progress=false",
                 f"output={tmp_path / 'two.json'}"]
    procs = [subprocess.Popen([*eval_args, f"hardware.distributed.process_id={i}"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    for p in procs:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-3000:]
    two_eval = json.loads((tmp_path / "two.json").read_text())
    from chainrule.evaluation import EvaluateConfig, evaluate

    one_eval = evaluate(EvaluateConfig(checkpoint=str(run_dir), split="test", batch_size=16,
                                       data={"test_fraction": 0.001}, progress=False,
                                       wandb=False, output=str(tmp_path / "1")))
    assert two_eval["num_scored"] == one_eval["num_scored"] > 0
    assert two_eval["nll_sum"] == pytest.approx(one_eval["nll_sum"], rel=1e-5)


def test_distributed_start_up_follows_the_environment(monkeypatch):
    from chainrule.parallel import DistributedConfig
    from chainrule.parallel.mesh import _distributed_wanted

    auto = DistributedConfig(enabled="auto")
    for name in ("SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert not _distributed_wanted(auto)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not _distributed_wanted(auto)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert _distributed_wanted(auto)
    assert not _distributed_wanted(DistributedConfig(enabled="false"))
    assert _distributed_wanted(DistributedConfig(enabled=True))
    with pytest.raises(ValueError, match="process_id=2 must be < num_processes=2"):
        DistributedConfig(num_processes=2, process_id=2)
