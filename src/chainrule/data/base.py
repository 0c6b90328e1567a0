"""What every data pipeline hands the training loop, and the registry of data configs.

A data config is a dataclass (also a Hydra structured config). `build_data(config, ...)`
finds the builder registered for the config's type and returns a `DataBundle`. The loop
knows nothing else about data: it draws `train` batches, evaluates on `val_batches`, feeds
`model_overrides` into the model config (so the vocabulary size follows the tokenizer), and
saves/restores the train iterator's state with every checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class DataBundle:
    """A built data pipeline.

    train:           infinite iterator of host batches (dict of numpy arrays with a leading
                     batch axis); a grain DatasetIterator, so `get_state()`/`set_state()` work.
    val_batches:     fixed validation batches, the same at every evaluation.
    model_overrides: model-config fields the data decides (e.g. {"vocab_size": 65}).
    metric_scales:   extra metrics derived from the loss: {"bits_per_char": s} logs
                     `nll_loss / ln 2 * s` (s = tokens per character, 1 for char level).
    sample_kind:     how generated samples are shown: "text", "image" or "audio".
    decode:          turns one generated sample (numpy) into what a person reads, sees or
                     hears: a str for "text", uint8 [H, W, C] for "image", float32 [T] in
                     [-1, 1] for "audio".
    encode:          the inverse, for what samples are conditioned on, where it exists: text
                     -> token ids, a WAV path -> μ-law codes, an image path -> levels.
    info:            anything else worth recording (tokenizer kind, sample_rate, num_classes).
    """

    train: Iterator[Batch]
    val_batches: list[Batch]
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    metric_scales: dict[str, float] = dataclasses.field(default_factory=dict)
    sample_kind: str = "text"
    decode: Callable[[np.ndarray], Any] | None = None
    encode: Callable[[str], np.ndarray] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


Builder = Callable[..., DataBundle]
_BUILDERS: dict[type, Builder] = {}


def register_data(config_type: type) -> Callable[[Builder], Builder]:
    """Decorator: `@register_data(TextDataConfig) def build_text(config, *, run_dir, ...)`."""

    def wrap(fn: Builder) -> Builder:
        _BUILDERS[config_type] = fn
        return fn

    return wrap


def build_data(config: Any, *, run_dir: Path | None = None, process_index: int = 0,
               process_count: int = 1) -> DataBundle:
    """Build the pipeline for `config` (this process's shard when process_count > 1)."""
    try:
        builder = _BUILDERS[type(config)]
    except KeyError:
        known = ", ".join(sorted(t.__name__ for t in _BUILDERS))
        raise ValueError(f"no data pipeline for config type {type(config).__name__}; "
                         f"known: {known}") from None
    return builder(config, run_dir=run_dir, process_index=process_index,
                   process_count=process_count)
