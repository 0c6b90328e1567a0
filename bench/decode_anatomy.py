"""Where a batch-1 decode step's time goes, on a minimal decoder with its pieces taken out.

    python bench/decode_anatomy.py

The nanoGPT "baby" shape (4 layers, 4 heads, 128 wide, vocab 65, rotary positions) written
directly in jax.numpy, no Flax: a key/value cache of fixed size, one token per step in a
`while_loop`, sampled at temperature 0.8. Every variant is compiled first and then timed in
turns, 15 rounds of 128 tokens, so the VM's drift hits them alike; each removes one piece
(its cost is the difference to `full`) or changes the cache's size. Not a model of the
library: `bench_transformer_decode.py` times the real `generate`.

Then the weights alone: the 24 block matrices as one matrix-vector product each per token, in
float32 (3.1 MB, more than a core's L2 here), half of them (1.6 MB, fits), and stored in
bfloat16 (what XLA's CPU backend makes of that).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, matvec_chain_seconds, save  # noqa: E402

D, HEADS, LAYERS, VOCAB, TOKENS = 128, 4, 4, 65, 128
HD = D // HEADS
VARIANTS = {  # name: (what is left out, cache slots)
    "full": (None, 256),
    "no attention (v passes through)": ("attention", 256),
    "no cache writes": ("cache writes", 256),
    "greedy instead of sampling": ("sampling", 256),
    "no rotary positions": ("rope", 256),
    "cache of 128 slots": (None, 128),
    "cache of 512 slots": (None, 512),
    "cache of 1024 slots": (None, 1024),
}


def weights(key):
    keys = iter(jax.random.split(key, 1 + 4 * LAYERS))
    normal = lambda shape: 0.02 * jax.random.normal(next(keys), shape)  # noqa: E731
    layers = [{"qkv": normal((D, 3 * D)), "proj": normal((D, D)), "fc": normal((D, 4 * D)),
               "out": normal((4 * D, D)), "ln1": jnp.ones(D), "ln2": jnp.ones(D)}
              for _ in range(LAYERS)]
    return {"embed": normal((VOCAB, D)), "layers": layers, "ln_f": jnp.ones(D)}


def layer_norm(x, gain):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * gain


def decoder(skip: str | None, slots: int):
    def step(params, token, t, cache, key):
        x = params["embed"][token]  # [1, D]
        angles = t.astype(jnp.float32) * 10000.0 ** (-jnp.arange(0, HD, 2) / HD)
        sin, cos = jnp.sin(angles), jnp.cos(angles)

        def rope(a):  # [HEADS, HD]
            a1, a2 = a[:, 0::2], a[:, 1::2]
            return jnp.stack([a1 * cos - a2 * sin, a1 * sin + a2 * cos], -1).reshape(a.shape)

        new_cache = []
        for p, (keys, values) in zip(params["layers"], cache, strict=True):
            q, k, v = jnp.split((layer_norm(x, p["ln1"]) @ p["qkv"]).reshape(3, HEADS, HD), 3)
            q, k, v = q[0], k[0], v[0]
            if skip != "rope":
                q, k = rope(q), rope(k)
            if skip != "cache writes":  # keys [HEADS, HD, S], values [HEADS, S, HD]
                keys = jax.lax.dynamic_update_slice(keys, k[:, :, None], (0, 0, t))
                values = jax.lax.dynamic_update_slice(values, v[:, None, :], (0, t, 0))
            if skip == "attention":
                out = v
            else:
                scores = jnp.einsum("hd,hds->hs", q, keys) / math.sqrt(HD)
                scores = jnp.where(jnp.arange(slots) <= t, scores, -1e30)
                out = jnp.einsum("hs,hsd->hd", jax.nn.softmax(scores, -1), values)
            x = x + out.reshape(1, D) @ p["proj"]
            x = x + jax.nn.gelu(layer_norm(x, p["ln2"]) @ p["fc"]) @ p["out"]
            new_cache.append((keys, values))
        logits = layer_norm(x, params["ln_f"]) @ params["embed"].T
        key, sub = jax.random.split(key)
        token = (jnp.argmax(logits, -1) if skip == "sampling"
                 else jax.random.categorical(sub, logits / 0.8, -1))
        return token.astype(jnp.int32), new_cache, key

    @jax.jit
    def run(params):
        cache = [(jnp.zeros((HEADS, HD, slots)), jnp.zeros((HEADS, slots, HD)))
                 for _ in range(LAYERS)]

        def body(state):
            t, token, cache, key, total = state
            token, cache, key = step(params, token, t, cache, key)
            return t + 1, token, cache, key, total + token

        state = (0, jnp.zeros((1,), jnp.int32), cache, jax.random.key(1),
                 jnp.zeros((1,), jnp.int32))
        _, _, cache, _, total = jax.lax.while_loop(lambda s: s[0] < TOKENS, body, state)
        # Depend on the cache, so XLA keeps its writes even where nothing reads them.
        return total + sum(k.sum() + v.sum() for k, v in cache).astype(jnp.int32)

    return run


def products(layers: int, dtype) -> float:
    """Microseconds per token for `layers` blocks' matrix-vector products alone."""
    blocks = weights(jax.random.key(0))["layers"][:layers]
    return 1e6 * matvec_chain_seconds([p[name].astype(dtype) for p in blocks
                                       for name in ("qkv", "proj", "fc", "out")])


def main() -> dict:
    print(f"[{machine()}]")
    params = weights(jax.random.key(0))
    runs = {name: decoder(*spec) for name, spec in VARIANTS.items()}
    for run in runs.values():
        run(params).block_until_ready()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(15):
        for name, run in runs.items():
            t = time.perf_counter()
            run(params).block_until_ready()
            times[name].append((time.perf_counter() - t) / TOKENS * 1e6)
    full = statistics.median(times["full"])
    results = {}
    for name, ts in times.items():
        us = statistics.median(ts)
        results[name] = us
        print(f"{name:34s} {us:6.0f} us/token ({us - full:+5.0f})  {1e6 / us:7,.0f} tokens/s")
    weights_only = {}
    for name, layers, dtype in (("float32, 4 layers (3.1 MB)", 4, jnp.float32),
                                ("float32, 2 layers (1.6 MB)", 2, jnp.float32),
                                ("bfloat16 stored, 4 layers", 4, jnp.bfloat16)):
        us = weights_only[name] = products(layers, dtype)
        mb = layers * 12 * D * D * jnp.dtype(dtype).itemsize / 1e6
        print(f"products only, {name:28s} {us:6.0f} us/token ({mb / us * 1e3:.0f} GB/s)")
    return {"shape": "4 layers, 4 heads, 128 wide, vocab 65, rope; batch 1, 128 tokens",
            "us_per_token": results, "products_only_us_per_token": weights_only}


if __name__ == "__main__":
    save("decode_anatomy", main())
