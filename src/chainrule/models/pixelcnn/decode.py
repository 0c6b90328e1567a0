"""The PixelCNN's compiled samplers: the cached fast one (Ramachandran et al. 2017) and
the naive reference.

Fast generation caches every layer's activations: at the start of row r the vertical stacks of
all layers are computed for that one row (from cached rows above); then per sub-pixel only
column c of every horizontal stack (and the head) is recomputed from the cached columns to its
left. That is about one forward pass of work for grey images (C passes of the horizontal stack
for C channels) instead of H*W*C full passes (`generate_naive`, the reference, does the latter).
Both draw sub-pixel (r, c, ch) with the same key, so they return the same images.

`model` is a `PixelCNN` (model.py imports this file, so it is not imported here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from chainrule.models.pixelcnn.layers import _gate
from chainrule.sampling import sample_token


def _draw_key(rngs) -> jax.Array:
    if rngs is None:
        return jax.random.key(0)
    if isinstance(rngs, nnx.Rngs):
        return rngs.sample() if "sample" in rngs else rngs()
    return rngs  # a raw key


@nnx.jit
def _sample_naive(model, keys, canvas, keep, labels, temperature, top_k, top_p):
    """H*W*C steps, each a full forward pass over the whole canvas."""
    _, width, n = model.image_shape
    flat_keys = keys.reshape(-1)

    def step(t, canvas):
        r, c, ch = t // (width * n), t // n % width, t % n
        logits = model(canvas, class_labels=labels)["logits"][:, r, c, ch]
        drawn = sample_token(flat_keys[t], logits, temperature=temperature, top_k=top_k,
                             top_p=top_p)
        value = jnp.where(keep[r, c], canvas[:, r, c, ch], drawn)
        return canvas.at[:, r, c, ch].set(value)

    return jax.lax.fori_loop(0, flat_keys.shape[0], step, canvas)


@nnx.jit
def _sample_cached(model, keys, canvas, keep, labels, temperature, top_k, top_p):
    """Row loop (vertical stacks of row r from cached rows above) around a column loop
    (horizontal stacks of column c from cached columns to its left), C draws per pixel."""
    b = canvas.shape[0]
    height, width, n = model.image_shape
    p, hidden = model.config.kernel_size // 2, model.hidden_channels
    layers = list(model.layers)
    kernels = [layer.masked_kernels() for layer in layers]
    # the horizontal conv at one column is one matmul: window [B, (p+1)*in] @ [(p+1)*in, 2c]
    h_mats = [h.reshape(-1, h.shape[-1]) for _, h in kernels]
    conds = [layer.conditioning(labels) for layer in layers]
    # Padded caches: p rows on top, p columns either side are zeros (the convs' zero padding).
    # x_pad is the scaled canvas; v_bufs[l] holds the gated vertical output of layer l, the
    # vertical input of layer l + 1.
    x_pad = jnp.zeros((b, height + p, width + 2 * p, n), model.dtype)
    v_bufs = [jnp.zeros((b, height + p, width + 2 * p, hidden), model.dtype)
              for _ in layers[:-1]]

    def row_step(r, carry):
        canvas, x_pad, v_bufs = carry
        links, window = [], jax.lax.dynamic_slice_in_dim(x_pad, r, p + 1, axis=1)
        new_v = []
        for i, layer in enumerate(layers):
            # v_pre: [B, 1, W, 2c], the vertical pre-activation of row r
            v_pre = layer.vertical(kernels[i][0], window, ((0, 0), (0, 0)), conds[i][0])
            links.append(layer.v_to_h(v_pre[:, 0], conds[i][1]))  # [B, W, 2c]
            if i + 1 < len(layers):
                buf = jax.lax.dynamic_update_slice(v_bufs[i], _gate(v_pre), (0, r + p, p, 0))
                new_v.append(buf)
                window = jax.lax.dynamic_slice_in_dim(buf, r, p + 1, axis=1)
        links = jnp.stack(links, axis=2)  # [B, W, layers, 2c]: one slice per pixel
        # h_bufs[l]: horizontal output of layer l along row r (p zero columns on the left).
        h_bufs = [jnp.zeros((b, width + p, hidden), model.dtype) for _ in layers[:-1]]

        def column_step(c, carry):
            canvas, x_pad, h_bufs = carry
            link = jax.lax.dynamic_index_in_dim(links, c, axis=1, keepdims=False)
            for ch in range(n):  # R, then G, then B: each draw sees the ones before it
                window = jax.lax.dynamic_slice(x_pad, (0, r + p, c, 0), (b, 1, p + 1, n))[:, 0]
                new_h = []
                for i, layer in enumerate(layers):
                    h_conv = window.reshape(b, -1) @ h_mats[i]
                    h = layer.horizontal(h_conv, link[:, i], window[:, -1])
                    if i + 1 < len(layers):
                        buf = jax.lax.dynamic_update_slice(h_bufs[i], h[:, None], (0, c + p, 0))
                        new_h.append(buf)
                        window = jax.lax.dynamic_slice_in_dim(buf, c, p + 1, axis=1)
                logits = model.head(h)[:, ch]
                drawn = sample_token(keys[r, c, ch], logits, temperature=temperature,
                                     top_k=top_k, top_p=top_p)
                value = jnp.where(keep[r, c], canvas[:, r, c, ch], drawn)
                canvas = jax.lax.dynamic_update_slice(canvas, value[:, None, None, None],
                                                      (0, r, c, ch))
                x_pad = jax.lax.dynamic_update_slice(x_pad, model.scale(value)[:, None, None, None],
                                                     (0, r + p, c + p, ch))
                h_bufs = new_h
            return canvas, x_pad, h_bufs

        canvas, x_pad, _ = jax.lax.fori_loop(0, width, column_step, (canvas, x_pad, h_bufs))
        return canvas, x_pad, new_v

    canvas, _, _ = jax.lax.fori_loop(0, height, row_step, (canvas, x_pad, v_bufs))
    return canvas
