"""The prepared-data format: a directory of shards and the manifest that describes them.

    <dir>/manifest.json        format + version, kind ("text" | "image" | "audio"), the data
                               config it was prepared from, the sources (path, size, sha256),
                               the codec (a text tokenizer), dtype, and per split its counts and
                               shards (file, count, bytes, sha256)
    <dir>/tokenizer.json       text: the tokenizer the tokens were made with
    <dir>/<split>/*.bin        raw little-endian arrays: text tokens in the smallest unsigned
                               dtype that holds the vocabulary, images as uint8 records, audio
                               as μ-law codes; plus per-split index arrays (document starts,
                               clip offsets, labels)

Training reads shards through `Shards`, random access by `os.pread` over the files: RAM
follows the batch, not the corpus, and a Grain worker that unpickles one reopens the files
instead of copying them. A shard whose size or checksum disagrees with the manifest, or a
manifest of a newer format, is a one-line error before anything is trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chainrule.config import check, from_dict
from chainrule.data.base import DataConfig, register_data
from chainrule.data.evaluation import register_eval

FORMAT = "chainrule-prepared"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HASH_BLOCK = 1 << 24


def smallest_uint(num_values: int) -> np.dtype:
    """The smallest unsigned dtype holding 0 .. num_values - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_values <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def write_shard(root: Path, rel: str, array: np.ndarray) -> dict[str, Any]:
    """Write `array` (raw, C order) to root/rel through a temporary file, and describe it.

    The description is what the manifest lists: file, count (leading axis), bytes, sha256 and
    the file's mtime (a shard whose size and mtime are unchanged is not hashed again)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(array)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(data).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": rel, "count": int(data.shape[0]) if data.ndim else 1,
            "bytes": int(data.nbytes), "sha256": hashlib.sha256(memoryview(data).cast("B")).hexdigest(),
            "mtime_ns": path.stat().st_mtime_ns}


# ----------------------------------------------------------------------------- reading


class Shards:
    """Shard files of one array, read as one: `len`, slices and integer-array indexing along
    the leading axis (records of `shape` each), returning numpy arrays of `out_dtype`.

    Reads are `os.pread`s of exactly the records asked for, not a memory map: a mapped file
    read at random places grows the process's resident memory by whole page-cache folios
    (megabytes per window on this kernel), while a read copies only the window."""

    def __init__(self, root: Path, shards: Sequence[dict[str, Any]], dtype: str,
                 shape: Sequence[int] = (), out_dtype: Any = None):
        self.root = Path(root)
        self.shards = [s for s in shards if s["count"]]
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self.out_dtype = np.dtype(out_dtype) if out_dtype is not None else self.dtype
        self.record_bytes = self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))
        counts = np.array([s["count"] for s in self.shards], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._files: list[int] | None = None

    def __getstate__(self) -> dict[str, Any]:  # pickled by path: workers reopen the files
        return {**self.__dict__, "_files": None}

    def __del__(self) -> None:
        for fd in self.__dict__.get("_files") or ():
            os.close(fd)

    def _read(self, k: int, lo: int, hi: int) -> np.ndarray:
        """Records lo..hi-1 of shard k."""
        if self._files is None:
            self._files = [os.open(self.root / s["file"], os.O_RDONLY) for s in self.shards]
        data = os.pread(self._files[k], int(hi - lo) * self.record_bytes,
                        int(lo) * self.record_bytes)
        return np.frombuffer(data, self.dtype).reshape(-1, *self.shape)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def concat(self, other: Shards) -> Shards:
        return Shards(self.root, self.shards + other.shards, self.dtype.str, self.shape,
                      self.out_dtype)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("Shards are read in contiguous slices (step 1) only")
            return self._slice(start, stop)
        if isinstance(index, (int, np.integer)):
            return self._gather(np.array([index]))[0]
        return self._gather(np.asarray(index))

    def _slice(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.offsets, start, "right")) - 1
        parts, at = [], start
        for k in range(max(first, 0), len(self.shards)):
            if at >= stop:
                break
            hi = min(stop, self.offsets[k + 1])
            parts.append(self._read(k, at - self.offsets[k], hi - self.offsets[k]))
            at = hi
        if not parts:
            return np.zeros((0, *self.shape), self.out_dtype)
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(self.out_dtype)

    def _gather(self, index: np.ndarray) -> np.ndarray:
        """Any indices: each run of consecutive distinct indices is one read."""
        wanted, inverse = np.unique(index.reshape(-1).astype(np.int64), return_inverse=True)
        if wanted.size and (wanted[0] < 0 or wanted[-1] >= len(self)):
            raise IndexError(f"index out of range for {len(self)} records")
        shard = np.searchsorted(self.offsets, wanted, "right") - 1
        breaks = np.flatnonzero((np.diff(wanted) != 1) | (np.diff(shard) != 0)) + 1
        firsts, lasts = np.append(0, breaks), np.append(breaks, wanted.size)
        parts = [self._read(shard[a], wanted[a] - self.offsets[shard[a]],
                            wanted[b - 1] + 1 - self.offsets[shard[a]])
                 for a, b in zip(firsts, lasts, strict=True) if b > a]
        values = np.concatenate(parts) if parts else np.zeros((0, *self.shape), self.dtype)
        return values[inverse].astype(self.out_dtype).reshape(*index.shape, *self.shape)


def _bad(where: Path, message: str) -> ValueError:
    return ValueError(f"prepared data {where}: {message}")


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory, checked for format and version."""
    root = Path(root).expanduser()
    path = root / MANIFEST
    if not path.is_file():
        raise _bad(root, f"no {MANIFEST}; expected a directory written by prepare.py")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _bad(root, f"{MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _bad(root, f"{MANIFEST} is not a {FORMAT!r} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _bad(root, f"format version {version!r} is newer than this chainrule reads "
                         f"({FORMAT_VERSION}); upgrade chainrule or prepare the data again")
    return manifest


def open_prepared(root: str | Path, kind: str, codec_json: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The manifest of a prepared directory of `kind`, its shards checked (`verify`); with a
    run's codec, it must be the one the data was prepared with."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest["kind"] != kind:
        raise _bad(root, f"holds {manifest['kind']} data, not {kind}")
    verify(root, manifest)
    if codec_json is not None and manifest.get("codec") not in (None, codec_json):
        raise _bad(root, f"holds {kind} coded as {manifest['codec']}; the run's model was "
                         f"trained on {codec_json}")
    return manifest


def all_shards(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file the manifest lists, shards and index arrays alike."""
    out = []
    for split in manifest["splits"].values():
        for entry in split.get("arrays", {}).values():
            out.extend(entry["shards"])
    return out


def verify(root: str | Path, manifest: dict[str, Any]) -> None:
    """Every listed file exists with its size; one whose mtime changed is hashed again."""
    root = Path(root)
    for shard in all_shards(manifest):
        path = root / shard["file"]
        if not path.is_file():
            raise _bad(root, f"shard {shard['file']} is missing; prepare the data again")
        stat = path.stat()
        if stat.st_size != shard["bytes"]:
            raise _bad(root, f"shard {shard['file']} has {stat.st_size} bytes, the manifest "
                             f"says {shard['bytes']} (truncated?); prepare the data again")
        if stat.st_mtime_ns != shard.get("mtime_ns") and file_sha256(path) != shard["sha256"]:
            raise _bad(root, f"shard {shard['file']} fails its sha256 checksum (changed since "
                             "it was prepared); prepare the data again")


def split_array(root: str | Path, manifest: dict[str, Any], split: str, name: str,
                out_dtype: Any = None) -> Shards:
    """One array of one split (e.g. the "tokens" of "train") as `Shards`."""
    entry = manifest["splits"][split]["arrays"][name]
    return Shards(Path(root), entry["shards"], entry["dtype"], entry.get("shape", ()),
                  out_dtype)


def array_entry(shards: list[dict[str, Any]], dtype: Any, shape: Sequence[int] = ()) -> dict:
    return {"dtype": np.dtype(dtype).str, "shape": list(shape), "shards": shards,
            "count": int(sum(s["count"] for s in shards))}


# ----------------------------------------------------------------------------- data=prepared


@dataclasses.dataclass
class PreparedDataConfig(DataConfig):
    """Train from a prepared directory (`data=prepared data.path=<dir>`): the manifest says
    what it holds and the data config it was prepared with; the fields set here (not None)
    replace that config's training-time settings."""

    source: str = "prepared"
    path: str | None = None
    batch_size: int = 32
    sequence_length: int = 256  # text and audio windows (the model's context follows it)
    val_batches: int | None = None
    seed: int = 0
    num_workers: int = 0
    prefetch: int = 2
    cross_documents: bool | None = None  # text (None: as prepared)

    def __post_init__(self):
        check(bool(self.path), f"data.path={self.path!r}: data=prepared needs the directory "
                               "prepare.py wrote (data.path=<dir>)")
        self.check_fields(("prepared",), ("batch_size", "sequence_length"))
        check(self.val_batches is None or self.val_batches > 0,
              f"data.val_batches={self.val_batches!r}: expected a positive integer or null")


@dataclasses.dataclass(frozen=True)
class PreparedKind:
    """How one kind of prepared data is read: its data config type, the pipeline over a
    prepared directory and the evaluation batches of a split."""

    config_type: type
    bundle: Callable[..., Any]
    evaluate: Callable[..., Any]


_KINDS: dict[str, PreparedKind] = {}


def register_prepared_kind(kind: str, config_type: type, *, bundle: Callable[..., Any],
                           evaluate: Callable[..., Any]) -> None:
    _KINDS[kind] = PreparedKind(config_type, bundle, evaluate)


def kind_config(config: PreparedDataConfig) -> tuple[Path, PreparedKind, Any]:
    """The prepared directory, its kind, and the data config it was prepared with, with this
    config's training-time settings."""
    root = Path(config.path).expanduser()
    manifest = read_manifest(root)
    kind = _KINDS.get(manifest.get("kind"))
    if kind is None:
        raise ValueError(f"prepared data {root} holds {manifest.get('kind')!r}; expected one "
                         f"of {sorted(_KINDS)}")
    names = {f.name for f in dataclasses.fields(kind.config_type)}
    saved = {k: v for k, v in manifest["data"].items() if k in names}
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if v is not None and k in names and k not in ("source", "path")}
    return root, kind, from_dict(kind.config_type.__name__, {**saved, **settings})


@register_data("prepared", PreparedDataConfig)
def build_prepared_data(config: PreparedDataConfig, *, codec: Any = None, process_index: int = 0,
                        process_count: int = 1) -> Any:
    root, kind, data = kind_config(config)
    return kind.bundle(data, root, codec=codec, process_index=process_index,
                       process_count=process_count)


@register_eval(PreparedDataConfig)
def prepared_eval(config: PreparedDataConfig, **kwargs: Any) -> Any:
    root, kind, data = kind_config(config)
    return kind.evaluate(data, root=root, **kwargs)
