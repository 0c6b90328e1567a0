"""Speculative sampling: acceptance rate and speed-up of a 1-layer draft for a 4-layer target.

    python bench/bench_speculative.py [--target RUN_DIR --draft RUN_DIR] [--steps 1500]

Without run directories, trains both on Shakespeare first (same tokenizer, nanoGPT baby width:
128 wide, 4 heads, context 256; the draft has 1 layer). Then, at batch 1 and temperature 0.8,
times 200 new tokens after a "ROMEO:" prompt with plain cached decoding of the target and with
speculative sampling for 2, 4 and 6 draft tokens (median of 3 after a warm-up).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, timed  # noqa: E402

from chainrule.sampling.speculative import speculative_sample  # noqa: E402
from chainrule.training.restore import load_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train(name: str, layers: int, steps: int) -> Path:
    run_dir = ROOT / "outputs" / "bench" / f"speculative-{name}-{int(time.time())}"
    subprocess.run([sys.executable, "train.py", "logger=none", f"model.num_layers={layers}",
                    "data.sequence_length=256", "data.batch_size=16", f"trainer.steps={steps}",
                    "trainer.eval_every=500", "trainer.progress=false",
                    f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True)
    return run_dir


def main(args) -> dict:
    target_dir = Path(args.target) if args.target else train("target", 4, args.steps)
    draft_dir = Path(args.draft) if args.draft else train("draft", 1, args.steps)
    target, data, _, _ = load_run(target_dir)
    draft, _, _, _ = load_run(draft_dir)
    prompt = np.asarray(data.encode("ROMEO:"), np.int32)
    # Within the context (256) with room for the draft's look-ahead: past it, plain decoding
    # falls back to full passes and speculative sampling refuses.
    new = 200
    print(f"[{machine()}]")

    def plain():
        return target.generate(1, prompt=prompt, max_new_tokens=new, temperature=0.8,
                               rngs=nnx.Rngs(sample=0))

    base, _ = timed(plain, repeats=3)
    out = {"target": str(target_dir), "draft": str(draft_dir), "new_tokens": new,
           "plain_s": base, "plain_tokens_per_s": new / base, "speculative": []}
    print(f"plain cached decoding: {new / base:,.0f} tokens/s")
    for k in (2, 4, 6):
        result = {}

        def spec(k=k, result=result):
            result["r"] = speculative_sample(target, draft, prompt, new, num_draft_tokens=k,
                                             temperature=0.8, rngs=jax.random.key(0))
            return result["r"].tokens

        seconds, _ = timed(spec, repeats=3)
        r = result["r"]
        row = {"num_draft_tokens": k, "seconds": seconds, "tokens_per_s": new / seconds,
               "speedup": base / seconds, "acceptance_rate": r.acceptance_rate,
               "tokens_per_target_call": r.tokens_per_target_call}
        out["speculative"].append(row)
        print(f"k={k}: acceptance {row['acceptance_rate']:.2f}, "
              f"{row['tokens_per_target_call']:.2f} tokens per target pass, "
              f"{row['tokens_per_s']:,.0f} tokens/s, speed-up {row['speedup']:.2f}x")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--target")
    parser.add_argument("--draft")
    parser.add_argument("--steps", type=int, default=1500)
    save("speculative", main(parser.parse_args()))
