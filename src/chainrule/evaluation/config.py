"""`EvaluateConfig`: what evaluate.py composes (conf/evaluate.yaml)."""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import MISSING

from chainrule.config import check
from chainrule.data.evaluation import SPLITS
from chainrule.parallel.config import HardwareConfig


@dataclasses.dataclass
class EvaluateConfig:
    """Score every element of a split of a trained run's data (or of another source).

    data: None scores the run's own data; `data.<key>=...` changes keys of the run's data
    config (e.g. data.path=); `data=<option>` (a data group option such as text_file) scores
    another source with the run's codec (its tokenizer).
    """

    checkpoint: str = MISSING  # a run directory
    split: str = "test"  # train | val | test | all (every element of the source)
    step: int | None = None  # None: the best checkpoint if there is one, else the latest
    stride: int | None = None  # tokens / samples between window starts; None: half a window
    batch_size: int | None = None  # windows or images per batch; None: 4x the run's batch
    data: Any = None
    hardware: HardwareConfig = dataclasses.field(default_factory=HardwareConfig)
    output: str | None = None  # default: <run dir>/eval_<split>[_<source>]_step<N>.json
    progress: bool = True
    wandb: bool = True  # add the results to the run's W&B summary, when it logged to W&B
    compilation_cache_dir: str | None = "~/.cache/chainrule/jax"  # as in train.py; null: off

    def __post_init__(self) -> None:
        check(self.split in SPLITS, f"split={self.split!r}; expected one of {SPLITS}")
        check(self.stride is None or self.stride > 0,
              f"stride={self.stride}: expected a positive number of tokens or null")
        check(self.batch_size is None or self.batch_size > 0,
              f"batch_size={self.batch_size}: expected a positive integer or null")
        check(self.step is None or self.step >= 0, f"step={self.step}: expected >= 0 or null")
