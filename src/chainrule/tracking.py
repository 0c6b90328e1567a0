"""Experiment tracking: W&B, a JSONL metrics log and sample files, behind one small class.

Whatever the backend, every `log` call appends a line to run_dir/metrics.jsonl and every
`log_samples` call writes the samples under run_dir/samples/, so a run can be inspected
without W&B. Image samples are written for people (a PNG grid upscaled to at least
MIN_IMAGE_SIDE px, also what W&B shows) and for tools (the exact samples, a .npy beside it). Only the main process writes or talks to W&B; on the others a Tracker is a
silent no-op, so the training loop never has to ask.
"""

from __future__ import annotations

import dataclasses
import json
import math
import netrc
import os
import time
import wave
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from chainrule.config import register
from chainrule.rundir import RunDir, write_json_atomic

BACKENDS = ("wandb", "none")
WANDB_MODES = ("online", "offline", "disabled")
SAMPLE_KINDS = ("text", "image", "audio")
GRID_SEPARATOR = 255  # value of the 1-px lines between images in a sample grid
MIN_IMAGE_SIDE = 256  # sample grids are shown upscaled until their long side is at least this


@dataclasses.dataclass
class LoggerConfig:
    """Where metrics go. Hydra schema name: logger_schema."""

    backend: str = "wandb"  # "wandb" | "none" (JSONL and sample files only)
    project: str = "chainrule"
    entity: str | None = None
    # "online" | "offline" | "disabled" | None: None = $WANDB_MODE if set, else online when
    # W&B credentials exist, else offline (W&B refuses to start with no key and no mode).
    mode: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    name: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"logger.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise ValueError(f"logger.mode must be one of {WANDB_MODES} or None, "
                             f"got {self.mode!r}")
        if not self.project:
            raise ValueError(f"logger.project must be a non-empty name, got {self.project!r}")
        if isinstance(self.tags, str):
            raise ValueError(f"logger.tags must be a list of strings, got the string "
                             f"{self.tags!r}")
        self.tags = tuple(str(t) for t in self.tags)  # Hydra hands lists over


register("logger", "logger", LoggerConfig)


# ---- W&B mode resolution ------------------------------------------------------------------

def wandb_host(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    base_url = env.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    return urlparse(base_url).hostname or "api.wandb.ai"


def has_wandb_credentials(env: Mapping[str, str] | None = None,
                          home: Path | None = None) -> bool:
    """True when W&B could log in: $WANDB_API_KEY, or a netrc entry for the W&B host."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(env["NETRC"]) if env.get("NETRC") else (home or Path.home()) / ".netrc"
    if not netrc_path.is_file():
        return False
    try:
        entry = netrc.netrc(str(netrc_path)).authenticators(wandb_host(env))
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def resolve_wandb_mode(logger: LoggerConfig, env: Mapping[str, str] | None = None,
                       home: Path | None = None) -> str:
    """Explicit `logger.mode` wins, then $WANDB_MODE, then online iff credentials exist."""
    env = os.environ if env is None else env
    if logger.mode is not None:
        return logger.mode
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    return "online" if has_wandb_credentials(env, home) else "offline"


# ---- sample rendering ---------------------------------------------------------------------

def image_grid(images: Sequence[np.ndarray], *, separator: int = GRID_SEPARATOR) -> np.ndarray:
    """Tile same-shaped uint8 [H, W, C] images (C in {1, 3}) into a near-square grid.

    Columns = ceil(sqrt(n)), rows = ceil(n / columns), with 1-px `separator` lines between
    cells; unused cells are filled with `separator`. Returns uint8 [rows*H + rows-1,
    cols*W + cols-1, C].
    """
    if len(images) == 0:
        raise ValueError("image_grid needs at least one image, got an empty list")
    arrays = [np.asarray(im) for im in images]
    first = arrays[0]
    for i, im in enumerate(arrays):
        if im.dtype != np.uint8:
            raise ValueError(f"image {i} must be uint8, got dtype {im.dtype}")
        if im.ndim != 3 or im.shape[-1] not in (1, 3):
            raise ValueError(f"image {i} must be [H, W, C] with C in {{1, 3}}, "
                             f"got shape {im.shape}")
        if im.shape != first.shape:
            raise ValueError(f"all images must share one shape; image 0 is {first.shape}, "
                             f"image {i} is {im.shape}")
    n = len(arrays)
    h, w, c = first.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), separator, np.uint8)
    for i, im in enumerate(arrays):
        r, col = divmod(i, cols)
        grid[r * (h + 1):r * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = im
    return grid


def upscale_factor(shape: Sequence[int], min_side: int = MIN_IMAGE_SIDE) -> int:
    """The smallest integer k with k * max(H, W) >= min_side; 1 for an image already that big."""
    return max(1, math.ceil(min_side / max(shape[0], shape[1])))


def upscale(image: np.ndarray, min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """[H, W, C] -> [kH, kW, C] by nearest neighbour with k = upscale_factor: every pixel
    becomes a uniform k x k block, so a 17 x 17 digits grid is shown crisp at 272 x 272."""
    k = upscale_factor(image.shape, min_side)
    return image if k == 1 else np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def write_png(path: Path, image: np.ndarray) -> None:
    """uint8 [H, W, 1] -> greyscale PNG, [H, W, 3] -> RGB PNG."""
    pil = Image.fromarray(image[..., 0], mode="L") if image.shape[-1] == 1 \
        else Image.fromarray(image, mode="RGB")
    pil.save(path, format="PNG")


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """float [T] in [-1, 1] -> mono 16-bit PCM WAV (values outside are clipped)."""
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())


def _to_float(name: str, value: Any) -> float:
    try:
        return float(np.asarray(value).item())
    except (TypeError, ValueError):
        raise ValueError(f"metric {name!r} must be a number (python, numpy or jax scalar), "
                         f"got {value!r}") from None


def _jsonable(value: Any) -> Any:
    """Summary values -> JSON: numpy/jax scalars become python numbers, tuples lists."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | bool | int | float) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    array = np.asarray(value)
    if array.dtype.kind in "biuf":
        return array.item() if array.ndim == 0 else array.tolist()
    raise ValueError(f"summary value {value!r} of type {type(value).__name__} is not "
                     "JSON-serialisable")


def write_json(path: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """Write `data` as indented JSON atomically (readers never see a half-written file)."""
    clean = _jsonable(dict(data))
    write_json_atomic(path, clean)
    return clean


# ---- the tracker --------------------------------------------------------------------------

class Tracker:
    """Metrics and samples to metrics.jsonl, samples/ and (optionally) W&B.

    W&B steps: metrics are logged against their own "step" key (`define_metric`), not W&B's
    internal step, so a run resumed from an older checkpoint can log steps W&B has already
    seen instead of having them dropped.
    """

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any], logger: LoggerConfig, *,
                 run_id: str | None = None, is_main_process: bool = True,
                 resume: bool = False):
        self.run_dir = Path(run_dir)
        self.layout = RunDir(self.run_dir)
        self.samples_dir = self.layout.samples
        self.logger = logger
        self.is_main_process = is_main_process
        self.run_id: str | None = run_id
        self.mode: str | None = None
        self._run = None
        self._jsonl = None
        self._finished = False
        if not is_main_process:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.layout.curves, "a", encoding="utf-8")  # noqa: SIM115
        if logger.backend == "wandb":
            if resume and run_id is None:
                print("[tracking] resuming without a saved W&B run id: starting a new W&B run")
            self._init_wandb(dict(config))

    def _init_wandb(self, config: dict) -> None:
        import wandb  # imported here so backend "none" never loads it

        self.mode = resolve_wandb_mode(self.logger)
        self._run = wandb.init(
            project=self.logger.project, entity=self.logger.entity, group=self.logger.group,
            tags=list(self.logger.tags) or None, name=self.logger.name, config=config,
            dir=str(self.run_dir), id=self.run_id, resume="allow", mode=self.mode,
        )
        self.run_id = self._run.id
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    # ---- metrics ---------------------------------------------------------------------------

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append {"step", "time", **metrics} to metrics.jsonl (flushed) and send to W&B."""
        if not self.is_main_process:
            return
        self._check_open()
        values = {str(k): _to_float(str(k), v) for k, v in metrics.items()}
        record = {"step": int(step), "time": time.time(), **values}
        # Python's json writes NaN/Infinity for diverged values: readable by json/pandas.
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._run is not None:
            self._run.log({**values, "step": int(step)})

    def summary(self, results: Mapping[str, Any]) -> Path:
        """Write results to run_dir/metrics.json and into the W&B run summary."""
        path = self.layout.metrics
        if not self.is_main_process:
            return path
        self._check_open()
        clean = write_json(path, results)
        if self._run is not None:
            self._run.summary.update(clean)
        return path

    def update_summary(self, values: Mapping[str, Any]) -> None:
        """Add `values` to the W&B run's summary only (evaluate.py's results)."""
        if self._run is not None and self.is_main_process:
            self._run.summary.update({str(k): _to_float(str(k), v) for k, v in values.items()})

    # ---- samples ---------------------------------------------------------------------------

    def log_samples(self, kind: str, samples: Sequence[Any], step: int, *,
                    sample_rate: int | None = None,
                    captions: Sequence[str] | None = None,
                    stem: str | None = None) -> list[Path]:
        """Write generated samples under run_dir/samples/ and send them to W&B.

        kind "text":  list of str -> appended to {stem}.txt, printed, a wandb.Table
        kind "image": list of uint8 [H, W, C], C in {1, 3} -> one PNG grid {stem}.png for
                      people (image_grid, upscaled by nearest neighbour with an integer factor
                      until its long side is >= MIN_IMAGE_SIDE px; as sent to W&B) and
                      {stem}.npy for tools: the samples themselves at native size, uint8
                      [N, H, W, C] in the order given (np.load; image_grid(list(a)) is the
                      native grid)
        kind "audio": list of float [T] in [-1, 1] and `sample_rate` -> 16-bit PCM WAVs
                      {stem}_{i}.wav
        The file names start with `stem`, by default step_{step:06d}.
        Returns the paths written (none on non-main processes).
        """
        if kind not in SAMPLE_KINDS:
            raise ValueError(f"sample kind must be one of {SAMPLE_KINDS}, got {kind!r}")
        if captions is not None and len(captions) != len(samples):
            raise ValueError(f"captions must match the samples one to one: got "
                             f"{len(captions)} captions for {len(samples)} samples")
        if kind == "audio" and (sample_rate is None or int(sample_rate) <= 0):
            raise ValueError(f"audio samples need a positive sample_rate, got {sample_rate!r}")
        if not self.is_main_process:
            return []
        self._check_open()
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        stem = stem or f"step_{int(step):06d}"
        if kind == "text":
            return self._log_text(samples, step, stem, captions)
        if kind == "image":
            return self._log_images(samples, step, stem, captions)
        return self._log_audio(samples, step, stem, int(sample_rate), captions)

    def _log_text(self, samples, step, stem, captions) -> list[Path]:
        for i, s in enumerate(samples):
            if not isinstance(s, str):
                raise ValueError(f"text sample {i} must be a str, got {type(s).__name__}")
        path = self.samples_dir / f"{stem}.txt"
        with open(path, "a", encoding="utf-8") as f:
            for i, text in enumerate(samples):
                header = f"=== step {step} sample {i}" + (f" ({captions[i]})" if captions else "")
                f.write(f"{header} ===\n{text}\n\n")
                print(f"{header} ===\n{text}\n", flush=True)
        if self._run is not None:
            import wandb

            columns = ["step", "sample"] + (["caption"] if captions else [])
            rows = [[int(step), s] + ([captions[i]] if captions else [])
                    for i, s in enumerate(samples)]
            self._run.log({"samples/text": wandb.Table(columns=columns, data=rows),
                           "step": int(step)})
        return [path]

    def _log_images(self, samples, step, stem, captions) -> list[Path]:
        images = [np.asarray(s) for s in samples]
        shown = upscale(image_grid(images))  # image_grid checks the images
        png, npy = self.samples_dir / f"{stem}.png", self.samples_dir / f"{stem}.npy"
        write_png(png, shown)
        np.save(npy, np.stack(images))
        if self._run is not None:
            import wandb

            caption = " | ".join(captions) if captions else f"step {step}"
            self._run.log({"samples/image": wandb.Image(shown, caption=caption),
                           "step": int(step)})
        return [png, npy]

    def _log_audio(self, samples, step, stem, sample_rate, captions) -> list[Path]:
        clips = [np.asarray(s, dtype=np.float32) for s in samples]
        for i, clip in enumerate(clips):
            if clip.ndim != 1:
                raise ValueError(f"audio sample {i} must be a 1-D waveform [T], "
                                 f"got shape {clip.shape}")
        paths = []
        for i, clip in enumerate(clips):
            path = self.samples_dir / f"{stem}_{i}.wav"
            write_wav(path, clip, sample_rate)
            paths.append(path)
        if self._run is not None:
            import wandb

            # One key per clip, each from its WAV file: wandb.Audio on raw arrays, and lists
            # of wandb.Audio, need the soundfile package, which chainrule does not install.
            media = {f"samples/audio_{i}": wandb.Audio(
                str(path), sample_rate=sample_rate,
                caption=captions[i] if captions else f"step {step} #{i}")
                for i, path in enumerate(paths)}
            self._run.log({**media, "step": int(step)})
        return paths

    # ---- lifetime --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("this Tracker has been finished; create a new one to log again")

    def finish(self, exit_code: int = 0) -> None:
        """Close the JSONL file and the W&B run. Safe to call more than once."""
        if self._finished:
            return
        self._finished = True
        if self._jsonl is not None:
            self._jsonl.close()
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
