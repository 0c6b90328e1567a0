"""Prepared images and audio (data=prepared) give bitwise the batches of the in-memory
pipelines, are reused rather than rewritten, and refuse damaged shards in one line."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from chainrule.data import AudioDataConfig, ImageDataConfig, PreparedDataConfig, build_data
from chainrule.data.audio import ClipCodes, clip_lengths, prepare_audio_data
from chainrule.data.evaluation import build_eval
from chainrule.data.images import prepare_image_data
from chainrule.data.prepare import prepare_data

IMAGES = ImageDataConfig(batch_size=8, val_batches=3, seed=3)
AUDIO = AudioDataConfig(sequence_length=64, batch_size=4, val_batches=2, seed=5,
                        label_from="pitch")


def assert_batches_equal(a, b):
    a, b = list(a), list(b)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def prepared_config(root, config, **settings) -> PreparedDataConfig:
    """data=prepared with the window the in-memory config trains on (data.sequence_length is
    training's to set; its default, 256, is a text window)."""
    window = {"sequence_length": config.sequence_length} if hasattr(config, "sequence_length") \
        else {}
    return PreparedDataConfig(path=str(root), **window, **settings)


def assert_same_as_in_memory(config, root):
    memory = build_data(config)
    prepared = build_data(prepared_config(root, config, batch_size=config.batch_size,
                                          seed=config.seed))
    assert_batches_equal(itertools.islice(memory.train, 4), itertools.islice(prepared.train, 4))
    assert_batches_equal(memory.val_batches, prepared.val_batches)
    assert prepared.info == {**memory.info, "prepared": str(root)}
    assert prepared.codec.to_json() == memory.codec.to_json()
    return memory


def assert_eval_same_as_in_memory(config, root, codec, split, batch_size):
    memory = build_eval(config, codec=codec, split=split, batch_size=batch_size)
    prepared = build_eval(prepared_config(root, config), codec=codec, split=split,
                          batch_size=batch_size)
    assert (prepared.num_batches, prepared.counts) == (memory.num_batches, memory.counts)
    assert_batches_equal(memory.batches(), prepared.batches())


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return prepare_image_data(IMAGES, tmp_path_factory.mktemp("p") / "digits")


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return prepare_audio_data(AUDIO, tmp_path_factory.mktemp("p") / "synthetic")


def test_digits_prepared_equal_in_memory(digits_dir):
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    assert manifest["kind"] == "image"
    assert manifest["splits"]["train"]["counts"] == {"images": 1437, "dims_per_image": 64}
    assert manifest["splits"]["train"]["arrays"]["images"]["dtype"] == "|u1"
    memory = assert_same_as_in_memory(IMAGES, digits_dir)
    for split in ("test", "all"):
        assert_eval_same_as_in_memory(IMAGES, digits_dir, memory.codec, split, batch_size=16)


def test_digits_prepared_other_training_settings_and_processes(digits_dir):
    config = ImageDataConfig(batch_size=6, val_batches=2, seed=11)
    memory = build_data(config, process_index=1, process_count=2)
    prepared = build_data(PreparedDataConfig(path=str(digits_dir), batch_size=6, val_batches=2,
                                             seed=11), process_index=1, process_count=2)
    assert_batches_equal(itertools.islice(memory.train, 3), itertools.islice(prepared.train, 3))
    assert_batches_equal(memory.val_batches, prepared.val_batches)


def test_requantised_digits_prepare_their_own_directory(tmp_path):
    config = ImageDataConfig(num_levels=4, batch_size=8, val_batches=2)
    root = prepare_data(config)  # the cache (conftest: a fresh one per session)
    assert root.name.startswith("image-") and root != prepare_data(IMAGES)
    assert_same_as_in_memory(config, root)


def test_synthetic_audio_prepared_equal_in_memory(synthetic_dir):
    manifest = json.loads((synthetic_dir / "manifest.json").read_text())
    val = manifest["splits"]["val"]
    assert val["counts"] == {"clips": 32, "samples": 32 * 8000, "seconds": 32.0}
    assert val["arrays"]["codes"]["dtype"] == "|u1"
    assert val["arrays"]["offsets"]["count"] == 33
    memory = assert_same_as_in_memory(AUDIO, synthetic_dir)
    for split in ("test", "all"):
        assert_eval_same_as_in_memory(AUDIO, synthetic_dir, memory.codec, split, batch_size=64)


def test_clip_codes_read_lazily(synthetic_dir):
    from chainrule.data.audio import _split_clips

    manifest = json.loads((synthetic_dir / "manifest.json").read_text())
    clips = _split_clips(synthetic_dir, manifest, "val", None)
    assert isinstance(clips.codes, ClipCodes) and len(clips.codes) == 32
    assert clips.codes.flat._files is None  # nothing opened until a clip is asked for
    np.testing.assert_array_equal(clip_lengths(clips.codes), [8000] * 32)
    assert clips.codes[-1].shape == (8000,) and clips.codes[31].dtype == np.uint8
    with pytest.raises(IndexError):
        clips.codes[32]


def test_prepared_directory_is_reused_not_rewritten(tmp_path):
    out = tmp_path / "digits"
    assert prepare_image_data(IMAGES, out) == out
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = ImageDataConfig(batch_size=16, seed=9)  # training settings: the same data
    assert prepare_data(again, out) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    with pytest.raises(ValueError, match="prepared from other sources or options"):
        prepare_image_data(ImageDataConfig(num_levels=2), out)


def copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_damaged_shards_are_one_line_errors(kind, digits_dir, synthetic_dir, tmp_path):
    root = copy_dir(digits_dir if kind == "image" else synthetic_dir, tmp_path / "d")
    manifest = json.loads((root / "manifest.json").read_text())
    # copytree keeps mtimes: the copy passes as it is
    codec = build_data(PreparedDataConfig(path=str(root), batch_size=4)).codec
    shard = root / "train" / ("images.bin" if kind == "image" else "codes.bin")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped, a new mtime
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard train/\S+ fails its sha256") as e:
        build_data(PreparedDataConfig(path=str(root), batch_size=4))
    assert "\n" not in str(e.value)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match=r"shard train/\S+ has \d+ bytes.*truncated") as e:
        build_eval(PreparedDataConfig(path=str(root)), codec=codec, split="train", batch_size=4)
    assert "\n" not in str(e.value)
    manifest["format_version"] = 99
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 99 is newer") as e:
        build_data(PreparedDataConfig(path=str(root), batch_size=4))
    assert "\n" not in str(e.value)


def test_a_run_with_another_codec_is_refused(digits_dir, synthetic_dir):
    images = build_data(PreparedDataConfig(path=str(digits_dir), batch_size=4)).codec
    with pytest.raises(ValueError, match="holds audio .* the run's model was trained on"):
        build_data(PreparedDataConfig(path=str(synthetic_dir), batch_size=4), codec=images)
    with pytest.raises(ValueError, match="the run's model was trained on"):
        build_eval(PreparedDataConfig(path=str(synthetic_dir)), codec=images, split="test",
                   batch_size=4)


def test_shared_binarized_mnist_prepared_equal_in_memory(shared_data, tmp_path):
    config = ImageDataConfig(source="binarized_mnist",
                             path=str(shared_data / "binarized_mnist" / "binarized_mnist.npz"),
                             batch_size=16, val_batches=2)
    root = prepare_image_data(config, tmp_path / "bin")
    manifest = json.loads((root / "manifest.json").read_text())
    assert [s["path"] for s in manifest["sources"]] == [str(Path(config.path).resolve())]
    assert "labels" not in manifest["splits"]["train"]["arrays"]
    memory = assert_same_as_in_memory(config, root)
    assert_eval_same_as_in_memory(config, root, memory.codec, "test", batch_size=500)

