"""WaveNet throughput: generation (fast queued vs naive) at batch 1, and training.

    python bench/bench_wavenet.py                      # the CPU default model, prints JSON
    python bench/bench_wavenet.py --length 16000 --naive-length 500 --batch 8

Model: 2 blocks x 8 layers, 32 residual / 32 dilation / 64 skip channels, 256 μ-law levels
(receptive field 511). Every figure is the median of `--repeats` timed runs after one
compile-and-run warm-up; samples/s counts audio samples (codes), not sequences. The naive
path runs a full forward pass over the whole buffer per sample (O(T^2)), so it is timed on
the shorter `--naive-length`; the fast path is also timed on that length for a like-for-like
figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from chainrule.models.wavenet import WaveNet, WaveNetConfig

BENCH_CONFIG = dict(residual_channels=32, skip_channels=64, num_blocks=2, layers_per_block=8,
                    vocab_size=256)


def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + first run, not timed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_generation(model, length: int, repeats: int, naive: bool) -> float:
    generate = model.generate_naive if naive else model.generate
    seconds = _median_seconds(
        lambda: generate(n_samples=1, max_length=length, rngs=nnx.Rngs(sample=0)), repeats)
    return (length - 1) / seconds  # one prefix sample, length - 1 drawn


def bench_training(model, batch: int, length: int, steps: int, repeats: int) -> float:
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def train(state, waveform):
        def one_step(state, _):
            model, optimizer = nnx.merge(graphdef, state)
            grads = nnx.grad(lambda m: m.train_loss({"waveform": waveform})["loss"])(model)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), None

        return jax.lax.scan(one_step, state, length=steps)[0]

    waveform = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, length + 1)),
                           jnp.int32)
    seconds = _median_seconds(lambda: train(state, waveform), repeats)
    return batch * length * steps / seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=16000, help="fast generation length")
    parser.add_argument("--naive-length", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8, help="training batch")
    parser.add_argument("--train-length", type=int, default=4000, help="training crop")
    parser.add_argument("--train-steps", type=int, default=3, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results"
                        / "wavenet.json")
    args = parser.parse_args(argv)

    model = WaveNet(WaveNetConfig(**BENCH_CONFIG), rngs=nnx.Rngs(0))
    results = {
        "device": jax.devices()[0].device_kind,
        "model": dict(BENCH_CONFIG, receptive_field=model.receptive_field,
                      params=model.num_params()),
        "fast_generate_samples_per_s": bench_generation(model, args.length, args.repeats, False),
        "fast_generate_length": args.length,
        "fast_generate_samples_per_s_at_naive_length":
            bench_generation(model, args.naive_length, args.repeats, False),
        "naive_generate_samples_per_s": bench_generation(model, args.naive_length, args.repeats,
                                                         True),
        "naive_generate_length": args.naive_length,
        "train_samples_per_s": bench_training(model, args.batch, args.train_length,
                                              args.train_steps, args.repeats),
        "train_batch": [args.batch, args.train_length],
    }
    results["speedup_at_naive_length"] = (results["fast_generate_samples_per_s_at_naive_length"]
                                          / results["naive_generate_samples_per_s"])
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
