"""Every element of a split, once: the batches `evaluate.py` scores.

Training draws random windows; evaluation must score each token, sub-pixel or audio sample of
a split exactly once, in fixed-shape batches (one compiled program). Each data module registers
how its split becomes such batches (`register_eval`), built by `build_eval`:

  sequences (text, audio)  sliding windows of `length` = sequence_length + 1 tokens, `stride`
                           apart (Hugging Face's perplexity recipe): window k scores only the
                           targets no earlier window scored, so each scored target has at least
                           `length - 1 - stride` tokens of context; the last window is aligned to
                           the end of the sequence. The first token of a sequence has no context
                           and is never a target. `loss_mask` [B, length] marks the targets a
                           window scores (position p is the target predicted from positions < p).
  images                   every image once; the last batch is padded with blank images whose
                           per-image `loss_mask` [B] is 0.

Rows added to fill the last batch carry an all-zero mask, so they count for nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from chainrule.data.base import Batch, Codec, DataConfig

SPLITS = ("train", "val", "test", "all")


@dataclasses.dataclass
class EvalSplit:
    """One split, ready to score.

    batches:     a function returning a fresh iterator over this process's rows of each global
                 batch (host numpy arrays), `num_batches` of them.
    counts:      what the split holds in the units papers report: {"characters", "bytes"} of
                 the scored text, {"images", "dims_per_image"}, {"samples"}.
    info:        anything else worth recording (stride, windows, clips, the source).
    """

    batches: Callable[[], Iterator[Batch]]
    num_batches: int
    counts: dict[str, int]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


_EVAL_BUILDERS: dict[type, Callable[..., EvalSplit]] = {}


def register_eval(config_type: type) -> Callable[[Callable], Callable]:
    """Decorator: `@register_eval(TextDataConfig) def text_eval(config, *, codec, split, ...)`."""

    def wrap(fn: Callable[..., EvalSplit]) -> Callable[..., EvalSplit]:
        _EVAL_BUILDERS[config_type] = fn
        return fn

    return wrap


def build_eval(config: DataConfig, *, codec: Codec, split: str, batch_size: int,
               stride: int | None = None, process_index: int = 0,
               process_count: int = 1) -> EvalSplit:
    """The batches that score every element of `split` ("train", "val", "test", or "all" of
    the source) once, with the run's `codec` (a text run's own tokenizer).

    batch_size: the global batch (windows or images); each process keeps its own rows.
    stride:     tokens (or audio samples) between window starts; None: half the window.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"batch_size={batch_size}: expected a positive multiple of the "
                         f"{process_count} processes")
    builder = _EVAL_BUILDERS.get(type(config))
    if builder is None:
        raise ValueError(f"{type(config).__name__} data cannot be evaluated; known: "
                         f"{', '.join(t.__name__ for t in _EVAL_BUILDERS)}")
    return builder(config, codec=codec, split=split, batch_size=batch_size, stride=stride,
                   process_index=process_index, process_count=process_count)


def _rows(batch_size: int, process_index: int, process_count: int) -> slice:
    per_process = batch_size // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


# ----------------------------------------------------------------------------- windows


def window_plan(lengths: list[int], length: int, stride: int) -> np.ndarray:
    """int64 [W, 4] rows (sequence, start, first, last): window `start .. start + length - 1`
    of `sequence` scores the targets at indices first..last (inclusive). Over all rows, every
    index 1..n-1 of every sequence of n tokens is scored exactly once."""
    if not 0 < stride <= length - 1:
        raise ValueError(f"stride={stride}: expected 1..{length - 1} (the window's "
                         f"{length - 1} targets)")
    plans = []
    for seq, n in enumerate(lengths):
        if n < 2:
            continue  # a lone token has nothing to predict it from
        last_start = max(n - length, 0)
        starts = np.unique(np.minimum(np.arange(0, last_start + stride, stride), last_start))
        lasts = np.minimum(starts + length - 1, n - 1)
        firsts = np.concatenate([[1], lasts[:-1] + 1])
        plans.append(np.stack([np.full_like(starts, seq), starts, firsts, lasts], 1))
    return np.concatenate(plans) if plans else np.zeros((0, 4), np.int64)


@dataclasses.dataclass
class WindowBatches:
    """Batches of windows over `sequences` (1-D int arrays, or an object whose `flat` holds
    them end to end at `offsets`), as `window_plan` lays them out.

    key: the batch key of the windows ("sequences", "waveform"); `labels` (one per sequence)
    are added as "labels"; `pad`: the token filling past a sequence's end (masked out).
    """

    sequences: list[np.ndarray]
    length: int
    stride: int
    batch_size: int
    key: str
    labels: np.ndarray | None = None
    pad: int = 0
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if hasattr(self.sequences, "flat"):  # stored end to end (prepared audio): gather there
            lengths, self._flat = np.diff(self.sequences.offsets), self.sequences.flat
        else:
            lengths = np.array([len(s) for s in self.sequences], np.int64)
            # One flat array and each sequence's offset in it: a batch is one vectorised gather.
            self._flat = (self.sequences[0] if len(self.sequences) == 1
                          else np.concatenate(self.sequences))
        self.plan = window_plan(lengths.tolist(), self.length, self.stride)
        self._offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self._lengths = lengths

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.plan) / self.batch_size)

    @property
    def num_scored(self) -> int:
        return int((self.plan[:, 3] - self.plan[:, 2] + 1).sum())

    def batch(self, index: int) -> Batch:
        rows = self.plan[index * self.batch_size:(index + 1) * self.batch_size]
        rows = rows[_rows(self.batch_size, self.process_index, self.process_count)]
        per_process = self.batch_size // self.process_count
        # Rows past the plan's end (the last batch) are padding: no tokens, nothing scored.
        rows = np.concatenate([rows, np.tile([[0, 0, 1, 0]], (per_process - len(rows), 1))])
        seq, start, first, last = rows.T
        at = start[:, None] + np.arange(self.length)  # index within the sequence
        inside = at < self._lengths[seq][:, None]
        flat_at = np.where(inside, self._offsets[seq][:, None] + at, 0)
        windows = np.where(inside, self._flat[flat_at], self.pad).astype(np.int32)
        mask = ((at >= first[:, None]) & (at <= last[:, None])).astype(np.int32)
        batch = {self.key: windows, "loss_mask": mask}
        if self.labels is not None:
            batch["labels"] = np.where(last >= first, self.labels[seq], 0).astype(np.int32)
        return batch

    def __call__(self) -> Iterator[Batch]:
        return (self.batch(i) for i in range(self.num_batches))


def default_stride(length: int, stride: int | None) -> int:
    """Half the window's targets unless given (so every target has >= half a context)."""
    return max((length - 1) // 2, 1) if stride is None else int(stride)


# ----------------------------------------------------------------------------- images


@dataclasses.dataclass
class ImageBatches:
    """Every image of `images` [N, H, W, C] once, `batch_size` at a time; the last batch is
    filled with blank images whose per-image `loss_mask` is 0."""

    images: np.ndarray
    labels: np.ndarray | None
    batch_size: int
    process_index: int = 0
    process_count: int = 1

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def batch(self, index: int) -> Batch:
        chosen = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
        chosen = chosen[_rows(self.batch_size, self.process_index, self.process_count)]
        real = chosen < len(self.images)
        safe = np.where(real, chosen, 0)
        images = np.where(real[:, None, None, None], self.images[safe], 0).astype(np.int32)
        batch = {"images": images, "loss_mask": real.astype(np.int32)}
        if self.labels is not None:
            batch["labels"] = np.where(real, self.labels[safe], 0).astype(np.int32)
        return batch

    def __call__(self) -> Iterator[Batch]:
        return (self.batch(i) for i in range(self.num_batches))
