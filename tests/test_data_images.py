"""Image pipelines: every source loads into the right layout, requantisation, the grain train
iterator (seeded, checkpointable, sharded), fixed validation batches and clear errors. Shared
data sets are read from ../shared/data beside the checkout and skipped when it is absent."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chainrule.data import base
from chainrule.data.base import build_data
from chainrule.data.images import (
    ImageDataConfig,
    _cifar_batch,
    build_image_data,
    inpainting_mask,
    levels_to_uint8,
    read_idx,
    requantize,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, field", [
    (dict(source="svhn"), "source"),
    (dict(source="cifar10"), "path"),
    (dict(source="image_folder"), "path"),
    (dict(num_levels=18), "num_levels"),  # digits have 17
    (dict(num_levels=1), "num_levels"),
    (dict(batch_size=0), "batch_size"),
    (dict(val_batches=0), "val_batches"),
    (dict(image_size=(8, 8)), "image_size"),  # digits are never resized
    (dict(source="image_folder", path="x", image_size=(0, 8)), "image_size"),
    (dict(num_workers=-1), "num_workers"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ImageDataConfig(**kwargs)


def test_missing_paths_raise(tmp_path):
    for source in ("mnist", "binarized_mnist", "cifar10", "image_folder"):
        with pytest.raises(ValueError, match="does not exist"):
            build_image_data(ImageDataConfig(source=source, path=str(tmp_path / "nowhere")))


# ----------------------------------------------------------------------------- levels


def test_requantize_and_decode_by_hand():
    levels = np.array([0, 63, 64, 127, 128, 255])
    np.testing.assert_array_equal(requantize(levels, 256, 4), [0, 0, 1, 1, 2, 3])
    np.testing.assert_array_equal(requantize(levels, 256, 256), levels)
    np.testing.assert_array_equal(requantize(np.arange(17), 17, 2), [0] * 9 + [1] * 8)
    np.testing.assert_array_equal(levels_to_uint8(np.array([[[0], [8], [16]]]), 17),
                                  [[[0], [128], [255]]])
    np.testing.assert_array_equal(levels_to_uint8(np.array([0, 1]), 2), [0, 255])


# ----------------------------------------------------------------------------- digits


def test_digits_bundle():
    bundle = base.build_data(ImageDataConfig(batch_size=8, val_batches=3))
    batch = next(bundle.train)
    assert batch["images"].shape == (8, 8, 8, 1) and batch["images"].dtype == np.int32
    assert batch["labels"].shape == (8,) and batch["labels"].dtype == np.int32
    assert 0 <= batch["images"].min() and batch["images"].max() <= 16
    assert set(np.unique(batch["labels"])) <= set(range(10))
    assert bundle.codec.model_fields() == {"image_shape": (8, 8, 1), "num_levels": 17}
    assert "num_classes" not in bundle.codec.model_fields()  # conditioning is the user's choice
    assert bundle.info["num_classes"] == 10 and bundle.codec.kind == "image"
    assert (bundle.info["train_images"], bundle.info["val_images"],
            bundle.info["test_images"]) == (1437, 180, 180)
    assert len(bundle.val_batches) == 3
    decoded = bundle.codec.decode(batch["images"][0])
    assert decoded.dtype == np.uint8 and decoded.shape == (8, 8, 1)
    np.testing.assert_array_equal(decoded, np.rint(batch["images"][0] * 255 / 16))

    # The validation batches are fixed (whatever the seed) and come from the validation 10%
    # of a fixed permutation; no batch holds a test image.
    again = build_image_data(ImageDataConfig(batch_size=8, val_batches=3, seed=5))
    for a, b in zip(bundle.val_batches, again.val_batches, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
    from sklearn.datasets import load_digits

    all_images = load_digits().images.astype(np.int32)[np.random.default_rng(0).permutation(1797)]
    val_rows = {img.tobytes() for img in all_images[1437:1617]}
    test_rows = {img.tobytes() for img in all_images[1617:]} - val_rows
    assert all(img[..., 0].tobytes() in val_rows for img in bundle.val_batches[0]["images"])
    trained = np.concatenate([b["images"] for b in take(bundle.train, 200)])
    assert not {img[..., 0].tobytes() for img in trained} & test_rows


def test_train_stream_is_seeded_shuffled_and_checkpointable():
    first = take(build_image_data(ImageDataConfig(batch_size=16, seed=1)).train, 3)
    same = take(build_image_data(ImageDataConfig(batch_size=16, seed=1)).train, 3)
    other = take(build_image_data(ImageDataConfig(batch_size=16, seed=2)).train, 3)
    for a, b in zip(first, same, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
    assert not np.array_equal(first[0]["images"], other[0]["images"])

    train = build_image_data(ImageDataConfig(batch_size=16, seed=1)).train
    take(train, 2)
    state = train.get_state()
    expected = take(train, 3)
    train.set_state(state)
    for a, b in zip(expected, take(train, 3), strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    fresh = build_image_data(ImageDataConfig(batch_size=16, seed=1)).train
    fresh.set_state(state)  # a restored run continues where the saved one stopped
    np.testing.assert_array_equal(next(fresh)["images"], expected[0]["images"])


def test_one_epoch_visits_every_train_image_once():
    bundle = build_image_data(ImageDataConfig(batch_size=3, num_levels=17))
    n = bundle.info["train_images"]  # 1437: the stream's first n images are a permutation
    seen = np.concatenate([b["images"] for b in take(bundle.train, n // 3)])
    from sklearn.datasets import load_digits

    order = np.random.default_rng(0).permutation(1797)[:n]
    train = load_digits().images[order].astype(np.int32).reshape(n, -1)
    assert sorted(map(bytes, seen.reshape(n, -1))) == sorted(map(bytes, train))


def test_processes_share_out_batches():
    both = [build_image_data(ImageDataConfig(batch_size=8), process_index=i, process_count=2)
            for i in range(2)]
    whole = build_image_data(ImageDataConfig(batch_size=8))
    # Each process keeps its own rows of the same validation batches.
    joined = np.concatenate([both[0].val_batches[0]["images"], both[1].val_batches[0]["images"]])
    np.testing.assert_array_equal(joined, whole.val_batches[0]["images"])
    # ...and alternate examples of the one shuffled train stream.
    stream = np.concatenate([b["images"] for b in take(whole.train, 3)])
    for i, part in enumerate(both):
        batches = take(part.train, 3)
        assert batches[0]["images"].shape == (4, 8, 8, 1)
        mine = np.concatenate([b["images"] for b in batches])
        np.testing.assert_array_equal(mine, stream[i::2])
    with pytest.raises(ValueError, match="divisible"):
        build_data(ImageDataConfig(batch_size=7), process_index=0, process_count=2)


def test_digits_requantised():
    bundle = build_image_data(ImageDataConfig(batch_size=8, num_levels=2))
    images = np.concatenate([b["images"] for b in bundle.val_batches])
    assert set(np.unique(images)) == {0, 1}
    assert bundle.codec.model_fields()["num_levels"] == 2


# ----------------------------------------------------------------------------- files in tmp


def test_idx_reader_and_mnist_folder(tmp_path):
    images = np.arange(20 * 28 * 28).reshape(20, 28, 28) % 256
    labels = np.arange(20)  # label i <-> image i
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    bundle = build_image_data(ImageDataConfig(source="mnist", path=str(tmp_path), batch_size=2,
                                              val_batches=1))
    assert (bundle.info["train_images"], bundle.info["val_images"],
            bundle.info["test_images"]) == (16, 2, 2)  # t10k divided 80/10/10
    val = bundle.val_batches[0]
    for img, label in zip(val["images"], val["labels"], strict=True):
        np.testing.assert_array_equal(img[..., 0], images[label])
        assert label in (16, 17)
    # With train files present, their last part validates and t10k is the test split.
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    bundle = build_image_data(ImageDataConfig(source="mnist", path=str(tmp_path), batch_size=2))
    assert (bundle.info["train_images"], bundle.info["val_images"],
            bundle.info["test_images"]) == (18, 2, 20)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + bytes(8)))
    with pytest.raises(ValueError, match="not a uint8 IDX"):
        read_idx(tmp_path / "bad.gz")


def test_cifar10_from_fake_pickle_batches(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (26, 3072), dtype=np.uint8)
    for name, rows in (("data_batch_1", data[:20]), ("test_batch", data[20:])):
        with open(tmp_path / name, "wb") as f:  # the CIFAR-10 python format is a pickle
            pickle.dump({b"data": rows, b"labels": list(range(len(rows)))}, f)
    bundle = build_image_data(ImageDataConfig(source="cifar10", path=str(tmp_path),
                                              batch_size=2, val_batches=1))
    assert bundle.codec.model_fields() == {"image_shape": (32, 32, 3), "num_levels": 256}
    # Validation: the last tenth of the training batches; test_batch is the test split.
    assert (bundle.info["train_images"], bundle.info["val_images"],
            bundle.info["test_images"]) == (18, 2, 6)
    val = bundle.val_batches[0]
    for img, label in zip(val["images"], val["labels"], strict=True):
        assert label in (18, 19)
        row = data[label]  # 1024 red, then 1024 green, then 1024 blue, row-major
        np.testing.assert_array_equal(img[..., 0], row[:1024].reshape(32, 32))
        np.testing.assert_array_equal(img[..., 2], row[2048:].reshape(32, 32))
    assert next(bundle.train)["images"].shape == (2, 32, 32, 3)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(ValueError, match="test_batch"):
        build_image_data(ImageDataConfig(source="cifar10", path=str(tmp_path)))


def test_cifar10_batches_are_read_without_running_code(tmp_path):
    class Exploit:  # what a tampered batch could hold: a call made while unpickling
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    for name in ("data_batch_1", "test_batch"):
        (tmp_path / name).write_bytes(pickle.dumps({b"data": Exploit(), b"labels": [0]}))
    with pytest.raises(ValueError, match=r"data_batch_1 is not a readable CIFAR-10 python batch "
                                         r"\(refusing to load (posix|os).system"):
        build_image_data(ImageDataConfig(source="cifar10", path=str(tmp_path)))
    assert not (tmp_path / "pwned").exists()
    # The real batches are Python 2 era pickles naming numpy.core (numpy 2: numpy._core).
    rows = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    old = pickle.dumps({b"data": rows, b"labels": [1, 2]}, protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "data_batch_1").write_bytes(old)
    (tmp_path / "data_batch_1").rename(tmp_path / "test_batch")
    images, labels = _cifar_batch(tmp_path / "test_batch")
    assert images.shape == (2, 32, 32, 3) and labels.tolist() == [1, 2]
    np.testing.assert_array_equal(images[1, 0, 0], rows[1, [0, 1024, 2048]])


def test_image_folder_with_classes_and_resizing(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):  # 20 images: 16 train, 2 validation, 2 test
            grey = rng.integers(0, 256, (6, 7), dtype=np.uint8)
            Image.fromarray(grey).save(tmp_path / cls / f"{i}.png")
    bundle = build_image_data(ImageDataConfig(source="image_folder", path=str(tmp_path),
                                              batch_size=2, val_batches=1))
    assert bundle.codec.model_fields()["image_shape"] == (6, 7, 1)  # grey PNGs: one channel
    assert bundle.info["num_classes"] == 2 and bundle.info["class_names"] == ["cat", "dog"]
    batch = next(bundle.train)
    for img, label in zip(batch["images"], batch["labels"], strict=True):
        folder = tmp_path / ["cat", "dog"][label]
        assert any(np.array_equal(img[..., 0], np.asarray(Image.open(f))) for f in
                   folder.iterdir())
    resized = build_image_data(ImageDataConfig(source="image_folder", path=str(tmp_path),
                                               batch_size=2, image_size=(4, 5)))
    assert resized.codec.model_fields()["image_shape"] == (4, 5, 1)


def test_image_folder_colour_flat_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    bundle = build_image_data(ImageDataConfig(source="image_folder", path=str(tmp_path),
                                              batch_size=1, num_levels=16))
    batch = next(bundle.train)
    assert batch["images"].shape == (1, 5, 5, 3) and "labels" not in batch
    assert batch["images"].max() < 16 and bundle.info["num_classes"] is None
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="different sizes"):
        build_image_data(ImageDataConfig(source="image_folder", path=str(tmp_path),
                                         batch_size=1))
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "sub" / "a.png")
    with pytest.raises(ValueError, match="both"):
        build_image_data(ImageDataConfig(source="image_folder", path=str(tmp_path),
                                         batch_size=1))


def test_too_few_images_for_a_batch(tmp_path):
    for i in range(5):  # 3 train, 1 validation, 1 test
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match="validation split has 1 images"):
        build_image_data(ImageDataConfig(source="image_folder", path=str(tmp_path),
                                         batch_size=2))


def test_encode_reads_an_image_as_the_model_sees_it(tmp_path):
    digits = build_image_data(ImageDataConfig(batch_size=8, val_batches=1))  # 8x8x1, 17 levels
    levels = next(digits.train)["images"][0]
    Image.fromarray(digits.codec.decode(levels)[..., 0]).save(tmp_path / "sample.png")
    # a saved sample reads back as the levels it was made of
    np.testing.assert_array_equal(digits.codec.encode(str(tmp_path / "sample.png")), levels)
    # a colour image of another size: resized, grey by luminance (ITU-R 601-2, PIL's "L"),
    # requantised: (200 * 299 + 100 * 587 + 50 * 114) / 1000 = 124 -> 124 * 17 // 256 = 8
    Image.fromarray(np.full((20, 12, 3), (200, 100, 50), np.uint8)).save(tmp_path / "c.png")
    encoded = digits.codec.encode(str(tmp_path / "c.png"))
    assert encoded.shape == (8, 8, 1) and np.all(encoded == 8)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable PNG/JPEG image"):
        digits.codec.encode(str(tmp_path / "text.png"))
    with pytest.raises(ValueError, match="does not exist"):
        digits.codec.encode(str(tmp_path / "missing.png"))


def test_inpainting_masks(tmp_path):
    top = inpainting_mask("top:3", 5, 4)
    np.testing.assert_array_equal(top, np.repeat([1, 1, 1, 0, 0], 4).reshape(5, 4))
    np.testing.assert_array_equal(inpainting_mask("left:1", 5, 4), np.tile([1, 0, 0, 0], (5, 1)))
    drawn = np.zeros((5, 4), np.uint8)
    drawn[1, 2] = 7
    Image.fromarray(drawn).save(tmp_path / "mask.png")
    np.testing.assert_array_equal(inpainting_mask(str(tmp_path / "mask.png"), 5, 4), drawn > 0)
    for bad, match in [("top:6", "have 5 rows"), ("left:9", "have 4 columns"),
                       ("middle:2", "neither a PNG file nor top:N / left:N"),
                       (str(tmp_path / "mask.png"), "is 5x4 .*expected the model's 4x4")]:
        with pytest.raises(ValueError, match=match):
            inpainting_mask(bad, *((4, 4) if bad.endswith(".png") else (5, 4)))


def test_binarized_npz_in_tmp(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {k: rng.integers(0, 2, (n, 784), dtype=np.uint8) for k, n in
              (("train", 12), ("valid", 4), ("test", 4))}
    np.savez(tmp_path / "binarized_mnist.npz", **arrays)
    bundle = build_image_data(ImageDataConfig(source="binarized_mnist", path=str(tmp_path),
                                              batch_size=4, val_batches=2))
    assert len(bundle.val_batches) == 1  # only 4 validation rows
    val = bundle.val_batches[0]["images"]
    assert sorted(map(bytes, val.reshape(4, -1).astype(np.uint8))) == sorted(
        map(bytes, arrays["valid"]))
    np.savez(tmp_path / "broken.npz", train=arrays["train"])
    with pytest.raises(ValueError, match="valid"):
        build_image_data(ImageDataConfig(source="binarized_mnist",
                                         path=str(tmp_path / "broken.npz")))


# ----------------------------------------------------------------------------- shared data


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="../shared/data/mnist is absent")
def test_shared_mnist():
    bundle = build_image_data(ImageDataConfig(source="mnist", path=str(SHARED / "mnist"),
                                              batch_size=16, val_batches=2))
    batch = next(bundle.train)
    assert batch["images"].shape == (16, 28, 28, 1) and batch["images"].max() <= 255
    counts = tuple(bundle.info[f"{s}_images"] for s in ("train", "val", "test"))
    assert counts in ((8000, 1000, 1000), (50_000, 10_000, 10_000))
    assert bundle.codec.model_fields() == {"image_shape": (28, 28, 1), "num_levels": 256}
    assert 0.1 < batch["images"].mean() / 255 < 0.2  # MNIST's mean pixel is about 0.13


@pytest.mark.skipif(not (SHARED / "binarized_mnist").is_dir(),
                    reason="../shared/data/binarized_mnist is absent")
def test_shared_binarized_mnist_default_path():
    bundle = build_image_data(ImageDataConfig(source="binarized_mnist", batch_size=16))
    batch = next(bundle.train)
    assert batch["images"].shape == (16, 28, 28, 1) and "labels" not in batch
    assert set(np.unique(batch["images"])) == {0, 1}
    assert bundle.info["train_images"] == 50_000 and bundle.info["val_images"] == 10_000
    assert bundle.codec.model_fields() == {"image_shape": (28, 28, 1), "num_levels": 2}


def test_worker_processes_give_the_same_checkpointable_stream():
    bundle = build_image_data(ImageDataConfig(batch_size=8, seed=3, num_workers=1))
    try:
        expected = take(build_image_data(ImageDataConfig(batch_size=8, seed=3)).train, 3)
        got = take(bundle.train, 3)
        state = bundle.train.get_state()
        after = take(bundle.train, 2)
        bundle.train.set_state(state)
        again = take(bundle.train, 2)
    finally:
        bundle.train.close()  # stop the worker process now, not at garbage collection
    for a, b in zip(expected + after, got + again, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
