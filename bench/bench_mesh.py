"""Sharded training throughput: one device vs an 8-device mesh in each layout.

    python bench/bench_mesh.py [--family transformer|pixelcnn|wavenet] [--repeats 5]

On a CPU the 8 devices are simulated (`jax_num_cpu_devices=8`) and share the same cores, so
no speed-up is expected: the figures measure what partitioning costs (collectives, smaller
per-device matmuls). Every layout runs the loop's own compiled train step (`assemble`) on the
same model and batches; a figure is the median of `--repeats` timings of 20 steps.
Transformer: nanoGPT's CPU "baby" shape (4 layers, 4 heads, 128 wide, block 64) at batch 16
(divisible by 8). The loss after the timed steps is printed too: it must agree across layouts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, timed  # noqa: E402

from chainrule.data.audio import AudioDataConfig  # noqa: E402
from chainrule.data.images import ImageDataConfig  # noqa: E402
from chainrule.data.text import TextDataConfig  # noqa: E402
from chainrule.models import (  # noqa: E402
    PixelCNNConfig,
    TransformerConfig,
    TransformerNetworkConfig,
    WaveNetConfig,
)
from chainrule.parallel import HardwareConfig, MeshConfig, build_mesh  # noqa: E402
from chainrule.tracking import LoggerConfig  # noqa: E402
from chainrule.training.config import TrainConfig, TrainerConfig  # noqa: E402
from chainrule.training.optim import OptimizerConfig  # noqa: E402
from chainrule.training.run import assemble  # noqa: E402

STEPS = 20
LAYOUTS = {
    "1 device": MeshConfig(data=1),
    "data=8": MeshConfig(data=8),
    "fsdp=8": MeshConfig(data=1, fsdp=8),
    "data=4 x tensor=2": MeshConfig(data=4, tensor=2),
    "fsdp=4 x tensor=2": MeshConfig(data=1, fsdp=4, tensor=2),
}
FAMILIES = {
    "transformer": lambda: (
        TransformerConfig(sequence_length=64, num_layers=4, network=TransformerNetworkConfig(
            embed_dim=128, num_heads=4, dropout_rate=0.0, positional_encoding="learned")),
        TextDataConfig(sequence_length=64, batch_size=16, val_batches=1), "tokens"),
    "pixelcnn": lambda: (
        PixelCNNConfig(image_shape=(8, 8, 1), num_levels=17, hidden_channels=64, num_layers=5,
                       num_residual_blocks=2, dropout_rate=0.0),
        ImageDataConfig(source="digits", batch_size=32, val_batches=1), "sub-pixels"),
    "wavenet": lambda: (
        WaveNetConfig(vocab_size=None, sequence_length=1024, residual_channels=32,
                      skip_channels=64, num_blocks=2, layers_per_block=8),
        AudioDataConfig(sequence_length=1024, batch_size=8, val_batches=1), "samples"),
}


def measure(family: str, mesh_config: MeshConfig, repeats: int) -> dict:
    model, data, unit = FAMILIES[family]()
    cfg = TrainConfig(model=model, data=data, optimizer=OptimizerConfig(),
                      logger=LoggerConfig(backend="none"),
                      hardware=HardwareConfig(name="bench", mesh=mesh_config),
                      trainer=TrainerConfig(steps=10_000, progress=False))
    mesh = build_mesh(cfg.hardware)
    with jax.set_mesh(mesh):
        setup = assemble(cfg, None, mesh)
        batches = [setup.batch(next(setup.data.train)) for _ in range(STEPS)]
        box = {"state": setup.state, "totals": setup.zero_totals(batches[0])}

        def run():
            for i, batch in enumerate(batches):
                box["state"], box["totals"] = setup.steps.train_step(
                    box["state"], box["totals"], batch, np.int32(i + 1))
            return box["totals"]

        seconds, _ = timed(run, repeats=repeats)
        model = nnx.merge(setup.graphdef, setup.state)[0]
        units = int(np.prod(model.model_inputs(batches[0]).shape))  # as the loop counts them
        loss = float(box["totals"]["loss"] / box["totals"]["count"])
    return {"layout": dict(mesh.shape), "units_per_s": units * STEPS / seconds,
            "ms_per_step": seconds / STEPS * 1e3, "mean_loss": loss, "unit": unit}


def main(args) -> dict:
    print(f"[{machine()}]  {args.family}, median of {args.repeats} x {STEPS} steps")
    rows = {}
    for name, mesh_config in LAYOUTS.items():
        rows[name] = row = measure(args.family, mesh_config, args.repeats)
        ratio = row["units_per_s"] / rows["1 device"]["units_per_s"]
        print(f"{name:>18}: {row['units_per_s']:>10,.0f} {row['unit']}/s  "
              f"{row['ms_per_step']:7.1f} ms/step  ({ratio:.2f}x one device)  "
              f"loss {row['mean_loss']:.6f}")
    return {"family": args.family, "layouts": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="transformer", choices=list(FAMILIES))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    save(f"mesh_{args.family}", main(args))
