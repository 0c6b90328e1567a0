"""The `optimizer` config group: `OptimizerConfig`, and the optax optimizer and learning-rate
schedule built from it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from chainrule.config import check, register

OPTIMIZERS = ("adamw", "adam", "sgd", "lion")
SCHEDULES = ("constant", "cosine", "transformer", "linear")


@dataclasses.dataclass
class OptimizerConfig:
    """optax optimizer, learning-rate schedule and gradient clipping.

    Schedules: `constant`; `cosine` (linear warmup, cosine decay to `min_learning_rate` at
    `decay_steps`, default the run's length); `linear` (warmup, linear decay); `transformer`
    (Vaswani et al.: learning_rate * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), step
    counting updates from 1, d_model the model's width unless set).
    Weight decay applies to matrices only, never to norms or biases.
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_steps: int | None = None
    min_learning_rate: float = 1e-4
    d_model: int | None = None  # `transformer` schedule only; None: the model's width
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9  # sgd
    grad_clip_norm: float | None = 1.0
    trainable: str = "all"  # "all" | "prefix" | "lora" (prefix tuning / LoRA: the rest frozen)

    def __post_init__(self) -> None:
        check(self.trainable in ("all", "prefix", "lora"),
               f"optimizer.trainable={self.trainable!r}; expected 'all', 'prefix' or 'lora'")
        check(self.name in OPTIMIZERS, f"optimizer.name={self.name!r}; expected one of {OPTIMIZERS}")
        check(self.schedule in SCHEDULES,
               f"optimizer.schedule={self.schedule!r}; expected one of {SCHEDULES}")
        check(self.learning_rate > 0, f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
        check(self.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.grad_clip_norm is None or self.grad_clip_norm > 0,
               f"optimizer.grad_clip_norm must be > 0 or null, got {self.grad_clip_norm}")
        check(self.d_model is None or self.d_model > 0,
              f"optimizer.d_model must be > 0 or null (the model's width), got {self.d_model}")
        check(self.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")


def transformer_schedule(learning_rate: float, warmup_steps: int, d_model: int) -> optax.Schedule:
    """Vaswani et al.: lr * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (the guide's)."""
    warmup = max(warmup_steps, 1)

    def schedule(count):
        # optax counts updates from 0: the first update is step 1, the peak comes at `warmup`.
        step = jnp.asarray(count, jnp.float32) + 1.0
        return learning_rate * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup**-1.5)

    return schedule


def build_schedule(cfg: OptimizerConfig, total_steps: int,
                   width: int | None = None) -> optax.Schedule:
    """The learning rate per update; `width` is the model's (the transformer schedule's
    d_model when the config leaves it None)."""
    decay = cfg.decay_steps or total_steps
    if cfg.schedule == "transformer":
        d_model = cfg.d_model or width
        if d_model is None:
            raise ValueError("optimizer.schedule=transformer needs optimizer.d_model (this "
                             "model has no width to take it from)")
        return transformer_schedule(cfg.learning_rate, cfg.warmup_steps, d_model)
    if cfg.schedule == "constant":
        if cfg.warmup_steps == 0:
            return optax.constant_schedule(cfg.learning_rate)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
             optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, cfg.warmup_steps, max(decay, cfg.warmup_steps + 1),
            end_value=cfg.min_learning_rate)
    # linear: warmup then linear decay to min_learning_rate
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
         optax.linear_schedule(cfg.learning_rate, cfg.min_learning_rate,
                               max(decay - cfg.warmup_steps, 1))], [cfg.warmup_steps])


def decay_mask(params):
    """Weight decay on matrices only: norms, biases and other vectors are left alone."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(cfg: OptimizerConfig, total_steps: int, width: int | None = None):
    """(optax transformation, schedule) for the config (`width`: see `build_schedule`)."""
    schedule = build_schedule(cfg, total_steps, width)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                          weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.name == "adam":
        opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "lion":
        opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                         mask=decay_mask)
    else:
        opt = optax.sgd(schedule, momentum=cfg.momentum or None)
    if cfg.grad_clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
    return opt, schedule


register("optimizer", "optimizer", OptimizerConfig, builds=build_optimizer)
