"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders") with cached fast generation (Ramachandran et al. 2017).

p(image) = prod over rows, columns, then channels (R -> G -> B) of a `num_levels`-way softmax.

Layout. Every gated layer has a vertical stack v (sees rows strictly above the current one: the
first layer's vertical kernel leaves out the current row, later ones cover rows r-p..r of a
stack that is itself strictly above) and a horizontal stack h (row r, columns c-p..c). v feeds h
through a 1x1 link, so the receptive field is the whole causal cone, with no blind spot. Mask A
(first layer) keeps the centre tap of h only for earlier colour channels; mask B (later layers)
also keeps the same channel group. Hidden channels are split into contiguous groups, one per image
channel, and every 1x1 that mixes channels at the same pixel is masked group <= group. After the
gated layers, `num_residual_blocks` masked 1x1 residual blocks and a masked 1x1 output give the
logits (they widen nothing in space, so the receptive field is set by num_layers and kernel_size).

Fast generation caches every layer's activations: at the start of row r the vertical stacks of
all layers are computed for that one row (from cached rows above); then per sub-pixel only
column c of every horizontal stack (and the head) is recomputed from the cached columns to its
left. That is about one forward pass of work for grey images (C passes of the horizontal stack
for C channels) instead of H*W*C full passes (`generate_naive`, the reference, does the latter).
Both draw sub-pixel (r, c, ch) with the same key, so they return the same images.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from chainrule.models.base import DTYPES, AutoregressiveModel
from chainrule.sampling import sample_token


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass
class PixelCNNConfig:
    """A gated PixelCNN over integer images [H, W, C] with values in [0, num_levels)."""

    name: str = "pixelcnn"
    # (height, width, channels) and softmax size per sub-pixel (2 for binarized, 256 for 8-bit);
    # None: the data decides (training fills both in from the data pipeline).
    image_shape: tuple[int, int, int] | None = (28, 28, 1)
    num_levels: int | None = 256
    hidden_channels: int = 128
    num_layers: int = 7  # gated masked-conv layers (vertical + horizontal stack pairs)
    num_residual_blocks: int = 5  # masked 1x1 residual blocks in the output head
    kernel_size: int = 3  # odd; each layer widens the receptive field by kernel_size // 2
    dropout_rate: float = 0.1
    num_classes: int | None = None  # class-conditional when set (labels from the batch)
    dtype: str | None = None  # compute dtype (None: float32, or hardware.compute_dtype)
    remat: bool = False  # recompute each gated layer's activations in the backward pass

    def __post_init__(self) -> None:
        _check(self.dtype is None or self.dtype in DTYPES,
               f"dtype={self.dtype!r}; expected one of {sorted(DTYPES)} (or null)")
        if self.image_shape is not None:
            shape = tuple(int(d) for d in self.image_shape)
            _check(len(shape) == 3 and min(shape) > 0, f"image_shape={tuple(self.image_shape)}: "
                                                       "expected (height, width, channels) > 0")
            self.image_shape = shape
            _check(self.hidden_channels >= shape[2],
                   f"hidden_channels={self.hidden_channels} must be >= the {shape[2]} image "
                   "channels (one hidden channel group per colour channel)")
        _check(self.num_levels is None or self.num_levels >= 2,
               f"num_levels must be >= 2 (or None: the data's), got {self.num_levels}")
        _check(self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}")
        _check(self.num_residual_blocks >= 0,
               f"num_residual_blocks must be >= 0, got {self.num_residual_blocks}")
        _check(self.kernel_size >= 3 and self.kernel_size % 2 == 1,
               f"kernel_size must be odd and >= 3, got {self.kernel_size}")
        _check(0.0 <= self.dropout_rate < 1.0,
               f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        _check(self.num_classes is None or self.num_classes >= 1,
               f"num_classes must be None or >= 1, got {self.num_classes}")

    @property
    def receptive_field(self) -> int:
        """Rows above (and columns left/right) that the logits at a pixel can see."""
        return self.num_layers * (self.kernel_size // 2)


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


# ------------------------------------------------------------------------------ model


class PixelCNN(AutoregressiveModel):
    """Gated PixelCNN: `PixelCNN(config, rngs=rngs)` or `PixelCNN(image_shape=..., rngs=rngs)`."""

    data_key = "images"

    def __init__(self, config: PixelCNNConfig | None = None, *, rngs: nnx.Rngs, **keywords: Any):
        if config is None:
            config = PixelCNNConfig()
        if not isinstance(config, PixelCNNConfig):
            raise ValueError(f"config must be a PixelCNNConfig, got {type(config).__name__}")
        fields = {f.name for f in dataclasses.fields(PixelCNNConfig)}
        unknown = sorted(set(keywords) - fields)
        _check(not unknown, f"unknown PixelCNN keyword(s) {unknown}; expected any of "
                            f"{sorted(fields)}")
        if keywords:  # the older keyword form of the guide
            config = dataclasses.replace(config, **keywords)
        _check(config.image_shape is not None and config.num_levels is not None,
               f"PixelCNNConfig has image_shape={config.image_shape}, num_levels="
               f"{config.num_levels}: set both, or let the data pipeline fill them in")
        self.config = config
        self.image_shape = config.image_shape
        self.num_levels = config.num_levels
        self.hidden_channels = config.hidden_channels
        self.num_classes = config.num_classes
        self.dtype = DTYPES[config.dtype or "float32"]
        n, c = config.image_shape[2], config.hidden_channels
        pool = WeightPool()
        self.layers = nnx.List([GatedLayer(n if i == 0 else c, config, i == 0, pool)
                                for i in range(config.num_layers)])
        self.head = OutputHead(config, pool)
        pool.draw(rngs.params())

    # ------------------------------------------------------------------ checks
    def _check_images(self, images) -> None:
        if not jnp.issubdtype(images.dtype, jnp.integer):
            raise ValueError(f"images have dtype {images.dtype}: expected integer levels in "
                             f"[0, num_levels={self.num_levels})")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images have shape {tuple(images.shape)}: expected [batch, H, W, C] "
                             f"with (H, W, C) = {self.image_shape}")
        if not isinstance(images, jax.core.Tracer):  # concrete: check the values on the host
            values = np.asarray(images)
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= self.num_levels:
                raise ValueError(f"image values span [{lo}, {hi}]: expected integer levels in "
                                 f"[0, num_levels={self.num_levels})")

    def _check_labels(self, labels, batch: int) -> None:
        if self.num_classes is None:
            _check(labels is None, "class_labels given but this PixelCNN is unconditional "
                                   "(num_classes=None); set num_classes to condition on labels")
            return
        _check(labels is not None, f"this PixelCNN is class-conditional (num_classes="
                                   f"{self.num_classes}): pass class_labels [batch]")
        labels = jnp.asarray(labels)
        _check(jnp.issubdtype(labels.dtype, jnp.integer) and labels.shape == (batch,),
               f"class_labels have shape {labels.shape} and dtype {labels.dtype}: expected "
               f"integers of shape ({batch},)")
        if not isinstance(labels, jax.core.Tracer):
            values = np.asarray(labels)
            lo, hi = int(values.min()), int(values.max())
            _check(lo >= 0 and hi < self.num_classes,
                   f"class_labels span [{lo}, {hi}]: expected [0, num_classes={self.num_classes})")

    # ------------------------------------------------------------------ forward
    def scale(self, levels: jax.Array) -> jax.Array:
        """Integer levels -> floats in [-1, 1]."""
        scaled = levels.astype(jnp.float32) * (2.0 / (self.num_levels - 1)) - 1.0
        return scaled.astype(self.dtype)

    def __call__(self, images, *, rngs=None, training=False, class_labels=None, **_):
        images = jnp.asarray(images)
        self._check_images(images)
        self._check_labels(class_labels, images.shape[0])
        if training and self.config.dropout_rate > 0 and rngs is None:
            raise ValueError("training with dropout_rate > 0 needs rngs (a 'dropout' stream)")
        logits = self.logits_from_scaled(self.scale(images), class_labels=class_labels,
                                         training=training, rngs=rngs)
        return {"logits": logits}

    def logits_from_scaled(self, x, *, class_labels=None, training=False, rngs=None):
        """Logits [B, H, W, C, num_levels] from images already scaled to [-1, 1] (float; the
        form to differentiate when checking the receptive field)."""
        v, h = x, x
        forward = nnx.remat(_layer_forward, static_argnums=(5,)) if self.config.remat \
            else _layer_forward
        for layer in self.layers:
            v, h = forward(layer, v, h, class_labels, rngs, training)
        return self.head(h, training=training, rngs=rngs)

    def model_kwargs(self, batch):
        if self.num_classes is not None and "labels" in batch:
            return {"class_labels": batch["labels"]}
        return {}

    def loss_fn(self, batch, outputs, *, rngs=None, **_):
        """Mean negative log-likelihood per sub-pixel, in nats ("nll_loss") and bits."""
        images = batch[self.data_key]
        logits = outputs["logits"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, images).mean()
        accuracy = (logits.argmax(-1) == images).mean()
        return {"loss": nll, "nll_loss": nll, "bits_per_dim": nll / math.log(2.0),
                "accuracy": accuracy}

    # --------------------------------------------------------------- generation
    def generate(self, n_samples: int = 16, temperature=1.0, top_k=None, top_p=None,
                 rngs: nnx.Rngs | None = None, class_labels=None) -> jax.Array:
        """Sample int32 images [n_samples, H, W, C] with the cached fast sampler.

        A class-conditional model without `class_labels` draws classes 0, 1, 2, ... in turn
        (a sample grid then shows every class). temperature 0 is greedy.
        """
        return self._sample(n_samples, temperature, top_k, top_p, rngs, class_labels, None, None,
                            naive=False)

    def generate_naive(self, n_samples: int = 16, temperature=1.0, top_k=None, top_p=None,
                       rngs: nnx.Rngs | None = None, class_labels=None, conditioning=None,
                       mask=None) -> jax.Array:
        """Reference sampler: one full forward pass per sub-pixel (H*W*C passes). Same draws as
        `generate` / `inpaint` for the same key."""
        return self._sample(n_samples, temperature, top_k, top_p, rngs, class_labels,
                            conditioning, mask, naive=True)

    def generate_conditional(self, class_label: int, n_samples: int = 16, temperature=1.0,
                             rngs: nnx.Rngs | None = None, top_k=None, top_p=None) -> jax.Array:
        """Sample `n_samples` images of class `class_label`."""
        _check(self.num_classes is not None,
               "generate_conditional needs a class-conditional PixelCNN (set num_classes)")
        _check(isinstance(class_label, (int, np.integer)) and 0 <= class_label < self.num_classes,
               f"class_label={class_label!r}: expected an int in [0, {self.num_classes})")
        labels = jnp.full((n_samples,), class_label, jnp.int32)
        return self.generate(n_samples, temperature, top_k, top_p, rngs, labels)

    def inpaint(self, conditioning, mask, n_samples: int = 4, temperature=1.0,
                rngs: nnx.Rngs | None = None, top_k=None, top_p=None,
                class_labels=None) -> jax.Array:
        """Fill the pixels where `mask` [H, W] is 0; pixels where it is 1 are copied from
        `conditioning` [H, W, C] (int levels) exactly. Each generated pixel is conditioned on
        every pixel before it in raster order (kept or drawn), not on kept pixels after it."""
        return self._sample(n_samples, temperature, top_k, top_p, rngs, class_labels,
                            conditioning, mask, naive=False)

    def _sample(self, n_samples, temperature, top_k, top_p, rngs, labels, conditioning, mask,
                *, naive: bool) -> jax.Array:
        sampler, args = self._sampling_inputs(n_samples, temperature, top_k, top_p, rngs, labels,
                                              conditioning, mask, naive=naive)
        return sampler(self, *args)

    def _sampling_inputs(self, n_samples, temperature, top_k, top_p, rngs, labels, conditioning,
                         mask, *, naive: bool):
        """Checks the arguments; returns the compiled sampler and its arguments after the model
        (the benchmark compiles ahead of time with `sampler.lower(model, *args).compile()`)."""
        _check(isinstance(n_samples, (int, np.integer)) and n_samples >= 1,
               f"n_samples={n_samples!r}: expected an int >= 1")
        _check(temperature is None or float(temperature) >= 0,
               f"temperature={temperature}: expected >= 0 (0 = greedy)")
        _check(top_k is None or int(top_k) >= 0, f"top_k={top_k}: expected None or >= 0")
        _check(top_p is None or 0 < float(top_p) <= 1, f"top_p={top_p}: expected in (0, 1]")
        shape = self.image_shape
        if (conditioning is None) != (mask is None):
            raise ValueError("inpainting needs both conditioning [H, W, C] and mask [H, W]")
        if conditioning is None:
            canvas = jnp.zeros((n_samples, *shape), jnp.int32)
            keep = jnp.zeros(shape[:2], bool)
        else:
            conditioning, mask = np.asarray(conditioning), np.asarray(mask)
            self._check_images(conditioning[None])
            _check(mask.shape == shape[:2], f"mask has shape {mask.shape}: expected (H, W) = "
                                            f"{shape[:2]}")
            _check(bool(np.all((mask == 0) | (mask == 1))), "mask values must be 0 or 1")
            canvas = jnp.asarray(np.broadcast_to(conditioning.astype(np.int32),
                                                 (n_samples, *shape)))
            keep = jnp.asarray(mask.astype(bool))
        if self.num_classes is not None and labels is None:
            labels = jnp.arange(n_samples, dtype=jnp.int32) % self.num_classes
        self._check_labels(labels, n_samples)
        labels = None if labels is None else jnp.asarray(labels, jnp.int32)
        keys = jax.random.split(_draw_key(rngs), math.prod(shape)).reshape(shape)
        # With both filters off, top_k / top_p stay None (static) so XLA drops their sorts: on
        # CPU the argsorts of top-k / top-p cost more than the network at each step. With either
        # on, both are traced: changing top_k from 40 to 50 does not recompile.
        filtered = (top_k is not None and int(top_k) > 0) or (top_p is not None
                                                              and float(top_p) < 1)
        knobs = (jnp.float32(1.0 if temperature is None else temperature),
                 jnp.int32(top_k or 0) if filtered else None,
                 jnp.float32(1.0 if top_p is None else top_p) if filtered else None)
        return (_sample_naive if naive else _sample_cached), (keys, canvas, keep, labels, *knobs)


def _layer_forward(layer: GatedLayer, v, h, class_labels, rngs, training):
    """One gated layer over whole images: (vertical stack, horizontal stack) -> next pair."""
    p = layer.p
    v_kernel, h_kernel = layer.masked_kernels()
    cond_v, cond_h = layer.conditioning(class_labels)
    v_pre = layer.vertical(v_kernel, v, ((p, 0), (p, p)), cond_v)
    h_conv = conv2d(h.astype(layer.dtype), h_kernel[None], ((0, 0), (p, 0)))
    h = layer.horizontal(h_conv, layer.v_to_h(v_pre, cond_h), h, training=training, rngs=rngs)
    return _gate(v_pre), h


def _draw_key(rngs) -> jax.Array:
    if rngs is None:
        return jax.random.key(0)
    if isinstance(rngs, nnx.Rngs):
        return rngs.sample() if "sample" in rngs else rngs()
    return rngs  # a raw key


@nnx.jit
def _sample_naive(model: PixelCNN, keys, canvas, keep, labels, temperature, top_k, top_p):
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
def _sample_cached(model: PixelCNN, keys, canvas, keep, labels, temperature, top_k, top_p):
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
