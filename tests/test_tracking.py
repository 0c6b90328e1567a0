"""Tracker: JSONL metrics, summary, sample files, W&B mode resolution and offline runs."""

from __future__ import annotations

import json
import math
import wave
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from chainrule.tracking import (
    GRID_SEPARATOR,
    MIN_IMAGE_SIDE,
    LoggerConfig,
    Tracker,
    has_wandb_credentials,
    image_grid,
    resolve_wandb_mode,
    upscale_factor,
)

NONE = LoggerConfig(backend="none")


@pytest.fixture
def wandb_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep W&B's own files (settings, caches, artifacts) inside the test's tmp dir."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return home


# ---- metrics -------------------------------------------------------------------------------

def test_jsonl_lines_appended_and_parseable(tmp_path: Path) -> None:
    with Tracker(tmp_path, {}, NONE) as tracker:
        tracker.log({"train/loss": jnp.float32(2.5), "train/lr": np.float64(1e-3)}, step=10)
        tracker.log({"val/perplexity": 7, "val/loss": float("nan")}, step=20)
        # Flushed at once: readable while the run is still going.
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    # A second tracker on the same run dir (a resumed run) appends.
    with Tracker(tmp_path, {}, NONE, resume=True) as tracker:
        tracker.log({"train/loss": 1.25}, step=30)

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30]
    assert lines[0]["train/loss"] == 2.5 and lines[0]["train/lr"] == pytest.approx(1e-3)
    assert lines[1]["val/perplexity"] == 7.0 and math.isnan(lines[1]["val/loss"])
    assert all(isinstance(r["time"], float) for r in lines)
    assert not (tmp_path / "wandb").exists()  # backend "none": no W&B at all


def test_bad_metric_value_and_use_after_finish(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, {}, NONE)
    with pytest.raises(ValueError, match="metric 'train/loss'"):
        tracker.log({"train/loss": "low"}, step=1)
    with pytest.raises(ValueError, match="metric 'x'"):
        tracker.log({"x": np.ones(3)}, step=1)
    tracker.finish()
    tracker.finish()  # idempotent
    with pytest.raises(RuntimeError, match="finished"):
        tracker.log({"train/loss": 1.0}, step=2)


def test_summary_writes_metrics_json(tmp_path: Path) -> None:
    with Tracker(tmp_path, {}, NONE) as tracker:
        path = tracker.summary({"test/loss": np.float32(0.5), "best_step": np.int64(300),
                                "per_layer": (jnp.asarray(1.0), 2), "family": "wavenet"})
    assert path == tmp_path / "metrics.json"
    assert json.loads(path.read_text()) == {"test/loss": 0.5, "best_step": 300,
                                            "per_layer": [1.0, 2], "family": "wavenet"}


# ---- samples -------------------------------------------------------------------------------

def test_image_grid_layout() -> None:
    h, w = 3, 2
    images = [np.full((h, w, 1), 10 * (i + 1), np.uint8) for i in range(5)]
    grid = image_grid(images)
    # 5 images -> 3 columns x 2 rows, 1-px separators between cells.
    assert grid.shape == (2 * h + 1, 3 * w + 2, 1) and grid.dtype == np.uint8
    for i in range(5):
        r, c = divmod(i, 3)
        cell = grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w]
        assert (cell == 10 * (i + 1)).all()
    assert (grid[h, :] == GRID_SEPARATOR).all()  # horizontal line
    assert (grid[:, w] == GRID_SEPARATOR).all() and (grid[:, 2 * w + 1] == GRID_SEPARATOR).all()
    assert (grid[h + 1:, 2 * (w + 1):] == GRID_SEPARATOR).all()  # the unused 6th cell
    single = image_grid([np.zeros((4, 4, 3), np.uint8)])
    assert single.shape == (4, 4, 3) and (single == 0).all()


def native_pixels(shown: np.ndarray, k: int) -> np.ndarray:
    """The native image behind a k-times nearest-neighbour upscale, after checking that every
    native pixel is a uniform k x k block."""
    h, w = shown.shape[0] // k, shown.shape[1] // k
    assert shown.shape[:2] == (h * k, w * k)
    blocks = shown.reshape(h, k, w, k, *shown.shape[2:])
    native = blocks[:, 0, :, 0]
    np.testing.assert_array_equal(blocks, np.broadcast_to(native[:, None, :, None],
                                                          blocks.shape))
    return native


def test_upscale_factor_is_the_smallest_integer_reaching_the_minimum() -> None:
    assert MIN_IMAGE_SIDE == 256
    assert upscale_factor((17, 17, 1)) == 16  # the digits preset's grid: 272 x 272
    assert upscale_factor((11, 9, 3)) == 24 and upscale_factor((9, 11, 3)) == 24  # long side
    assert upscale_factor((128, 5)) == 2 and upscale_factor((129, 5)) == 2
    assert upscale_factor((255, 255)) == 2
    assert upscale_factor((256, 3)) == 1 and upscale_factor((3, 1000)) == 1


def test_image_samples_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, (5, 4, 3), dtype=np.uint8) for _ in range(4)]
    grey = [rng.integers(0, 256, (5, 4, 1), dtype=np.uint8) for _ in range(3)]
    with Tracker(tmp_path, {}, NONE) as tracker:
        rgb_paths = tracker.log_samples("image", rgb, step=7)
        grey_paths = tracker.log_samples("image", grey, step=8)
    rgb_path, rgb_npy = rgb_paths
    assert rgb_path == tmp_path / "samples" / "step_000007.png"
    assert rgb_npy == tmp_path / "samples" / "step_000007.npy"
    assert sorted((tmp_path / "samples").iterdir()) == sorted(rgb_paths + grey_paths)
    # For people: the grid (11 x 9) upscaled 24x to 264 x 216, each pixel a 24 x 24 block.
    shown_rgb = np.asarray(Image.open(rgb_path))
    assert shown_rgb.shape == (264, 216, 3) and max(shown_rgb.shape[:2]) >= MIN_IMAGE_SIDE
    read_rgb = native_pixels(shown_rgb, 24)
    np.testing.assert_array_equal(read_rgb, image_grid(rgb))
    assert read_rgb.shape == (11, 9, 3)
    np.testing.assert_array_equal(read_rgb[:5, :4], rgb[0])
    np.testing.assert_array_equal(read_rgb[6:, 5:], rgb[3])
    shown_grey = np.asarray(Image.open(grey_paths[0]))
    assert shown_grey.shape == (264, 216)  # greyscale PNG
    read_grey = native_pixels(shown_grey, 24)
    assert read_grey.shape == (11, 9)
    np.testing.assert_array_equal(read_grey[6:, :4], grey[2][..., 0])
    # For tools: the samples themselves, exactly, uint8 [N, H, W, C].
    for npy, samples in ((rgb_npy, rgb), (grey_paths[1], grey)):
        assert npy.suffix == ".npy"
        saved = np.load(npy)
        channels = samples[0].shape[-1]
        assert saved.dtype == np.uint8 and saved.shape == (len(samples), 5, 4, channels)
        np.testing.assert_array_equal(saved, np.stack(samples))


def test_large_image_grid_is_not_upscaled(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    # Two 256 x 100 images side by side: a 256 x 201 grid, long side already 256.
    images = [rng.integers(0, 256, (256, 100, 3), dtype=np.uint8) for _ in range(2)]
    with Tracker(tmp_path, {}, NONE) as tracker:
        png, npy = tracker.log_samples("image", images, step=1)
    np.testing.assert_array_equal(np.asarray(Image.open(png)), image_grid(images))
    np.testing.assert_array_equal(np.load(npy), np.stack(images))


def test_sample_py_stems_count_the_npy_beside_each_png(tmp_path: Path) -> None:
    from chainrule.cli.sample import free_stem

    image = [np.zeros((2, 2, 1), np.uint8)]
    with Tracker(tmp_path, {}, NONE) as tracker:
        first = tracker.log_samples("image", image, 5, stem=free_stem(tracker.samples_dir, 5))
        second = tracker.log_samples("image", image, 5, stem=free_stem(tracker.samples_dir, 5))
        assert [p.name for p in first + second] == [
            "sample_step_000005_0.png", "sample_step_000005_0.npy",
            "sample_step_000005_1.png", "sample_step_000005_1.npy"]
        first[0].unlink()  # a stem with only its .npy left is still taken
        assert free_stem(tracker.samples_dir, 5) == "sample_step_000005_2"


def test_audio_samples_wav(tmp_path: Path) -> None:
    clips = [np.array([0.0, 0.5, -1.0, 1.0, 2.0, -3.0], np.float32), np.zeros(40, np.float32)]
    with Tracker(tmp_path, {}, NONE) as tracker:
        paths = tracker.log_samples("audio", clips, step=3, sample_rate=16000)
    assert paths == [tmp_path / "samples" / f"step_000003_{i}.wav" for i in range(2)]
    with wave.open(str(paths[0]), "rb") as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 16000)
        assert f.getnframes() == 6
        pcm = np.frombuffer(f.readframes(6), "<i2")
    np.testing.assert_array_equal(pcm, [0, 16384, -32767, 32767, 32767, -32767])
    with wave.open(str(paths[1]), "rb") as f:
        assert f.getnframes() == 40


def test_text_samples_file_and_console(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with Tracker(tmp_path, {}, NONE) as tracker:
        (path,) = tracker.log_samples("text", ["ROMEO: hi", "JULIET: oh"], step=42)
        tracker.log_samples("text", ["third"], step=42, captions=["T=0.8"])
    assert path == tmp_path / "samples" / "step_000042.txt"
    text = path.read_text()
    assert text.index("ROMEO: hi") < text.index("JULIET: oh") < text.index("third")
    assert "(T=0.8)" in text
    assert "JULIET: oh" in capsys.readouterr().out


def test_bad_samples(tmp_path: Path) -> None:
    with Tracker(tmp_path, {}, NONE) as tracker:
        with pytest.raises(ValueError, match="'video'"):
            tracker.log_samples("video", [], step=1)
        with pytest.raises(ValueError, match="sample_rate"):
            tracker.log_samples("audio", [np.zeros(4)], step=1)
        with pytest.raises(ValueError, match="uint8"):
            tracker.log_samples("image", [np.zeros((2, 2, 1), np.float32)], step=1)
        with pytest.raises(ValueError, match="C in"):
            tracker.log_samples("image", [np.zeros((2, 2, 4), np.uint8)], step=1)
        with pytest.raises(ValueError, match="share one shape"):
            tracker.log_samples("image", [np.zeros((2, 2, 1), np.uint8),
                                          np.zeros((3, 2, 1), np.uint8)], step=1)
        with pytest.raises(ValueError, match="captions"):
            tracker.log_samples("text", ["a", "b"], step=1, captions=["only one"])
        with pytest.raises(ValueError, match="must be a str"):
            tracker.log_samples("text", [3], step=1)


def test_non_main_process_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    logger = LoggerConfig(backend="wandb", mode="offline")  # would start W&B on the main one
    with Tracker(run_dir, {"a": 1}, logger, is_main_process=False) as tracker:
        tracker.log({"train/loss": 1.0}, step=1)
        assert tracker.log_samples("text", ["x"], step=1) == []
        assert tracker.log_samples("image", [np.zeros((2, 2, 1), np.uint8)], step=1) == []
        tracker.summary({"a": 1.0})
        assert tracker.run_id is None
    assert not run_dir.exists()


# ---- configuration and W&B mode ------------------------------------------------------------

def test_logger_config_validation() -> None:
    assert LoggerConfig(tags=["a", "b"]).tags == ("a", "b")
    with pytest.raises(ValueError, match="backend"):
        LoggerConfig(backend="tensorboard")
    with pytest.raises(ValueError, match="mode"):
        LoggerConfig(mode="sometimes")
    with pytest.raises(ValueError, match="tags"):
        LoggerConfig(tags="ab")


def _netrc(home: Path, host: str) -> None:
    path = home / ".netrc"
    path.write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
    path.chmod(0o600)


def test_mode_resolution(tmp_path: Path) -> None:
    home = tmp_path
    auto = LoggerConfig()
    assert resolve_wandb_mode(auto, env={}, home=home) == "offline"
    assert resolve_wandb_mode(auto, env={"WANDB_API_KEY": "x" * 40}, home=home) == "online"
    assert resolve_wandb_mode(auto, env={"WANDB_MODE": "disabled", "WANDB_API_KEY": "x"},
                              home=home) == "disabled"
    assert resolve_wandb_mode(LoggerConfig(mode="offline"),
                              env={"WANDB_MODE": "online", "WANDB_API_KEY": "x"},
                              home=home) == "offline"
    _netrc(home, "example.com")
    assert resolve_wandb_mode(auto, env={}, home=home) == "offline"
    _netrc(home, "api.wandb.ai")
    assert resolve_wandb_mode(auto, env={}, home=home) == "online"
    assert not has_wandb_credentials({"WANDB_BASE_URL": "https://wandb.corp.net"}, home=home)
    _netrc(home, "wandb.corp.net")
    assert has_wandb_credentials({"WANDB_BASE_URL": "https://wandb.corp.net"}, home=home)
    (home / ".netrc").write_text("machine\n")  # malformed: treated as no credentials
    assert resolve_wandb_mode(auto, env={}, home=home) == "offline"


def test_mode_resolution_from_process_env(wandb_sandbox: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_wandb_mode(LoggerConfig()) == "offline"
    _netrc(wandb_sandbox, "api.wandb.ai")
    assert resolve_wandb_mode(LoggerConfig()) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode(LoggerConfig()) == "offline"


# ---- real W&B runs (no network) ------------------------------------------------------------

def test_wandb_offline_run_and_resume(tmp_path: Path, wandb_sandbox: Path) -> None:
    run_dir = tmp_path / "run"
    logger = LoggerConfig(mode="offline", tags=("test",), group="g", name="offline-test")
    tracker = Tracker(run_dir, {"model": {"d": 8}}, logger)
    assert tracker.mode == "offline" and tracker.run_id
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.log_samples("text", ["hello"], step=1)
    tracker.log_samples("image", [np.zeros((4, 4, 3), np.uint8)], step=1)
    tracker.log_samples("audio", [np.zeros(100, np.float32)], step=1, sample_rate=8000)
    tracker.summary({"val/loss": 0.5})
    tracker.finish()
    tracker.finish()
    run_id = tracker.run_id
    run_files = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(run_files) == 1 and run_files[0].stat().st_size > 0
    # W&B is sent the upscaled grid people see in samples/ (4 x 4 -> 256 x 256).
    (media,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/files/media/images/**/*.png")
    shown = np.asarray(Image.open(run_dir / "samples" / "step_000001.png"))
    assert shown.shape == (256, 256, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(media)), shown)

    # The resumed run continues the same W&B run id (here: offline, so no server check).
    with Tracker(run_dir, {"model": {"d": 8}}, logger, run_id=run_id, resume=True) as resumed:
        assert resumed.run_id == run_id
        resumed.log({"train/loss": 0.9}, step=1)  # a step W&B has seen: must not fail
    assert len([json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]) == 2


def test_wandb_disabled_and_failed_run(tmp_path: Path, wandb_sandbox: Path) -> None:
    with pytest.raises(KeyError), Tracker(tmp_path, {}, LoggerConfig(mode="disabled")) as t:
        t.log({"train/loss": 1.0}, step=1)
        raise KeyError("boom")  # the context manager still finishes the run
    assert t._finished and t._run is None
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["train/loss"] == 1.0
