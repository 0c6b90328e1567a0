import json

import numpy as np
import pytest

from chainrule.data.tokenizers import (
    EOS_TOKEN,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    fit_tokenizer,
    load_tokenizer,
)

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\nSpeak, speak.\n\nNaïve café — déjà vu, 日本語 tokens!\n") * 20


@pytest.fixture(scope="module")
def bpe():
    return fit_tokenizer("bpe", TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def tokenizers(bpe):
    return {"char": fit_tokenizer("char", TEXT), "byte": fit_tokenizer("byte", TEXT), "bpe": bpe}


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_round_trip_and_ids(tokenizers, kind):
    tok = tokenizers[kind]
    assert tok.kind == kind
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and ids.ndim == 1 and len(ids) > 0
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids.tolist()) == TEXT  # plain lists too
    assert tok.decode(np.asarray([], np.int32)) == ""


def test_char_vocabulary_is_sorted_characters():
    tok = fit_tokenizer("char", "abcab\n")
    assert tok.chars == ["\n", "a", "b", "c"] and tok.vocab_size == 4
    np.testing.assert_array_equal(tok.encode("cab\n"), [3, 1, 2, 0])
    assert tok.eos_id is None and tok.pad_id is None


def test_char_unknown_characters_are_named():
    tok = fit_tokenizer("char", "hello world")
    with pytest.raises(ValueError, match=r"'Z'.*'!'|'!'.*'Z'"):
        tok.encode("hello Zorld!")


def test_byte_ids_are_utf8_bytes():
    tok = fit_tokenizer("byte", "")
    assert tok.vocab_size == 256
    assert tok.encode("é!").tolist() == list("é!".encode())
    # A sampled byte sequence need not be valid UTF-8: it still decodes.
    assert tok.decode([0x68, 0xC3]) == "h\ufffd"


def test_bpe_merges_and_eos(bpe):
    assert 256 < bpe.vocab_size <= 300
    ids = bpe.encode(TEXT)
    assert len(ids) < len(TEXT.encode())  # merges make it shorter than bytes
    eos = bpe.encode(EOS_TOKEN)
    assert eos.tolist() == [bpe.eos_id]
    assert bpe.decode(bpe.encode("a" + EOS_TOKEN + "b")) == "a" + EOS_TOKEN + "b"
    # Text never seen in fitting still encodes (byte fallback) and round-trips.
    assert bpe.decode(bpe.encode("Ωμέγα ∑ 🙂")) == "Ωμέγα ∑ 🙂"


def test_bpe_fit_is_deterministic(bpe):
    again = fit_tokenizer("bpe", TEXT, vocab_size=300)
    assert again.to_json() == bpe.to_json()


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_save_load(tokenizers, kind, tmp_path):
    tok = tokenizers[kind]
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    assert json.loads(path.read_text())["kind"] == kind  # plain JSON
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert loaded.vocab_size == tok.vocab_size and loaded.eos_id == tok.eos_id
    np.testing.assert_array_equal(loaded.encode(TEXT), tok.encode(TEXT))
    assert loaded.decode(tok.encode(TEXT)) == TEXT


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="'wordpiece'"):
        fit_tokenizer("wordpiece", TEXT)
    with pytest.raises(ValueError, match="vocab_size=100"):
        fit_tokenizer("char", TEXT, vocab_size=100)
    with pytest.raises(ValueError, match=r"vocab_size must be >= 257.*got 200"):
        fit_tokenizer("bpe", TEXT, vocab_size=200)
    with pytest.raises(ValueError, match="empty"):
        fit_tokenizer("char", "")
    tok = fit_tokenizer("char", "abc")
    with pytest.raises(ValueError, match=r"\[0, 3\).*\[0, 3\]"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="integers"):
        tok.decode(np.array([0.5]))
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "pickle"}))
    with pytest.raises(ValueError, match="'pickle'"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match="sorted"):
        CharTokenizer(["b", "a"])


def test_interface_types(tokenizers):
    assert isinstance(tokenizers["byte"], ByteTokenizer)
    assert isinstance(tokenizers["bpe"], BPETokenizer)
    assert tokenizers["bpe"].pad_id is None


def test_char_encoding_of_ascii_and_wider_text_with_a_wide_vocabulary():
    tok = fit_tokenizer("char", "ab—c\n")  # the em dash (U+2014) widens the code-point table
    assert tok.decode(tok.encode("abc\n")) == "abc\n"  # ASCII-only text: the uint8 path
    assert tok.encode("a—").tolist() == [tok.chars.index("a"), tok.chars.index("—")]
    with pytest.raises(ValueError, match="outside the char tokenizer's 5-symbol vocabulary: 'z'"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="'é'"):
        fit_tokenizer("char", "ab").encode("é")  # above the largest code point of the vocabulary
