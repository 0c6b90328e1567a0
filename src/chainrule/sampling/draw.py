"""One entry point from a `SamplerConfig` to samples, for any model family and strategy.

Used by the training loop's previews and by sample.py. Token-by-token strategies call the
model's `generate` (or `inpaint`) with only the keywords its signature names, so the families
differ here by keyword names, not by type:

  prompts      sequences every sample continues: `prompt=` (token ids for a Transformer,
               μ-law codes for a WaveNet); each prompt gets `num_samples` samples
  class_label  one class for every sample of a class-conditional model: `class_labels=`
               (PixelCNN) or `global_condition=` (WaveNet)
  inpaint      (levels [H, W, C], mask [H, W] with 1 = keep): the model's `inpaint` (PixelCNN)

A sampler knob the model does not take fails when it is set away from its default
(sampler.stop_tokens for a WaveNet); length knobs do not apply to fixed-size samples (an image
is always the model's image_shape). `beam` and `speculative` need a token model (with
`beam_search` and a key/value cache). Every check runs before anything is generated.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import numpy as np
from flax import nnx

CLASS_KEYWORDS = ("class_labels", "global_condition")
# Sampler fields passed under their own names where `generate` takes them, with the value
# that means "off": anything else on a model that does not take them is an error.
TOKEN_KNOBS = {"min_new_tokens": 0, "stop_tokens": (), "repetition_penalty": 1.0}


def draw(model, sampler, *, key: jax.Array, prompts: list[np.ndarray] | None = None,
         draft=None, class_label: int | None = None,
         inpaint: tuple[np.ndarray, np.ndarray] | None = None,
         ) -> tuple[list[np.ndarray], list[str]]:
    """(samples, notes): one array per sample and a short note each (score, acceptance)."""
    name = type(model).__name__
    if inpaint is not None and not hasattr(model, "inpaint"):
        raise ValueError(f"inpainting (image= and mask=) needs an image model with `inpaint` "
                         f"(PixelCNN); this model is a {name}")
    fn = model.generate if inpaint is None else model.inpaint
    takes = set(inspect.signature(fn).parameters)
    if class_label is not None:
        _check_class_label(model, class_label, takes)
    if sampler.name in ("beam", "speculative"):
        if not hasattr(model, "beam_search"):
            raise ValueError(f"sampler={sampler.name} is for token models (Transformer); this "
                             f"model is a {name}")
        if sampler.name == "beam":
            return _beam(model, sampler, prompts)
        return _speculative(model, draft, sampler, prompts, key)
    if prompts is not None and "prompt" not in takes:
        raise ValueError(f"a {name} continues no prompt: prompts are for sequence models "
                         f"(Transformer, WaveNet)")
    kwargs: dict[str, Any] = {**sampler.kwargs(), **_token_knobs(sampler, takes, fn)}
    n = sampler.num_samples
    if prompts is not None:  # every prompt n times, one (ragged) batch
        kwargs["prompt"] = [p for p in prompts for _ in range(n)]
        n = len(prompts) * n
    kwargs.update(_length(sampler, takes, prompts))
    if class_label is not None:
        keyword = next(k for k in CLASS_KEYWORDS if k in takes)
        kwargs[keyword] = np.full(n, class_label, np.int32)
    if inpaint is not None:
        kwargs["conditioning"], kwargs["mask"] = inpaint
    samples = np.asarray(fn(n_samples=n, rngs=nnx.Rngs(sample=key), **kwargs))
    return list(samples), [""] * len(samples)


def _token_knobs(sampler, takes: set[str], fn) -> dict[str, Any]:
    """The token-only knobs `fn` takes; one set away from its default for a model whose `fn`
    does not take it is refused."""
    knobs = {}
    for knob, off in TOKEN_KNOBS.items():
        value = getattr(sampler, knob)
        if knob in takes:
            knobs[knob] = value
        elif (tuple(value) if isinstance(value, list) else value) != off:
            owner = type(getattr(fn, "__self__", None)).__name__
            raise ValueError(f"sampler.{knob}={value} is for token models; {owner}."
                             f"{fn.__name__} does not take it (leave it at {off})")
    return knobs


def _check_class_label(model, class_label: int, takes: set[str]) -> None:
    name = type(model).__name__
    classes = getattr(getattr(model, "config", None), "num_classes", None)
    if classes is None or not takes & set(CLASS_KEYWORDS):
        raise ValueError(f"class_label={class_label}: this {name} is not class-conditional "
                         f"(trained with model.num_classes=null); leave class_label out")
    if not 0 <= class_label < classes:
        raise ValueError(f"class_label={class_label} is out of range: this {name} has "
                         f"{classes} classes, ids 0..{classes - 1}")


def _length(sampler, takes: set[str], prompts) -> dict[str, int]:
    """The sampler's length for models that take one (a model's own default otherwise)."""
    if sampler.max_new_tokens is not None:
        if "max_new_tokens" in takes:
            return {"max_new_tokens": sampler.max_new_tokens}
        if "max_length" in takes:  # after the longest prompt, or the one start symbol
            start = max((len(p) for p in prompts), default=1) if prompts else 1
            return {"max_length": start + sampler.max_new_tokens}
    elif sampler.max_length is not None and "max_length" in takes:
        return {"max_length": sampler.max_length}
    return {}


def _new_tokens(model, sampler, prompt_len: int) -> int:
    if sampler.max_new_tokens is not None:
        return sampler.max_new_tokens
    total = sampler.max_length or model.config.sequence_length
    return total - prompt_len


def _beam(model, sampler, prompts):
    samples, notes = [], []
    for prompt in prompts or [None]:
        length = 1 if prompt is None else len(prompt)
        seqs, scores = model.beam_search(prompt=prompt, beam_size=sampler.beam_size,
                                         max_length=length + _new_tokens(model, sampler, length),
                                         length_penalty=sampler.length_penalty)
        keep = min(sampler.num_samples, sampler.beam_size)
        samples += list(np.asarray(seqs)[:keep])
        notes += [f"beam score {float(s):.3f}" for s in np.asarray(scores)[:keep]]
    return samples, notes


def _speculative(model, draft, sampler, prompts, key):
    from chainrule.sampling.speculative import speculative_sample

    if draft is None:
        raise ValueError("sampler=speculative needs a draft model (sampler.draft_checkpoint=)")
    samples, notes = [], []
    for i, prompt in enumerate(prompts or [np.array([model.config.bos_token_id])]):
        result = speculative_sample(
            model, draft, prompt, _new_tokens(model, sampler, len(prompt)),
            num_draft_tokens=sampler.num_draft_tokens, temperature=sampler.temperature,
            top_k=sampler.top_k, top_p=sampler.top_p, n_samples=sampler.num_samples,
            rngs=jax.random.fold_in(key, i))
        samples += list(np.asarray(result.tokens))
        notes += [f"acceptance {result.acceptance_rate:.2f}, "
                  f"{result.tokens_per_target_call:.2f} tokens per target pass"] * len(
                      result.tokens)
    return samples, notes
