"""`debug=smoke` trains with every hardware=cpu|cpu_cores|cpu_mesh x model=transformer|pixelcnn|
wavenet: each combination composed as train.py composes it, then run in process for 2 steps."""

import jax
import pytest
from hydra import compose, initialize_config_dir

from chainrule.cli import CONF_DIR
from chainrule.cli.schemas import register_configs
from chainrule.config import resolve
from chainrule.parallel.mesh import cores_available

register_configs()
HARDWARE = ["cpu", "cpu_cores", "cpu_mesh"]
MODELS = ["transformer", "pixelcnn", "wavenet"]
# debug=smoke as it is, only shorter: 2 steps, with its evaluation, checkpoint and samples.
SHORT = ["trainer.steps=2", "trainer.log_every=1", "trainer.eval_every=2",
         "trainer.checkpoint_every=2"]


def run_training(cfg, run_dir):
    """The one call into the training API in this file (re-point it here if it moves)."""
    from chainrule.training.train import train

    return train(cfg, run_dir)


def expected_devices(hardware: str, batch_size: int) -> int:
    if hardware == "cpu":
        return 1
    if hardware == "cpu_mesh":
        return 8
    # a device per core (at most the 8 this process has) that divides the batch
    cores = min(cores_available(), jax.local_device_count("cpu"))
    return max(d for d in range(1, cores + 1) if batch_size % d == 0)


# Each family's smoke run on hardware=cpu_cores (train.yaml's default) is what tests/test_cli.py
# runs from the shell, and in-process smoke runs on hardware=cpu are what tests/test_rundir.py
# and tests/test_evaluate.py train; every family trains on the 8-device layouts in
# tests/test_parallel.py. So all nine run with the slow tests (`make test-full`), keeping
# `make test` within its 10 minutes.
CASES = [pytest.param(h, m, marks=[pytest.mark.slow]) for h in HARDWARE for m in MODELS]


@pytest.mark.parametrize(("hardware", "model"), CASES)
def test_smoke_trains_on_every_hardware_and_model(hardware, model, tmp_path):
    jax.devices()  # the 8 devices conftest asks for are started: hardware= uses those
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["debug=smoke", f"hardware={hardware}",
                                          f"model={model}", *SHORT])
    train_cfg = resolve(cfg)
    results = run_training(train_cfg, tmp_path / "run")
    assert results["final_step"] == 2 and results["model_family"] == model
    assert results["val_loss"] > 0 and results["train_loss"] > 0
    assert results["num_devices"] == expected_devices(hardware, train_cfg.data.batch_size)
    assert list((tmp_path / "run" / "samples").iterdir())
