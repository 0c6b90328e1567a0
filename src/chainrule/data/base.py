"""What every data pipeline hands the training loop, and how a run turns samples into media.

A data config is a dataclass (also a Hydra structured config) registered with its builder:
`build_data(config, ...)` returns a `DataBundle`. The loop knows nothing else about data: it
draws `train` batches, evaluates on `val_batches`, completes the model config from the codec
(the vocabulary size follows the tokenizer) and saves/restores the train iterator's state.

The bundle's `Codec` is the part of the data a trained run keeps: it turns model output into
text, an image or audio and back, without the corpus. It is saved in the run directory, so
sampling, evaluation and `init_from` never rebuild a data pipeline.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np

from chainrule.config import build, check, register

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class DataConfig:
    """Base of every data config schema (text, image, audio), with the checks they share."""

    def check_fields(self, sources: tuple[str, ...], positive: tuple[str, ...]) -> None:
        """`source` is known, the `positive` fields are integers > 0, seed and workers fit."""
        check(self.source in sources,
              f"data.source={self.source!r} is unknown; expected one of {sources}")
        for name in positive:
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                  f"data.{name}={value!r}: expected a positive integer")
        check(0 <= self.seed < 2**32, f"data.seed={self.seed}: expected an integer in "
                                      "[0, 2**32)")
        check(self.num_workers >= 0, f"data.num_workers={self.num_workers}: expected >= 0")
        check(getattr(self, "prefetch", 0) >= 0,
              f"data.prefetch={getattr(self, 'prefetch', 0)}: expected >= 0")


class Codec(abc.ABC):
    """Model symbols <-> what a person reads, sees or hears, for one kind of data.

    kind:        how samples are shown: "text", "image" or "audio".
    decode:      one generated sample (numpy) -> a str, uint8 [H, W, C], or float32 [T] in
                 [-1, 1].
    encode:      the inverse, for what samples are conditioned on: text -> token ids, a WAV
                 path -> μ-law codes, an image path -> levels.
    model_fields: model-config fields the data decides (e.g. {"vocab_size": 65}).
    media:       keyword arguments for writing samples as media (e.g. {"sample_rate": 8000}).
    """

    kind: ClassVar[str]

    @abc.abstractmethod
    def decode(self, sample: np.ndarray) -> Any: ...

    @abc.abstractmethod
    def encode(self, value: str) -> np.ndarray: ...

    @abc.abstractmethod
    def model_fields(self) -> dict[str, Any]: ...

    @property
    def media(self) -> dict[str, Any]:
        return {}

    @abc.abstractmethod
    def to_json(self) -> dict[str, Any]:
        """Everything needed to rebuild the codec, with a "kind" entry."""

    @classmethod
    @abc.abstractmethod
    def from_json(cls, obj: dict[str, Any]) -> Codec: ...


_CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: `load_codec` rebuilds codecs of `cls.kind` with `cls.from_json`."""
    _CODECS[cls.kind] = cls
    return cls


def load_codec(obj: dict[str, Any]) -> Codec:
    """A codec from what its `to_json` wrote."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind not in _CODECS:
        raise ValueError(f"codec of kind {kind!r}; expected one of {sorted(_CODECS)}")
    return _CODECS[kind].from_json(obj)


@dataclasses.dataclass
class DataBundle:
    """A built data pipeline.

    train:           infinite iterator of host batches (dict of numpy arrays with a leading
                     batch axis); a grain DatasetIterator, so `get_state()`/`set_state()` work.
    val_batches:     fixed validation batches, the same at every evaluation.
    codec:           model symbols <-> text / images / audio (saved with the run).
    metric_scales:   extra metrics derived from the loss: {"bits_per_char": s} logs
                     `nll_loss / ln 2 * s` (s = tokens per character of the train split, 1
                     for char level).
    val_metric_scales: the same for `val_batches`, from exactly the tokens they score (None:
                     `metric_scales`), so bits per character are the validation windows'
                     bits over their characters.
    info:            anything else worth recording (tokenizer kind, sample_rate, num_classes).
    """

    train: Iterator[Batch]
    val_batches: list[Batch]
    codec: Codec
    metric_scales: dict[str, float] = dataclasses.field(default_factory=dict)
    val_metric_scales: dict[str, float] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def register_data(name: str, config_type: type) -> Callable[[Callable], Callable]:
    """Decorator: `@register_data("text", TextDataConfig) def build_text(config, *, codec, ...)`
    records the schema `data/text_schema` and its builder."""

    def wrap(fn: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        register("data", name, config_type, builds=fn)
        return fn

    return wrap


def build_data(config: DataConfig, *, codec: Codec | None = None, process_index: int = 0,
               process_count: int = 1) -> DataBundle:
    """Build the pipeline for `config` (this process's shard when process_count > 1).

    `codec`: the run's saved codec, when resuming; the data then uses it (a text run keeps its
    tokenizer) instead of fitting one.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}, process_count={process_count}: "
                         "expected 0 <= process_index < process_count")
    if config.batch_size % process_count:
        raise ValueError(f"data.batch_size={config.batch_size} is not divisible by the "
                         f"{process_count} processes; expected a multiple of {process_count}")
    return build(config, group="data", codec=codec, process_index=process_index,
                 process_count=process_count)


def iterate(dataset: Any, *, prefetch: int, num_workers: int) -> Iterator[Batch]:
    """A checkpointable iterator over a Grain MapDataset of batches: `prefetch` batches made
    ahead by one background thread (the sources are in memory), or by `num_workers` processes."""
    import grain

    read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    iter_ds = dataset.to_iter_dataset(read)
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)))
    return iter(iter_ds)
