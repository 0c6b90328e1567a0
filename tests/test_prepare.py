"""Prepared text: streaming preparation into shards, read memory-mapped.

The reference is the whole text in memory: `split_text` cuts it, the tokenizer encodes each
part in one call. Small pieces and units (monkeypatched) make a few hundred kB behave like a
corpus of many units, so every cut and resume path runs.
"""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chainrule.data import (
    PreparedDataConfig,
    TextDataConfig,
    build_data,
    documents,
    prepare,
    tokenizers,
)
from chainrule.data.prepared import read_manifest, split_array
from chainrule.data.text import (
    _DocumentWindow,
    load_text,
    prepare_text_data,
    split_text,
    train_dataset,
    validation_batches,
)
from chainrule.data.tokenizers import bpe_chunks, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "king", "ROMEO:", "naïve", "—", "and", ",", ".", "well-a-day", "3rd", "'s"]


def _documents(n: int = 40, seed: int = 0) -> list[str]:
    """Documents of lines of words, with blank lines, runs of spaces and non-ASCII."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choice(WORDS, rng.integers(0, 12))) + rng.choice(["", "  ", "\t"])
                 for _ in range(rng.integers(5, 60))]
        docs.append("\n".join(lines) + rng.choice(["\n", "", "\n\n"]))
    return docs


@pytest.fixture
def small_units(monkeypatch):
    """Pieces of ~2 kB, units of ~6k characters, BPE batches of ~300: many of each."""
    monkeypatch.setattr(documents, "PIECE_BYTES", 2048)
    monkeypatch.setattr(documents, "MAX_PIECE_BYTES", 8192)
    monkeypatch.setattr(prepare, "UNIT_CHARS", 6000)
    monkeypatch.setattr(tokenizers, "BPE_CHUNK", 300)


def _config(path, **kw) -> TextDataConfig:
    base = dict(source="text_file", path=str(path), sequence_length=16, batch_size=4,
                val_batches=2, prefetch=0, prepare_workers=1, bpe_vocab_size=300)
    return TextDataConfig(**{**base, **kw})


def _tokens(root: Path, split: str) -> np.ndarray:
    return np.asarray(split_array(root, read_manifest(root), split, "tokens")[:])


@pytest.mark.parametrize("tokenizer", ["char", "byte", "bpe"])
def test_prepared_tokens_are_the_in_memory_encoding(tmp_path, small_units, tokenizer):
    (tmp_path / "corpus.txt").write_text("".join(_documents()), encoding="utf-8")
    config = _config(tmp_path / "corpus.txt", tokenizer=tokenizer)
    root = prepare_text_data(config, tmp_path / "prepared")
    manifest = read_manifest(root)
    tok = load_tokenizer(root / "tokenizer.json")
    parts = split_text(load_text(config), config.val_fraction, config.test_fraction)
    for split, text in parts.items():
        assert np.array_equal(_tokens(root, split), tok.encode(text)), split
        assert manifest["splits"][split]["counts"]["characters"] == len(text)
        assert manifest["splits"][split]["counts"]["bytes"] == len(text.encode())
    assert len(manifest["splits"]["train"]["arrays"]["tokens"]["shards"]) > 3  # many units
    assert manifest["dtype"] == ("uint8" if tokenizer != "bpe" else "uint16")


def test_training_batches_equal_the_in_memory_pipeline(tmp_path, small_units):
    (tmp_path / "corpus.txt").write_text("".join(_documents()), encoding="utf-8")
    config = _config(tmp_path / "corpus.txt", tokenizer="bpe")
    bundle = build_data(config)
    tok = bundle.codec.tokenizer
    parts = split_text(load_text(config), config.val_fraction, config.test_fraction)
    train, val = tok.encode(parts["train"]), tok.encode(parts["val"])
    ref = iter(train_dataset(train, window=17, batch_size=4, seed=0).to_iter_dataset())
    for _ in range(5):
        assert np.array_equal(next(bundle.train)["sequences"], next(ref)["sequences"])
    ref_val = validation_batches(val, window=17, batch_size=4, num_batches=2)
    for got, want in zip(bundle.val_batches, ref_val, strict=True):
        assert np.array_equal(got["sequences"], want["sequences"])
    # data=prepared on the cached directory is the same pipeline
    again = build_data(PreparedDataConfig(path=bundle.info["prepared"], batch_size=4,
                                          sequence_length=16, val_batches=2, prefetch=0))
    first = build_data(config).train
    for _ in range(3):
        assert np.array_equal(next(again.train)["sequences"], next(first)["sequences"])


def test_two_worker_processes_write_what_one_writes(tmp_path, small_units):
    (tmp_path / "corpus.txt").write_text("".join(_documents(80)), encoding="utf-8")
    one = prepare_text_data(_config(tmp_path / "corpus.txt", tokenizer="bpe"), tmp_path / "one")
    two = prepare_text_data(_config(tmp_path / "corpus.txt", tokenizer="bpe",
                                    prepare_workers=2), tmp_path / "two")
    shards = [[(s["count"], s["sha256"]) for s in read_manifest(r)["splits"]["train"]["arrays"]
               ["tokens"]["shards"]] for r in (one, two)]
    assert shards[0] == shards[1] and len(shards[0]) > 3


def test_jsonl_gz_and_parquet_give_the_tokens_of_the_text_files(tmp_path, small_units):
    docs = _documents(12)
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    (tmp_path / "docs.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}),
                   tmp_path / "docs.parquet", row_group_size=5)
    roots = {name: prepare_text_data(_config(path, tokenizer="bpe", bpe_sample_chars=10_000),
                                     tmp_path / f"prep_{name}")
             for name, path in [("txt", folder), ("jsonl", tmp_path / "docs.jsonl"),
                                ("gz", tmp_path / "docs.jsonl.gz"),
                                ("parquet", tmp_path / "docs.parquet")]}
    tok = load_tokenizer(roots["txt"] / "tokenizer.json")
    for split in ("train", "val", "test"):
        want = _tokens(roots["txt"], split)
        for name in ("jsonl", "gz", "parquet"):
            assert np.array_equal(_tokens(roots[name], split), want), (name, split)
    # documents are separated by the eos token (one fewer than documents), none before the first
    everything = np.concatenate([_tokens(roots["txt"], s) for s in ("train", "val", "test")])
    assert (everything == tok.eos_id).sum() == len(docs) - 1 and everything[0] != tok.eos_id
    assert sum(read_manifest(roots["txt"])["splits"][s]["counts"]["documents"]
               for s in ("train", "val", "test")) == len(docs)


def test_bpe_chunks_cut_where_the_pre_tokenizer_cuts():
    text = "".join(_documents(30, seed=3))
    chunks = bpe_chunks(text, size=500)
    assert "".join(chunks) == text and len(chunks) > 10
    for a, b in zip(chunks[:-1], chunks[1:], strict=True):
        assert a.endswith("\n") and a[-2] not in " \t\n" and b[0] not in " \t\n"


def test_windows_inside_documents(tmp_path, small_units):
    docs = _documents(30, seed=1)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    config = _config(folder, tokenizer="bpe", cross_documents=False, sequence_length=32)
    bundle = build_data(config)
    root = Path(bundle.info["prepared"])
    tokens = _tokens(root, "train")
    starts = np.asarray(split_array(root, read_manifest(root), "train", "doc_starts")[:])
    ends = np.append(starts[1:], len(tokens))
    eos = bundle.codec.tokenizer.eos_id
    sampler = _DocumentWindow(tokens, starts, 33, eos)
    for k in range(sampler.num_windows):  # every window lies in one document
        doc = np.searchsorted(starts, sampler.starts[k], "right") - 1
        assert sampler.starts[k] < ends[doc] and sampler.ends[k] == ends[doc]
        assert (sampler.starts[k] - starts[doc]) % 32 == 0
    for _ in range(3):
        batch = next(bundle.train)
        for seq, mask in zip(batch["sequences"], batch["loss_mask"], strict=True):
            n = int(mask.sum()) + 1  # tokens of the document in the window
            assert mask[0] == 0 and mask[1:n].all() and not mask[n:].any()
            assert (seq[1:n] != eos).all()  # no target crosses into the next document
            assert (seq[n:] == eos).all()  # padding


def test_a_killed_preparation_resumes_to_the_same_result(tmp_path):
    (tmp_path / "corpus.txt").write_text("".join(_documents(60)), encoding="utf-8")
    script = f"""
import os, signal
from chainrule.data import documents, prepare
from chainrule.data.text import TextDataConfig, prepare_text_data
documents.PIECE_BYTES, documents.MAX_PIECE_BYTES, prepare.UNIT_CHARS = 2048, 8192, 6000
encode, done = prepare._encode_unit, []
def killing(*args):
    encode(*args)
    done.append(1)
    if {{kill}} and len(done) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
prepare._encode_unit = killing
config = TextDataConfig(source="text_file", path={str(tmp_path / 'corpus.txt')!r},
                        tokenizer="bpe", bpe_vocab_size=300, prepare_workers=1)
prepare_text_data(config, prepare.Path({{out!r}}))
print("encoded", len(done))
"""
    run = lambda kill, out: subprocess.run(  # noqa: E731
        [sys.executable, "-c", script.format(kill=kill, out=str(out))], cwd=REPO,
        capture_output=True, text=True, timeout=300)
    killed = run(True, tmp_path / "resumed")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "resumed").exists()  # nothing half-written under the final name
    assert len(list((tmp_path / "resumed.partial" / "units").glob("*.json"))) == 4
    resumed = run(False, tmp_path / "resumed")
    fresh = run(False, tmp_path / "fresh")
    assert resumed.returncode == fresh.returncode == 0, resumed.stderr[-2000:]
    units = int(fresh.stdout.split()[-1])
    assert int(resumed.stdout.split()[-1]) == units - 4  # the 4 done units were not redone
    a, b = (read_manifest(tmp_path / name) for name in ("resumed", "fresh"))
    for split in ("train", "val", "test"):
        assert a["splits"][split]["counts"] == b["splits"][split]["counts"]
        for array in ("tokens", "doc_starts"):
            assert [s["sha256"] for s in a["splits"][split]["arrays"][array]["shards"]] == \
                [s["sha256"] for s in b["splits"][split]["arrays"][array]["shards"]]


def test_unchanged_sources_are_reused_and_a_changed_one_prepared_again(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(_documents(10)), encoding="utf-8")
    config = _config(path)
    first = prepare_text_data(config)
    mtime = (first / "manifest.json").stat().st_mtime_ns
    assert prepare_text_data(config) == first
    assert (first / "manifest.json").stat().st_mtime_ns == mtime  # not written again
    path.write_text("".join(_documents(10, seed=5)), encoding="utf-8")
    second = prepare_text_data(config)
    assert second != first
    assert read_manifest(second)["sources"][0]["sha256"] != \
        read_manifest(first)["sources"][0]["sha256"]
    with pytest.raises(ValueError, match="prepared from other sources or options"):
        prepare_text_data(config, first)  # an explicit out= holding something else


def test_bad_inputs_are_one_line_errors(tmp_path):
    def error(path, **kw) -> str:
        with pytest.raises(ValueError) as info:
            prepare_text_data(_config(path, **kw), tmp_path / f"out{len(os.listdir(tmp_path))}")
        message = str(info.value)
        assert "\n" not in message
        return message

    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in error(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert "not UTF-8" in error(tmp_path / "latin1.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
    assert "bad.jsonl:2" in error(tmp_path / "bad.jsonl") and "text" in error(
        tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    assert "broken.jsonl:2: not a JSON line" in error(tmp_path / "broken.jsonl")
    with gzip.open(tmp_path / "cut.jsonl.gz", "wt") as f:
        f.write('{"text": "some text here"}\n' * 2000)
    data = (tmp_path / "cut.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    assert "cannot be read" in error(tmp_path / "cut.jsonl.gz")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "wrong.parquet")
    assert "no 'text' column" in error(tmp_path / "wrong.parquet")
    assert "does not exist" in error(tmp_path / "missing.txt")


def test_damaged_prepared_data_is_refused_before_training(tmp_path):
    (tmp_path / "corpus.txt").write_text("".join(_documents(10)), encoding="utf-8")
    root = prepare_text_data(_config(tmp_path / "corpus.txt"), tmp_path / "prepared")
    config = PreparedDataConfig(path=str(root), batch_size=4, sequence_length=16, prefetch=0)
    build_data(config)  # intact
    shard = root / read_manifest(root)["splits"]["train"]["arrays"]["tokens"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 1  # one bit flipped, size unchanged
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"fails its sha256 checksum"):
        build_data(config)
    shard.write_bytes(bytes(data[:-5]))
    with pytest.raises(ValueError, match=r"has \d+ bytes, the manifest says \d+ \(truncated"):
        build_data(config)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format_version"] = 99
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 99 is newer"):
        build_data(config)
    with pytest.raises(ValueError, match="no manifest.json"):
        build_data(PreparedDataConfig(path=str(tmp_path)))


@pytest.mark.slow  # two spawned processes start up: ~5 s
def test_a_script_without_a_main_guard_gets_an_error_not_a_hang(tmp_path):
    (tmp_path / "corpus.txt").write_text("".join(_documents(40)), encoding="utf-8")
    script = tmp_path / "unguarded.py"  # spawned BPE workers import it again, as __mp_main__
    script.write_text(f"""
from chainrule.data import documents, prepare
from chainrule.data.text import TextDataConfig, prepare_text_data
documents.PIECE_BYTES, documents.MAX_PIECE_BYTES, prepare.UNIT_CHARS = 2048, 8192, 6000
config = TextDataConfig(source="text_file", path={str(tmp_path / 'corpus.txt')!r},
                        tokenizer="bpe", bpe_vocab_size=300, prepare_workers=2)
prepare_text_data(config, prepare.Path({str(tmp_path / 'out')!r}))
""")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert 'must guard its entry point with `if __name__ == "__main__":`' in result.stderr


def test_shards_read_slices_and_gathers_across_files(tmp_path):
    from chainrule.data.prepared import Shards, write_shard

    data = np.arange(50, dtype=np.uint16) * 7
    shards = [write_shard(tmp_path, f"s{k}.bin", data[a:b])
              for k, (a, b) in enumerate([(0, 13), (13, 13), (13, 40), (40, 50)])]
    view = Shards(tmp_path, shards, "uint16", out_dtype=np.int32)
    assert len(view) == 50 and view[:].dtype == np.int32
    for a, b in [(0, 50), (5, 20), (13, 14), (39, 41), (49, 50), (20, 20)]:
        assert np.array_equal(view[a:b], data[a:b])
    index = np.array([[49, 0, 12, 13, 13], [40, 39, 38, 1, 2]])
    assert np.array_equal(view[index], data[index])
    assert view[17] == data[17]
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(6, 2, 2)
    records = Shards(tmp_path, [write_shard(tmp_path, "img.bin", images)], "uint8", (2, 2))
    assert np.array_equal(records[np.array([5, 0, 5])], images[[5, 0, 5]])
    with pytest.raises(IndexError):
        view[np.array([50])]
