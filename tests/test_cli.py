"""train.py and sample.py as a user runs them: subprocesses on clean run directories."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chainrule.data.audio import mu_law_encode, read_audio, read_wav
from chainrule.data.images import levels_to_uint8, requantize
from chainrule.tracking import image_grid, upscale, write_wav

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def run(script, *args, check=True, env=ENV):
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke")
    proc = run("train.py", "debug=smoke", f"hydra.run.dir={run_dir}")
    return run_dir, proc


def test_train_smoke_writes_a_complete_run(smoke_run):
    run_dir, proc = smoke_run
    results = json.loads((run_dir / "metrics.json").read_text())
    assert results["final_step"] == 6 and results["val_loss"] > 0
    assert "val_perplexity" in results and "val_bits_per_char" in results
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in x for x in lines) and any("val/loss" in x for x in lines)
    assert json.loads((run_dir / "run.json").read_text())["codec"]["kind"] == "text"
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert "results: val_loss=" in proc.stdout


def test_sample_cli_keeps_compiled_programs_for_the_next_run(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    cache = tmp_path / "compiled"
    # The suite's own cache (JAX_COMPILATION_CACHE_DIR, which wins where set) is left out.
    env = {k: v for k, v in ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    run("sample.py", f"checkpoint={run_dir}", "sampler.max_new_tokens=8",
        f"compilation_cache_dir={cache}", f"output={tmp_path}", env=env)
    assert cache.is_dir() and any(cache.iterdir())


def test_sample_cli_continues_a_prompt(smoke_run):
    run_dir, _ = smoke_run
    proc = run("sample.py", f"checkpoint={run_dir}", "prompt=ROMEO:", "sampler=top_k",
               "sampler.num_samples=2", "sampler.max_length=20")
    assert proc.stdout.count("ROMEO:") >= 2
    written = list((run_dir / "samples").glob("*.txt"))
    assert written and "ROMEO:" in "".join(p.read_text() for p in written)


def test_sample_cli_beam_speculative_and_prompt_file(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    proc = run("sample.py", f"checkpoint={run_dir}", "sampler=beam", "prompt=KING:",
               "sampler.beam_size=3", "sampler.num_samples=2", "sampler.max_new_tokens=6")
    assert proc.stdout.count("beam score") == 2
    # a model drafting for itself: every draft token is accepted
    proc = run("sample.py", f"checkpoint={run_dir}", "sampler=speculative",
               f"sampler.draft_checkpoint={run_dir}", "prompt=KING:", "sampler.num_samples=2",
               "sampler.max_new_tokens=9", "sampler.num_draft_tokens=3")
    assert "acceptance 1.00" in proc.stdout
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET:\n")
    proc = run("sample.py", f"checkpoint={run_dir}", f"prompt_file={prompts}",
               "sampler.num_samples=2", "sampler.max_new_tokens=5", "sampler=greedy")
    assert proc.stdout.count("ROMEO:") == 2 and proc.stdout.count("JULIET:") == 2


def test_rerun_in_the_same_directory_resumes(smoke_run, tmp_path):
    run_dir = tmp_path / "again"
    run("train.py", "debug=smoke", "trainer.steps=3", f"hydra.run.dir={run_dir}")
    proc = run("train.py", "debug=smoke", f"hydra.run.dir={run_dir}")
    assert "resuming" in proc.stdout and "from step 3" in proc.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["final_step"] == 6


@pytest.mark.parametrize("args, expected", [
    (["trainer.stepz=10"], "trainer.stepz is not a config key (did you mean trainer.steps?)"),
    (["trainer.steps=abc"], "trainer.steps: Value 'abc' of type 'str' could not be converted"),
    (["data=text_file", "data.path=/no/such/file.txt"], "/no/such/file.txt"),
    (["hardware=tpu"], "JAX found 'cpu'"),
    (["model.vocab_size=10"], "smaller than the data's vocabulary"),
])
def test_bad_input_exits_2_with_one_line_and_no_run_directory(tmp_path, args, expected):
    """The rows of docs/reliability.md as a user meets them (all rows: test_bad_input.py)."""
    proc = run("train.py", "debug=smoke", f"hydra.run.dir={tmp_path / 'run'}", *args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith("error: ") and expected in proc.stderr
    assert not (tmp_path / "run").exists()


def test_another_family_in_a_run_directory_leaves_it_untouched(smoke_run):
    run_dir, _ = smoke_run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run("train.py", "model=pixelcnn", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [proc.stderr.strip()]
    assert "holds checkpoints of a transformer model, not pixelcnn" in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_sample_cli_rejects_a_directory_without_checkpoints(tmp_path):
    proc = run("sample.py", f"checkpoint={tmp_path}", check=False)
    assert proc.returncode != 0 and "no chainrule checkpoint" in proc.stderr


# ----------------------------------------------------------------------------- images and audio
# Tiny class-conditional models on the families' default data (digits 8x8, 17 levels; synthetic
# notes labelled by pitch class, 12 classes): one run each of 2 steps (one evaluation, one
# checkpoint), sampled with every input at once.
SHORT = ["debug=smoke", "trainer.steps=2", "trainer.eval_every=2", "trainer.checkpoint_every=2"]

TINY_PIXELCNN = ["model=pixelcnn", "model.hidden_channels=8", "model.num_layers=2",
                 "model.num_residual_blocks=0", "model.num_classes=10"]
TINY_WAVENET = ["model=wavenet", "model.residual_channels=8", "model.skip_channels=8",
                "model.layers_per_block=3", "model.num_blocks=1", "data.sequence_length=256",
                "data.label_from=pitch"]


@pytest.fixture(scope="module")
def pixelcnn_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pixelcnn")
    run("train.py", *SHORT, *TINY_PIXELCNN, f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.fixture(scope="module")
def wavenet_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("wavenet")
    run("train.py", *SHORT, *TINY_WAVENET, f"hydra.run.dir={run_dir}")
    return run_dir


def written(proc) -> list[Path]:
    return [Path(p) for p in proc.stdout.split("written: ")[-1].strip().split(", ")]


def native_grid(path: Path) -> np.ndarray:
    """A greyscale sample grid at native size, from the .npy of samples beside its PNG, after
    checking that the PNG is that grid upscaled (long side >= 256 px)."""
    grid = image_grid(list(np.load(path.with_suffix(".npy"))))[..., 0]
    shown = np.asarray(Image.open(path))
    assert max(shown.shape) >= 256
    np.testing.assert_array_equal(shown, upscale(grid))
    return grid


def grid_cells(path: Path, size: int) -> list[np.ndarray]:
    """The size x size cells of a sample grid (1-px separators), row by row."""
    grid = native_grid(path)
    return [grid[r:r + size, c:c + size] for r in range(0, grid.shape[0], size + 1)
            for c in range(0, grid.shape[1], size + 1)]


def test_train_pixelcnn_logs_bits_per_dim_and_a_png_grid(pixelcnn_run):
    lines = [json.loads(x) for x in (pixelcnn_run / "metrics.jsonl").read_text().splitlines()]
    for split in ("train", "val"):
        logged = [x for x in lines if f"{split}/bits_per_dim" in x]
        assert logged
        for x in logged:  # nats per sub-pixel in bits
            assert x[f"{split}/bits_per_dim"] == pytest.approx(x[f"{split}/nll_loss"] / math.log(2))
    preview = pixelcnn_run / "samples" / "step_000002.png"
    assert native_grid(preview).shape == (8, 17)  # 2 digits side by side
    assert np.asarray(Image.open(preview)).shape == (8 * 16, 17 * 16)  # shown 16x
    assert np.load(preview.with_suffix(".npy")).shape == (2, 8, 8, 1)


def test_image_and_audio_runs_load_without_a_data_pipeline(pixelcnn_run, wavenet_run,
                                                          monkeypatch):
    import chainrule
    from chainrule.training import restore

    def no_data_pipeline(*args, **kwargs):
        raise AssertionError("a data pipeline was built")

    monkeypatch.setattr(restore, "build_data", no_data_pipeline)
    _, images, _, _ = chainrule.load_run(pixelcnn_run)
    assert images.shape == (8, 8, 1) and images.levels == 17 and len(images.class_names) == 10
    _, audio, _, _ = chainrule.load_run(wavenet_run)
    assert audio.media == {"sample_rate": 8000} and len(audio.label_names) == 12


def test_sample_pixelcnn_inpaints_a_class_into_a_png_grid(pixelcnn_run, tmp_path):
    picture = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "picture.png")
    proc = run("sample.py", f"checkpoint={pixelcnn_run}", "class_label=3",
               f"image={tmp_path / 'picture.png'}", "mask=top:3", "sampler.num_samples=3")
    path, array = written(proc)
    assert path.parent == pixelcnn_run / "samples" and path.suffix == ".png"
    assert array == path.with_suffix(".npy") and np.load(array).shape == (3, 8, 8, 1)
    assert (pixelcnn_run / "samples" / "step_000002.png").exists()  # the preview stays
    kept = levels_to_uint8(requantize(picture, 256, 17), 17)[:3]  # as the model's levels
    cells = grid_cells(path, 8)
    assert len(cells) == 4  # 3 samples in a 2 x 2 grid
    for cell in cells[:3]:
        np.testing.assert_array_equal(cell[:3], kept)


def test_train_and_sample_wavenet_write_wav_files(wavenet_run, tmp_path):
    previews = sorted((wavenet_run / "samples").glob("step_000002_*.wav"))
    assert len(previews) == 2 and len(read_wav(previews[0])[0]) == 24  # debug=smoke's length
    prefix = tmp_path / "prefix.wav"
    write_wav(prefix, 0.5 * np.sin(np.arange(40) / 3), 8000)
    proc = run("sample.py", f"checkpoint={wavenet_run}", "class_label=3",
               f"prompt_audio={prefix}", "sampler.max_new_tokens=50", "sampler.num_samples=2")
    paths = written(proc)
    assert len(paths) == 2 and all(p.parent == wavenet_run / "samples" for p in paths)
    codes = mu_law_encode(read_audio(prefix, 8000))
    for path in paths:
        audio, rate = read_wav(path)
        assert rate == 8000 and len(audio) == 40 + 50
        np.testing.assert_array_equal(mu_law_encode(audio)[:40], codes)  # continues the prefix


def compose_sample(*overrides: str):
    from hydra import compose, initialize_config_dir

    from chainrule.cli import CONF_DIR
    from chainrule.cli.schemas import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("sample", overrides=list(overrides))


def sample_in_process(*overrides: str) -> int:
    """sample.py's run() in this process (a subprocess per bad value would load JAX each
    time); returns its exit code."""
    from chainrule.cli.sample import run as sample_run

    with pytest.raises(SystemExit) as exit_:
        sample_run(compose_sample(*overrides))
    return exit_.value.code


def test_sample_bad_inputs_fail_with_one_line_before_sampling(smoke_run, pixelcnn_run,
                                                              wavenet_run, tmp_path, capsys):
    picture = tmp_path / "picture.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(picture)
    cases = [
        (smoke_run[0], ["class_label=1"], "class_label=1: this TransformerAutoregressiveModel "
                                          "is not class-conditional"),
        (pixelcnn_run, ["class_label=10"], "class_label=10 is out of range: this PixelCNN has "
                                           "10 classes"),
        (wavenet_run, [f"image={picture}", "mask=top:2"],
         "image= with mask=: for image models, but this run's WaveNet makes audio samples"),
        (pixelcnn_run, [f"image={picture}", "mask=top:9"], "images have 8 rows"),
        (pixelcnn_run, [f"image={picture}", f"mask={picture}x"], "neither a PNG file nor"),
        (pixelcnn_run, [f"image={tmp_path / 'none.png'}", "mask=top:2"],
         "none.png' is not a readable file"),
        (pixelcnn_run, ["mask=left:2"], "inpainting needs both image="),
    ]
    before = {d: sorted((d / "samples").iterdir()) for d in (pixelcnn_run, wavenet_run)}
    for run_dir, args, message in cases:
        assert sample_in_process(f"checkpoint={run_dir}", *args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
    assert before == {d: sorted((d / "samples").iterdir()) for d in before}


def test_sample_keys_are_checked_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="class_labels"):
        compose_sample("checkpoint=x", "class_labels=3")
    with pytest.raises(ConfigCompositionException, match="class_label"):
        compose_sample("checkpoint=x", "class_label=three")
