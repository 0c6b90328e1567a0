"""Hugging Face GPT-2 in chainrule: import time, and batch-1 cached decoding against
`transformers`' own `generate` (its KV cache) on the same weights, prompt and length.

    python bench/bench_hf_decode.py [--quick]

Two models, both random and created locally (no download): the tests' tiny GPT-2 (2 layers,
64 wide, vocabulary 100, context 64) and a GPT-2-small-shaped one (12 layers, 768 wide, 12
heads, vocabulary 50257, context 1024: 124M parameters), each saved with `save_pretrained`.
Import: `chainrule.models.from_pretrained(dir)` wall time (config, safetensors, model built),
median of 3. Decode: greedy, an 8-token prompt, `new` tokens (eos never stops it:
min_new_tokens), batch 1; tokens/s over the new tokens, median of 3 after a warm-up (which
compiles chainrule's loop; that first call is reported apart). torch uses every core, as JAX.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import machine, save  # noqa: E402

from chainrule.models import from_pretrained  # noqa: E402

SHAPES = {
    "tiny": dict(vocab_size=100, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                 bos_token_id=0, eos_token_id=0),
    "gpt2_small": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}


def median_seconds(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_shape(name: str, new: int, root: Path) -> dict:
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPES[name])).eval()
    path = root / name
    reference.save_pretrained(path)
    import_s = median_seconds(lambda: from_pretrained(path))
    model = from_pretrained(path)
    prompt = np.random.default_rng(0).integers(0, SHAPES[name]["vocab_size"], 8)

    def ours():
        return jax.block_until_ready(model.generate(
            1, prompt=prompt, max_new_tokens=new, min_new_tokens=new, temperature=0.0))

    def theirs():
        with torch.no_grad():
            return reference.generate(torch.tensor(prompt[None]), do_sample=False,
                                      max_new_tokens=new, min_new_tokens=new, use_cache=True,
                                      pad_token_id=0)

    t = time.perf_counter()
    first = np.asarray(ours())[0]
    first_s = time.perf_counter() - t
    theirs()  # warm-up
    same = np.array_equal(first, theirs().numpy()[0])
    ours_s, theirs_s = median_seconds(ours), median_seconds(theirs)
    row = {"model": name, "params": sum(p.numel() for p in reference.parameters()),
           "import_s": import_s, "new_tokens": new, "first_call_s_with_compile": first_s,
           "chainrule_tokens_per_s": new / ours_s, "transformers_tokens_per_s": new / theirs_s,
           "speedup": theirs_s / ours_s, "same_tokens": bool(same)}
    print(f"{name} ({row['params'] / 1e6:.1f}M): import {import_s:.2f} s; {new} new tokens "
          f"batch 1: chainrule {row['chainrule_tokens_per_s']:.0f} tok/s, transformers "
          f"{row['transformers_tokens_per_s']:.0f} tok/s ({row['speedup']:.2f}x); first call "
          f"with compile {first_s:.2f} s; same tokens: {same}")
    return row


def main(quick: bool) -> dict:
    print(f"[{machine()}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"transformers {transformers.__version__}]")
    with tempfile.TemporaryDirectory() as root:
        rows = [bench_shape("tiny", 56, Path(root))]
        rows.append(bench_shape("gpt2_small", 32 if quick else 128, Path(root)))
    return {"runs": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    results = main(parser.parse_args().quick)
    save("hf_decode", results)
