"""The decoder-only Transformer language model (GPT-style, pre-LN): forward pass, loss and
the generation API (the compiled loops it runs are in `decode.py`)."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from chainrule.models.base import DTYPES, AutoregressiveModel, logical
from chainrule.models.transformer import decode
from chainrule.models.transformer.config import TransformerConfig
from chainrule.models.transformer.decode import (
    Knobs,
    _bucket,
    _decode_cached,
    _decode_windowed,
    _draw_key,
)
from chainrule.models.transformer.layers import (
    Block,
    _dense,
    _remat_block,
    sinusoidal_embedding,
)


class TransformerAutoregressiveModel(AutoregressiveModel):
    """GPT-style decoder; the guide's `TransformerAutoregressiveModel(config, rngs=rngs)`."""

    data_key = "sequences"

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        if config.vocab_size is None:
            raise ValueError("TransformerConfig.vocab_size is None: set it, or let the data's "
                             "tokenizer set it (train.py does this)")
        self.config = config
        net, d = config.network, config.network.embed_dim
        dtype = DTYPES[config.dtype or "float32"]
        self.embed_dim = d
        self.token_embed = nnx.Embed(
            config.vocab_size, d, dtype=dtype, rngs=rngs,
            embedding_init=logical(nnx.initializers.normal(0.02), "vocab", "embed"))
        self.pos_embed = (nnx.Embed(config.sequence_length, d, dtype=dtype, rngs=rngs,
                                    embedding_init=nnx.initializers.normal(0.02))
                          if net.positional_encoding == "learned" else None)
        self.embed_dropout = nnx.Dropout(config.effective_dropout)
        self.blocks = nnx.List([Block(net, config.num_layers, config.effective_dropout, dtype,
                                      config.prefix_length, rngs=rngs, lora=config.lora)
                                for _ in range(config.num_layers)])
        self.ln_f = nnx.LayerNorm(d, epsilon=net.layer_norm_epsilon, use_bias=net.use_bias, dtype=dtype,
                                 rngs=rngs)
        self.lm_head = (None if config.tie_weights else
                        _dense(rngs, d, config.vocab_size, ("embed", "vocab"), dtype=dtype,
                               use_bias=False))
        self._keep_dropout_stream(rngs)

    # ------------------------------------------------------------------ forward
    def __call__(self, tokens, *, rngs=None, training=False, positions=None, cache=None,
                 cache_index=None, valid_from=None, **_):
        """Logits for every position. With `cache` (from `init_cache`) and `cache_index`, the
        chunk `tokens` sits at slots cache_index.. and the updated cache is returned too.
        `positions` [B, T] default to the slots; `valid_from` [B] masks left padding."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        self._check_tokens(tokens)
        b, t = tokens.shape
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
        deterministic = not training
        rngs = self._training_rngs(rngs, training)
        x = self.token_embed(tokens)
        kind = self.config.network.positional_encoding
        if kind == "learned":
            x = x + self.pos_embed(positions)
        elif kind == "sinusoidal":
            x = x + sinusoidal_embedding(positions, self.embed_dim).astype(x.dtype)
        x = self.embed_dropout(x, deterministic=deterministic, rngs=rngs)
        new_cache = []
        for i, block in enumerate(self.blocks):
            if self.config.remat and cache is None:
                x = _remat_block(block, x, positions, valid_from, rngs, deterministic)
                continue
            kv = None if cache is None else cache[i]
            x, kv = block(x, positions, deterministic=deterministic, rngs=rngs, kv_cache=kv,
                          cache_index=cache_index, valid_from=valid_from)
            new_cache.append(kv)
        x = self.ln_f(x)
        logits = self.token_embed.attend(x) if self.lm_head is None else self.lm_head(x)
        outputs = {"logits": logits.astype(jnp.float32)}
        if cache is not None:
            outputs["cache"] = new_cache
        return outputs

    def _check_tokens(self, tokens) -> None:
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got dtype {tokens.dtype}")
        if isinstance(tokens, jax.core.Tracer):
            return
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = hi if hi >= self.config.vocab_size else lo
            raise ValueError(f"token id {bad} is out of range: expected ids in "
                             f"[0, vocab_size={self.config.vocab_size})")

    def model_inputs(self, batch):
        # The last token is only ever a target: dropping it saves one position of compute.
        return batch[self.data_key][:, :-1]

    def loss_fn(self, batch, outputs, *, rngs=None, **_):
        """Next-token cross-entropy: logits at t against sequences at t + 1, padding left out."""
        sequences = batch[self.data_key]
        length = sequences.shape[1]
        logits = outputs["logits"][:, : length - 1]
        targets = sequences[:, 1:]
        weights = jnp.ones(targets.shape, jnp.float32)
        if "loss_mask" in batch:
            weights = weights * batch["loss_mask"][:, 1:].astype(jnp.float32)
        if self.config.pad_token_id is not None:
            weights = weights * (targets != self.config.pad_token_id)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        count = jnp.maximum(weights.sum(), 1.0)
        nll_loss = (nll * weights).sum() / count
        accuracy = ((logits.argmax(-1) == targets) * weights).sum() / count
        return {"loss": nll_loss, "nll_loss": nll_loss, "perplexity": jnp.exp(nll_loss),
                "accuracy": accuracy, "bits_per_token": nll_loss / math.log(2.0),
                "num_scored": weights.sum()}

    # --------------------------------------------------------------- generation
    def init_cache(self, batch_size: int, max_length: int):
        """Zeroed key/value cache, one (keys [B*H, D, S], values [B*H, S, D]) pair per layer:
        heads folded into the batch, keys transposed (see `CausalSelfAttention`)."""
        return decode.init_cache(self.config, batch_size, max_length)

    def reorder_cache(self, cache, index: jax.Array):
        """The cache of the sequences `index` [B'] (beam search follows its parents)."""
        return decode.reorder_cache(self.config, cache, index)

    def generate(self, n_samples: int = 1, max_length: int | None = None, temperature=1.0,
                 top_k=None, top_p=None, rngs: nnx.Rngs | None = None, *, prompt=None,
                 max_new_tokens: int | None = None, min_new_tokens: int = 0,
                 eos_id: int | None = None, stop_tokens=(), repetition_penalty=1.0,
                 use_cache: bool | None = None, conditioning=None) -> jax.Array:
        """Sample sequences; returns int32 [n, length] with each prompt at the start of its row.

        prompt: None (each sample starts with `config.bos_token_id`), [P] (shared by all
        samples), [n, P], or a list of n sequences of different lengths (ragged; rows come back
        with their prompt first and padding, `pad_token_id` or 0, at the end).
        length: `max_length` tokens in all (prompt included; default the model's context) or
        the longest prompt + `max_new_tokens`. A sample stops at `eos_id` (default
        `config.eos_token_id`) or any of `stop_tokens`, which it keeps; padding follows.
        `min_new_tokens` forbids stopping earlier. temperature 0 is greedy; top_k, top_p and
        `repetition_penalty` filter as in `chainrule.sampling`.

        `conditioning` is another name for `prompt` (the guide's speculative sketch uses it).

        One compiled loop: the prompts are prefilled in one pass, then one token per step
        against the key/value cache (`use_cache`, default `config.use_cache`) or, as the slow
        reference, a full pass over the last `sequence_length` tokens. Knobs are traced (only
        turning top-k/top-p on or off selects another compiled loop) and lengths bucketed to
        powers of two, so new settings rarely recompile.
        """
        if conditioning is not None:
            if prompt is not None:
                raise ValueError("pass prompt or conditioning (the same thing), not both")
            prompt = conditioning
        prompts, lengths = self._prompt_batch(prompt, n_samples)
        n, width = prompts.shape
        if max_new_tokens is not None:
            total = width + int(max_new_tokens)
        else:
            total = self.config.sequence_length if max_length is None else int(max_length)
        if not width <= total:
            raise ValueError(f"the prompt ({width} tokens) is longer than max_length={total}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        # The cache holds at most `sequence_length` slots; longer samples slide a window of
        # full forward passes, tens of times slower: say so rather than slow down silently.
        if use_cache and total > self.config.sequence_length:
            warnings.warn(f"generating {total} tokens with a context of "
                          f"{self.config.sequence_length}: past the context the key/value cache "
                          "cannot be used, so every token is a full forward pass over a sliding "
                          f"window (max_length <= {self.config.sequence_length} stays cached)",
                          stacklevel=2)
            use_cache = False
        size = _bucket(total)
        if use_cache:
            size = min(size, self.config.sequence_length)
        offsets = width - lengths  # left padding per row
        buffer = np.zeros((n, size), np.int32)
        for i in range(n):
            buffer[i, offsets[i]:width] = prompts[i, :lengths[i]]
        eos_id = self.config.eos_token_id if eos_id is None else eos_id
        stops = sorted({int(s) for s in stop_tokens} | ({int(eos_id)} if eos_id is not None
                                                        else set()))
        stop_ids = np.full((8 * (len(stops) // 8 + 1),), -1, np.int32)  # bucketed, -1 unused
        stop_ids[:len(stops)] = stops
        pad = 0 if self.config.pad_token_id is None else self.config.pad_token_id
        # Host (numpy) values go to the compiled loop with the call: no dispatch per value.
        knobs = Knobs(np.float32(temperature), np.int32(top_k or 0),
                      np.float32(1.0 if top_p is None else top_p),
                      np.float32(repetition_penalty), np.int32(min_new_tokens), stop_ids,
                      np.int32(pad))
        decode = _decode_cached if use_cache else _decode_windowed
        # Whether top-k/top-p are on is compiled in (the sort stays out of a loop that never
        # filters); their values are traced, so changing them does not recompile.
        filters = bool((top_k or 0) > 0) or bool(top_p is not None and top_p < 1.0)
        # A 1-token prompt needs no prefill pass: the loop's first step reads it (and a program
        # without the prefill's copy of the model compiles ~30% faster: the first sample). The
        # windowed decoder has no prefill: 0 keeps one compiled program for every prompt.
        prefill = 0 if width == 1 or not use_cache else min(_bucket(width, 8), size)
        out = decode(self, buffer, offsets.astype(np.int32), np.int32(width), np.int32(total),
                     _draw_key(rngs), knobs, prefill, filters)
        out = np.asarray(out[:, :total])
        if offsets.any():  # ragged prompts: shift each row so its prompt comes first
            out = np.stack([np.concatenate([row[o:], np.full(o, pad, np.int32)])
                            for row, o in zip(out, offsets, strict=True)])
        return jnp.asarray(out)

    def _prompt_batch(self, prompt, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """Prompts as a right-padded [n, P] array and their lengths, validated."""
        if prompt is None:
            prompt = [self.config.bos_token_id]
        if isinstance(prompt, list | tuple) and prompt and np.ndim(prompt[0]) == 1:
            rows = [np.asarray(p, np.int32) for p in prompt]  # ragged
        else:
            arr = np.asarray(prompt)
            if arr.ndim == 1:
                arr = np.broadcast_to(arr, (n_samples, arr.shape[0]))
            if arr.ndim != 2:
                raise ValueError(f"prompt must be [P], [n, P] or a list of sequences, got shape "
                                 f"{arr.shape}")
            rows = list(arr)
        lengths = np.array([len(r) for r in rows], np.int32)
        if lengths.min() < 1:
            raise ValueError("every prompt needs at least one token")
        batch = np.zeros((len(rows), lengths.max()), np.int32)
        for i, r in enumerate(rows):
            if not np.issubdtype(np.asarray(r).dtype, np.integer):
                raise ValueError(f"prompt token ids must be integers, got {np.asarray(r).dtype}")
            batch[i, :len(r)] = r
        self._check_tokens(batch)
        return batch, lengths

    def generate_with_cache(self, n_samples: int = 1, max_length: int | None = None,
                            temperature=1.0, top_k=None, top_p=None, prompt=None,
                            rngs: nnx.Rngs | None = None, **kwargs) -> jax.Array:
        """The guide's cached generation: `generate(..., use_cache=True)`."""
        return self.generate(n_samples, max_length, temperature, top_k, top_p, rngs,
                             prompt=prompt, use_cache=True, **kwargs)

    def sample_with_conditioning(self, conditioning, n_samples: int = 1, temperature=1.0,
                                 top_k=None, top_p=None, rngs: nnx.Rngs | None = None,
                                 max_length: int | None = None, **kwargs) -> jax.Array:
        """Continue the prompt `conditioning`: [P] or [1, P] gives n_samples completions of it;
        [B, P] or a list of B prompts gives one completion each."""
        if not isinstance(conditioning, list | tuple):
            conditioning = np.asarray(conditioning, np.int32)
            if conditioning.ndim == 2 and conditioning.shape[0] == 1:
                conditioning = conditioning[0]
            elif conditioning.ndim == 2:
                n_samples = conditioning.shape[0]
        else:
            n_samples = len(conditioning)
        return self.generate(n_samples, max_length, temperature, top_k, top_p, rngs,
                             prompt=conditioning, **kwargs)

    def beam_search(self, prompt=None, beam_size: int = 4, max_length: int | None = None,
                    length_penalty: float = 0.0, eos_id: int | None = None,
                    rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
        """(sequences [n, max_length], length-normalised scores [n]), best first, with
        n = min(beam_size, the hypotheses that exist); see `chainrule.sampling.beam.beam_search`
        (rngs is accepted for the guide's API: beam search draws nothing)."""
        from chainrule.sampling.beam import beam_search

        return beam_search(self, prompt, beam_size=beam_size, max_length=max_length,
                           length_penalty=length_penalty, eos_id=eos_id)
