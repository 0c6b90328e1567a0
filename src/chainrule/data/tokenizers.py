"""Tokenizers: text <-> int32 token ids, with one interface for every kind.

Kinds:
  char  the sorted set of characters of the fitting text (nanoGPT's shakespeare_char).
  byte  the UTF-8 bytes of the text; vocabulary 256, nothing to fit.
  bpe   byte-level BPE trained locally with HF `tokenizers`; `<|endoftext|>` is the eos token.

Every tokenizer saves itself as JSON (never pickle) and `load_tokenizer` reads any kind back,
so a run directory's `tokenizer.json` is all sampling or resuming needs.
"""

from __future__ import annotations

import abc
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chainrule.rundir import write_json_atomic

KINDS = ("char", "byte", "bpe")
EOS_TOKEN = "<|endoftext|>"
DEFAULT_BPE_VOCAB_SIZE = 1024
# A byte-level BPE vocabulary holds at least the 256 byte symbols and the eos token.
MIN_BPE_VOCAB_SIZE = 257


def _as_ids(ids: Any, vocab_size: int) -> np.ndarray:
    """Ids to a flat int64 array, checked against the vocabulary (a clear error, not garbage)."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return arr.reshape(0).astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")
    return arr


class Tokenizer(abc.ABC):
    """Common interface: `encode(text) -> int32 ids`, `decode(ids) -> text`, `save(path)`."""

    kind: str
    eos_id: int | None = None
    pad_id: int | None = None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, int32 [n]."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the ids (any integer array; it is flattened)."""

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text; one call over the joined texts where the tokenizer's
        symbols never span two texts (char, byte)."""
        if not texts:
            return []
        ids = self.encode("".join(texts))
        sizes = [self._symbols(t) for t in texts]
        return np.split(ids, np.cumsum(sizes)[:-1])

    def _symbols(self, text: str) -> int:
        raise NotImplementedError

    @abc.abstractmethod
    def to_json(self) -> dict[str, Any]:
        """Everything needed to rebuild the tokenizer, with a "kind" entry."""

    def save(self, path: Path | str) -> None:
        write_json_atomic(Path(path), self.to_json(), indent=None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One id per character; ids follow the sorted order of the characters."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("a char tokenizer needs at least one character, got none")
        if any(len(c) != 1 for c in chars):
            bad = [c for c in chars if len(c) != 1][:5]
            raise ValueError(f"char vocabulary entries must be single characters, got {bad!r}")
        if len(set(chars)) != len(chars) or chars != sorted(chars):
            raise ValueError("char vocabulary must be sorted and free of duplicates")
        self.chars = chars
        self._code_points = np.array([ord(c) for c in chars], dtype=np.uint32)
        # id of every code point up to the largest in the vocabulary (-1: not in it): encode
        # is one gather, ~10x a searchsorted over the sorted code points.
        self._ids = np.full(int(self._code_points.max()) + 1, -1, np.int32)
        self._ids[self._code_points] = np.arange(len(chars), dtype=np.int32)

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        if not text:
            raise ValueError("cannot fit a char tokenizer on empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        cps = (np.frombuffer(text.encode("ascii"), np.uint8) if text.isascii()
               else np.frombuffer(text.encode("utf-32-le"), np.uint32))
        limit = len(self._ids) - 1
        beyond = int(cps.max(initial=0)) > limit  # a code point above the vocabulary's
        ids = self._ids[np.minimum(cps, limit) if beyond else cps]
        unknown = (ids < 0) | (cps > limit) if beyond else ids < 0
        if unknown.any():
            chars = sorted({chr(c) for c in cps[unknown]})
            shown = ", ".join(repr(c) for c in chars[:20])
            more = f" (and {len(chars) - 20} more)" if len(chars) > 20 else ""
            raise ValueError(f"text contains {len(chars)} character(s) outside the char "
                             f"tokenizer's {self.vocab_size}-symbol vocabulary: {shown}{more}")
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = _as_ids(ids, self.vocab_size)
        return self._code_points[arr].tobytes().decode("utf-32-le")

    def _symbols(self, text: str) -> int:
        return len(text)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer(Tokenizer):
    """The UTF-8 bytes of the text; nothing to fit."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        # A sampled byte sequence need not be valid UTF-8: show what cannot be decoded as U+FFFD.
        return _as_ids(ids, 256).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def _symbols(self, text: str) -> int:
        return len(text) if text.isascii() else len(text.encode("utf-8"))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) backed by an HF `tokenizers.Tokenizer`."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any):
        self._tok = hf_tokenizer
        eos = hf_tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"a BPE tokenizer must contain the eos token {EOS_TOKEN!r}")
        self.eos_id = int(eos)

    @classmethod
    def fit(cls, text: str, vocab_size: int = DEFAULT_BPE_VOCAB_SIZE) -> BPETokenizer:
        if not text:
            raise ValueError("cannot fit a bpe tokenizer on empty text")
        # Lines keep their newline, so the trainer sees the text exactly as encode will.
        return cls.fit_lines(text.splitlines(keepends=True), vocab_size)

    @classmethod
    def fit_lines(cls, lines: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB_SIZE
                  ) -> BPETokenizer:
        """Fitted on an iterator of lines (a bounded sample of a corpus, never all of it)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < MIN_BPE_VOCAB_SIZE:
            raise ValueError(f"bpe vocab_size must be >= {MIN_BPE_VOCAB_SIZE} (256 bytes + eos), "
                             f"got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            # All 256 byte symbols, seen or not, so any text encodes.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(lines, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """HF's batch encoding over chunks of at most BPE_CHUNK characters, cut where the
        byte-level pre-tokenizer cuts anyway (so the result is `encode` of each text), a few
        MB at a time: HF's per-token encoding objects never hold a whole corpus."""
        # encode_batch_fast leaves out the character offsets (half the time); older
        # `tokenizers` releases only have encode_batch.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        out = []
        for text in texts:
            chunks = bpe_chunks(text)
            ids = []
            for k in range(0, len(chunks), 64):
                ids += [e.ids for e in encode(chunks[k:k + 64])]
            out.append(np.fromiter(itertools.chain.from_iterable(ids), np.int32))
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = _as_ids(ids, self.vocab_size)
        return self._tok.decode(arr.tolist(), skip_special_tokens=False)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer": json.loads(self._tok.to_str())}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(json.dumps(obj["tokenizer"])))


BPE_CHUNK = 1 << 16
_VISIBLE = frozenset(chr(c) for c in range(0x21, 0x7F))


def _safe_point(text: str, lo: int, hi: int) -> int | None:
    """The last index in (lo, hi] just after a newline with visible ASCII on both sides: GPT-2's
    pre-tokenizer splits there whatever surrounds it, so text cut there encodes the same."""
    end = min(hi, len(text) - 1)
    while (nl := text.rfind("\n", lo, end)) > 0:
        if text[nl - 1] in _VISIBLE and text[nl + 1] in _VISIBLE:
            return nl + 1
        end = nl
    return None


def bpe_chunks(text: str, size: int | None = None) -> list[str]:
    """`text` cut at safe points into chunks of about `size` (default BPE_CHUNK) characters
    (longer where no safe point comes sooner)."""
    size = size or BPE_CHUNK
    chunks, start = [], 0
    while len(text) - start > size:
        cut = _safe_point(text, start + size // 2, start + size)
        step = size
        while cut is None and start + step < len(text):
            cut = _safe_point(text, start + step, start + 2 * step)
            step *= 2
        if cut is None:
            break
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


def fit_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer of `kind` fitted on `text` (`vocab_size` only for bpe; default 1024)."""
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
    if kind != "bpe" and vocab_size is not None:
        raise ValueError(f"vocab_size is set by the text for a {kind} tokenizer; "
                         f"got vocab_size={vocab_size}, expected None")
    if kind == "char":
        return CharTokenizer.fit(text)
    if kind == "byte":
        return ByteTokenizer()
    return BPETokenizer.fit(text, DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size)


def tokenizer_from_json(obj: Any) -> Tokenizer:
    """A tokenizer from what its `to_json` wrote, whatever its kind."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind == "char":
        return CharTokenizer(obj["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.from_json(obj)
    raise ValueError(f"has kind {kind!r}; expected one of {KINDS}")


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Read back a tokenizer written by `Tokenizer.save`, whatever its kind."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer file {path} does not exist; expected a JSON file "
                         "written by Tokenizer.save")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer file {path} is not valid JSON: {e}") from None
    try:
        return tokenizer_from_json(obj)
    except ValueError as e:
        raise ValueError(f"tokenizer file {path} {e}") from None
