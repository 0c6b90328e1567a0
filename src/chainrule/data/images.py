"""Images for PixelCNN: sources, the `ImageDataConfig` schema and its Grain pipeline.

Every source becomes integer levels [N, H, W, C] (plus int labels where it has them) in three
splits, train, validation and test; training never reads the test split (`evaluate.py split=test`
scores it):

  digits           sklearn's 8x8 digits (embedded, no download), 17 levels, 10 classes; a fixed
                   seeded permutation: 80% train / 10% validation / 10% test.
  mnist            IDX .gz files in a folder, 256 levels, 10 classes; test = t10k, validation = the
                   last 10,000 training images. Without train-images-idx3-ubyte.gz
                   (../shared/data/mnist has only the t10k images) the 10k t10k set is divided:
                   first 8,000 train, next 1,000 validation, last 1,000 test (not the papers' test).
  binarized_mnist  the Larochelle & Murray .npz (train 50k / valid 10k / test 10k, 784 uint8
                   {0, 1} rows), 2 levels; its train and valid rows have no labels, so batches
                   carry none.
  cifar10          the python-pickle batches, 32x32x3, 256 levels: test = test_batch, validation =
                   the last 5,000 images of data_batch_1..5.
  image_folder     PNG/JPEG files (PIL); class = sub-folder name when there are sub-folders;
                   grey when every image is grey, else RGB; a fixed permutation, 80/10/10.

`num_levels` below a source's native count requantises (level v -> v * L // native), e.g.
binarising 8-bit MNIST with num_levels=2.

The pipeline: train is an infinite, seeded-shuffle (reshuffled every epoch), checkpointable
Grain iterator of {"images": int32 [B, H, W, C], "labels": int32 [B]}; validation is a fixed list
of such batches drawn from a fixed permutation of the validation split.

Prepared (`prepare_image_data`, then `data=prepared data.path=<dir>`): each split's levels as uint8
records [H, W, C] plus int32 labels in shards, gathered from the files into bitwise the same
batches; `data=digits` etc. still load their (small) source in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import pickle
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
from chainrule.data.evaluation import EvalSplit, ImageBatches, register_eval
from chainrule.data.prepare import (
    cache_root,
    hash_sources,
    make_key,
    preparing,
    register_prepare,
    source_signature,
    write_manifest,
)
from chainrule.data.prepared import (
    Shards,
    array_entry,
    open_prepared,
    register_prepared_kind,
    split_array,
    write_shard,
)

SOURCES = ("digits", "mnist", "binarized_mnist", "cifar10", "image_folder")
NATIVE_LEVELS = {"digits": 17, "mnist": 256, "binarized_mnist": 2, "cifar10": 256,
                 "image_folder": 256}
DEFAULT_PATHS = {"mnist": "../shared/data/mnist",
                 "binarized_mnist": "../shared/data/binarized_mnist/binarized_mnist.npz"}
SPLITS = ("train", "val", "test")
HELD_OUT = 0.1  # validation and test fractions, each, for sources without official splits
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
REPO_ROOT = Path(__file__).resolve().parents[3]


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class ImageDataConfig(DataConfig):
    """Image data for PixelCNN (Hydra schema `image_schema`)."""

    source: str = "digits"  # one of SOURCES
    path: str | None = None  # folder / file; mnist and binarized_mnist default to ../shared/data
    num_levels: int | None = None  # None: the source's native count (see NATIVE_LEVELS)
    batch_size: int = 32  # global batch; each process draws batch_size // process_count
    val_batches: int = 4
    seed: int = 0
    image_size: tuple[int, int] | None = None  # (height, width): resize image_folder images
    num_workers: int = 0  # grain worker processes (0: produce batches in this process)

    def __post_init__(self):
        self.check_fields(SOURCES, ("batch_size", "val_batches"))
        check(self.source not in ("cifar10", "image_folder") or bool(self.path),
              f"data.path={self.path!r}: source {self.source!r} needs the path of its folder "
              "(e.g. data.path=../shared/data/cifar10)")
        native = NATIVE_LEVELS[self.source]
        check(self.num_levels is None or 2 <= self.num_levels <= native,
              f"data.num_levels={self.num_levels}: expected None or 2..{native} (source "
              f"{self.source!r} has {native} levels; fewer requantises)")
        if self.image_size is not None:
            self.image_size = tuple(int(v) for v in self.image_size)
            check(len(self.image_size) == 2 and min(self.image_size) > 0,
                  f"data.image_size={self.image_size}: expected (height, width) > 0 or None")
            check(self.source == "image_folder",
                  f"data.image_size={self.image_size}: resizing applies to source "
                  f"'image_folder' only, not {self.source!r}")

    @property
    def levels(self) -> int:
        return NATIVE_LEVELS[self.source] if self.num_levels is None else self.num_levels


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass
class ImageSplits:
    """A source loaded into memory: per split ("train", "val", "test"), uint8/int levels
    [N, H, W, C] and int labels [N] (None for a source without labels)."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray | None]
    num_classes: int | None = None
    class_names: list[str] | None = None
    split: str = ""


def resolve_path(path: str | Path, what: str) -> Path:
    """A relative path is looked up from the working directory, then from the repository root
    (so `../shared/data/...` works wherever a run starts)."""
    path = Path(path).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise ValueError(f"{what} {str(path)!r} does not exist (looked at "
                     f"{', '.join(str(c) for c in candidates)})")


def _split_fractions(images, labels, held_out=HELD_OUT, *, val_only=False
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    """Train (first), validation and test (last) parts, `held_out` of the images each (at least
    one); `val_only`: the last part is validation and there is no test."""
    n = len(images)
    n_held = max(1, int(round(n * held_out)))
    parts = ("val",) if val_only else ("val", "test")
    cut = n - n_held * len(parts)
    if cut < 1:
        raise ValueError(f"{n} images are too few to split into train, validation and test")
    bounds = {"train": (0, cut), "val": (cut, cut + n_held), "test": (cut + n_held, n)}
    bounds = {k: bounds[k] for k in ("train", *parts)}
    return ({k: images[lo:hi] for k, (lo, hi) in bounds.items()},
            {k: None if labels is None else labels[lo:hi] for k, (lo, hi) in bounds.items()})


def load_digits_source() -> ImageSplits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))  # fixed, whatever the seed
    images = digits.images.astype(np.uint8)[order, ..., None]  # [1797, 8, 8, 1], values 0..16
    images, labels = _split_fractions(images, digits.target.astype(np.int32)[order])
    return ImageSplits(images, labels, 10, [str(i) for i in range(10)],
                       split="fixed permutation: " + _counts(images))


def _counts(images: dict[str, np.ndarray]) -> str:
    return " / ".join(f"{len(v)} {k}" for k, v in images.items())


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): big-endian int32 magic, dims, then a uint8 payload."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x0000 08 nd: unsigned bytes, nd dimensions
        raise ValueError(f"{path} is not a uint8 IDX file (magic {magic:#010x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    payload = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {payload.size} bytes")
    return payload.reshape(dims)


def _mnist_files(path: str | Path) -> tuple[list[Path], list[Path] | None]:
    """The t10k (images, labels) files of an MNIST folder, and the train pair when both are
    there (gzipped or not)."""
    folder = resolve_path(path, "data.path (mnist folder)")

    def find(stem):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
        return None

    test = [find("t10k-images-idx3-ubyte"), find("t10k-labels-idx1-ubyte")]
    if None in test:
        raise ValueError(f"{folder} lacks t10k-images-idx3-ubyte.gz / t10k-labels-idx1-ubyte.gz")
    train = [find("train-images-idx3-ubyte"), find("train-labels-idx1-ubyte")]
    return test, None if None in train else train


def load_mnist(path: str | Path) -> ImageSplits:
    (test_images, test_labels), train_files = _mnist_files(path)
    images, labels = read_idx(test_images)[..., None], read_idx(test_labels).astype(np.int32)
    names = [str(i) for i in range(10)]
    if train_files is not None:
        train_images, train_labels = train_files
        train = read_idx(train_images)[..., None]
        held_out = 10_000 / len(train) if len(train) >= 50_000 else HELD_OUT  # 60k: 50k / 10k
        split, split_labels = _split_fractions(train, read_idx(train_labels).astype(np.int32),
                                               held_out, val_only=True)
        split["test"], split_labels["test"] = images, labels
        return ImageSplits(split, split_labels, 10, names,
                           split="train files: " + _counts(split) + " (t10k)")
    split, split_labels = _split_fractions(images, labels)
    return ImageSplits(split, split_labels, 10, names,
                       split="no train images, t10k divided: " + _counts(split))


def _binarized_file(path: str | Path) -> Path:
    file = resolve_path(path, "data.path (binarized_mnist .npz)")
    return file / "binarized_mnist.npz" if file.is_dir() else file


def load_binarized_mnist(path: str | Path) -> ImageSplits:
    file = _binarized_file(path)
    names = {"train": "train", "val": "valid", "test": "test"}
    with np.load(file) as npz:  # plain arrays: allow_pickle stays False
        missing = {"train", "valid"} - set(npz.files)
        if missing:
            raise ValueError(f"{file} lacks arrays {sorted(missing)} (has {npz.files})")
        # `test` is optional: without it there is no test split to evaluate
        rows = {split: npz[name] for split, name in names.items() if name in npz.files}
    for split, array in rows.items():
        if array.ndim != 2 or array.shape[1] != 28 * 28:
            raise ValueError(f"{file}: array {names[split]!r} has shape {array.shape}; expected "
                             "[N, 784], one flattened 28x28 image per row")
    images = {split: array.reshape(-1, 28, 28, 1) for split, array in rows.items()}
    return ImageSplits(images, dict.fromkeys(images),
                       split="train / valid / test (labels exist only for test: batches carry "
                             "none)")


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only. The CIFAR-10 "python version" IS a
    pickle; a plain `pickle.load` would run whatever code a tampered file names."""

    # _codecs.encode is how protocol-2 pickles spell bytes (as latin-1 text)
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch "
                                         "holds only dicts, lists, bytes and numpy arrays")
        return super().find_class(module, name)


def _cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(file, "rb") as f:
            batch = _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{file} is not a readable CIFAR-10 python batch ({e})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{file} is not a CIFAR-10 batch (expected a dict, got "
                         f"{type(batch).__name__})")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{file} is not a CIFAR-10 batch (expected 'data' and 'labels' keys)")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{file}: 'data' has shape {data.shape}; expected [N, 3072], one "
                         "32x32 RGB image per row")
    images = np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(labels, np.int32)


def _cifar_files(path: str | Path) -> tuple[list[Path], Path]:
    """The CIFAR-10 train batches there are (data_batch_1..5) and test_batch."""
    folder = resolve_path(path, "data.path (cifar10 folder)")
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6)
                   if (folder / f"data_batch_{i}").is_file()]
    if not train_files or not (folder / "test_batch").is_file():
        raise ValueError(f"{folder} needs data_batch_1..5 (at least one) and test_batch, the "
                         "CIFAR-10 python batches")
    return train_files, folder / "test_batch"


def load_cifar10(path: str | Path) -> ImageSplits:
    train_files, test_file = _cifar_files(path)
    parts = [_cifar_batch(f) for f in train_files]
    train = np.concatenate([p[0] for p in parts])
    images, labels = _split_fractions(train, np.concatenate([p[1] for p in parts]),
                                      min(5000 / len(train), HELD_OUT), val_only=True)
    images["test"], labels["test"] = _cifar_batch(test_file)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    return ImageSplits(images, labels, 10, names,
                       split=f"{', '.join(f.name for f in train_files)}: {len(images['train'])} "
                             f"train / last {len(images['val'])} validation; test_batch test")


def read_image(file: Path, mode: str = "RGB",
               size: tuple[int, int] | None = None) -> np.ndarray:
    """A PNG/JPEG file -> uint8 [H, W, C]: PIL `mode` "RGB" (C = 3) or "L" (grey, C = 1),
    resized (bilinear) to size = (height, width) when given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(im, np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{file}: not a readable PNG/JPEG image ({e})") from None
    return array[..., None] if array.ndim == 2 else array


def _folder_files(path: str | Path) -> tuple[Path, list[str], list[tuple[Path, int]]]:
    """An image folder, its classes (sub-folder names, sorted) and its (file, class id) pairs
    (class -1 without sub-folders)."""
    folder = resolve_path(path, "data.path (image folder)")

    def images_in(d: Path) -> list[Path]:
        return sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)

    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and images_in(d))
    top = images_in(folder)
    if classes and top:
        raise ValueError(f"{folder} holds images both at the top and in sub-folders {classes}: "
                         "expected one or the other (sub-folder = class)")
    files = ([(f, i) for i, c in enumerate(classes) for f in images_in(folder / c)] if classes
             else [(f, -1) for f in top])
    return folder, classes, files


def load_image_folder(path: str | Path, image_size: tuple[int, int] | None) -> ImageSplits:
    folder, classes, files = _folder_files(path)
    if len(files) < 3:
        raise ValueError(f"{folder} holds {len(files)} PNG/JPEG images; expected at least 3 "
                         "(train, validation and test)")
    arrays = [read_image(file, "RGB", image_size) for file, _ in files]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"images in {folder} have different sizes {sorted(sizes)}: set "
                         "data.image_size=[height, width] to resize them")
    images = np.stack(arrays)
    if np.all(images == images[..., :1]):  # every image grey: one channel
        images = images[..., :1]
    labels = np.array([label for _, label in files], np.int32) if classes else None
    order = np.random.default_rng(0).permutation(len(images))  # classes are sorted on disk
    images = images[order]
    labels = None if labels is None else labels[order]
    images, labels = _split_fractions(images, labels)
    return ImageSplits(images, labels, len(classes) or None, classes or None,
                       split="fixed permutation: " + _counts(images))


def load_source(config: ImageDataConfig) -> ImageSplits:
    path = config.path or DEFAULT_PATHS.get(config.source)
    if config.source == "digits":
        return load_digits_source()
    if config.source == "mnist":
        return load_mnist(path)
    if config.source == "binarized_mnist":
        return load_binarized_mnist(path)
    if config.source == "cifar10":
        return load_cifar10(path)
    return load_image_folder(path, config.image_size)


# ----------------------------------------------------------------------------- levels


def check_levels(images: np.ndarray, levels: int, what: str) -> np.ndarray:
    """Integer levels [N, H, W, C] (C = 1 or 3) in [0, levels) pass; anything else is
    refused rather than cast (a float image in [0, 1] would silently truncate to black).
    Floats are accepted only when every value is already a whole level."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{what}: images of shape {images.shape}; expected [N, height, width, "
                         "channels] with 1 or 3 channels")
    if images.dtype.kind == "f":
        if not np.all(np.isfinite(images)) or np.any(images != np.round(images)):
            raise ValueError(f"{what}: {images.dtype} images with fractional values; expected "
                             f"integer levels 0..{levels - 1} (quantise the images first)")
    elif images.dtype.kind not in "biu":
        raise ValueError(f"{what}: images of dtype {images.dtype}; expected integer levels "
                         f"0..{levels - 1}")
    if images.size:
        lo, hi = images.min(), images.max()
        if lo < 0 or hi >= levels:
            raise ValueError(f"{what}: pixel values span [{lo:g}, {hi:g}]; expected levels "
                             f"0..{levels - 1}")
    return images


def requantize(images: np.ndarray, native: int, levels: int) -> np.ndarray:
    """Levels [0, native) -> [0, levels) in equal-width bins (identity when levels == native)."""
    images = images.astype(np.int32)
    return images if levels == native else images * levels // native


def levels_to_uint8(sample, num_levels: int) -> np.ndarray:
    """One generated image (levels [H, W, C]) -> uint8 [H, W, C] spanning 0..255."""
    sample = np.asarray(sample, np.float32)
    return np.clip(np.rint(sample * (255.0 / (num_levels - 1))), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- sampling inputs


def encode_image(path: str | Path, *, shape: tuple[int, int, int], levels: int) -> np.ndarray:
    """An image file as a model of `shape` = (H, W, C) sees it (an inpainting input): resized
    to H x W, grey for C = 1 (luminance) or RGB for C = 3, its 8-bit values requantised to
    `levels` like the training data. Int32 levels [H, W, C]."""
    height, width, channels = shape
    if channels not in (1, 3):
        raise ValueError(f"image shape {shape}: expected 1 (grey) or 3 (RGB) channels")
    image = read_image(resolve_path(path, "image"), "L" if channels == 1 else "RGB",
                       (height, width))
    return requantize(image, NATIVE_LEVELS["image_folder"], levels)


MASK_SPECS = {"top": "rows", "left": "columns"}


def mask_spec(mask: str) -> tuple[str, int] | None:
    """("top", N) for "top:N", ("left", N) for "left:N"; None for anything else (a file)."""
    side, _, count = mask.partition(":")
    return (side, int(count)) if side in MASK_SPECS and count.isdigit() else None


def mask_file(mask: str) -> Path | None:
    """None for top:N / left:N, else the PNG file `mask` names (it must exist)."""
    if mask_spec(mask):
        return None
    file = Path(mask).expanduser()
    if not file.is_file():
        raise ValueError(f"mask={mask!r} is neither a PNG file nor top:N / left:N (keep the "
                         "first N rows / columns)")
    return file


def inpainting_mask(mask: str, height: int, width: int) -> np.ndarray:
    """An inpainting mask, int32 [H, W] with 1 = keep, from `top:N` (keep the first N rows),
    `left:N` (the first N columns) or a PNG of exactly H x W (nonzero = keep)."""
    file = mask_file(mask)
    if file is not None:
        keep = read_image(file, "L")[..., 0]
        if keep.shape != (height, width):
            raise ValueError(f"mask={mask!r} is {keep.shape[0]}x{keep.shape[1]} (HxW); "
                             f"expected the model's {height}x{width}")
        return (keep != 0).astype(np.int32)
    side, count = mask_spec(mask)
    size = height if side == "top" else width
    if count > size:
        raise ValueError(f"mask={mask!r}: the model's images have {size} {MASK_SPECS[side]}; "
                         f"expected {side}:0..{size}")
    keep = np.zeros((height, width), np.int32)
    if side == "top":
        keep[:count] = 1
    else:
        keep[:, :count] = 1
    return keep


# ----------------------------------------------------------------------------- pipeline


class _Gather:
    """Grain map: a batch of example indices -> the batch of images (and labels)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None):
        self.images, self.labels = images, labels

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        batch = {"images": self.images[indices]}
        if self.labels is not None:
            batch["labels"] = self.labels[indices]
        return batch


def train_dataset(images: np.ndarray, labels: np.ndarray | None, *, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Infinite MapDataset of batches: a seeded shuffle, reshuffled every epoch; process p keeps
    the examples p, p + P, ... of the shuffled stream, batch_size // P of them per batch."""
    per_process = batch_size // process_count
    if len(images) < batch_size:
        raise ValueError(f"the train split has {len(images)} images; one batch needs "
                         f"{batch_size} (lower data.batch_size)")
    ds = grain.MapDataset.range(len(images)).shuffle(seed=seed).repeat()
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds.batch(per_process, drop_remainder=True).map(_Gather(images, labels))


def validation_batches(images: np.ndarray, labels: np.ndarray | None, *, batch_size: int,
                       num_batches: int, process_index: int = 0,
                       process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Up to `num_batches` fixed batches from a fixed permutation (some splits are sorted by
    class); each process keeps its own rows of every batch."""
    if len(images) < batch_size:
        raise ValueError(f"the validation split has {len(images)} images; one batch needs "
                         f"{batch_size} (lower data.batch_size)")
    num_batches = min(num_batches, len(images) // batch_size)
    order = np.random.default_rng(0).permutation(len(images))[: num_batches * batch_size]
    per_process = batch_size // process_count
    gather = _Gather(images, labels)
    batches = []
    for rows in order.reshape(num_batches, batch_size):
        mine = rows[process_index * per_process: (process_index + 1) * per_process]
        batches.append(gather(mine))
    return batches


@register_codec
class ImageCodec(Codec):
    """Images of `shape` (H, W, C) in `levels` intensity levels <-> uint8 pictures."""

    kind = "image"

    def __init__(self, shape: tuple[int, int, int], levels: int,
                 class_names: list[str] | None = None):
        self.shape = tuple(int(d) for d in shape)
        self.levels = int(levels)
        self.class_names = None if class_names is None else [str(c) for c in class_names]

    def decode(self, sample: np.ndarray) -> np.ndarray:
        return levels_to_uint8(sample, self.levels)

    def encode(self, value: str) -> np.ndarray:
        return encode_image(value, shape=self.shape, levels=self.levels)

    def model_fields(self) -> dict[str, Any]:
        # Conditioning is the user's choice (model.num_classes), so it is not decided here.
        return {"image_shape": self.shape, "num_levels": self.levels}

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape), "levels": self.levels,
                "class_names": self.class_names}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ImageCodec:
        return cls(tuple(obj["shape"]), obj["levels"], obj.get("class_names"))


def split_levels(config: ImageDataConfig, splits: ImageSplits, split: str) -> np.ndarray:
    """One split's images as int32 levels in [0, config.levels), checked."""
    native = NATIVE_LEVELS[config.source]
    where = f"data.source={config.source!r}" + (f" at {config.path}" if config.path else "")
    images = check_levels(splits.images[split], native, f"{where} ({split})")
    return requantize(images, native, config.levels)


def _bundle(config: ImageDataConfig, train: tuple[Any, Any], val: tuple[Any, Any],
            codec: ImageCodec, info: dict[str, Any], process_index: int,
            process_count: int) -> DataBundle:
    """The pipeline over (images, labels) of train and validation: numpy arrays or `Shards`
    (both index with integer arrays)."""
    ds = train_dataset(*train, batch_size=config.batch_size, seed=config.seed,
                       process_index=process_index, process_count=process_count)
    val_batches = validation_batches(*val, batch_size=config.batch_size,
                                     num_batches=config.val_batches,
                                     process_index=process_index, process_count=process_count)
    return DataBundle(
        # Gathers are cheap (in memory, or a few records read from the shards): one background
        # thread keeps two batches ready.
        train=iterate(ds, prefetch=2, num_workers=config.num_workers),
        val_batches=val_batches,
        codec=codec,
        info={"source": config.source, "num_levels": config.levels,
              "native_levels": NATIVE_LEVELS[config.source], "image_shape": codec.shape, **info,
              "val_batches": len(val_batches)},
    )


@register_data("image", ImageDataConfig)
def build_image_data(config: ImageDataConfig, *, codec: Codec | None = None,
                     process_index: int = 0, process_count: int = 1) -> DataBundle:
    """The source in memory (the sources are small); `data=prepared` reads the same images
    from a prepared directory instead."""
    del codec  # nothing is fitted: the data alone decides everything
    splits = load_source(config)
    train_images, val_images = (split_levels(config, splits, s) for s in ("train", "val"))
    info = {
        # Conditioning is the user's choice (model.num_classes); this says what the data allows.
        "num_classes": splits.num_classes if splits.labels["train"] is not None else None,
        "class_names": splits.class_names,
        "split": splits.split,
        "train_images": len(train_images),
        "val_images": len(val_images),
        "test_images": len(splits.images.get("test", ())),
    }
    codec = ImageCodec(train_images.shape[1:], config.levels, splits.class_names)
    return _bundle(config, (train_images, splits.labels["train"]),
                   (val_images, splits.labels["val"]), codec, info, process_index,
                   process_count)


def _check_eval_codec(config: ImageDataConfig, codec: Codec, shape: tuple[int, ...]) -> None:
    if not isinstance(codec, ImageCodec) or (tuple(shape), config.levels) != (codec.shape,
                                                                              codec.levels):
        shown = getattr(codec, "shape", codec.kind), getattr(codec, "levels", "")
        raise ValueError(f"data.source={config.source!r} gives {config.levels}-level images of "
                         f"shape {tuple(shape)}; the run's model was trained on {shown}")


def _no_split(config: ImageDataConfig, split: str, described: str, have: Any) -> ValueError:
    return ValueError(f"split={split!r}: data.source={config.source!r} has no {split} split "
                      f"({described}); expected one of {sorted(have)} or 'all'")


def _memory_split(config: ImageDataConfig, split: str) -> tuple[Any, Any, str]:
    """(images, labels or None, the split's description) of `split` ("all": every split)
    from the source in memory."""
    splits = load_source(config)
    names = [s for s in splits.images if split in (s, "all")]
    if not names:
        raise _no_split(config, split, splits.split, splits.images)
    images = np.concatenate([split_levels(config, splits, s) for s in names])
    labels = [splits.labels[s] for s in names]
    labels = None if any(lab is None for lab in labels) else np.concatenate(labels)
    return images, labels, splits.split


@register_eval(ImageDataConfig)
def image_eval(config: ImageDataConfig, *, codec: Codec, split: str, batch_size: int,
               stride: int | None = None, process_index: int = 0, process_count: int = 1,
               root: Path | None = None) -> EvalSplit:
    """Every image of the split once (`stride` does not apply to images), from the source in
    memory or, given `root`, from that prepared directory."""
    del stride
    images, labels, described = (_memory_split(config, split) if root is None
                                 else _prepared_split(config, Path(root), split))
    shape = tuple(images.shape[1:]) if isinstance(images, np.ndarray) else images.shape
    _check_eval_codec(config, codec, shape)
    batches = ImageBatches(images, labels, batch_size, process_index, process_count)
    info = {"source": config.source, "path": config.path, "splits": described}
    if root is not None:
        info["prepared"] = str(root)
    return EvalSplit(batches, batches.num_batches,
                     {"images": len(images), "dims_per_image": int(np.prod(shape))}, info=info)


# ----------------------------------------------------------------------------- prepared


def source_files(config: ImageDataConfig) -> list[Path]:
    """The files the source is read from (none for the embedded digits): what a prepared
    directory's key and manifest see of it."""
    path = config.path or DEFAULT_PATHS.get(config.source)
    if config.source == "mnist":
        test, train = _mnist_files(path)
        return test + (train or [])
    if config.source == "binarized_mnist":
        return [_binarized_file(path)]
    if config.source == "cifar10":
        train, test = _cifar_files(path)
        return [*train, test]
    if config.source == "image_folder":
        return [f for f, _ in _folder_files(path)[2]]
    return []


def prepare_key(config: ImageDataConfig, files: list[Path]) -> str:
    # Batch size, seed and workers only shape training: one prepared directory serves them all.
    return make_key({"kind": "image", "sources": source_signature(files),
                     "data": {"source": config.source, "levels": config.levels,
                              "image_size": config.image_size}})


def _write_split(work: Path, config: ImageDataConfig, splits: ImageSplits,
                 split: str) -> dict[str, Any]:
    images = split_levels(config, splits, split).astype(np.uint8)  # levels <= 256
    arrays = {"images": array_entry([write_shard(work, f"{split}/images.bin", images)],
                                    np.uint8, images.shape[1:])}
    labels = splits.labels[split]
    if labels is not None:
        labels = np.asarray(labels, np.int32)
        arrays["labels"] = array_entry([write_shard(work, f"{split}/labels.bin", labels)],
                                       np.int32)
    return {"counts": {"images": len(images), "dims_per_image": int(np.prod(images.shape[1:]))},
            "arrays": arrays}


@register_prepare(ImageDataConfig)
def prepare_image_data(config: ImageDataConfig, out: Path | None = None) -> Path:
    """The source's splits as uint8 levels (requantised to config.levels) and int32 labels in
    a prepared directory: `out`, or the data cache (reused while the sources are unchanged)."""
    files = source_files(config)
    key = prepare_key(config, files)
    out = out or cache_root() / f"image-{key}"
    with preparing(out, key) as work:
        if work is None:
            return out
        splits = load_source(config)
        written = {s: _write_split(work, config, splits, s) for s in splits.images}
        shape = splits.images["train"].shape[1:]
        write_manifest(work, key, "image", data=dataclasses.asdict(config),
                       sources=hash_sources(files),
                       codec=ImageCodec(shape, config.levels, splits.class_names).to_json(),
                       num_classes=(splits.num_classes if splits.labels["train"] is not None
                                    else None),
                       split=splits.split, splits=written)
    return out


def _arrays(root: Path, manifest: dict[str, Any], split: str) -> tuple[Shards, Shards | None]:
    """One split's images and labels (None without), read from the shards, served as int32."""
    images = split_array(root, manifest, split, "images", np.int32)
    has_labels = "labels" in manifest["splits"][split]["arrays"]
    return images, (split_array(root, manifest, split, "labels", np.int32) if has_labels
                    else None)


def image_bundle(config: ImageDataConfig, root: Path, *, codec: Codec | None = None,
                 process_index: int = 0, process_count: int = 1) -> DataBundle:
    """The pipeline over a prepared image directory: batches gathered from the
    shards (RAM follows the batch), bitwise those `build_image_data` makes of the source."""
    manifest = open_prepared(root, "image", codec and codec.to_json())
    counts = {s: manifest["splits"].get(s, {}).get("counts", {}).get("images", 0)
              for s in SPLITS}
    codec = ImageCodec.from_json(manifest["codec"])
    info = {"num_classes": manifest["num_classes"], "class_names": codec.class_names,
            "split": manifest["split"], **{f"{s}_images": n for s, n in counts.items()},
            "prepared": str(root)}
    return _bundle(config, _arrays(root, manifest, "train"), _arrays(root, manifest, "val"),
                   codec, info, process_index, process_count)


def _prepared_split(config: ImageDataConfig, root: Path, split: str) -> tuple[Any, Any, str]:
    """`_memory_split` from a prepared directory: the split's shards, not the source."""
    manifest = open_prepared(root, "image")
    names = [s for s in manifest["splits"] if split in (s, "all")]
    if not names:
        raise _no_split(config, split, manifest["split"], manifest["splits"])
    parts = [_arrays(root, manifest, s) for s in names]
    images = functools.reduce(Shards.concat, [p[0] for p in parts])
    labels = (None if any(p[1] is None for p in parts)
              else functools.reduce(Shards.concat, [p[1] for p in parts]))
    return images, labels, manifest["split"]


register_prepared_kind("image", ImageDataConfig, bundle=image_bundle, evaluate=image_eval)
