"""A training run's config: `TrainConfig` (what conf/train.yaml composes) and `TrainerConfig`
(the loop's schedule of work). Every other group's schema lives beside its code."""

from __future__ import annotations

import dataclasses

from omegaconf import MISSING

from chainrule.config import check, register
from chainrule.data.base import DataConfig
from chainrule.models.base import ModelConfig
from chainrule.parallel.config import HardwareConfig
from chainrule.sampling.config import SamplerConfig
from chainrule.tracking import LoggerConfig
from chainrule.training.optim import OptimizerConfig


@dataclasses.dataclass
class TrainerConfig:
    """The training loop's schedule of work."""

    steps: int = 2000
    log_every: int = 50
    eval_every: int = 250
    sample_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    progress: bool = True
    grad_accum_steps: int = 1  # micro-batches per step: the batch is split, gradients averaged
    # A step with a NaN/Inf loss or gradient is never applied; "stop" ends the run there
    # (naming the step), "skip" drops the step and goes on (chainrule.training.nonfinite).
    on_nonfinite: str = "stop"

    def __post_init__(self) -> None:
        check(self.on_nonfinite in ("stop", "skip"),
               f"trainer.on_nonfinite={self.on_nonfinite!r}; expected 'stop' or 'skip'")
        for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                     "grad_accum_steps"):
            check(getattr(self, name) > 0, f"trainer.{name} must be > 0, got {getattr(self, name)}")
        check(self.sample_every >= 0, f"trainer.sample_every must be >= 0, got {self.sample_every}")


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run needs; conf/train.yaml composes it."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    hardware: HardwareConfig = dataclasses.field(default_factory=HardwareConfig)
    logger: LoggerConfig = dataclasses.field(default_factory=LoggerConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    seed: int = 0
    resume: bool = True  # continue from the run directory's latest checkpoint, if any
    init_from: str | None = None  # start from another run's weights (e.g. to prefix-tune it)
    experiment: str | None = None  # set by experiment presets, recorded with the run
    # Compiled programs kept across runs (a resume or a re-run loads them); null: off.
    compilation_cache_dir: str | None = "~/.cache/chainrule/jax"


register("trainer", "trainer", TrainerConfig)
