"""Bad input, one test per row of docs/reliability.md: `python train.py ...` exits 2 with one
line saying what is wrong and what is expected, and leaves no run directory behind (or an
existing one exactly as it was).

The commands run in this process through train.py's own entry point (Hydra's composition,
the Preflight callback, the task), with sys.argv set; test_cli.py runs a few as subprocesses
for the real exit code and stderr.
"""

import hashlib
import re
import sys
import wave
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra

from chainrule.checkpoint import Checkpointer
from chainrule.cli.train import main

COMMON = ["logger=none", "trainer.progress=false", "data.batch_size=2", "data.val_batches=1"]
TEXT = ["model.num_layers=1", "model.network.embed_dim=32", "model.network.num_heads=2",
        "data.sequence_length=16"]
IMAGE = ["model=pixelcnn", "model.num_layers=1", "model.hidden_channels=8"]
AUDIO = ["model=wavenet", "model.residual_channels=8", "model.skip_channels=8",
         "model.num_blocks=1", "model.layers_per_block=2", "data.sequence_length=16"]


@pytest.fixture
def train_py(monkeypatch, capfd):
    """`python train.py ARGS` in this process; returns (exit code, stderr lines). Hydra's
    logging setup is off (in a test process it would close the handlers pytest relies on);
    test_cli.py runs commands with it."""

    def run(*args: str) -> tuple[int, list[str]]:
        argv = ["train.py", *args, "hydra/job_logging=none", "hydra/hydra_logging=none"]
        monkeypatch.setattr(sys, "argv", argv)
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        finally:
            GlobalHydra.instance().clear()
        return code, capfd.readouterr().err.strip().splitlines()

    return run


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Bad data files of every kind, and one good text file."""
    d = tmp_path_factory.mktemp("files")
    (d / "empty.txt").write_text("")
    (d / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    rows = {"wrong_shape": np.zeros((8, 100), np.uint8),
            "out_of_levels": np.full((8, 784), 2, np.uint8),  # binarized: levels 0 and 1
            "float": np.full((8, 784), 0.5, np.float32)}
    for name, train in rows.items():
        np.savez(d / f"{name}.npz", train=train, valid=train)
    for name in ("not_wav", "empty_wav"):
        (d / name).mkdir()
    (d / "not_wav" / "clip.wav").write_text("this is not audio")
    with wave.open(str(d / "empty_wav" / "clip.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(8000)
    return d


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory) -> Path:
    """A run directory holding a (tiny, fake) checkpoint of a Transformer run."""
    run_dir = tmp_path_factory.mktemp("transformer_run")
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        ckpt.save(4, {"w": jnp.zeros(3)}, meta={"model_family": "transformer", "config": {}})
    (run_dir / "train.log").write_text("the first run's log\n")
    return run_dir


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# (row of the docs table, arguments, what the one line must say)
FRESH_RUN_DIR = [
    ("misspelled key", ["trainer.stepz=10"],
     r"trainer.stepz is not a config key \(did you mean trainer.steps\?\); expected one of: "
     r"steps, "),
    ("misspelled key, appended", ["+trainer.stepz=10"],
     r"trainer.stepz is not a config key \(did you mean trainer.steps\?\)"),
    ("unknown option", [*TEXT, "model=pixelcnnn"],
     r"no config 'model/pixelcnnn'; expected one of: pixelcnn, transformer, wavenet"),
    ("wrong type", ["trainer.steps=ten"],
     r"trainer.steps: Value 'ten' of type 'str' could not be converted to Integer"),
    ("zero size", ["trainer.steps=0"], r"trainer.steps must be > 0, got 0"),
    ("negative size", ["data.batch_size=-2"], r"data.batch_size=-2: expected a positive integer"),
    ("zero size", ["model.num_layers=0"], r"num_layers"),
    ("zero size", ["model.network.embed_dim=0"], r"embed_dim"),
    ("num_heads does not divide the width", ["model.network.num_heads=3"],
     r"num_heads=3 must divide network.embed_dim=32"),
    ("unknown choice", ["trainer.on_nonfinite=ignore"],
     r"trainer.on_nonfinite='ignore'; expected 'stop' or 'skip'"),
    ("hardware not present", ["hardware=tpu"],
     r"hardware=tpu asks for platform 'tpu' but JAX found 'cpu'"),
    ("hardware not present", ["hardware=gpu"],
     r"hardware=gpu asks for platform 'gpu' but JAX found 'cpu'"),
    ("missing data path", ["data=text_file", "data.path=/no/such/corpus.txt"],
     r"text path '/no/such/corpus.txt' .* does not exist; expected a text, JSONL or Parquet file or a folder"),
    ("missing data path", [*IMAGE, "data=binarized_mnist", "data.path=/no/such.npz"],
     r"data.path \(binarized_mnist .npz\) '/no/such.npz' does not exist"),
    ("missing data path", [*AUDIO, "data=wav_folder", "data.path=/no/such/folder"],
     r"data.path='/no/such/folder' .* is not a folder; expected a folder of .wav files"),
    ("empty text file", ["data=text_file", "data.path={files}/empty.txt"],
     r"text file .*empty.txt is empty; expected some text"),
    ("vocabulary smaller than the data's token ids",
     ["data=text_file", "data.path={files}/corpus.txt", "model.vocab_size=5"],
     r"model.vocab_size=5 is smaller than the data's vocabulary \(\d+ tokens\)"),
    ("image of the wrong shape", [*IMAGE, "data=digits", "model.image_shape=[28,28,1]"],
     r"model.image_shape=\(28, 28, 1\) does not match the data \(\(8, 8, 1\)\)"),
    ("image of the wrong shape",
     [*IMAGE, "data=binarized_mnist", "data.path={files}/wrong_shape.npz"],
     r"array 'train' has shape \(8, 100\); expected \[N, 784\]"),
    ("image values outside the levels",
     [*IMAGE, "data=binarized_mnist", "data.path={files}/out_of_levels.npz"],
     r"pixel values span \[2, 2\]; expected levels 0..1"),
    ("float image", [*IMAGE, "data=binarized_mnist", "data.path={files}/float.npz"],
     r"float32 images with fractional values; expected integer levels 0..1"),
    ("non-WAV audio", [*AUDIO, "data=wav_folder", "data.path={files}/not_wav"],
     r"clip.wav: not a readable WAV file .*expected a RIFF/WAVE PCM file"),
    ("empty audio", [*AUDIO, "data=wav_folder", "data.path={files}/empty_wav"],
     r"clip.wav: the WAV file has no samples; expected audio"),
]


@pytest.mark.parametrize("row, args, message", FRESH_RUN_DIR,
                         ids=[f"{row}: {' '.join(a[-1:])}" for row, a, _ in FRESH_RUN_DIR])
def test_bad_input_fails_in_one_line_and_leaves_no_run_directory(
        train_py, files, tmp_path, row, args, message):
    run_dir = tmp_path / "outputs" / "run"
    family = [] if any(a.startswith("model=") for a in args) else TEXT
    args = [*COMMON, *family, *(a.format(files=files) for a in args)]
    code, err = train_py(*args, f"hydra.run.dir={run_dir}")
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args, message", [
    (IMAGE, r"holds checkpoints of a transformer model, not pixelcnn: expected a "
                         r"new run directory for model=pixelcnn"),
    ([*TEXT, "resume=false"], r"already holds checkpoints and resume=false: expected a new run "
                       r"directory"),
], ids=["checkpoint from a different model family", "resume=false over checkpoints"])
def test_an_existing_run_directory_that_cannot_be_resumed_is_left_as_it_was(
        train_py, transformer_run, args, message):
    before = digests(transformer_run)
    code, err = train_py(*COMMON, *args, f"hydra.run.dir={transformer_run}")
    assert code == 2 and len(err) == 1, err
    assert re.search(message, err[0]), err[0]
    assert digests(transformer_run) == before  # not even Hydra's .hydra/ record or the log
