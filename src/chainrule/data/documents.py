"""Where text comes from: files of documents, read as a stream of bounded pieces.

    *.txt (any other name)   one document per file, UTF-8
    *.jsonl, *.jsonl.gz      one document per line: the line's "text" string
    *.parquet                one document per row: the "text" column (Hugging Face hub datasets)

A path is one such file or a folder of them (`glob`, sorted by name). Nothing is read whole:
`read_pieces` yields `Piece`s of at most about `PIECE_BYTES`, and a document longer than that
is cut only where byte-level BPE would cut it anyway: after a newline with a visible character
on both sides (GPT-2's pre-tokenizer never joins across such a point), so encoding the pieces
one by one gives the tokens of the whole.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

PIECE_BYTES = 1 << 22  # pieces of about 4 MiB: bounded memory, few Python objects
MAX_PIECE_BYTES = 1 << 25  # without a safe cut point, cut anyway at 32 MiB (at a newline)
_VISIBLE = range(0x21, 0x7F)  # printable ASCII other than space


@dataclasses.dataclass(frozen=True)
class Piece:
    text: str
    starts_document: bool


def file_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def text_files(path: str | Path, glob: str = "*.txt") -> list[Path]:
    """The files of a text source: `path` itself, or the `glob` files of a folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"text path {str(path)!r} (resolved to {p.resolve()}) does not exist; "
                         f"expected a text, JSONL or Parquet file or a folder of {glob!r} files")
    if p.is_dir():
        files = sorted(f for f in p.glob(glob) if f.is_file())
        if not files:
            raise ValueError(f"text folder {p.resolve()} has no files matching {glob!r}; "
                             "expected at least one non-empty text file")
        return files
    return [p]


def _safe_cut(buf: bytes, lowest: int) -> int | None:
    """The last index > lowest just after a newline with visible characters on both sides."""
    end = len(buf) - 1
    while True:
        nl = buf.rfind(b"\n", lowest, end)
        if nl <= 0:
            return None
        if buf[nl - 1] in _VISIBLE and buf[nl + 1] in _VISIBLE:
            return nl + 1
        end = nl


def _cut(buf: bytes) -> int:
    """Where to cut a buffer that has grown past MAX_PIECE_BYTES: a safe point if any, else
    the last newline, else the last UTF-8 character boundary."""
    cut = _safe_cut(buf, 0) or buf.rfind(b"\n") + 1
    if cut <= 0:  # no newline at all: before the last character that starts in the buffer
        cut = len(buf) - 1
        while cut > 1 and buf[cut] & 0xC0 == 0x80:
            cut -= 1
    return cut


def _decode(data: bytes, file: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {file} is not UTF-8 (byte {offset + e.start}); expected "
                         "UTF-8 text") from None


def byte_pieces(buf: bytes, first: bool, file: Path, offset: int = 0) -> Iterator[Piece]:
    """A document's bytes as pieces of about PIECE_BYTES, cut at safe points."""
    while len(buf) > PIECE_BYTES:
        cut = _safe_cut(buf, PIECE_BYTES // 2)
        if cut is None and len(buf) <= MAX_PIECE_BYTES:
            break
        cut = cut or _cut(buf[:MAX_PIECE_BYTES])
        yield Piece(_decode(buf[:cut], file, offset), first)
        buf, offset, first = buf[cut:], offset + cut, False
    if buf:
        yield Piece(_decode(buf, file, offset), first)


def _text_file_pieces(file: Path) -> Iterator[Piece]:
    carry, offset, first = b"", 0, True
    with open(file, "rb") as f:
        while block := f.read(PIECE_BYTES):
            buf = carry + block
            cut = _safe_cut(buf, len(buf) // 2)
            if cut is None:
                if len(buf) <= MAX_PIECE_BYTES:
                    carry = buf
                    continue
                cut = _cut(buf)
            yield Piece(_decode(buf[:cut], file, offset), first)
            carry, offset, first = buf[cut:], offset + cut, False
    if carry:
        yield Piece(_decode(carry, file, offset), first)


def _jsonl_pieces(file: Path) -> Iterator[Piece]:
    opener = gzip.open if file.name.lower().endswith(".gz") else open
    try:
        with opener(file, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                text = _jsonl_text(line, file, number)
                if text:
                    yield from byte_pieces(text.encode("utf-8"), True, file)
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise ValueError(f"JSONL file {file} cannot be read ({e}); expected UTF-8 JSON "
                         "lines, optionally gzip-compressed") from None


def _jsonl_text(line: bytes, file: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}:{number}: not a JSON line ({e}); expected one JSON object "
                         "per line") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"{file}:{number}: no \"text\" string field (keys: "
                         f"{sorted(record) if isinstance(record, dict) else type(record).__name__})"
                         "; expected {\"text\": \"...\"} on every line")
    return text


def _parquet_pieces(file: Path) -> Iterator[Piece]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise ValueError(f"Parquet file {file} cannot be read ({e})") from None
    names = parquet.schema_arrow.names
    if "text" not in names:
        raise ValueError(f"Parquet file {file} has no 'text' column (columns: {names}); "
                         "expected the documents in a string column named 'text'")
    for batch in parquet.iter_batches(batch_size=4096, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text:
                yield from byte_pieces(str(text).encode("utf-8"), True, file)


def file_pieces(file: Path) -> Iterator[Piece]:
    """The pieces of one source file, by its format."""
    reader = {"jsonl": _jsonl_pieces, "parquet": _parquet_pieces}.get(file_format(file),
                                                                      _text_file_pieces)
    return reader(file)


def read_pieces(files: list[Path]) -> Iterator[Piece]:
    for file in files:
        yield from file_pieces(file)
