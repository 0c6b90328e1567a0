"""Preparing data once: a source becomes a prepared directory (the format: prepared.py).

Text is prepared in two streaming passes over its pieces (documents.py), never whole in memory:

  scan     counts the characters (the split points are fractions of them), collects the char
           tokenizer's alphabet or a bounded sample of the train split to fit BPE on, hashes
           the source files, and groups the pieces into units of about UNIT_CHARS characters;
  encode   tokenizes each unit in a worker process (vectorised for char/byte, HF's batch
           encoding for BPE) into one shard per split it touches, documents separated by the
           tokenizer's eos token (char and byte tokenizers have none: documents just follow).

Everything is written into `<out>.partial/` under a lock; each finished unit leaves a marker,
so a killed preparation resumes at the first unfinished unit, and the directory is renamed to
`<out>` only when the manifest is complete. A prepared directory is found again by its key: a
hash of the format, the options that shape the result and the sources' paths, sizes and mtimes
(a changed source gives a new key, hence a fresh preparation).

Images and audio (small fixed-shape records) register their own writers with
`register_prepare`; they share the key, the lock and the rename.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING

from chainrule.data.documents import Piece, read_pieces
from chainrule.data.prepared import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    array_entry,
    file_sha256,
    read_manifest,
    smallest_uint,
    write_shard,
)
from chainrule.data.tokenizers import Tokenizer, tokenizer_from_json
from chainrule.rundir import write_json_atomic

SPLITS = ("train", "val", "test")
UNIT_CHARS = 1 << 23  # ~8M characters per unit of work: the resume and parallelism grain
CACHE_ENV = "CHAINRULE_DATA_CACHE"


def cache_root(cache_dir: str | None = None) -> Path:
    """Where prepared data is cached: `cache_dir`, $CHAINRULE_DATA_CACHE or
    ~/.cache/chainrule/data."""
    root = cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/chainrule/data"
    return Path(root).expanduser()


def source_signature(files: list[Path]) -> list[list[Any]]:
    """[path, size, mtime_ns] of each file: what the key sees of the sources (cheap to stat)."""
    out = []
    for f in files:
        stat = f.stat()
        out.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


def make_key(what: dict[str, Any]) -> str:
    blob = json.dumps({"format_version": FORMAT_VERSION, **what}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def progress(total: int | None, desc: str):
    """A bar in MB and MB/s on stderr (silent when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1 << 20,
                mininterval=0.5, disable=None, file=sys.stderr)


# ----------------------------------------------------------------------------- the directory


@contextlib.contextmanager
def preparing(out: Path, key: str) -> Iterator[Path | None]:
    """Hold `out`'s lock and yield its work directory, or None when `out` is already
    prepared with this key (by an earlier run or a process that held the lock first).

    The work directory survives an exception or a kill (the next call resumes in it); on
    success it is renamed to `out`."""
    if sys.modules.get("__mp_main__") not in (None, sys.modules.get("__main__")):
        # A spawned worker is importing the main script again (as __mp_main__): a script that
        # prepares data at import time would wait for the lock its parent holds, for ever.
        raise RuntimeError(f"data is being prepared ({out}) in a worker process: the script "
                           "that started it must guard its entry point with "
                           "`if __name__ == \"__main__\":`")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / MANIFEST).is_file():
            existing = read_manifest(out).get("key")
            if existing != key:
                raise ValueError(f"{out} holds data prepared from other sources or options "
                                 f"(key {existing}, now {key}); choose another out= or "
                                 "delete it")
            yield None
            return
        work = out.with_name(out.name + ".partial")
        plan = work / "plan.json"
        if work.exists() and (not plan.is_file() or json.loads(plan.read_text()).get("key") != key):
            shutil.rmtree(work)  # a preparation of something else: start again
        work.mkdir(parents=True, exist_ok=True)
        yield work
        if not (work / MANIFEST).is_file():
            raise RuntimeError(f"preparation of {out} ended without a manifest")
        os.replace(work, out)


def write_manifest(work: Path, key: str, kind: str, **fields: Any) -> None:
    write_json_atomic(work / MANIFEST, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                        "key": key, "kind": kind,
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                        **fields})


def hash_sources(files: list[Path]) -> list[dict[str, Any]]:
    return [{"path": str(f.resolve()), "bytes": f.stat().st_size, "sha256": file_sha256(f)}
            for f in files]


# ----------------------------------------------------------------------------- text: options


@dataclasses.dataclass
class TextPreparation:
    """What shapes prepared text: the split fractions and the tokenizer to fit (or `tokenizer`:
    a run's own, used as it is)."""

    tokenizer_kind: str
    bpe_vocab_size: int
    bpe_sample_chars: int
    val_fraction: float
    test_fraction: float
    tokenizer: Tokenizer | None = None
    workers: int = 2

    def key_fields(self) -> dict[str, Any]:
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("tokenizer", "workers")}
        if self.tokenizer is not None:  # a given tokenizer decides the tokens, not the options
            blob = json.dumps(self.tokenizer.to_json(), sort_keys=True).encode()
            fields = {"tokenizer": hashlib.sha256(blob).hexdigest(),
                      "val_fraction": self.val_fraction, "test_fraction": self.test_fraction}
        return fields

    def bounds(self, total_chars: int) -> tuple[int, int]:
        """(train_end, val_end) in characters, as `split_text` cuts an in-memory text."""
        train_end = int(total_chars * (1.0 - self.val_fraction - self.test_fraction))
        val_end = int(total_chars * (1.0 - self.test_fraction)) if self.test_fraction \
            else total_chars
        return train_end, val_end


# ----------------------------------------------------------------------------- text: scan


@dataclasses.dataclass
class _Scan:
    units: list[list[int]]  # [pieces, characters] per unit
    total_chars: int = 0
    documents: int = 0
    code_points: set[int] = dataclasses.field(default_factory=set)
    sample: list[str] = dataclasses.field(default_factory=list)
    sample_chars: int = 0

    def add(self, piece: Piece, *, alphabet: bool, sample_limit: int) -> None:
        text = piece.text
        self.total_chars += len(text)
        self.documents += piece.starts_document
        if alphabet:  # a count per code point: O(n), where a set of the text's characters is not
            cps = (np.frombuffer(text.encode("ascii"), np.uint8) if text.isascii()
                   else np.frombuffer(text.encode("utf-32-le"), np.uint32))
            self.code_points.update(np.flatnonzero(np.bincount(cps)).tolist())
        if self.sample_chars < sample_limit:
            self.sample.append(text[: sample_limit - self.sample_chars])
            self.sample_chars += len(self.sample[-1])

    def alphabet(self) -> list[str]:
        return sorted(chr(c) for c in self.code_points)


def _scan(files: list[Path], prep: TextPreparation, total_bytes: int) -> _Scan:
    fit_bpe = prep.tokenizer is None and prep.tokenizer_kind == "bpe"
    scan = _Scan(units=[[0, 0]])
    with progress(total_bytes, "scan") as bar:
        for piece in read_pieces(files):
            if scan.units[-1][1] >= UNIT_CHARS:
                scan.units.append([0, 0])
            scan.add(piece, alphabet=prep.tokenizer is None and prep.tokenizer_kind == "char",
                     sample_limit=prep.bpe_sample_chars if fit_bpe else 0)
            scan.units[-1][0] += 1
            scan.units[-1][1] += len(piece.text)
            bar.update(len(piece.text))
    return scan


def _fit(scan: _Scan, prep: TextPreparation, train_end: int) -> Tokenizer:
    """The run's tokenizer: the given one, the scan's alphabet, or BPE fitted on the sample
    (the first `bpe_sample_chars` of the train split)."""
    from chainrule.data.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer

    if prep.tokenizer is not None:
        return prep.tokenizer
    if prep.tokenizer_kind == "char":
        return CharTokenizer(scan.alphabet())
    if prep.tokenizer_kind == "byte":
        return ByteTokenizer()
    sample, left = [], min(prep.bpe_sample_chars, train_end)
    for text in scan.sample:
        sample.append(text[:left])
        left -= len(sample[-1])
    lines = (line for text in sample for line in text.splitlines(keepends=True))
    return BPETokenizer.fit_lines(lines, prep.bpe_vocab_size)


# ----------------------------------------------------------------------------- text: encode


@dataclasses.dataclass
class _Unit:
    index: int
    pieces: list[Piece]
    char_start: int
    first_piece: int  # index of the unit's first piece in the corpus (0: the first document)


_TOKENIZERS: dict[str, Tokenizer] = {}


def _worker_tokenizer(path: str) -> Tokenizer:
    """The tokenizer a unit is encoded with, read once per process (per file version)."""
    stat = os.stat(path)
    key = f"{path}:{stat.st_mtime_ns}:{stat.st_size}"
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = tokenizer_from_json(json.loads(Path(path).read_text()))
    return _TOKENIZERS[key]


def _segments(unit: _Unit, bounds: tuple[int, int]) -> Iterator[tuple[str, str, bool, bool]]:
    """(split, text, starts_document, eos_before) of the unit's pieces, cut at the split
    points; every document but the corpus's first is preceded by the eos token."""
    edges = (0, *bounds, float("inf"))
    at = unit.char_start
    for k, piece in enumerate(unit.pieces):
        text, starts = piece.text, piece.starts_document
        eos = starts and (unit.first_piece + k) > 0
        while text:
            s = next(k for k in range(3) if at < edges[k + 1])
            take = int(min(len(text), edges[s + 1] - at))
            yield SPLITS[s], text[:take], starts, eos
            text, at, starts, eos = text[take:], at + take, False, False


def _encode_split(tok: Tokenizer, parts: list[tuple[str, bool, bool]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of consecutive parts of one split, eos tokens where the parts ask for one, and
    where each document's windows may start (its eos, or its first token)."""
    arrays = tok.encode_many([text for text, _, _ in parts])
    out, starts, at = [], [], 0
    for (_, starts_doc, eos), ids in zip(parts, arrays, strict=True):
        if starts_doc:
            starts.append(at)
        if eos and tok.eos_id is not None:
            out.append(np.array([tok.eos_id], np.int32))
            at += 1
        out.append(ids)
        at += len(ids)
    tokens = np.concatenate(out) if out else np.zeros(0, np.int32)
    return tokens, np.array(starts, np.int64)


def _encode_unit(unit: _Unit, bounds: tuple[int, int], tokenizer_path: str, dtype: str,
                 work: str) -> dict[str, Any]:
    """One unit -> one tokens shard and one document-starts shard per split it touches, and
    the marker that says the unit is done."""
    tok = _worker_tokenizer(tokenizer_path)
    by_split: dict[str, list[tuple[str, bool, bool]]] = {}
    for split, *part in _segments(unit, bounds):
        by_split.setdefault(split, []).append(tuple(part))
    record: dict[str, Any] = {}
    for split, parts in by_split.items():
        tokens, starts = _encode_split(tok, parts)
        if tokens.size and int(tokens.max()) >= np.iinfo(dtype).max + 1:
            raise ValueError(f"token id {int(tokens.max())} does not fit {dtype}")
        name = f"{split}/{unit.index:06d}"
        record[split] = {
            "tokens": write_shard(Path(work), f"{name}.tokens.bin", tokens.astype(dtype)),
            "doc_starts": starts.tolist(),
            "characters": sum(len(t) for t, _, _ in parts),
            "bytes": sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t, _, _ in parts),
            "documents": sum(s for _, s, _ in parts)}
    write_json_atomic(Path(work) / "units" / f"{unit.index:06d}.json", record, indent=None)
    return record


def _units(files: list[Path], plan: list[list[int]]) -> Iterator[_Unit]:
    pieces = read_pieces(files)
    char_start = first = 0
    for index, (count, chars) in enumerate(plan):
        chunk = [next(pieces) for _ in range(count)]
        yield _Unit(index, chunk, char_start, first)
        char_start += chars
        first += count


def _pool(workers: int, units: int):
    if workers <= 1 or units <= 1:
        return contextlib.nullcontext(None)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _encode_all(files: list[Path], work: Path, plan: dict[str, Any], workers: int) -> None:
    """Encode every unit not yet done, `workers` at a time, in order."""
    done = {p.stem for p in (work / "units").glob("*.json")}
    args = (tuple(plan["bounds"]), str(work / "tokenizer.json"), plan["dtype"], str(work))
    with progress(plan["total_chars"], "encode") as bar, _pool(workers, len(plan["units"])) as pool:
        pending = []
        for unit in _units(files, plan["units"]):
            chars = plan["units"][unit.index][1]
            if f"{unit.index:06d}" in done:
                bar.update(chars)
                continue
            if pool is None:
                _encode_unit(unit, *args)
                bar.update(chars)
                continue
            pending.append((pool.submit(_encode_unit, unit, *args), chars))
            while len(pending) > 2 * workers or (pending and pending[0][0].done()):
                future, size = pending.pop(0)
                future.result()
                bar.update(size)
        for future, size in pending:
            future.result()
            bar.update(size)


def _broken_pool_hint(error: BrokenProcessPool) -> RuntimeError:
    return RuntimeError(f"a tokenizing worker process died ({error}): out of memory, or the "
                        "script that prepares the data lacks an `if __name__ == \"__main__\":` "
                        "guard (spawned workers import it again)")


# ----------------------------------------------------------------------------- text: finish


def _finish_split(work: Path, split: str, records: list[dict[str, Any]],
                  dtype: str) -> dict[str, Any]:
    shards, starts, offset = [], [], 0
    counts = {"tokens": 0, "characters": 0, "bytes": 0, "documents": 0}
    for record in records:
        part = record.get(split)
        if part is None:
            continue
        shards.append(part["tokens"])
        starts.append(np.asarray(part["doc_starts"], np.int64) + offset)
        offset += part["tokens"]["count"]
        for name in ("characters", "bytes", "documents"):
            counts[name] += part[name]
    counts["tokens"] = offset
    doc_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    return {"counts": counts, "arrays": {
        "tokens": array_entry(shards, dtype),
        "doc_starts": array_entry([write_shard(work, f"{split}/doc_starts.bin", doc_starts)],
                                  np.int64)}}


def prepare_text(files: list[Path], out: Path, prep: TextPreparation, *,
                 data: dict[str, Any], key: str) -> Path:
    """Prepare the text of `files` into `out` (reused when already prepared with `key`)."""
    with preparing(out, key) as work:
        if work is None:
            return out
        plan_file = work / "plan.json"
        if not plan_file.is_file():
            _plan(files, work, prep, key)
        plan = json.loads(plan_file.read_text())
        tokenizer = _worker_tokenizer(str(work / "tokenizer.json"))
        # char and byte encode as one numpy gather, faster than shipping text to a process
        workers = prep.workers if tokenizer.kind == "bpe" else 1
        try:
            _encode_all(files, work, plan, workers)
        except BrokenProcessPool as e:
            raise _broken_pool_hint(e) from None
        records = [json.loads((work / "units" / f"{i:06d}.json").read_text())
                   for i in range(len(plan["units"]))]
        splits = {s: _finish_split(work, s, records, plan["dtype"]) for s in SPLITS}
        shutil.rmtree(work / "units")
        (work / "plan.json").unlink()
        write_manifest(work, key, "text", data=data, sources=plan["sources"],
                       tokenizer="tokenizer.json", vocab_size=tokenizer.vocab_size,
                       eos_id=tokenizer.eos_id, dtype=plan["dtype"], splits=splits)
    return out


def _plan(files: list[Path], work: Path, prep: TextPreparation, key: str) -> None:
    """Pass one: scan, split points, tokenizer; written so a resumed run skips it."""
    total_bytes = sum(f.stat().st_size for f in files)
    sources = hash_sources(files)
    scan = _scan(files, prep, total_bytes)
    if scan.total_chars == 0:
        shown = (f"text file {files[0].resolve()} is" if len(files) == 1 else
                 f"the {len(files)} files in {files[0].parent.resolve()} are all")
        raise ValueError(f"{shown} empty; expected some text")
    bounds = prep.bounds(scan.total_chars)
    if bounds[0] == 0 or bounds[1] == bounds[0] or (prep.test_fraction and
                                                    bounds[1] == scan.total_chars):
        raise ValueError(f"text of {scan.total_chars} characters leaves an empty part at "
                         f"val_fraction={prep.val_fraction}, test_fraction={prep.test_fraction}"
                         "; expected more text")
    tokenizer = _fit(scan, prep, bounds[0])
    tokenizer.save(work / "tokenizer.json")
    write_json_atomic(work / "plan.json", {
        "key": key, "units": scan.units, "total_chars": scan.total_chars,
        "documents": scan.documents, "bounds": list(bounds), "sources": sources,
        "dtype": smallest_uint(tokenizer.vocab_size).name}, indent=None)


# ----------------------------------------------------------------------------- any data

_PREPARERS: dict[type, Callable[..., Path]] = {}


def register_prepare(config_type: type) -> Callable[[Callable], Callable]:
    """Decorator: `@register_prepare(TextDataConfig) def prepare(config, out=None, ...)`."""

    def wrap(fn: Callable[..., Path]) -> Callable[..., Path]:
        _PREPARERS[config_type] = fn
        return fn

    return wrap


def prepare_data(config: Any, out: str | Path | None = None, **kwargs: Any) -> Path:
    """Prepare the source `config` describes into `out` (None: the cache); its path."""
    preparer = _PREPARERS.get(type(config))
    if preparer is None:
        raise ValueError(f"{type(config).__name__} data cannot be prepared; known: "
                         f"{', '.join(t.__name__ for t in _PREPARERS)}")
    return preparer(config, None if out is None else Path(out).expanduser(), **kwargs)


# ----------------------------------------------------------------------------- prepare.py


@dataclasses.dataclass
class PrepareConfig:
    """What prepare.py composes (conf/prepare.yaml): a data option and where to write.

    out:       the prepared directory (None: the data cache, where train.py finds it again);
    init_from: a run directory whose tokenizer the text is encoded with (nothing fitted).
    """

    data: Any = MISSING
    out: str | None = None
    init_from: str | None = None


def prepare_from_config(config: PrepareConfig) -> Path:
    kwargs: dict[str, Any] = {}
    if config.init_from and not hasattr(config.data, "tokenizer"):
        raise ValueError(f"init_from={config.init_from}: only text is encoded with a run's "
                         f"tokenizer; data is {type(config.data).__name__}")
    if config.init_from:
        from chainrule.data.base import load_codec
        from chainrule.rundir import RunDir

        record = RunDir.existing(config.init_from, "init_from").read_run() or {}
        codec = load_codec(record.get("codec"))
        if codec.kind != "text":
            raise ValueError(f"init_from={config.init_from}: the run's data is {codec.kind}; "
                             "only text is encoded with a run's tokenizer")
        kwargs["tokenizer"] = codec.tokenizer
    return prepare_data(config.data, config.out, **kwargs)


def summary(root: Path) -> str:
    """A few lines on a prepared directory: kind, dtype, per-split counts."""
    manifest = read_manifest(root)
    lines = [f"prepared {manifest['kind']} data: {root}"]
    for split, entry in manifest["splits"].items():
        counts = ", ".join(f"{v:,} {k}" for k, v in entry["counts"].items())
        lines.append(f"  {split:5s} {counts}")
    return "\n".join(lines)
