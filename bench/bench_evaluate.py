"""Evaluation throughput against the training step, on the same model and machine.

    python bench/bench_evaluate.py

The nanoGPT CPU "baby" Transformer (4 layers, 4 heads, 128 wide, block 64, vocab 65). Compared
in the same run, each the median of 3 timed passes after a warm-up:
  train step   chainrule's compiled step (forward + backward + AdamW), batch 12 windows:
               targets per second;
  evaluate     `chainrule.evaluation.score.Scorer` over every token of a 200k-token sequence,
               batch 48 windows (4x the training batch, evaluate.py's default), with the
               default stride (half a window: each window scores about half its targets, every
               target has >= 32 tokens of context) and with stride = 64 (disjoint windows):
               scored targets per second, host batching and float64 sums included.
The issue's target: evaluation >= 2x the training step's tokens/s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, timed  # noqa: E402

from chainrule.data.evaluation import EvalSplit, WindowBatches  # noqa: E402
from chainrule.evaluation.score import Scorer  # noqa: E402
from chainrule.models import TransformerConfig, TransformerNetworkConfig, build_model  # noqa: E402
from chainrule.parallel import build_mesh, normalise_rules  # noqa: E402
from chainrule.parallel.config import DEFAULT_AXIS_RULES, HardwareConfig  # noqa: E402
from chainrule.training.optim import OptimizerConfig, build_optimizer  # noqa: E402
from chainrule.training.steps import Steps  # noqa: E402

BATCH, BLOCK, VOCAB, TRAIN_STEPS, EVAL_TOKENS = 12, 64, 65, 20, 200_000


def baby():
    net = TransformerNetworkConfig(embed_dim=128, num_heads=4, dropout_rate=0.0,
                                   positional_encoding="rope", use_bias=False)
    cfg = TransformerConfig(vocab_size=VOCAB, sequence_length=BLOCK, network=net, num_layers=4)
    return build_model(cfg, rngs=nnx.Rngs(0))


def train_tokens_per_s() -> tuple[float, list]:
    batches = [{"sequences": jax.random.randint(jax.random.key(i), (BATCH, BLOCK + 1), 0, VOCAB)}
               for i in range(TRAIN_STEPS)]
    model = baby()
    tx = build_optimizer(OptimizerConfig(), 2000)[0]
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    steps = Steps(graphdef, jax.random.key(0))
    box = {"state": state,
           "totals": {k: jnp.zeros((), jnp.float32) for k in steps.metric_names(state,
                                                                              batches[0])}}

    def run():
        for i, b in enumerate(batches):
            box["state"], box["totals"] = steps.train_step(box["state"], box["totals"], b,
                                                           jnp.int32(i))
        return box["totals"]

    seconds, all_s = timed(run, repeats=3)
    return BATCH * BLOCK * TRAIN_STEPS / seconds, all_s


def eval_tokens_per_s(stride: int) -> tuple[float, list, int]:
    tokens = np.random.default_rng(0).integers(0, VOCAB, EVAL_TOKENS).astype(np.int32)
    windows = WindowBatches([tokens], BLOCK + 1, stride, 4 * BATCH, "sequences")
    split = EvalSplit(windows, windows.num_batches, {"characters": EVAL_TOKENS})
    mesh = build_mesh(HardwareConfig())
    scorer = Scorer(baby(), mesh, normalise_rules(dict(DEFAULT_AXIS_RULES)))
    with jax.set_mesh(mesh):
        seconds, all_s = timed(lambda: scorer(split, progress=False).nll, repeats=3)
    return windows.num_scored / seconds, all_s, len(windows.plan)


def main() -> None:
    train, train_all = train_tokens_per_s()
    out = {"shape": "4 layers, 4 heads, 128 wide, block 64, vocab 65",
           "train_tokens_per_s": train, "train_repeats_s": train_all}
    print(f"[{machine()}]")
    print(f"train step (batch {BATCH}): {train:,.0f} tokens/s")
    for name, stride in (("half_window", BLOCK // 2), ("disjoint", BLOCK)):
        rate, all_s, n_windows = eval_tokens_per_s(stride)
        out[f"eval_{name}_tokens_per_s"] = rate
        out[f"eval_{name}_repeats_s"] = all_s
        print(f"evaluate, stride {stride} ({n_windows:,} windows, batch {4 * BATCH}): "
              f"{rate:,.0f} scored tokens/s = {rate / train:.1f}x the train step")
    save("evaluate", out)


if __name__ == "__main__":
    main()
