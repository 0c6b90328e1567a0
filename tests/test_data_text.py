import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from chainrule.cli import CONF_DIR
from chainrule.data import DataBundle, TextDataConfig, build_data
from chainrule.data.base import load_codec
from chainrule.data.text import (
    TextCodec,
    _play_markdown_to_text,
    read_text_path,
    shakespeare_text,
    split_text,
)
from chainrule.data.tokenizers import fit_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"


def _corpus(n_chars: int = 12_000, seed: int = 0) -> str:
    # Random words: no two long windows coincide, so a window pins down its offset.
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words, size = [], 0
    while size < n_chars:
        w = "".join(rng.choice(letters, rng.integers(1, 9)))
        words.append(w + rng.choice([" ", " ", " ", ",\n", ".\n\n"]))
        size += len(words[-1])
    return "".join(words)[:n_chars]


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(_corpus(), encoding="utf-8")
    return path


def _config(path, **kw) -> TextDataConfig:
    # nanoGPT's split (the last 10% validates, no test part) unless a test says otherwise
    base = dict(source="text_file", path=str(path), sequence_length=16, batch_size=4,
                val_batches=3, prefetch=0, val_fraction=0.1, test_fraction=0.0)
    return TextDataConfig(**{**base, **kw})


def _take(it, n):
    return [next(it)["sequences"].copy() for _ in range(n)]


def _offsets(windows: np.ndarray, tokens: np.ndarray) -> list[int]:
    """The offset of each window in `tokens` (asserting it is a contiguous slice)."""
    all_windows = np.lib.stride_tricks.sliding_window_view(tokens, windows.shape[-1])
    out = []
    for w in windows.reshape(-1, windows.shape[-1]):
        hits = np.flatnonzero((all_windows == w).all(axis=1))
        assert len(hits) >= 1, "window is not a contiguous slice of the token stream"
        out.append(int(hits[0]))
    return out


# ----------------------------------------------------------------------------- sources


def test_markdown_conversion_reference():
    md = ("# Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter ROMEO and\nJULIET_\n\n"
          "**ROMEO**  \nBut soft, what light  \nthrough yonder window breaks?\n\n"
          "**JULIET**  \n__\\[Aside]_  \nAy me!\\--no.\n\n*Exeunt.*\n")
    expected = ("Enter ROMEO and\nJULIET\n\nROMEO:\nBut soft, what light\n"
                "through yonder window breaks?\n\nJULIET:\n[Aside]\nAy me!--no.\n\nExeunt.\n")
    assert _play_markdown_to_text(md) == expected


def test_shakespeare_text():
    text = shakespeare_text()
    assert len(text) > 1_000_000
    assert "ROMEO:" in text and "HAMLET:" in text and "To be, or not to be" in text
    for mark in ("**", "_", "#", "\\", "  \n", "\n\n\n"):
        assert mark not in text, mark
    shakespeare_text.cache_clear()
    assert shakespeare_text() == text  # deterministic order and conversion


def test_read_text_path_folder_and_relative(tmp_path, monkeypatch):
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "c.md").write_text("not text\n")
    assert read_text_path(tmp_path) == "first\nsecond\n"
    assert read_text_path(tmp_path, glob="*.md") == "not text\n"
    monkeypatch.chdir(tmp_path)
    assert read_text_path("a.txt") == "first\n"


def test_read_text_path_errors(tmp_path):
    with pytest.raises(ValueError, match="nope.txt.*does not exist"):
        read_text_path(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        read_text_path(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="are all empty"):
        read_text_path(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match=r"no files matching '\*.txt'"):
        read_text_path(tmp_path / "sub")


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value, match", [
    ("source", "web", "data.source='web'"),
    ("tokenizer", "wordpiece", "data.tokenizer='wordpiece'"),
    ("sequence_length", 0, "data.sequence_length=0"),
    ("batch_size", -1, "data.batch_size=-1"),
    ("val_batches", 0, "data.val_batches=0"),
    ("val_fraction", 1.0, "data.val_fraction=1.0"),
    ("val_fraction", 0.0, "data.val_fraction=0.0"),
    ("bpe_vocab_size", 100, "data.bpe_vocab_size=100"),
    ("seed", -1, "data.seed=-1"),
    ("num_workers", -2, "data.num_workers=-2"),
    ("prefetch", -1, "data.prefetch=-1"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        TextDataConfig(**{field: value})


def test_text_file_needs_path():
    with pytest.raises(ValueError, match="data.path=None"):
        TextDataConfig(source="text_file")


def _yaml_config(name: str) -> TextDataConfig:
    # What Hydra does with `defaults: [text_schema, _self_]`: the YAML merged onto the schema.
    yaml = OmegaConf.load(Path(CONF_DIR) / "data" / f"{name}.yaml")
    assert list(yaml.pop("defaults")) == ["text_schema", "_self_"]
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TextDataConfig), yaml))


def test_yaml_files_fit_the_schema(monkeypatch):
    cfg = _yaml_config("shakespeare")
    assert (cfg.source, cfg.tokenizer, cfg.sequence_length, cfg.batch_size) == (
        "shakespeare", "char", 128, 32)
    # `path: ???` must be given on the command line: without it the schema names the field.
    with pytest.raises((ValueError, MissingMandatoryValue), match="path"):
        _yaml_config("text_file")
    monkeypatch.delenv("CHAINRULE_SHARED", raising=False)
    cfg = _yaml_config("tinyshakespeare")
    assert cfg.source == "text_file"
    assert cfg.path == "../shared/data/tinyshakespeare/input.txt"
    monkeypatch.setenv("CHAINRULE_SHARED", "/data/x")
    assert _yaml_config("tinyshakespeare").path == "/data/x/data/tinyshakespeare/input.txt"


# ----------------------------------------------------------------------------- pipeline


def test_bundle_and_windows(corpus_file):
    cfg = _config(corpus_file)
    bundle = build_data(cfg)
    assert isinstance(bundle, DataBundle) and bundle.codec.kind == "text"
    text = corpus_file.read_text()
    n_train = int(len(text) * 0.9)
    train_tokens = bundle.codec.encode(text[:n_train])
    vocab = len(set(text))
    assert bundle.codec.model_fields() == {"vocab_size": vocab}
    assert bundle.metric_scales == {"bits_per_char": 1.0}
    assert bundle.info["train_tokens"] == n_train
    assert bundle.info["val_tokens"] == len(text) - n_train

    batches = _take(bundle.train, 20)
    for b in batches:
        assert b.shape == (4, 17) and b.dtype == np.int32
        assert b.min() >= 0 and b.max() < vocab
    offsets = _offsets(np.stack(batches), train_tokens)
    # Uniform offsets over the whole train split, not a fixed few.
    assert len(set(offsets)) > 70
    assert min(offsets) < n_train // 4 and max(offsets) > 3 * n_train // 4
    assert bundle.codec.decode(batches[0][0]) == text[offsets[0]:offsets[0] + 17]


def test_seeds(corpus_file):
    a = _take(build_data(_config(corpus_file, seed=3)).train, 5)
    b = _take(build_data(_config(corpus_file, seed=3)).train, 5)
    c = _take(build_data(_config(corpus_file, seed=4)).train, 5)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_resume(corpus_file, prefetch):
    cfg = _config(corpus_file, prefetch=prefetch)
    it = build_data(cfg).train
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    expected = _take(it, 6)
    resumed = build_data(cfg).train
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(resumed, 6)), np.stack(expected))


def test_worker_processes_match_and_resume(corpus_file):
    inline = _take(build_data(_config(corpus_file)).train, 6)
    cfg = _config(corpus_file, num_workers=1)
    it = build_data(cfg).train
    try:
        got = _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        got += _take(it, 3)
    finally:
        it.close()
    np.testing.assert_array_equal(np.stack(got), np.stack(inline))
    resumed = build_data(cfg).train
    try:
        resumed.set_state(state)
        np.testing.assert_array_equal(np.stack(_take(resumed, 3)), np.stack(inline[3:]))
    finally:
        resumed.close()


def test_processes_draw_disjoint_shards(corpus_file):
    cfg = _config(corpus_file, batch_size=6)
    whole = _take(build_data(cfg).train, 4)
    parts = [_take(build_data(cfg, process_index=p, process_count=2).train, 4) for p in (0, 1)]
    for k in range(4):
        assert parts[0][k].shape == (3, 17)
        # Process p holds elements p, p + 2, ...: interleaved they are the one-process batch.
        joined = np.empty_like(whole[k])
        joined[0::2], joined[1::2] = parts[0][k], parts[1][k]
        np.testing.assert_array_equal(joined, whole[k])
    val = build_data(cfg).val_batches
    val_parts = [build_data(cfg, process_index=p, process_count=2).val_batches for p in (0, 1)]
    for k in range(len(val)):
        np.testing.assert_array_equal(
            np.concatenate([val_parts[0][k]["sequences"], val_parts[1][k]["sequences"]]),
            val[k]["sequences"])
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 processes"):
        build_data(cfg, process_index=0, process_count=4)


def test_validation_batches(corpus_file):
    cfg = _config(corpus_file)
    a, b = build_data(cfg).val_batches, build_data(cfg).val_batches
    assert len(a) == 3
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["sequences"], y["sequences"])
    text = corpus_file.read_text()
    val_tokens = fit_tokenizer("char", text).encode(text[int(len(text) * 0.9):])
    windows = np.concatenate([x["sequences"] for x in a])
    assert windows.shape == (12, 17) and windows.dtype == np.int32
    starts = _offsets(windows, val_tokens)
    # Non-overlapping windows on the (T + 1)-grid, spread over the whole split.
    assert starts == sorted(starts) and len(set(s // 17 for s in starts)) == 12
    assert np.all(np.diff(starts) >= 17)
    assert starts[-1] > len(val_tokens) * 3 // 4


def test_validation_split_too_short(corpus_file):
    # 1200 validation characters; one batch of 8 windows of 257 tokens needs 2056.
    cfg = _config(corpus_file, sequence_length=256, batch_size=8)
    with pytest.raises(ValueError, match="validation split has 1200 tokens.*needs 2056"):
        build_data(cfg)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_data(_config(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        build_data(_config(tmp_path / "empty.txt"))


def test_a_resumed_run_keeps_its_saved_tokenizer(corpus_file):
    bundle = build_data(_config(corpus_file))
    saved = load_codec(bundle.codec.to_json())  # as run.json keeps it
    assert saved.model_fields() == bundle.codec.model_fields()
    # A run with a (different) saved tokenizer: it is used, not refitted.
    bigger = TextCodec(fit_tokenizer("char", corpus_file.read_text() + "XYZ"))
    reused = build_data(_config(corpus_file), codec=load_codec(bigger.to_json()))
    assert reused.codec.model_fields()["vocab_size"] == bundle.codec.model_fields()["vocab_size"] + 3
    assert reused.codec.decode(reused.codec.encode("XYZ")) == "XYZ"
    with pytest.raises(ValueError, match="holds a 'char' tokenizer but data.tokenizer='byte'"):
        build_data(_config(corpus_file, tokenizer="byte"), codec=bigger)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_subword_tokenizers(tmp_path, kind):
    text = ("Ünïcödé — 日本\n" * 20 + _corpus(2_000)) * 10  # non-ASCII in both splits
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    cfg = _config(path, tokenizer=kind, bpe_vocab_size=400)
    bundle = build_data(cfg)
    vocab = bundle.codec.model_fields()["vocab_size"]
    train_text = text[:int(len(text) * 0.9)]
    ratio = len(bundle.codec.encode(train_text)) / len(train_text)
    assert bundle.metric_scales["bits_per_char"] == pytest.approx(ratio)
    if kind == "byte":
        assert vocab == 256 and ratio == len(train_text.encode()) / len(train_text) > 1
    else:
        assert 256 < vocab <= 400 and ratio < 1
    for b in _take(bundle.train, 5) + [v["sequences"] for v in bundle.val_batches]:
        assert b.dtype == np.int32 and b.min() >= 0 and b.max() < vocab
    assert bundle.codec.decode(bundle.codec.encode(text[:500])) == text[:500]


def test_validation_bits_per_char_count_the_validation_characters(tmp_path):
    """Audit finding: validation bits/char used the train split's tokens per character. A BPE
    fitted on repeated words packs them densely; the validation part is text it never saw."""
    rng = np.random.default_rng(1)
    train = "the quick brown fox jumps over the lazy dog\n" * 400
    val = "".join(rng.choice(list("zqxjkvbpgw0123456789 "), 4_000))
    path = tmp_path / "t.txt"
    path.write_text(train + val)
    bundle = build_data(_config(path, tokenizer="bpe", bpe_vocab_size=300,
                                val_fraction=len(val) / len(train + val), val_batches=4))
    scored = [row[1:] for b in bundle.val_batches for row in b["sequences"]]
    chars = sum(len(bundle.codec.decode(row)) for row in scored)
    expected = sum(len(row) for row in scored) / chars
    assert bundle.val_metric_scales["bits_per_char"] == pytest.approx(expected)
    assert bundle.metric_scales["bits_per_char"] < 0.5 < expected  # dense train, sparse val


@pytest.mark.skipif(not TINY_SHAKESPEARE.is_file(), reason="shared tinyshakespeare not present")
def test_tinyshakespeare(monkeypatch):
    monkeypatch.chdir(REPO)  # the YAML path is relative to where one runs: the repo root
    monkeypatch.delenv("CHAINRULE_SHARED", raising=False)
    cfg = dataclasses.replace(_yaml_config("tinyshakespeare"), sequence_length=64, batch_size=12)
    assert Path(cfg.path).resolve() == TINY_SHAKESPEARE.resolve()
    bundle = build_data(cfg)
    assert bundle.codec.model_fields() == {"vocab_size": 65}
    assert bundle.info["train_chars"] == 1_003_854
    batch = next(bundle.train)["sequences"]
    assert batch.shape == (12, 65) and batch.max() < 65


def test_train_validation_and_test_parts_are_disjoint_and_in_order(corpus_file):
    text = corpus_file.read_text()
    parts = split_text(text, 0.1, 0.05)
    assert "".join(parts[k] for k in ("train", "val", "test")) == text
    assert len(parts["test"]) == len(text) - int(len(text) * 0.95)
    assert len(parts["val"]) == int(len(text) * 0.95) - int(len(text) * 0.85)
    # Training and validation never see the test part.
    bundle = build_data(_config(corpus_file, val_fraction=0.1, test_fraction=0.05))
    assert bundle.info["train_chars"] + bundle.info["val_chars"] == int(len(text) * 0.95)
    assert split_text(text, 0.1, 0.0)["test"] == ""
    with pytest.raises(ValueError, match="data.test_fraction=0.9: expected a value in"):
        _config(corpus_file, test_fraction=0.9)
