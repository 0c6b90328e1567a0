"""How samples are drawn: `SamplerConfig` (the `sampler` config group, for train-time previews
and sample.py) and `SampleConfig` (what sample.py composes)."""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import MISSING

from chainrule.config import check, register

SAMPLERS = ("greedy", "temperature", "top_k", "top_p", "beam", "speculative")


@dataclasses.dataclass
class SamplerConfig:
    """How samples are drawn (train-time previews and sample.py). temperature 0 = greedy.

    `name` picks the strategy: greedy / temperature / top_k / top_p all sample token by token
    (the knobs combine); `beam` runs beam search (token models); `speculative` drafts with
    the model of `draft_checkpoint` and verifies with the trained one (token models).
    """

    name: str = "top_p"
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = 0.9
    repetition_penalty: float = 1.0
    num_samples: int = 4  # per prompt
    max_length: int | None = None  # in all, prompt included; None = the model's context
    max_new_tokens: int | None = None  # instead of max_length: this many after the prompt
    min_new_tokens: int = 0
    stop_tokens: tuple[int, ...] = ()
    beam_size: int = 4
    length_penalty: float = 0.0
    draft_checkpoint: str | None = None
    num_draft_tokens: int = 4

    def __post_init__(self) -> None:
        check(self.name in SAMPLERS, f"sampler.name={self.name!r}; expected one of {SAMPLERS}")
        check(self.temperature >= 0, f"sampler.temperature must be >= 0, got {self.temperature}")
        check(self.top_k is None or self.top_k >= 0, f"sampler.top_k must be >= 0, got {self.top_k}")
        check(self.top_p is None or 0 < self.top_p <= 1,
               f"sampler.top_p must be in (0, 1], got {self.top_p}")
        check(self.repetition_penalty > 0,
               f"sampler.repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(self.num_samples > 0, f"sampler.num_samples must be > 0, got {self.num_samples}")
        check(self.beam_size > 0, f"sampler.beam_size must be > 0, got {self.beam_size}")
        check(self.num_draft_tokens > 0,
               f"sampler.num_draft_tokens must be > 0, got {self.num_draft_tokens}")
        check(self.name != "speculative" or self.draft_checkpoint is not None,
               "sampler=speculative needs sampler.draft_checkpoint=<run dir of the draft model>")

    def kwargs(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


register("sampler", "sampler", SamplerConfig)


@dataclasses.dataclass
class SampleConfig:
    """sample.py: draw from a trained run.

    What the samples continue or fill in is for the kind of samples the run makes: text
    (`prompt` / `prompt_file`), audio (`prompt_audio`, a WAV file) or images (`image` + `mask`,
    inpainting); `class_label` is for any class-conditional model (PixelCNN, WaveNet).
    """

    checkpoint: str = MISSING  # a run directory (or its checkpoints/ folder)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    prompt: str | None = None
    prompt_file: str | None = None  # one prompt per line ("\\n" for a line break inside one)
    prompt_audio: str | None = None  # a WAV file every sample continues (resampled, μ-law coded)
    class_label: int | None = None  # every sample of this class id (class-conditional models)
    image: str | None = None  # inpainting: a PNG/JPEG, resized to the model's H x W and levels
    mask: str | None = None  # with image: top:N / left:N (keep N rows / columns) or an H x W PNG
    step: int | None = None  # None = the best checkpoint if there is one, else the latest
    seed: int = 0
    output: str | None = None  # default: <run dir>/samples/
    compilation_cache_dir: str | None = "~/.cache/chainrule/jax"  # as in train.py; null: off

    def __post_init__(self) -> None:
        inputs = [k for k in ("prompt", "prompt_file", "prompt_audio", "image")
                  if getattr(self, k) is not None]
        check(len(inputs) <= 1, f"give one of prompt=, prompt_file=, prompt_audio=, image= "
                                 f"(got {' and '.join(f'{k}=' for k in inputs)})")
        check((self.image is None) == (self.mask is None),
               "inpainting needs both image= (the picture) and mask= (which pixels to keep), "
               f"got only {'image' if self.mask is None else 'mask'}=")
