"""`python train.py [group=option ...] [key=value ...]`: compose, validate, train.

The return value (final validation loss) is what Hydra sweepers (Optuna) minimise.
Bad input fails before the run directory is touched: Hydra itself rejects unknown keys and
wrong types; the `Preflight` callback checks values, the hardware and the run directory's
checkpoints before Hydra creates or writes into the directory; what only the data can tell
(a missing file, token ids beyond the vocabulary) fails before any checkpoint, and a run
directory this command created is then removed again.
"""

from __future__ import annotations

import copy
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from chainrule.cli.common import (
    discard_new_run_dir_on_bad_input,
    fail_cleanly,
    hydra_main,
    note_new_run_dir,
    quiet_libraries,
)
from chainrule.config import TrainConfig, register_configs, resolve


@fail_cleanly
def preflight(cfg: DictConfig, run_dir: Path) -> TrainConfig:
    """Every check that needs no data: config values, hardware, the run directory's
    checkpoints (family, resume). Raises ValueError; nothing is written."""
    quiet_libraries()
    train_cfg = resolve(cfg)
    from chainrule.training.loop import check_hardware
    from chainrule.training.restore import check_resumable

    check_hardware(train_cfg.hardware)
    check_resumable(train_cfg, run_dir)
    return train_cfg


class Preflight(Callback):
    """Hydra callback (conf/train.yaml): `preflight` before Hydra creates the run directory
    and writes its .hydra/ record and log there (single runs; sweep jobs check in `run`)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(str(config.hydra.run.dir))
        task = copy.deepcopy(config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        preflight(task, run_dir)
        note_new_run_dir(run_dir)


@fail_cleanly
def run(cfg: DictConfig) -> float:
    quiet_libraries()
    train_cfg = resolve(cfg)  # every dataclass check runs here, before any compute
    from chainrule.training.loop import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with discard_new_run_dir_on_bad_input(run_dir):
        results = train(train_cfg, run_dir)
    print(f"run directory: {run_dir}")
    shown = ("val_loss", "val_perplexity", "val_bits_per_char", "val_bits_per_dim",
             "val_accuracy", "tokens_per_s", "wall_time_s")
    print("results: " + ", ".join(f"{k}={results[k]:.4g}" for k in shown if k in results))
    return float(results["val_loss"])


def main() -> None:
    register_configs()
    hydra_main(run, "train")


if __name__ == "__main__":
    main()
