"""The training loop end to end, in process: loss goes down, resume is exact, overrides."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from chainrule.checkpoint import Checkpointer
from chainrule.data.text import TextDataConfig
from chainrule.models import TransformerConfig, TransformerNetworkConfig, complete_config
from chainrule.tracking import LoggerConfig
from chainrule.training.config import TrainConfig, TrainerConfig
from chainrule.training.optim import OptimizerConfig
from chainrule.training.train import train


def tiny_config(steps=8, **trainer) -> TrainConfig:
    net = TransformerNetworkConfig(embed_dim=32, num_heads=2, dropout_rate=0.1)
    return TrainConfig(
        model=TransformerConfig(sequence_length=32, num_layers=2, network=net),
        data=TextDataConfig(sequence_length=32, batch_size=4, val_batches=1),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=8),
        logger=LoggerConfig(backend="none"),
        trainer=TrainerConfig(steps=steps, log_every=2, eval_every=4, checkpoint_every=4,
                              progress=False, **trainer))


def final_params(run_dir):
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        restored = ckpt.restore(None)
    return restored.step, jax.tree.leaves(restored.state)


def test_resume_is_exact(tmp_path):
    """8 steps in one go == 4 steps, then the same run resumed to 8 (bitwise on CPU)."""
    whole = train(tiny_config(steps=8), tmp_path / "whole")
    train(tiny_config(steps=4), tmp_path / "split")
    resumed = train(tiny_config(steps=8), tmp_path / "split")
    step_a, params_a = final_params(tmp_path / "whole")
    step_b, params_b = final_params(tmp_path / "split")
    assert step_a == step_b == 8
    for a, b in zip(params_a, params_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert whole["val_loss"] == resumed["val_loss"]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) > 0


def test_results_and_files(tmp_path):
    results = train(tiny_config(steps=4), tmp_path)
    for key in ("val_loss", "val_perplexity", "val_bits_per_char", "num_params", "tokens_seen",
                "wall_time_s", "train_loss"):
        assert key in results, key
    assert math.isclose(results["val_perplexity"], math.exp(results["val_nll_loss"]),
                        rel_tol=1e-5)
    assert (tmp_path / "metrics.json").exists()
    saved = json.loads((tmp_path / "run.json").read_text())  # the run's tokenizer is kept
    assert saved["codec"]["tokenizer"]["kind"] == "char"
    assert list((tmp_path / "samples").glob("*.txt"))


def test_validation_bits_per_char_use_the_validation_scale(tmp_path):
    """val/bits_per_char = val nll / ln 2 * the validation windows' tokens per character."""
    (tmp_path / "t.txt").write_text("to be or not to be, that is the question\n" * 150
                                    + "xq zv jk 09 81 wq pz\n" * 40)
    cfg = tiny_config(steps=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, source="text_file", path=str(tmp_path / "t.txt"), tokenizer="bpe",
        bpe_vocab_size=300, sequence_length=16, val_fraction=0.12))
    train(cfg, tmp_path / "run")
    from chainrule.data import build_data

    scale = build_data(cfg.data).val_metric_scales["bits_per_char"]
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
              if "val/loss" in x]
    assert logged and scale > 1.2 * build_data(cfg.data).metric_scales["bits_per_char"]
    for x in logged:
        assert x["val/bits_per_char"] == pytest.approx(x["val/nll_loss"] / math.log(2) * scale)


def test_data_decides_vocab_and_contradictions_fail():
    model = TransformerConfig(vocab_size=None)
    assert complete_config(model, {"vocab_size": 65}).vocab_size == 65
    assert complete_config(dataclasses.replace(model, vocab_size=100),
                                {"vocab_size": 65}).vocab_size == 100
    with pytest.raises(ValueError, match="smaller than the data's vocabulary"):
        complete_config(dataclasses.replace(model, vocab_size=10), {"vocab_size": 65})


@pytest.mark.slow
def test_loss_decreases_on_shakespeare(tmp_path):
    cfg = tiny_config(steps=150)
    cfg.trainer.eval_every = 150
    cfg.optimizer.decay_steps = None
    results = train(cfg, tmp_path)
    assert results["val_loss"] < 0.75 * math.log(80)
