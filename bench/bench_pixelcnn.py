"""PixelCNN: generation time (cached fast sampler vs naive full passes) and training throughput.

    python bench/bench_pixelcnn.py                     # the issue's model; writes results/
    python bench/bench_pixelcnn.py --naive-repeats 3   # the naive path takes minutes per run

Model: gated PixelCNN on 28x28x1 images with 256 levels, 64 hidden channels, 7 gated layers,
5 head residual blocks (the guide's defaults but 64 channels). Generation draws 16 samples at
temperature 1; compile time is measured ahead of time (`lower().compile()`) and reported apart
from the runs, each figure the median of its repeats. The naive path runs one full forward
pass per sub-pixel (784 of them), so it gets fewer repeats by default. Training: images/s of one
jitted train step (forward, backward, optax adam) on batch 32, dropout on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save  # noqa: E402

from chainrule.models.pixelcnn import PixelCNN, PixelCNNConfig  # noqa: E402

BENCH_CONFIG = dict(image_shape=(28, 28, 1), num_levels=256, hidden_channels=64, num_layers=7,
                    num_residual_blocks=5, kernel_size=3, dropout_rate=0.1)


def _runs(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def bench_generation(model: PixelCNN, n_samples: int, repeats: int, naive: bool) -> dict:
    sampler, args = model._sampling_inputs(n_samples, 1.0, None, None, nnx.Rngs(sample=0), None,
                                           None, None, naive=naive)
    start = time.perf_counter()
    compiled = sampler.lower(model, *args).compile()
    compile_s = time.perf_counter() - start
    times = _runs(lambda: compiled(model, *args), repeats)
    return {"compile_s": compile_s, "median_s": statistics.median(times), "runs_s": times}


def bench_training(model: PixelCNN, batch: int, steps: int, repeats: int) -> dict:
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def train_step(state, images, key):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            return model.train_loss({"images": images}, rngs=nnx.Rngs(dropout=key))["loss"]

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, 28, 28, 1)), jnp.int32)
    keys = jax.random.split(jax.random.key(0), steps)
    start = time.perf_counter()
    jax.block_until_ready(train_step(state, images, keys[0]))
    first_s = time.perf_counter() - start

    def run():
        s = state
        for key in keys:
            s, loss = train_step(s, images, key)
        return loss

    times = _runs(run, repeats)
    seconds = statistics.median(times) / steps
    return {"images_per_s": batch / seconds, "step_s": seconds, "first_step_s": first_s,
            "batch": batch}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="fast-path and training repeats")
    parser.add_argument("--naive-repeats", type=int, default=1, help="0 skips the naive path")
    parser.add_argument("--batch", type=int, default=32, help="training batch")
    parser.add_argument("--train-steps", type=int, default=5, help="steps per timed run")
    args = parser.parse_args(argv)

    model = PixelCNN(PixelCNNConfig(**BENCH_CONFIG), rngs=nnx.Rngs(0))
    results = {
        "model": dict(BENCH_CONFIG, params=model.num_params()),
        "samples": args.samples,
        "fast": bench_generation(model, args.samples, args.repeats, naive=False),
    }
    print(f"fast:  compile {results['fast']['compile_s']:.1f} s, "
          f"median {results['fast']['median_s']:.2f} s for {args.samples} samples", flush=True)
    if args.naive_repeats > 0:
        results["naive"] = bench_generation(model, args.samples, args.naive_repeats, naive=True)
        results["speedup"] = results["naive"]["median_s"] / results["fast"]["median_s"]
        print(f"naive: compile {results['naive']['compile_s']:.1f} s, "
              f"median {results['naive']['median_s']:.1f} s  (fast is "
              f"{results['speedup']:.0f}x faster)", flush=True)
    results["train"] = bench_training(model, args.batch, args.train_steps, args.repeats)
    print(f"train: {results['train']['images_per_s']:.0f} images/s "
          f"({results['train']['step_s'] * 1e3:.0f} ms per step of {args.batch})", flush=True)
    print(machine())
    save("pixelcnn", results)
    return results


if __name__ == "__main__":
    main()
