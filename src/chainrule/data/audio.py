"""Audio for WaveNet: μ-law codes of mono waveforms, the `AudioDataConfig` schema, its pipeline.

Sources (`source=`):
  synthetic   needs no download. A fixed set of procedurally generated "note" clips (the same
              for every seed; the seed only drives crop order and positions): 256 train, 32
              validation and 32 test clips of max(1 s, sequence_length + 1 samples). Each clip has one
              pitch class, its label (12 classes, "C" .. "B"): a run of back-to-back notes of
              0.12-0.4 s, each in a random octave (MIDI octaves 3-5, 131-988 Hz) with 1-4
              harmonics below 0.45 x the sample rate (amplitude ~ 1/h, randomly jittered), a
              5 ms linear attack, an exponential decay (time constant 0.05-0.3 s) and a random
              peak of 0.3-0.9, plus white noise of standard deviation 0.01, clipped to [-1, 1].
              Labels with `label_from="pitch"`.
  wav_folder  every *.wav under `path` (recursive). Test: the files whose name's CRC32 is 0 mod
              10, validation: 1 mod 10 (with fewer than 3 files, or a split left empty, every
              file's first 80% trains, the next 10% validates, the last 10% tests).
  fsdd        the Free Spoken Digit Dataset, `{digit}_{speaker}_{index}.wav`, 8 kHz; its
              official split: takes 0-4 are test; takes 5-9 validation, 10-49 train.
Training never reads the test split; `evaluate.py split=test` scores it.

WAV files are read with the stdlib `wave` module: PCM with 8 (unsigned), 16, 24 or 32-bit
samples, any number of channels (averaged to mono), any rate (polyphase resampled to
`sample_rate`). Labels (`label_from`): "digit" / "speaker" (fields 0 / 1 of FSDD-style names
split at "_"), "parent" (the folder name), a field index such as "2", or a regular expression
with one group searched in the file name without extension. Label ids follow the sorted label
names (numerically when all are integers, so digit d has id d).

The pipeline serves
  train:        an infinite, checkpointable Grain iterator of random crops of
                sequence_length + 1 samples, {"waveform": int32 [B, T + 1], "labels": int32 [B]}
                ("labels" only with label_from). Clips are drawn in proportion to their length;
                shorter clips are padded at the end with μ-law silence;
  val_batches:  fixed crops of the validation clips, the same at every evaluation.

Prepared (`prepare_audio_data`, then `data=prepared data.path=<dir>`): each split's clips end to
end as μ-law codes, their offsets and labels in shards; crops are read from the shards (`ClipCodes`),
bitwise the in-memory batches. Synthetic clips are as long as the prepared sequence_length made
them (a longer data.sequence_length later pads, masked).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import wave
import zlib
from collections.abc import Iterator
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
from chainrule.data.evaluation import EvalSplit, WindowBatches, default_stride, register_eval
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
    smallest_uint,
    split_array,
    write_shard,
)

SOURCES = ("synthetic", "wav_folder", "fsdd")
DEFAULT_FSDD_PATH = "../shared/data/fsdd/recordings"
LABEL_KEYWORDS = {"digit": 0, "speaker": 1}  # fields of FSDD file names
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
SYNTHETIC_CLIPS = {"train": (256, 0), "val": (32, 1), "test": (32, 2)}  # (count, generator seed)
SPLITS = ("train", "val", "test")
_REPO = Path(__file__).resolve().parents[3]

# ----------------------------------------------------------------------------- μ-law


def _check_mu(mu) -> int:
    if isinstance(mu, bool) or not isinstance(mu, int | np.integer) or not 1 <= mu <= 65535:
        raise ValueError(f"mu={mu!r}: expected an integer in [1, 65535] (mu + 1 levels)")
    return int(mu)


def mu_law_encode(x, mu: int = 255) -> np.ndarray:
    """Waveform in [-1, 1] -> int32 codes in [0, mu]: sign(x) ln(1 + mu|x|) / ln(1 + mu),
    mapped to mu + 1 evenly spaced levels (rounded to the nearest)."""
    mu = _check_mu(mu)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"mu_law_encode expects a float waveform in [-1, 1], got dtype {x.dtype}")
    if x.size and not (np.all(np.isfinite(x)) and np.abs(x).max() <= 1.0):
        bad = x[~(np.isfinite(x) & (np.abs(x) <= 1.0))].flat[0]
        raise ValueError(f"mu_law_encode: sample {bad} is outside [-1, 1]; clip or normalise "
                         "the waveform first")
    x = x.astype(np.float64)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)
    return np.clip(np.floor((y + 1.0) / 2.0 * mu + 0.5), 0, mu).astype(np.int32)


def mu_law_decode(codes, mu: int = 255) -> np.ndarray:
    """int codes in [0, mu] -> float32 waveform in [-1, 1] (the inverse of the companding)."""
    mu = _check_mu(mu)
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"mu_law_decode expects integer codes, got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() > mu):
        raise ValueError(f"mu_law_decode: code {codes.max() if codes.max() > mu else codes.min()}"
                         f" is outside [0, mu={mu}]")
    y = 2.0 * codes.astype(np.float64) / mu - 1.0
    return (np.sign(y) * np.expm1(np.abs(y) * math.log1p(mu)) / mu).astype(np.float32)


# ----------------------------------------------------------------------------- WAV files


def resample(x: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling by the rational factor target/orig (scipy.signal.resample_poly's
    method: a Kaiser-windowed (beta 5) sinc low-pass at the lower Nyquist frequency, 20 taps
    per output phase on each side), computed only at the output samples."""
    if orig_rate == target_rate:
        return np.asarray(x, np.float32)
    g = math.gcd(orig_rate, target_rate)
    up, down = target_rate // g, orig_rate // g
    half = 10 * max(up, down)
    cutoff = 1.0 / max(up, down)
    n = np.arange(-half, half + 1)
    h = np.sinc(cutoff * n) * np.kaiser(2 * half + 1, 5.0)
    h *= up / h.sum()  # unit gain at DC once zero-stuffed by `up`
    x = np.asarray(x, np.float64)
    n_out = -(-len(x) * up // down)
    taps = -(-len(h) // up)
    out = np.empty(n_out)
    for start in range(0, n_out, 8192):  # bounded memory for long files
        p = np.arange(start, min(start + 8192, n_out)) * down + half  # filter centre on input
        k = (p % up)[:, None] + up * np.arange(taps)  # filter taps that meet input samples
        j = (p[:, None] - k) // up  # the input sample each tap meets
        valid = (k < len(h)) & (j >= 0) & (j < len(x))
        out[start:start + len(p)] = np.where(
            valid, h[np.minimum(k, len(h) - 1)] * x[np.clip(j, 0, len(x) - 1)], 0.0).sum(1)
    return out.astype(np.float32)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM WAV file -> (float32 mono waveform in [-1, 1], sample rate)."""
    expected = "expected a RIFF/WAVE PCM file with 8, 16, 24 or 32-bit samples"
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable WAV file ({e or type(e).__name__}); "
                         f"{expected}") from None
    if width not in (1, 2, 3, 4):
        raise ValueError(f"{path}: {8 * width}-bit samples are not supported; {expected}")
    frames = len(raw) // (channels * width)
    if frames == 0:
        raise ValueError(f"{path}: the WAV file has no samples; expected audio")
    raw = raw[: frames * channels * width]
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # little-endian 24-bit: widen to int32, keeping the sign
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16) << 8 >> 8).astype(np.float32) / 2.0**23
    else:
        x = np.frombuffer(raw, f"<i{width}").astype(np.float32) / 2.0 ** (8 * width - 1)
    return x.reshape(frames, channels).mean(axis=1), rate


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """A WAV file as float32 mono in [-1, 1] at `sample_rate`."""
    x, rate = read_wav(path)
    return np.clip(resample(x, rate, sample_rate), -1.0, 1.0)


def _resolve(path: str) -> Path:
    """A relative path is taken from the current directory, else from the repository root."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (_REPO / p).exists():
        return _REPO / p
    return p


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class AudioDataConfig(DataConfig):
    """μ-law audio for WaveNet (Hydra schema `audio_schema`)."""

    source: str = "synthetic"  # "synthetic" | "wav_folder" (needs path) | "fsdd"
    path: str | None = None  # wav_folder: a folder of WAVs; fsdd: None = ../shared/data/fsdd/...
    sample_rate: int = 8000
    sequence_length: int = 4000  # model input; crops hold sequence_length + 1 samples
    mu: int = 255  # μ-law levels - 1 (vocab_size = mu + 1)
    batch_size: int = 8  # global batch; each process draws batch_size // process_count
    val_batches: int = 2
    seed: int = 0
    label_from: str | None = None  # see the module docstring; "pitch" for synthetic
    num_workers: int = 0  # grain worker processes (0: produce batches in this process)
    prefetch: int = 2  # batches prepared ahead by a background thread (0: none)

    def __post_init__(self):
        self.check_fields(SOURCES, ("sample_rate", "sequence_length", "batch_size",
                                    "val_batches"))
        check(self.source != "wav_folder" or bool(self.path),
              f"data.path={self.path!r}: source 'wav_folder' needs a folder of .wav files "
              "(e.g. data.path=recordings/)")
        try:
            _check_mu(self.mu)
        except ValueError as e:
            raise ValueError(f"data.{e}") from None
        if self.source == "synthetic":
            check(self.label_from in (None, "pitch"),
                  f"data.label_from={self.label_from!r}: synthetic clips are labelled by pitch "
                  "class; expected null or 'pitch'")
        elif self.label_from is not None:
            _label_parser(self.label_from)  # raises on a bad pattern


# ----------------------------------------------------------------------------- clips


def _label_parser(label_from: str):
    """label_from -> function(Path) -> label name (None when the name does not fit)."""
    if label_from == "parent":
        return lambda p: p.parent.name
    if label_from in LABEL_KEYWORDS or label_from.isdigit():
        field = LABEL_KEYWORDS.get(label_from, None)
        field = int(label_from) if field is None else field
        return lambda p: (p.stem.split("_") + [None] * (field + 1))[field]
    try:
        pattern = re.compile(label_from)
    except re.error as e:
        raise ValueError(f"data.label_from={label_from!r} is not a keyword (digit, speaker, "
                         f"parent, a field index) nor a valid regular expression: {e}") from None
    if pattern.groups != 1:
        raise ValueError(f"data.label_from={label_from!r}: a regular expression needs exactly "
                         f"one group (the label), it has {pattern.groups}")
    return lambda p: (m.group(1) if (m := pattern.search(p.stem)) else None)


def _sorted_names(names) -> list[str]:
    names = sorted(set(names))
    if all(n.isdigit() for n in names):
        names.sort(key=int)
    return names


def synthetic_clip(rng: np.random.Generator, pitch_class: int, length: int,
                   sample_rate: int) -> np.ndarray:
    """One synthetic clip (see the module docstring): float32 [length] in [-1, 1]."""
    t_all = np.arange(length) / sample_rate
    x = np.zeros(length)
    start = 0
    while start < length:
        n = min(int(rng.uniform(0.12, 0.4) * sample_rate), length - start)
        t = t_all[:n]
        f0 = 440.0 * 2.0 ** ((12 * (rng.integers(3, 6) + 1) + pitch_class - 69) / 12)
        note = np.zeros(n)
        for h in range(1, rng.integers(1, 5) + 1):
            if h * f0 < 0.45 * sample_rate:
                note += rng.uniform(0.5, 1.0) / h * np.sin(2 * np.pi * h * f0 * t
                                                           + rng.uniform(0, 2 * np.pi))
        envelope = np.minimum(t / 0.005, 1.0) * np.exp(-t / rng.uniform(0.05, 0.3))
        note *= envelope * rng.uniform(0.3, 0.9) / max(np.abs(note * envelope).max(), 1e-9)
        x[start:start + n] = note
        start += n
    x += rng.normal(0.0, 0.01, length)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


class ClipCodes:
    """Clips stored end to end (prepared audio): clip i is flat[offsets[i]:offsets[i + 1]],
    read from the shards only when asked for, so RAM follows the batch."""

    def __init__(self, flat: Shards, offsets: np.ndarray):
        self.flat, self.offsets = flat, np.asarray(offsets, np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"clip {index} of {len(self)}")
        index %= len(self)
        return self.flat[int(self.offsets[index]):int(self.offsets[index + 1])]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def concat(self, other: ClipCodes) -> ClipCodes:
        return ClipCodes(self.flat.concat(other.flat),
                         np.concatenate([self.offsets, other.offsets[1:] + self.offsets[-1]]))


def clip_lengths(codes: list[np.ndarray] | ClipCodes) -> np.ndarray:
    """Samples per clip, without reading the clips of a `ClipCodes`."""
    if isinstance(codes, ClipCodes):
        return np.diff(codes.offsets)
    return np.array([len(c) for c in codes], np.int64)


@dataclasses.dataclass
class Clips:
    """μ-law coded clips of one split, and their label ids (None without labels): in memory
    (a list of arrays) or from a prepared directory (`ClipCodes`)."""

    codes: list[np.ndarray] | ClipCodes
    labels: np.ndarray | None


def _code_dtype(mu: int):
    return np.uint8 if mu < 256 else np.uint16  # clips are stored compactly, served as int32


def _synthetic(config: AudioDataConfig) -> tuple[dict[str, Clips], list[str] | None]:
    length = max(config.sample_rate, config.sequence_length + 1)
    splits = {}
    for split, (count, seed) in SYNTHETIC_CLIPS.items():
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, len(PITCH_CLASSES), count)
        codes = [mu_law_encode(synthetic_clip(rng, int(c), length, config.sample_rate),
                               config.mu).astype(_code_dtype(config.mu)) for c in labels]
        splits[split] = Clips(codes, labels.astype(np.int32) if config.label_from else None)
    return splits, list(PITCH_CLASSES) if config.label_from else None


def _wav_files(config: AudioDataConfig) -> tuple[Path, list[Path]]:
    folder = _resolve(config.path or DEFAULT_FSDD_PATH)
    if not folder.is_dir():
        raise ValueError(f"data.path={config.path!r} (resolved to {folder.resolve()}) is not a "
                         f"folder; expected a folder of .wav files for source={config.source!r}")
    files = sorted((p for p in folder.rglob("*") if p.suffix.lower() == ".wav" and p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise ValueError(f"no .wav files under {folder.resolve()}; expected at least one")
    return folder, files


def _file_split(path: Path, source: str) -> str:
    """"train", "val" or "test" for one file of the folder."""
    if source == "fsdd":
        fields = path.stem.split("_")
        if len(fields) != 3 or not fields[2].isdigit():
            raise ValueError(f"{path}: FSDD files are named {{digit}}_{{speaker}}_{{index}}.wav")
        take = int(fields[2])
        return "test" if take < 5 else "val" if take < 10 else "train"  # 0-4: official test
    bucket = zlib.crc32(path.name.encode()) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def _cut_each(audio: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
    """Every clip's first 80% for train, next 10% validation, last 10% test."""
    pieces = []
    for codes in audio:
        a, b = len(codes) * 8 // 10, len(codes) * 9 // 10
        if not 0 < a < b < len(codes):
            raise ValueError(f"a clip of {len(codes)} samples is too short to cut into train, "
                             "validation and test parts")
        pieces += [(codes[:a], "train"), (codes[a:b], "val"), (codes[b:], "test")]
    return pieces


def _wav_clips(config: AudioDataConfig) -> tuple[dict[str, Clips], list[str] | None]:
    folder, files = _wav_files(config)
    names = [None] * len(files)
    if config.label_from:
        parse = _label_parser(config.label_from)
        names = [parse(p) for p in files]
        for p, name in zip(files, names, strict=True):
            if not name:
                raise ValueError(f"{p}: no label from label_from={config.label_from!r}")
    audio = [mu_law_encode(read_audio(p, config.sample_rate), config.mu) for p in files]
    where = [_file_split(p, config.source) for p in files]
    if len(files) < 3 or set(where) != set(SPLITS):  # small folders: cut every recording
        pieces = _cut_each(audio)
        names = [n for n in names for _ in range(3)]
    else:
        pieces = list(zip(audio, where, strict=True))
    label_names = None if not config.label_from else _sorted_names(names)
    dtype = _code_dtype(config.mu)
    splits = {}
    for split in SPLITS:
        keep = [i for i, (_, s) in enumerate(pieces) if s == split]
        ids = (None if label_names is None
               else np.array([label_names.index(names[i]) for i in keep], np.int32))
        splits[split] = Clips([pieces[i][0].astype(dtype) for i in keep], ids)
    return splits, label_names


def load_clips(config: AudioDataConfig) -> tuple[dict[str, Clips], list[str] | None]:
    """{"train", "val", "test"}: Clips, and the label names (None without labels)."""
    return _synthetic(config) if config.source == "synthetic" else _wav_clips(config)


# ----------------------------------------------------------------------------- pipeline


class _RandomCrop:
    """Grain random map: clip index -> one crop of `length` samples at a uniform offset."""

    def __init__(self, clips: Clips, length: int, silence: int):
        self.clips, self.length, self.silence = clips, length, silence

    def crop(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        clip = self.clips.codes[index]
        out = np.full(self.length, self.silence, np.int32)
        start = int(rng.integers(max(len(clip) - self.length, 0) + 1))
        piece = clip[start:start + self.length]
        out[: len(piece)] = piece
        # The silence that pads a short clip is not audio: the loss leaves it out.
        mask = np.zeros(self.length, np.int32)
        mask[: len(piece)] = 1
        item = {"waveform": out, "loss_mask": mask}
        if self.clips.labels is not None:
            item["labels"] = np.int32(self.clips.labels[index])
        return item

    def __call__(self, element: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.crop(int(element), rng)


def train_dataset(clips: Clips, *, length: int, silence: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Infinite MapDataset of batches of random crops; each clip appears once per epoch for
    every `length` samples it holds (at least once), epochs shuffled differently."""
    repeats = np.maximum(1, clip_lengths(clips.codes) // length)
    slots = np.repeat(np.arange(len(clips.codes)), repeats)
    ds = grain.MapDataset.source(slots.tolist()).shuffle(seed=seed).repeat()
    ds = ds.random_map(_RandomCrop(clips, length, silence), seed=seed)
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds.batch(batch_size, drop_remainder=True)


def validation_batches(clips: Clips, *, length: int, silence: int, batch_size: int,
                       num_batches: int, process_index: int = 0,
                       process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Fixed crops (a fixed generator, whatever the seed) of the validation clips in a fixed
    shuffled order, cycling when there are fewer clips than crops."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(clips.codes))
    crop = _RandomCrop(clips, length, silence)
    items = [crop.crop(int(order[i % len(order)]), rng) for i in range(num_batches * batch_size)]
    per_process = batch_size // process_count
    batches = []
    for b in range(num_batches):
        rows = items[b * batch_size + process_index * per_process:
                     b * batch_size + (process_index + 1) * per_process]
        batches.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return batches


@register_codec
class AudioCodec(Codec):
    """μ-law codes (mu + 1 levels) at `sample_rate` <-> waveforms in [-1, 1]."""

    kind = "audio"

    def __init__(self, sample_rate: int, mu: int, label_names: list[str] | None = None):
        self.sample_rate = int(sample_rate)
        self.mu = _check_mu(mu)
        self.label_names = None if label_names is None else [str(n) for n in label_names]

    def decode(self, sample: np.ndarray) -> np.ndarray:
        return mu_law_decode(sample, self.mu)

    def encode(self, value: str) -> np.ndarray:
        """A prompt for generation: a WAV file's μ-law codes (mono, at the run's rate)."""
        return mu_law_encode(read_audio(_resolve(value), self.sample_rate), self.mu)

    def model_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"vocab_size": self.mu + 1}
        if self.label_names is not None:
            fields["num_classes"] = len(self.label_names)
        return fields

    @property
    def media(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate}

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "sample_rate": self.sample_rate, "mu": self.mu,
                "label_names": self.label_names}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AudioCodec:
        return cls(obj["sample_rate"], obj["mu"], obj.get("label_names"))


def _silence(mu: int) -> int:
    return int(mu_law_encode(np.zeros(1), mu)[0])


def _bundle(config: AudioDataConfig, splits: dict[str, Clips], codec: AudioCodec,
            seconds: dict[str, float], info: dict[str, Any], process_index: int,
            process_count: int) -> DataBundle:
    """The pipeline over the clips of each split, in memory or prepared."""
    for split in ("train", "val"):  # (training never reads the test split)
        if not len(splits[split].codes):
            raise ValueError(f"the {split} split of source={config.source!r} has no clips")
    window = config.sequence_length + 1
    silence = _silence(config.mu)
    ds = train_dataset(splits["train"], length=window, silence=silence,
                       batch_size=config.batch_size // process_count, seed=config.seed,
                       process_index=process_index, process_count=process_count)
    val = validation_batches(splits["val"], length=window, silence=silence,
                             batch_size=config.batch_size, num_batches=config.val_batches,
                             process_index=process_index, process_count=process_count)
    label_names = codec.label_names
    return DataBundle(
        train=iterate(ds, prefetch=config.prefetch, num_workers=config.num_workers),
        val_batches=val,
        codec=codec,
        info={
            "source": config.source, "sample_rate": config.sample_rate, "mu": config.mu,
            "silence_code": silence,
            **{f"{s}_clips": len(clips.codes) for s, clips in splits.items()},
            **{f"{s}_seconds": seconds[s] for s in SPLITS},
            "label_from": config.label_from,
            "num_classes": None if label_names is None else len(label_names),
            "label_names": label_names, "val_batches": len(val), **info,
        },
    )


@register_data("audio", AudioDataConfig)
def build_audio_data(config: AudioDataConfig, *, codec: Codec | None = None,
                     process_index: int = 0, process_count: int = 1) -> DataBundle:
    """The clips in memory; `data=prepared` reads the same clips from a prepared directory."""
    del codec  # nothing is fitted to the data
    splits, label_names = load_clips(config)
    seconds = {s: sum(len(c) for c in clips.codes) / config.sample_rate
               for s, clips in splits.items()}
    return _bundle(config, splits, AudioCodec(config.sample_rate, config.mu, label_names),
                   seconds, {}, process_index, process_count)


def _memory_clips(config: AudioDataConfig, split: str) -> tuple[Any, Any, list[str] | None]:
    """(codes, labels or None, label names) of the split ("all": every split), in memory."""
    splits, label_names = load_clips(config)
    chosen = [splits[s] for s in SPLITS if split in (s, "all")]
    codes = [c.astype(np.int32) for clips in chosen for c in clips.codes]
    labels = [clips.labels for clips in chosen]
    labels = None if any(lab is None for lab in labels) else np.concatenate(labels)
    return codes, labels, label_names


def _check_eval_codec(config: AudioDataConfig, codec: Codec, labelled: bool,
                      label_names: list[str] | None) -> None:
    if not isinstance(codec, AudioCodec) or (codec.mu, codec.sample_rate) != (config.mu,
                                                                              config.sample_rate):
        raise ValueError(f"the data is μ-law {config.mu} at {config.sample_rate} Hz; the run's "
                         f"model was trained on {codec.to_json()}")
    if labelled and codec.label_names not in (None, label_names):
        raise ValueError(f"the data's labels {label_names} differ from the run's "
                         f"{codec.label_names}")


@register_eval(AudioDataConfig)
def audio_eval(config: AudioDataConfig, *, codec: Codec, split: str, batch_size: int,
               stride: int | None, process_index: int = 0, process_count: int = 1,
               root: Path | None = None) -> EvalSplit:
    """Every sample of every clip of the split scored once (but each clip's first), in
    sliding windows of sequence_length + 1 samples; padding past a clip's end is masked. The
    clips come from the source in memory or, given `root`, from that prepared directory."""
    codes, labels, label_names = (_memory_clips(config, split) if root is None
                                  else _prepared_clips(Path(root), split))
    _check_eval_codec(config, codec, labels is not None, label_names)
    if not len(codes):
        raise ValueError(f"split={split!r} of source={config.source!r} has no clips")
    length = config.sequence_length + 1
    windows = WindowBatches(codes, length, default_stride(length, stride), batch_size,
                            "waveform", labels=labels, pad=_silence(config.mu),
                            process_index=process_index, process_count=process_count)
    info = {"source": config.source, "path": config.path, "windows": len(windows.plan),
            "stride": windows.stride, "window": length, "sample_rate": config.sample_rate}
    if root is not None:
        info["prepared"] = str(root)
    return EvalSplit(windows, windows.num_batches,
                     {"samples": windows.num_scored, "clips": len(codes)}, info=info)


# ----------------------------------------------------------------------------- prepared


def source_files(config: AudioDataConfig) -> list[Path]:
    """The WAV files the clips come from (none for synthetic clips)."""
    return [] if config.source == "synthetic" else _wav_files(config)[1]


def prepare_key(config: AudioDataConfig, files: list[Path]) -> str:
    shaping = {k: getattr(config, k) for k in ("source", "sample_rate", "mu", "label_from")}
    if config.source == "synthetic":  # clips hold max(1 s, sequence_length + 1) samples
        shaping["clip_samples"] = max(config.sample_rate, config.sequence_length + 1)
    return make_key({"kind": "audio", "data": shaping, "sources": source_signature(files)})


def _write_split(work: Path, config: AudioDataConfig, split: str, clips: Clips) -> dict:
    dtype = smallest_uint(config.mu + 1)
    lengths = clip_lengths(clips.codes)
    codes = (np.concatenate(clips.codes) if clips.codes else np.zeros(0)).astype(dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arrays = {"codes": array_entry([write_shard(work, f"{split}/codes.bin", codes)], dtype),
              "offsets": array_entry([write_shard(work, f"{split}/offsets.bin", offsets)],
                                     np.int64)}
    if clips.labels is not None:
        labels = np.asarray(clips.labels, np.int32)
        arrays["labels"] = array_entry([write_shard(work, f"{split}/labels.bin", labels)],
                                       np.int32)
    return {"counts": {"clips": len(lengths), "samples": int(offsets[-1]),
                       "seconds": int(offsets[-1]) / config.sample_rate}, "arrays": arrays}


@register_prepare(AudioDataConfig)
def prepare_audio_data(config: AudioDataConfig, out: Path | None = None) -> Path:
    """Every split's μ-law codes (clips end to end), clip offsets and labels in a prepared
    directory: `out`, or the data cache (reused while the sources are unchanged)."""
    files = source_files(config)
    key = prepare_key(config, files)
    out = out or cache_root() / f"audio-{key}"
    with preparing(out, key) as work:
        if work is None:
            return out
        splits, label_names = load_clips(config)
        written = {s: _write_split(work, config, s, clips) for s, clips in splits.items()}
        write_manifest(work, key, "audio", data=dataclasses.asdict(config),
                       sources=hash_sources(files),
                       codec=AudioCodec(config.sample_rate, config.mu, label_names).to_json(),
                       splits=written)
    return out


def _split_clips(root: Path, manifest: dict[str, Any], split: str, out_dtype: Any) -> Clips:
    """One split's clips, read lazily; offsets and labels (a few bytes a clip) in memory."""
    arrays = manifest["splits"][split]["arrays"]
    codes = ClipCodes(split_array(root, manifest, split, "codes", out_dtype),
                      split_array(root, manifest, split, "offsets")[:])
    labels = (split_array(root, manifest, split, "labels", np.int32)[:] if "labels" in arrays
              else None)
    return Clips(codes, labels)


def audio_bundle(config: AudioDataConfig, root: Path, *, codec: Codec | None = None,
                 process_index: int = 0, process_count: int = 1) -> DataBundle:
    """The pipeline over a prepared audio directory: crops read from the shards of codes
    (RAM follows the batch), bitwise those `build_audio_data` makes of the source."""
    manifest = open_prepared(root, "audio", codec and codec.to_json())
    # Stored dtype, as in memory: the crops widen to int32 themselves.
    splits = {s: _split_clips(root, manifest, s, None) for s in manifest["splits"]}
    seconds = {s: part["counts"]["seconds"] for s, part in manifest["splits"].items()}
    return _bundle(config, splits, AudioCodec.from_json(manifest["codec"]), seconds,
                   {"prepared": str(root)}, process_index, process_count)


def _prepared_clips(root: Path, split: str) -> tuple[Any, Any, list[str] | None]:
    """`_memory_clips` from a prepared directory: lazy clips served as int32."""
    manifest = open_prepared(root, "audio")
    chosen = [_split_clips(root, manifest, s, np.int32) for s in SPLITS
              if split in (s, "all") and s in manifest["splits"]]
    codes = functools.reduce(ClipCodes.concat, [c.codes for c in chosen])
    labels = [c.labels for c in chosen]
    labels = None if any(lab is None for lab in labels) else np.concatenate(labels)
    return codes, labels, manifest["codec"]["label_names"]


register_prepared_kind("audio", AudioDataConfig, bundle=audio_bundle, evaluate=audio_eval)


__all__ = ["AudioCodec", "AudioDataConfig", "ClipCodes", "audio_bundle", "build_audio_data",
           "load_clips", "mu_law_decode", "mu_law_encode", "prepare_audio_data", "read_audio",
           "read_wav", "resample", "synthetic_clip"]
