"""Decode throughput of the nanoGPT CPU "baby" shape: cached vs uncached, batch 1 and 8.

    python bench/bench_transformer_decode.py [--quick]

Shape: 4 layers, 4 heads, 128 wide, vocab 65, context 1024. For 128, 512 and 1023 new tokens
(after a 1-token prompt): tokens/s (median of 3 runs after a warm-up), per-token cost, and the
time to the first complete sample with compilation included (a fresh model, cold cache).
The uncached decoder (a full forward pass over the context per token) is the reference.

Also the floor under batch-1 decoding: the model's own 24 weight matrices (3.1 MB) multiplied
by one vector each, per token, in a compiled loop with nothing else; at batch 1 every token has
to read them all, so no cached decoder on this machine runs faster than this.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matvec_chain_seconds, save, timed  # noqa: E402

from chainrule.models import TransformerConfig, TransformerNetworkConfig, build_model  # noqa: E402


def baby(context=1024, layers=4):
    net = TransformerNetworkConfig(embed_dim=128, num_heads=4, dropout_rate=0.0,
                                   positional_encoding="rope")
    cfg = TransformerConfig(vocab_size=65, sequence_length=context, network=net,
                            num_layers=layers)
    return build_model(cfg, rngs=nnx.Rngs(0))


def weights_floor(model) -> float:
    """Seconds per token to read every block matrix once as a matrix-vector product."""
    return matvec_chain_seconds([layer.kernel[...] for block in model.blocks for layer in
                                 (block.attn.qkv, block.attn.proj, block.fc, block.out)])


def main(quick: bool) -> dict:
    # 1023 new tokens after the 1-token prompt fill the whole 1024 context (one more would
    # slide the window, which the cache does not do: generate falls back to full passes).
    lengths = [128, 512] if quick else [128, 512, 1023]
    results = {"shape": "4 layers, 4 heads, 128 wide, vocab 65, context 1024", "runs": []}
    print(f"[{machine()}]")
    t = time.perf_counter()
    fresh = baby()
    jax.block_until_ready(fresh.generate(1, max_length=129, temperature=0.8,
                                         rngs=nnx.Rngs(sample=0)))
    results["first_sample_s_with_compile"] = time.perf_counter() - t
    print(f"first sample (128 new tokens, batch 1, compile included): "
          f"{results['first_sample_s_with_compile']:.2f} s")
    model = baby()
    for batch in (1, 8):
        for new in lengths:
            for cached in (True, False):
                if not cached and (new > 512 or quick and new > 128 or batch > 1 and new > 128):
                    continue  # the reference is quadratic: keep the run short
                def go(batch=batch, new=new, cached=cached):
                    return model.generate(batch, max_length=new + 1, temperature=0.8,
                                          rngs=nnx.Rngs(sample=1), use_cache=cached)
                median, _ = timed(go, repeats=3)
                row = {"batch": batch, "new_tokens": new, "cached": cached,
                       "seconds": median, "tokens_per_s": batch * new / median,
                       "us_per_token_step": median / new * 1e6}
                results["runs"].append(row)
                print(f"batch {batch:>2} new {new:>5} {'cached  ' if cached else 'uncached'}: "
                      f"{row['tokens_per_s']:>9,.0f} tokens/s  ({row['us_per_token_step']:.0f} us "
                      f"per step)")
    floor = weights_floor(model)
    results["weights_floor_us_per_token"] = floor * 1e6
    print(f"floor: the 24 weight matrices as matrix-vector products alone: {floor * 1e6:.0f} us "
          f"per token ({1 / floor:,.0f} tokens/s at most at batch 1)")
    by = {(r["batch"], r["new_tokens"], r["cached"]): r for r in results["runs"]}
    last = lengths[-1]
    ratio = by[(1, last, True)]["us_per_token_step"] / by[(1, 128, True)]["us_per_token_step"]
    results["cost_ratio_last_vs_128"] = ratio
    print(f"per-token cost at {last} / at 128 new tokens (batch 1, cached): {ratio:.2f}x")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    save("transformer_decode", main(parser.parse_args().quick))
