"""Learning-rate schedules against hand-computed values."""

import numpy as np
import optax
import pytest

from chainrule.models import TransformerConfig, TransformerNetworkConfig
from chainrule.training.optim import OptimizerConfig, build_optimizer, build_schedule


def vaswani(lr: float, d_model: int, warmup: int, step: int) -> float:
    return lr * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def test_transformer_schedule_counts_updates_from_one():
    """Audit finding: with max(count, 1) updates 1 and 2 shared a rate and the peak came a step
    late. optax hands the schedule count = 0 at the first update."""
    cfg = OptimizerConfig(name="adam", schedule="transformer", learning_rate=1.0, warmup_steps=4,
                          d_model=64)
    schedule = build_schedule(cfg, total_steps=100)
    rates = [float(schedule(count)) for count in range(10)]
    assert rates == pytest.approx([vaswani(1.0, 64, 4, count + 1) for count in range(10)])
    assert rates[0] < rates[1] and int(np.argmax(rates)) == 3  # update 4 = the warmup's end


def test_transformer_schedule_takes_the_models_width():
    """Audit finding: d_model was a fixed 512 whatever the model's width."""
    model = TransformerConfig(network=TransformerNetworkConfig(embed_dim=96, num_heads=4))
    cfg = OptimizerConfig(name="adam", schedule="transformer", learning_rate=1.0, warmup_steps=4)
    _, schedule = build_optimizer(cfg, 100, model.width())
    assert float(schedule(3)) == pytest.approx(vaswani(1.0, 96, 4, 4))
    _, fixed = build_optimizer(OptimizerConfig(name="adam", schedule="transformer",
                                               learning_rate=1.0, warmup_steps=4, d_model=512),
                               100, model.width())
    assert float(fixed(3)) == pytest.approx(vaswani(1.0, 512, 4, 4))  # a set d_model wins
    with pytest.raises(ValueError, match="needs optimizer.d_model"):
        build_schedule(cfg, 100, width=None)


def test_the_schedule_is_what_the_optimizer_applies():
    """The rate optax uses at update n is schedule(n - 1): one sgd step on f(x) = x."""
    cfg = OptimizerConfig(name="sgd", momentum=0.0, schedule="transformer", learning_rate=1.0,
                          warmup_steps=4, d_model=16, grad_clip_norm=None, weight_decay=0.0)
    tx, schedule = build_optimizer(cfg, 100)
    state = tx.init(np.zeros(()))
    for n in range(1, 6):
        updates, state = tx.update(np.ones(()), state)
        assert float(-updates) == pytest.approx(float(schedule(n - 1)))
        assert float(-updates) == pytest.approx(vaswani(1.0, 16, 4, n))
    assert isinstance(tx, optax.GradientTransformation)
