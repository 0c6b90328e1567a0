"""`python train.py [group=option ...] [key=value ...]`: compose, validate, train.

The return value (final validation loss) is what Hydra sweepers (Optuna) minimise.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from chainrule.cli import CONF_DIR
from chainrule.cli.common import fail_cleanly, quiet_libraries
from chainrule.config import register_configs, resolve


@fail_cleanly
def run(cfg: DictConfig) -> float:
    quiet_libraries()
    train_cfg = resolve(cfg)  # every dataclass check runs here, before any compute
    from chainrule.training.loop import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    config_dict["_types"] = {"model": type(train_cfg.model).__name__,
                             "data": type(train_cfg.data).__name__}
    results = train(train_cfg, run_dir, config_dict=config_dict)
    print(f"run directory: {run_dir}")
    shown = ("val_loss", "val_perplexity", "val_bits_per_char", "val_bits_per_dim",
             "val_accuracy", "tokens_per_s", "wall_time_s")
    print("results: " + ", ".join(f"{k}={results[k]:.4g}" for k in shown if k in results))
    return float(results["val_loss"])


def main() -> None:
    register_configs()
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")(run)()


if __name__ == "__main__":
    main()
