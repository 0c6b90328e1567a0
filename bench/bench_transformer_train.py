"""Train throughput (tokens/s) of the nanoGPT CPU "baby" shape, and the 2000-iteration recipe.

    python bench/bench_transformer_train.py            # throughput only (about a minute)
    python bench/bench_transformer_train.py --recipe   # + experiment=shakespeare_char_cpu,
                                                       #   seeds 0 1 2 (about 10 minutes)
    python bench/bench_transformer_train.py --recipe --override \
        model.network.positional_encoding=learned      # the recipe with nanoGPT's exact model

Shape: 4 layers, 4 heads, 128 wide, block 64, batch 12, vocab 65. Compared in the same run:
chainrule's train step (flat state through `jax.jit`, donated) against the straightforward
`nnx.jit` step over the model and optimizer objects.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, timed  # noqa: E402

from chainrule.models import TransformerConfig, TransformerNetworkConfig, build_model  # noqa: E402
from chainrule.training.optim import (
    OptimizerConfig,  # noqa: E402
    build_optimizer,  # noqa: E402
)
from chainrule.training.steps import Steps  # noqa: E402

BATCH, BLOCK, VOCAB, STEPS_PER_TIMING = 12, 64, 65, 20


def baby():
    net = TransformerNetworkConfig(embed_dim=128, num_heads=4, dropout_rate=0.0,
                                   positional_encoding="learned")
    cfg = TransformerConfig(vocab_size=VOCAB, sequence_length=BLOCK, network=net, num_layers=4)
    return build_model(cfg, rngs=nnx.Rngs(0))


def throughput() -> dict:
    batches = [{"sequences": jax.random.randint(jax.random.key(i), (BATCH, BLOCK + 1), 0, VOCAB)}
               for i in range(STEPS_PER_TIMING)]
    tx = build_optimizer(OptimizerConfig(), 2000)[0]

    model = baby()
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    steps = Steps(graphdef, jax.random.key(0))
    totals = {k: jnp.zeros((), jnp.float32) for k in steps.metric_names(state, batches[0])}
    box = {"state": state, "totals": totals}

    def run_ours():
        for i, b in enumerate(batches):
            box["state"], box["totals"] = steps.train_step(box["state"], box["totals"], b,
                                                           jnp.int32(i))
        return box["totals"]

    model2 = baby()
    opt2 = nnx.Optimizer(model2, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(lambda m: m.train_loss(batch)["loss"])(model)
        optimizer.update(model, grads)
        return loss

    def run_nnx():
        for b in batches:
            loss = nnx_step(model2, opt2, b)
        return loss

    tokens = BATCH * BLOCK * STEPS_PER_TIMING
    ours, ours_all = timed(run_ours, repeats=5)
    ref, ref_all = timed(run_nnx, repeats=5)
    out = {
        "shape": "4 layers, 4 heads, 128 wide, block 64, batch 12, vocab 65",
        "tokens_per_s": tokens / ours, "ms_per_step": ours / STEPS_PER_TIMING * 1e3,
        "nnx_jit_tokens_per_s": tokens / ref, "nnx_jit_ms_per_step": ref / STEPS_PER_TIMING * 1e3,
        "repeats_s": ours_all, "nnx_jit_repeats_s": ref_all,
    }
    print(f"[{machine()}]")
    print(f"chainrule step: {out['tokens_per_s']:,.0f} tokens/s ({out['ms_per_step']:.1f} ms/step)"
          f"   nnx.jit step: {out['nnx_jit_tokens_per_s']:,.0f} tokens/s "
          f"({out['nnx_jit_ms_per_step']:.1f} ms/step)   (median of 5 x {STEPS_PER_TIMING} steps)")
    return out


def recipe(seeds: list[int], overrides: list[str]) -> dict:
    """Run experiment=shakespeare_char_cpu (plus `overrides`) end to end once per seed; report
    each run's val loss, wall time and validation curve (seconds since launch, compilation
    included), and their medians."""
    root = Path(__file__).resolve().parents[1]
    runs = []
    for seed in seeds:
        run_dir = root / "outputs" / "bench" / f"shakespeare_char_cpu-seed{seed}-{int(time.time())}"
        launched, t = time.time(), time.perf_counter()
        subprocess.run([sys.executable, "train.py", "experiment=shakespeare_char_cpu",
                        f"seed={seed}", "logger=none", f"hydra.run.dir={run_dir}", *overrides],
                       cwd=root, check=True)
        wall = time.perf_counter() - t
        metrics = json.loads((run_dir / "metrics.json").read_text())
        curve = [(r["step"], r["val/loss"], r["time"] - launched)
                 for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                 if "val/loss" in r]
        runs.append({"seed": seed, "val_loss": metrics["val_loss"], "wall_s": wall,
                     "train_s": metrics["wall_time_s"], "val_curve": curve,
                     "run_dir": str(run_dir)})
        print(f"shakespeare_char_cpu seed {seed}: val loss {metrics['val_loss']:.4f} nats/char "
              f"after {metrics['final_step']} steps, {wall:.0f} s wall "
              f"(training {metrics['wall_time_s']:.0f} s); val loss at steps "
              + ", ".join(f"{step}: {loss:.3f} ({s:.0f} s)" for step, loss, s in curve))
    out = {"overrides": overrides, "runs": runs,
           **{f"median_{k}": statistics.median(r[k] for r in runs)
              for k in ("val_loss", "wall_s", "train_s")}}
    print(f"shakespeare_char_cpu {' '.join(overrides)}, median of {len(runs)} seeds: val loss "
          f"{out['median_val_loss']:.4f}, training {out['median_train_s']:.0f} s, "
          f"wall {out['median_wall_s']:.0f} s")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", action="store_true", help="also run the 2000-step recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="the recipe's seeds (one run each; the median is reported)")
    parser.add_argument("--override", action="append", default=[],
                        help="a Hydra override for the recipe's runs (repeatable), e.g. "
                             "model.network.positional_encoding=learned: nanoGPT's model")
    args = parser.parse_args()
    results = {"throughput": throughput()}
    if args.recipe:
        results["recipe"] = recipe(args.seeds, args.override)
    # A run with overrides is saved beside the preset's: transformer_train_learned.json
    save("_".join(["transformer_train", *(o.split("=")[-1] for o in args.override)]), results)
