"""optax optimizers and learning-rate schedules from an `OptimizerConfig`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from chainrule.config import OptimizerConfig


def transformer_schedule(learning_rate: float, warmup_steps: int, d_model: int) -> optax.Schedule:
    """Vaswani et al.: lr * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (the guide's)."""
    warmup = max(warmup_steps, 1)

    def schedule(count):
        step = jnp.maximum(count, 1).astype(jnp.float32)
        return learning_rate * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup**-1.5)

    return schedule


def build_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    decay = cfg.decay_steps or total_steps
    if cfg.schedule == "transformer":
        return transformer_schedule(cfg.learning_rate, cfg.warmup_steps, cfg.d_model)
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


def build_optimizer(cfg: OptimizerConfig, total_steps: int):
    """(optax transformation, schedule) for the config."""
    schedule = build_schedule(cfg, total_steps)
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
