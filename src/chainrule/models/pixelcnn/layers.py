"""The PixelCNN's layers: masked convolutions and gated layers.

Layout. Every gated layer has a vertical stack v (sees rows strictly above the current one: the
first layer's vertical kernel leaves out the current row, later ones cover rows r-p..r of a
stack that is itself strictly above) and a horizontal stack h (row r, columns c-p..c). v feeds h
through a 1x1 link, so the receptive field is the whole causal cone, with no blind spot. Mask A
(first layer) keeps the centre tap of h only for earlier colour channels; mask B (later layers)
also keeps the same channel group. Hidden channels are split into contiguous groups, one per image
channel, and every 1x1 that mixes channels at the same pixel is masked group <= group. After the
gated layers, `num_residual_blocks` masked 1x1 residual blocks and a masked 1x1 output give the
logits (they widen nothing in space, so the receptive field is set by num_layers and kernel_size).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chainrule.models.base import DTYPES
from chainrule.models.pixelcnn.config import PixelCNNConfig

# ------------------------------------------------------------------------------ masks


def channel_groups(n_channels: int, n_groups: int) -> np.ndarray:
    """Contiguous groups: channel i belongs to colour group i * n_groups // n_channels."""
    return np.arange(n_channels) * n_groups // n_channels


@functools.cache
def _group_mask(n_in: int, n_out: int, n_groups: int, strict: bool, out_repeats: int = 1):
    """[n_in, n_out * out_repeats] 0/1: out group g reads in groups < g (strict) or <= g."""
    gin = channel_groups(n_in, n_groups)[:, None]
    gout = np.tile(channel_groups(n_out, n_groups), out_repeats)[None, :]
    return ((gin < gout) if strict else (gin <= gout)).astype(np.float32)


def conv2d(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """Stride-1 convolution of x [B, H, W, C] with kernel [kh, kw, C, F] as one matmul over the
    stacked shifted views (im2col). On CPU, XLA's convolution gradient with respect to the
    kernel ran several times slower than this matmul's."""
    kh, kw, c_in, c_out = kernel.shape
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    rows, cols = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    taps = [x[:, i: i + rows, j: j + cols] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(taps, axis=-1) @ kernel.reshape(kh * kw * c_in, c_out)


def _gate(x: jax.Array) -> jax.Array:
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.tanh(a) * jax.nn.sigmoid(b)


def _per_example(e: jax.Array | None, ndim: int) -> jax.Array | float:
    """[B, F] conditioning broadcast against a [B, ..., F] activation of rank `ndim`."""
    return 0.0 if e is None else e.reshape(e.shape[0], *(1,) * (ndim - 2), e.shape[-1])


def _dropout(layer: nnx.Dropout, x, training: bool, rngs):
    return layer(x, deterministic=not training, rngs=rngs) if training else x


class WeightPool:
    """Builds a model's weights: every `weight` is filled, once the model is built, from ONE
    normal vector (LeCun: std 1 / sqrt(fan_in)). One random-number program to compile per model
    instead of one per weight shape: on a small CPU those compiles took longer than anything
    else. Eager or traced (nnx.jit / nnx.eval_shape), the values are the same."""

    def __init__(self):
        self.requests: list[tuple[nnx.Param, int]] = []

    @staticmethod
    def zeros(*shape: int, axes: tuple[str | None, ...] | None = None) -> nnx.Param:
        """A zero parameter (a transfer, no compile); `axes` are its logical axis names."""
        value = jnp.asarray(np.zeros(shape, np.float32))
        if axes is None:
            return nnx.Param(value)
        return nnx.Param(value, out_sharding=axes, eager_sharding=False)

    def weight(self, *shape: int, fan_in: int, axes=None) -> nnx.Param:
        param = self.zeros(*shape, axes=axes)
        self.requests.append((param, fan_in))
        return param

    def draw(self, key: jax.Array) -> None:
        total = sum(param[...].size for param, _ in self.requests)
        flat = jax.random.normal(key, (total,), jnp.float32)
        xp = jnp if isinstance(flat, jax.core.Tracer) else np
        flat = flat if xp is jnp else np.asarray(flat)
        offset = 0
        for param, fan_in in self.requests:
            shape = param[...].shape
            size = math.prod(shape)
            block = flat[offset: offset + size].reshape(shape) * xp.float32(1 / math.sqrt(fan_in))
            param[...] = jnp.asarray(block)
            offset += size


class Dense(nnx.Module):
    """x @ kernel + bias; with `n_groups`, a 1x1 convolution masked so that out group g reads
    only in groups <= g (mask B)."""

    def __init__(self, n_in: int, n_out: int, pool: WeightPool, n_groups: int | None = None,
                 dtype=jnp.float32):
        self.shape = (n_in, n_out, n_groups)
        self.dtype = dtype
        self.kernel = pool.weight(n_in, n_out, fan_in=n_in, axes=("embed", "channels"))
        self.bias = pool.zeros(n_out)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        if self.shape[2] is not None:
            kernel = kernel * _group_mask(*self.shape, False)
        return x.astype(self.dtype) @ kernel.astype(self.dtype) + self.bias[...].astype(self.dtype)


class GatedLayer(nnx.Module):
    """One vertical + horizontal stack pair (van den Oord et al. 2016, Fig. 2)."""

    def __init__(self, n_in: int, config: PixelCNNConfig, first: bool, pool: WeightPool):
        k, p, c, n = config.kernel_size, config.kernel_size // 2, config.hidden_channels, \
            config.image_shape[2]
        self.first, self.p, self.n_in, self.hidden, self.n_groups = first, p, n_in, c, n
        self.dtype = dtype = DTYPES[config.dtype or "float32"]
        # vertical taps: rows r-p..r, columns c-p..c+p; horizontal taps: columns c-p..c
        self.v_kernel = pool.weight(p + 1, k, n_in, 2 * c, fan_in=(p + 1) * k * n_in,
                                    axes=(None, None, "embed", "channels"))
        self.v_bias = pool.zeros(2 * c)
        self.h_kernel = pool.weight(p + 1, n_in, 2 * c, fan_in=(p + 1) * n_in,
                                    axes=(None, "embed", "channels"))
        self.h_bias = pool.zeros(2 * c)
        self.link = Dense(2 * c, 2 * c, pool, dtype=dtype)  # v pre-activation -> h
        self.h_out = Dense(c, c, pool, n, dtype=dtype)
        self.dropout = nnx.Dropout(config.dropout_rate)
        # One embedding row per class and layer, added to both gates: [v part | h part].
        self.cond = (pool.weight(config.num_classes, 4 * c, fan_in=4 * c)
                     if config.num_classes else None)

    def masked_kernels(self) -> tuple[jax.Array, jax.Array]:
        """(vertical [p+1, k, in, 2c], horizontal [p+1, in, 2c]) kernels with masks applied."""
        v = self.v_kernel[...]
        if self.first:  # mask A: the first vertical layer must not see the current row
            v = v.at[-1].set(0.0)
        centre = _group_mask(self.n_in, self.hidden, self.n_groups, self.first, 2)
        h = self.h_kernel[...]
        return v.astype(self.dtype), h.at[-1].multiply(centre).astype(self.dtype)

    def conditioning(self, labels) -> tuple[jax.Array | None, jax.Array | None]:
        if self.cond is None:
            return None, None
        e = self.cond[...][labels].astype(self.dtype)
        return e[:, : 2 * self.hidden], e[:, 2 * self.hidden:]

    def vertical(self, v_kernel, x, padding, cond_v) -> jax.Array:
        """Vertical pre-activation [B, rows, W, 2c] (no padding on a padded cached window)."""
        y = conv2d(x.astype(self.dtype), v_kernel, padding)
        return y + self.v_bias[...].astype(self.dtype) + _per_example(cond_v, y.ndim)

    def v_to_h(self, v_pre, cond_h) -> jax.Array:
        """What the vertical stack (and the class) add to the horizontal gate."""
        return (self.link(v_pre) + self.h_bias[...].astype(self.dtype)
                + _per_example(cond_h, v_pre.ndim))

    def horizontal(self, h_conv, link, h_in, *, training=False, rngs=None) -> jax.Array:
        """h_conv: masked horizontal convolution; h_in: the residual input (unused if first)."""
        out = self.h_out(_dropout(self.dropout, _gate(h_conv + link), training, rngs))
        return out if self.first else h_in + out


class OutputHead(nnx.Module):
    """Masked 1x1 residual blocks, then a masked 1x1 to channels * num_levels logits."""

    def __init__(self, config: PixelCNNConfig, pool: WeightPool):
        c, n, levels = config.hidden_channels, config.image_shape[2], config.num_levels
        self.n, self.levels = n, levels
        dtype = DTYPES[config.dtype or "float32"]
        self.blocks = nnx.List([nnx.List([Dense(c, c, pool, n, dtype), Dense(c, c, pool, n, dtype)])
                                for _ in range(config.num_residual_blocks)])
        self.dropout = nnx.Dropout(config.dropout_rate)
        # out channel j predicts sub-pixel j // levels, which is exactly its colour group
        self.out = Dense(c, n * levels, pool, n, dtype)

    def __call__(self, h, *, training=False, rngs=None) -> jax.Array:
        for first, second in self.blocks:
            y = _dropout(self.dropout, jax.nn.relu(first(jax.nn.relu(h))), training, rngs)
            h = h + second(y)
        logits = self.out(jax.nn.relu(h)).astype(jnp.float32)
        return logits.reshape(*logits.shape[:-1], self.n, self.levels)


def _layer_forward(layer: GatedLayer, v, h, class_labels, rngs, training):
    """One gated layer over whole images: (vertical stack, horizontal stack) -> next pair."""
    p = layer.p
    v_kernel, h_kernel = layer.masked_kernels()
    cond_v, cond_h = layer.conditioning(class_labels)
    v_pre = layer.vertical(v_kernel, v, ((p, 0), (p, p)), cond_v)
    h_conv = conv2d(h.astype(layer.dtype), h_kernel[None], ((0, 0), (p, 0)))
    h = layer.horizontal(h_conv, layer.v_to_h(v_pre, cond_h), h, training=training, rngs=rngs)
    return _gate(v_pre), h
