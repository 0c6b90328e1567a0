"""The gated PixelCNN model: checks, forward pass, loss and the sampling API (the compiled
samplers it runs are in `decode.py`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from chainrule.config import check
from chainrule.models.base import DTYPES, AutoregressiveModel
from chainrule.models.pixelcnn.config import PixelCNNConfig
from chainrule.models.pixelcnn.decode import _draw_key, _sample_cached, _sample_naive
from chainrule.models.pixelcnn.layers import GatedLayer, OutputHead, WeightPool, _layer_forward


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
        check(not unknown, f"unknown PixelCNN keyword(s) {unknown}; expected any of "
                            f"{sorted(fields)}")
        if keywords:  # the older keyword form of the guide
            config = dataclasses.replace(config, **keywords)
        check(config.image_shape is not None and config.num_levels is not None,
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
        self._keep_dropout_stream(rngs)

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
            check(labels is None, "class_labels given but this PixelCNN is unconditional "
                                   "(num_classes=None); set num_classes to condition on labels")
            return
        check(labels is not None, f"this PixelCNN is class-conditional (num_classes="
                                   f"{self.num_classes}): pass class_labels [batch]")
        labels = jnp.asarray(labels)
        check(jnp.issubdtype(labels.dtype, jnp.integer) and labels.shape == (batch,),
               f"class_labels have shape {labels.shape} and dtype {labels.dtype}: expected "
               f"integers of shape ({batch},)")
        if not isinstance(labels, jax.core.Tracer):
            values = np.asarray(labels)
            lo, hi = int(values.min()), int(values.max())
            check(lo >= 0 and hi < self.num_classes,
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
        rngs = self._training_rngs(rngs, training)
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
        """Mean negative log-likelihood per sub-pixel, in nats ("nll_loss") and bits.

        A per-image "loss_mask" [B] (0 = not scored: the blank images that fill an evaluation
        batch) leaves images out; "num_scored" counts the sub-pixels scored."""
        images = batch[self.data_key]
        logits = outputs["logits"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, images)
        correct = logits.argmax(-1) == images
        if "loss_mask" not in batch:
            return {"loss": nll.mean(), "nll_loss": nll.mean(),
                    "bits_per_dim": nll.mean() / math.log(2.0), "accuracy": correct.mean(),
                    "num_scored": jnp.asarray(nll.size, jnp.float32)}
        weights = jnp.broadcast_to(batch["loss_mask"].astype(jnp.float32)[:, None, None, None],
                                   nll.shape)
        scored = weights.sum()
        mean = (nll * weights).sum() / jnp.maximum(scored, 1.0)
        return {"loss": mean, "nll_loss": mean, "bits_per_dim": mean / math.log(2.0),
                "accuracy": (correct * weights).sum() / jnp.maximum(scored, 1.0),
                "num_scored": scored}

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
        check(self.num_classes is not None,
               "generate_conditional needs a class-conditional PixelCNN (set num_classes)")
        check(isinstance(class_label, (int, np.integer)) and 0 <= class_label < self.num_classes,
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
        check(isinstance(n_samples, (int, np.integer)) and n_samples >= 1,
               f"n_samples={n_samples!r}: expected an int >= 1")
        check(temperature is None or float(temperature) >= 0,
               f"temperature={temperature}: expected >= 0 (0 = greedy)")
        check(top_k is None or int(top_k) >= 0, f"top_k={top_k}: expected None or >= 0")
        check(top_p is None or 0 < float(top_p) <= 1, f"top_p={top_p}: expected in (0, 1]")
        shape = self.image_shape
        if (conditioning is None) != (mask is None):
            raise ValueError("inpainting needs both conditioning [H, W, C] and mask [H, W]")
        if conditioning is None:
            canvas = jnp.zeros((n_samples, *shape), jnp.int32)
            keep = jnp.zeros(shape[:2], bool)
        else:
            conditioning, mask = np.asarray(conditioning), np.asarray(mask)
            self._check_images(conditioning[None])
            check(mask.shape == shape[:2], f"mask has shape {mask.shape}: expected (H, W) = "
                                            f"{shape[:2]}")
            check(bool(np.all((mask == 0) | (mask == 1))), "mask values must be 0 or 1")
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
