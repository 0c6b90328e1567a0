"""WaveNet (van den Oord et al. 2016): stacks of causal dilated convolutions over μ-law codes.

    logits = model(waveform)["logits"]     # [B, T, vocab]; logits[:, t] predicts waveform[:, t + 1]
    losses = model.loss_fn({"waveform": waveform}, outputs)
    codes  = model.generate(n_samples=1, max_length=16000, temperature=0.9, rngs=rngs)

Each residual layer: a causal convolution of width `kernel_size` and dilation d, a gated unit
tanh(f) * sigmoid(g) (plus a per-layer embedding of the class id when `num_classes` is set),
then a 1x1 projection split into a residual update and a skip output. The head is
ReLU -> 1x1 -> ReLU -> 1x1 over the sum of the skips. Dilations run
dilation_base**0 .. dilation_base**(layers_per_block - 1) in each of the `num_blocks` blocks.

Receptive field: 1 + (kernel_size - 1) * sum of all dilations. One block of 1, 2, ..., 512
sees 1024 samples (the guide's figure), but three such blocks see 1 + 3 * 1023 = 3070.

Generation (Fast WaveNet, Paine et al. 2016): each layer keeps a queue (a ring buffer) of its
last (kernel_size - 1) * d inputs, so a new sample costs one step of every layer, not a
forward pass over the receptive field. It runs as one compiled loop over an output buffer
whose length is bucketed to a power of two (a new `max_length` rarely recompiles).
`generate_naive` recomputes the full causal forward over the sequence per sample: the slow
reference the fast path is tested against (same keys, identical codes).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from chainrule.config import check
from chainrule.models.base import DTYPES, AutoregressiveModel, ModelConfig, logical
from chainrule.sampling import sample_token

_OLD_DEFAULTS = {"num_layers": 30, "num_stacks": 3}  # the older keyword API's defaults




def _positive_int(value, name: str) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        value = None
    check(value is not None and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclasses.dataclass
class WaveNetConfig(ModelConfig):
    """A WaveNet. `num_layers` (total) / `num_stacks` are the older API's names: when given
    they set layers_per_block = num_layers // num_stacks and num_blocks = num_stacks, and are
    then cleared (so `dataclasses.replace` on the result stays consistent)."""

    name: str = "wavenet"
    vocab_size: int | None = 256  # μ-law levels (mu + 1); None: the data decides
    sequence_length: int = 16000  # default generation length
    residual_channels: int = 128
    skip_channels: int = 512
    num_blocks: int = 3
    layers_per_block: int = 10
    kernel_size: int = 2
    dilation_base: int = 2
    use_gated_activation: bool = True
    dilation_channels: int | None = None  # None: residual_channels
    num_classes: int | None = None  # global conditioning (speaker / class id)
    dropout_rate: float = 0.0
    dtype: str | None = None  # compute dtype (None: float32, or hardware.compute_dtype)
    remat: bool = False  # recompute each residual layer's activations in the backward pass
    num_layers: int | None = None  # older API: total layers
    num_stacks: int | None = None  # older API: number of blocks

    def width(self) -> int:
        return self.residual_channels

    def __post_init__(self) -> None:
        if self.num_layers is not None or self.num_stacks is not None:
            layers = _OLD_DEFAULTS["num_layers"] if self.num_layers is None else self.num_layers
            stacks = _OLD_DEFAULTS["num_stacks"] if self.num_stacks is None else self.num_stacks
            check(stacks > 0, f"num_stacks must be > 0, got {stacks}")
            check(layers > 0 and layers % stacks == 0,
                   f"num_layers={layers} must be a positive multiple of num_stacks={stacks} "
                   "(every stack has num_layers // num_stacks layers)")
            self.num_blocks, self.layers_per_block = stacks, layers // stacks
            self.num_layers = self.num_stacks = None
        check(self.vocab_size is None
               or (isinstance(self.vocab_size, int) and self.vocab_size >= 2),
               f"vocab_size must be None (taken from the data) or an integer >= 2, "
               f"got {self.vocab_size!r}")
        for field in ("sequence_length", "residual_channels", "skip_channels",
                      "num_blocks", "layers_per_block", "dilation_base"):
            value = getattr(self, field)
            check(isinstance(value, int) and value >= 1,
                   f"{field} must be an integer >= 1, got {value!r}")
        check(self.kernel_size >= 2, f"kernel_size must be >= 2 (a causal convolution needs a "
               f"past tap), got {self.kernel_size}")
        check(self.dilation_channels is None or self.dilation_channels >= 1,
               f"dilation_channels must be None or >= 1, got {self.dilation_channels}")
        check(self.num_classes is None or self.num_classes >= 1,
               f"num_classes must be None or >= 1, got {self.num_classes}")
        check(0.0 <= self.dropout_rate < 1.0,
               f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        check(self.dtype is None or self.dtype in DTYPES,
               f"dtype={self.dtype!r}; expected one of {sorted(DTYPES)} (or null)")

    @property
    def dilations(self) -> tuple[int, ...]:
        block = tuple(self.dilation_base**i for i in range(self.layers_per_block))
        return block * self.num_blocks

    @property
    def receptive_field(self) -> int:
        """Samples that logits[t] sees: inputs t - receptive_field + 1 .. t."""
        return 1 + (self.kernel_size - 1) * sum(self.dilations)


def _linear(d_in: int, d_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A 1x1 convolution: input channels "embed", output channels "channels" (axis rules)."""
    init = logical(nnx.initializers.lecun_normal(), "embed", "channels")
    return nnx.Linear(d_in, d_out, kernel_init=init, dtype=dtype, rngs=rngs)


class ResidualLayer(nnx.Module):
    """Causal dilated conv -> gated unit -> 1x1 to (residual update, skip output)."""

    def __init__(self, config: WaveNetConfig, dilation: int, *, rngs: nnx.Rngs):
        channels = config.residual_channels
        hidden = config.dilation_channels or channels
        gate = 2 * hidden if config.use_gated_activation else hidden
        self.dilation, self.kernel_size, self.channels = dilation, config.kernel_size, channels
        self.gated = config.use_gated_activation
        dtype = DTYPES[config.dtype or "float32"]
        # Taps are concatenated oldest first, so the kernel is [kernel_size * channels, gate].
        self.conv = _linear(config.kernel_size * channels, gate, dtype, rngs)
        self.condition = (nnx.Embed(config.num_classes, gate, dtype=dtype, rngs=rngs)
                          if config.num_classes else None)
        # One matmul for both outputs: the residual update and the skip connection.
        self.out = _linear(hidden, channels + config.skip_channels, dtype, rngs)
        self.dropout = nnx.Dropout(config.dropout_rate)

    @property
    def queue_length(self) -> int:
        """Past inputs this layer needs in generation: (kernel_size - 1) * dilation."""
        return (self.kernel_size - 1) * self.dilation

    def activate(self, taps, condition_bias, *, training=False, rngs=None):
        """taps [..., kernel_size * C] -> (residual update [..., C], skip [..., skip])."""
        h = self.conv(taps)
        if condition_bias is not None:
            h = h + condition_bias
        if self.gated:
            f, g = jnp.split(h, 2, axis=-1)
            z = jnp.tanh(f) * jax.nn.sigmoid(g)
        else:
            z = jax.nn.relu(h)
        z = self.dropout(z, deterministic=not training, rngs=rngs)
        out = self.out(z)
        return out[..., : self.channels], out[..., self.channels:]

    def __call__(self, x, condition_bias, *, training=False, rngs=None):
        """x [B, T, C] -> (x + residual update, skip [B, T, skip])."""
        length, d = x.shape[1], self.dilation
        padded = jnp.pad(x, ((0, 0), (self.queue_length, 0), (0, 0)))  # zeros before t = 0
        taps = jnp.concatenate([padded[:, j * d: j * d + length]
                                for j in range(self.kernel_size)], axis=-1)
        bias = None if condition_bias is None else condition_bias[:, None, :]
        residual, skip = self.activate(taps, bias, training=training, rngs=rngs)
        return x + residual, skip


class WaveNet(AutoregressiveModel):
    """`WaveNet(config, rngs=rngs)`, or the older `WaveNet(num_layers=30, num_stacks=3,
    residual_channels=128, dilation_channels=256, skip_channels=512, rngs=rngs)`."""

    data_key = "waveform"

    def __init__(self, config: WaveNetConfig | None = None, *, rngs: nnx.Rngs, **keywords):
        fields = {f.name for f in dataclasses.fields(WaveNetConfig)}
        unknown = sorted(set(keywords) - fields)
        check(not unknown, f"unknown WaveNet keyword(s) {unknown}; expected fields of "
               f"WaveNetConfig: {sorted(fields)}")
        config = (WaveNetConfig(**keywords) if config is None
                  else dataclasses.replace(config, **keywords))
        check(config.vocab_size is not None, "WaveNetConfig.vocab_size is None: set it (mu + 1, "
               "e.g. 256) or let the data pipeline fill it in")
        self.config = config
        dtype = DTYPES[config.dtype or "float32"]
        self.embed = nnx.Embed(
            config.vocab_size, config.residual_channels, dtype=dtype, rngs=rngs,
            embedding_init=logical(nnx.initializers.variance_scaling(1.0, "fan_in", "normal",
                                                                     out_axis=0),
                                   "vocab", "embed"))
        self.layers = nnx.List([ResidualLayer(config, d, rngs=rngs) for d in config.dilations])
        self.head_hidden = _linear(config.skip_channels, config.skip_channels, dtype, rngs)
        self.head_out = _linear(config.skip_channels, config.vocab_size, dtype, rngs)
        self._keep_dropout_stream(rngs)

    @property
    def receptive_field(self) -> int:
        return self.config.receptive_field

    # ------------------------------------------------------------------ checks
    def _check_codes(self, codes, what: str = "waveform") -> None:
        if not jnp.issubdtype(codes.dtype, jnp.integer):
            raise ValueError(f"{what} must hold integer μ-law codes in [0, "
                             f"{self.config.vocab_size}), got dtype {codes.dtype} (encode audio "
                             "with chainrule.data.audio.mu_law_encode)")
        if isinstance(codes, jax.core.Tracer) or codes.size == 0:
            return
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"{what} code {hi if hi >= self.config.vocab_size else lo} is out of "
                             f"range: expected codes in [0, vocab_size={self.config.vocab_size})")

    def _check_condition(self, labels, batch: int):
        classes = self.config.num_classes
        if classes is None:
            check(labels is None, "global_condition given, but this WaveNet has "
                   "num_classes=None (set num_classes to condition on a class id)")
            return None
        check(labels is not None, f"this WaveNet is class-conditioned (num_classes={classes}): "
               "pass global_condition=<int class ids [batch]>")
        labels = jnp.asarray(labels)
        if labels.ndim == 0:
            labels = jnp.broadcast_to(labels, (batch,))
        check(labels.shape == (batch,), f"global_condition has shape {labels.shape}; "
               f"expected ({batch},), one class id per sequence")
        check(jnp.issubdtype(labels.dtype, jnp.integer),
               f"global_condition must be integer class ids, got dtype {labels.dtype}")
        if not isinstance(labels, jax.core.Tracer):
            lo, hi = int(labels.min()), int(labels.max())
            check(lo >= 0 and hi < classes, f"global_condition id {hi if hi >= classes else lo} "
                   f"is out of range: expected ids in [0, num_classes={classes})")
        return labels

    def _condition_biases(self, labels):
        return [None if layer.condition is None or labels is None else layer.condition(labels)
                for layer in self.layers]

    # ----------------------------------------------------------------- forward
    def __call__(self, waveform, *, rngs=None, training=False, global_condition=None):
        waveform = jnp.asarray(waveform)
        check(waveform.ndim == 2, f"waveform must be [batch, time], got shape {waveform.shape}")
        self._check_codes(waveform)
        labels = self._check_condition(global_condition, waveform.shape[0])
        return {"logits": self.logits_from_embeddings(self.embed(waveform), labels,
                                                      training=training, rngs=rngs)}

    def logits_from_embeddings(self, h, labels=None, *, training=False, rngs=None):
        """The network after the input embedding: h [B, T, residual_channels] -> logits."""
        rngs = self._training_rngs(rngs, training)
        skips = 0.0
        run = (nnx.remat(_run_layer, static_argnums=(4,)) if self.config.remat
               else _run_layer)
        for layer, bias in zip(self.layers, self._condition_biases(labels), strict=True):
            h, skip = run(layer, h, bias, rngs, training)
            skips = skips + skip
        return self._head(skips)

    def _head(self, skips):
        logits = self.head_out(jax.nn.relu(self.head_hidden(jax.nn.relu(skips))))
        return logits.astype(jnp.float32)

    def model_inputs(self, batch):
        return batch[self.data_key][:, :-1]  # the last sample is only ever a target

    def model_kwargs(self, batch):
        if self.config.num_classes is not None and "labels" in batch:
            return {"global_condition": batch["labels"]}
        return {}

    def loss_fn(self, batch, outputs, *, rngs=None, **_):
        """Teacher forcing: logits at t against the waveform at t + 1."""
        waveform = batch[self.data_key]
        length = waveform.shape[1]
        logits = outputs["logits"]
        check(logits.shape[1] >= length - 1, f"logits cover {logits.shape[1]} steps but the "
               f"waveform has {length} samples; expected at least {length - 1}")
        logits = logits[:, : length - 1].astype(jnp.float32)
        targets = waveform[:, 1:length]
        weights = jnp.ones(targets.shape, jnp.float32)
        if "loss_mask" in batch:  # the silence padding a short clip is not scored
            weights = weights * batch["loss_mask"][:, 1:length].astype(jnp.float32)
        scored = weights.sum()
        nll = (optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights).sum()
        nll = nll / jnp.maximum(scored, 1.0)
        accuracy = ((logits.argmax(-1) == targets) * weights).sum() / jnp.maximum(scored, 1.0)
        return {"loss": nll, "nll_loss": nll, "accuracy": accuracy, "num_scored": scored,
                "perplexity": jnp.exp(nll), "bits_per_sample": nll / math.log(2.0)}

    # -------------------------------------------------------------- generation
    def init_queue(self, n: int) -> jax.Array:
        """Generation state: every layer's past inputs in one array [n, sum of queue lengths, C];
        layer l's input at time s sits at row offset_l + s mod queue_length_l."""
        return jnp.zeros((n, sum(layer.queue_length for layer in self.layers),
                          self.config.residual_channels), DTYPES[self.config.dtype or "float32"])

    def step(self, code, queue, t, condition_biases):
        """Logits for time t + 1 from the code at time t [n]; updates and returns the queue."""
        lengths = np.array([layer.queue_length for layer in self.layers])
        offsets = np.cumsum(lengths) - lengths
        taps = self.config.kernel_size - 1
        # Layer l's taps: its inputs at t - taps * d, ..., t - d (oldest first), then at t.
        back = np.array([[m * layer.dilation for m in range(taps, 0, -1)] for layer in self.layers])
        reads = offsets[:, None] + (t - back) % lengths[:, None]  # [layers, taps]
        writes = offsets + t % lengths
        # One gather for every layer's past taps and one scatter of every layer's input: the
        # scattered inputs depend on the gathered taps, so XLA updates the queue in place.
        past = queue[:, reads]  # [n, layers, taps, C]
        h, skips, inputs = self.embed(code), 0.0, []
        for i, (layer, bias) in enumerate(zip(self.layers, condition_biases, strict=True)):
            inputs.append(h)
            window = jnp.concatenate([past[:, i].reshape(h.shape[0], -1), h], axis=-1)
            residual, skip = layer.activate(window, bias)
            h, skips = h + residual, skips + skip
        queue = queue.at[:, writes].set(jnp.stack(inputs, axis=1), unique_indices=True)
        return self._head(skips), queue

    def _prepare(self, n_samples, max_length, prefix, global_condition, rngs, temperature,
                 top_k, top_p):
        n_samples = _positive_int(n_samples, "n_samples")
        max_length = _positive_int(self.config.sequence_length if max_length is None
                                   else max_length, "max_length")
        if prefix is None:  # start from one sample of silence (the middle μ-law code)
            prefix = jnp.full((1,), self.config.vocab_size // 2, jnp.int32)
        prefix = jnp.asarray(prefix)
        self._check_codes(prefix, "prefix")
        if prefix.ndim == 1:
            prefix = jnp.broadcast_to(prefix, (n_samples, prefix.shape[0]))
        check(prefix.ndim == 2 and prefix.shape[0] == n_samples and prefix.shape[1] >= 1,
               f"prefix has shape {prefix.shape}; expected [T0] or [n_samples={n_samples}, T0]"
               " with T0 >= 1")
        check(prefix.shape[1] <= max_length,
               f"prefix length {prefix.shape[1]} exceeds max_length={max_length}")
        if global_condition is None and self.config.num_classes is not None:
            global_condition = jnp.arange(n_samples) % self.config.num_classes  # cycle classes
        labels = self._check_condition(global_condition, n_samples)
        if not isinstance(temperature, jax.core.Tracer):
            check(float(temperature) >= 0, f"temperature must be >= 0, got {temperature}")
        if rngs is None:
            key = jax.random.key(0)
        elif isinstance(rngs, nnx.Rngs):
            key = rngs.sample() if "sample" in rngs else rngs()
        else:
            key = rngs  # a raw key
        knobs = (jnp.float32(temperature), None if top_k is None else jnp.int32(top_k),
                 None if top_p is None else jnp.float32(top_p))
        return n_samples, max_length, prefix.astype(jnp.int32), labels, key, knobs

    def generate(self, n_samples: int = 1, max_length: int | None = None, temperature=1.0,
                 top_k=None, top_p=None, rngs: nnx.Rngs | None = None, global_condition=None,
                 prefix=None, *, prompt=None) -> jax.Array:
        """Sample int32 codes [n_samples, max_length] (default: config.sequence_length).

        Each sample starts with `prefix` ([T0] shared, or [n_samples, T0]; `prompt` is another
        name for it) or, without one, with one sample of silence (code vocab_size // 2); the
        rest is drawn. Class-conditioned models take `global_condition` ids [n_samples]
        (default: classes 0, 1, 2, ... in turn). The code at time t + 1 is drawn with key
        fold_in(key, t), key taken from `rngs` (its "sample" stream if it has one).
        """
        check(prefix is None or prompt is None, "pass prefix or prompt, not both")
        n_samples, max_length, prefix, labels, key, knobs = self._prepare(
            n_samples, max_length, prompt if prefix is None else prefix, global_condition, rngs,
            temperature, top_k, top_p)
        size = max(256, 1 << (max_length - 1).bit_length())  # bucketed: few compiles
        codes = jnp.zeros((n_samples, size), jnp.int32).at[:, : prefix.shape[1]].set(prefix)
        out = _generate_fast(self, codes, jnp.int32(prefix.shape[1]), jnp.int32(max_length),
                             key, labels, *knobs)
        return out[:, :max_length]

    def generate_naive(self, n_samples: int = 1, max_length: int | None = None,
                       temperature=1.0, top_k=None, top_p=None, rngs: nnx.Rngs | None = None,
                       global_condition=None, prefix=None) -> jax.Array:
        """`generate`, the slow obvious way: a full causal forward pass per sample."""
        n_samples, max_length, prefix, labels, key, knobs = self._prepare(
            n_samples, max_length, prefix, global_condition, rngs, temperature, top_k, top_p)
        codes = jnp.zeros((n_samples, max_length), jnp.int32).at[:, : prefix.shape[1]].set(prefix)
        return _generate_naive(self, codes, jnp.int32(prefix.shape[1]), key, labels, *knobs)


def _run_layer(layer: ResidualLayer, h, bias, rngs, training):
    return layer(h, bias, training=training, rngs=rngs)


def _draw(t, logits, prefix, prefix_length, key, temperature, top_k, top_p):
    """The code at time t + 1: the prefix while it lasts, then a draw with key fold_in(key, t)."""
    drawn = sample_token(jax.random.fold_in(key, t), logits, temperature=temperature,
                         top_k=top_k, top_p=top_p)
    given = jax.lax.dynamic_index_in_dim(prefix, jnp.minimum(t + 1, prefix.shape[1] - 1), axis=1,
                                         keepdims=False)
    return jnp.where(t + 1 < prefix_length, given, drawn)


@nnx.jit
def _generate_fast(model, prefix, prefix_length, max_length, key, labels, temperature, top_k,
                   top_p):
    """prefix [n, size] (its first prefix_length codes are used) -> codes [n, size]."""
    biases = model._condition_biases(labels)

    def step(t, carry):
        code, queue, out = carry
        logits, queue = model.step(code, queue, t, biases)
        code = _draw(t, logits, prefix, prefix_length, key, temperature, top_k, top_p)
        # `out` is only written in the loop (never read), so XLA updates it in place.
        return code, queue, jax.lax.dynamic_update_index_in_dim(out, code, t + 1, axis=1)

    n = prefix.shape[0]
    init = (prefix[:, 0], model.init_queue(n), prefix)
    return jax.lax.fori_loop(0, max_length - 1, step, init)[2]


@nnx.jit
def _generate_naive(model, prefix, prefix_length, key, labels, temperature, top_k, top_p):
    def step(t, codes):
        # Codes after t are still zeros or prefix; causality keeps them out of logits[t].
        logits = model.logits_from_embeddings(model.embed(codes), labels)
        logits = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)
        code = _draw(t, logits, prefix, prefix_length, key, temperature, top_k, top_p)
        return jax.lax.dynamic_update_index_in_dim(codes, code, t + 1, axis=1)

    return jax.lax.fori_loop(0, prefix.shape[1] - 1, step, prefix)


__all__ = ["ResidualLayer", "WaveNet", "WaveNetConfig"]
