"""A run directory is self-sufficient: `chainrule.load_run` and sample.py need nothing else —
not the training data, not a data pipeline — and runs written before run.json still load."""

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir
from PIL import Image

import chainrule
from chainrule.cli import CONF_DIR
from chainrule.cli.schemas import register_configs
from chainrule.config import resolve
from chainrule.data.audio import AudioCodec
from chainrule.data.base import load_codec
from chainrule.data.images import ImageCodec
from chainrule.data.text import TextCodec
from chainrule.data.tokenizers import load_tokenizer
from chainrule.rundir import FORMAT_VERSION, RunDir
from chainrule.training import restore
from chainrule.training.train import train

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "runs_v0"
register_configs()


def no_data_pipeline(*args, **kwargs):
    raise AssertionError("a data pipeline was built")


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


def sample(run_dir: Path, *overrides: str) -> None:
    from chainrule.cli.sample import run as sample_run

    sample_run(compose_config("sample", [f"checkpoint={run_dir}", *overrides]))


def make_text(folder: Path) -> list[str]:
    folder.mkdir()
    (folder / "corpus.txt").write_text("To be, or not to be, that is the question.\n" * 120)
    return ["model=transformer", "data=text_file", f"data.path={folder / 'corpus.txt'}",
            "data.sequence_length=16"]


def make_images(folder: Path) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):  # 32 train, 4 validation, 4 test: a batch of 4 each
        Image.fromarray(rng.integers(0, 256, (6, 7), dtype=np.uint8)).save(folder / f"{i}.png")
    return ["model=pixelcnn", "data=image_folder", f"data.path={folder}", "data.batch_size=4",
            "data.num_levels=4"]


def make_audio(folder: Path) -> list[str]:
    folder.mkdir()
    t = np.arange(16000) / 8000.0
    pcm = (np.sin(2 * np.pi * 440 * t) * 20000).astype(np.int16)
    with wave.open(str(folder / "tone.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(8000)
        f.writeframes(pcm.tobytes())
    return ["model=wavenet", "data=wav_folder", f"data.path={folder}",
            "data.sequence_length=64"]


FAMILIES = {"transformer": (make_text, TextCodec), "pixelcnn": (make_images, ImageCodec),
            "wavenet": (make_audio, AudioCodec)}


# The text run moves its corpus away in the fast suite; the image and audio runs (their own
# trainings, ~20 s each) run with the slow tests, and tests/test_cli.py loads its image and
# audio runs with data pipelines forbidden every time.
CASES = [pytest.param(f, marks=[] if f == "transformer" else [pytest.mark.slow]) for f in FAMILIES]


@pytest.mark.parametrize("family", CASES)
def test_a_run_samples_with_its_training_data_moved_away(family, tmp_path, monkeypatch):
    make_data, codec_type = FAMILIES[family]
    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    overrides = make_data(data_dir)
    cfg = resolve(compose_config("train", ["debug=smoke", *overrides, "trainer.steps=2",
                                           "trainer.eval_every=2", "trainer.checkpoint_every=2",
                                           "sampler.num_samples=1", "sampler.max_length=8"]))
    train(cfg, run_dir)
    record = json.loads((run_dir / RunDir.RUN_FILE).read_text())
    assert record["format"] == FORMAT_VERSION and record["family"] == family
    fields = load_codec(record["codec"]).model_fields()  # what the data decided is recorded
    assert fields and all(record["model"]["config"][k] == list(v) if isinstance(v, tuple)
                          else record["model"]["config"][k] == v for k, v in fields.items())

    shutil.move(data_dir, tmp_path / "moved")
    monkeypatch.setattr(restore, "build_data", no_data_pipeline)
    model, codec, step, config = chainrule.load_run(run_dir)
    assert step == 2 and isinstance(codec, codec_type)
    assert config["_types"]["model"] == type(model.config).__name__
    before = set((run_dir / "samples").iterdir())
    sample(run_dir, "sampler.num_samples=1", "sampler.max_length=8")
    assert set((run_dir / "samples").iterdir()) > before


def test_the_codec_turns_samples_back_into_media():
    tokenizer = load_tokenizer(FIXTURES / "transformer" / "tokenizer.json")
    text = TextCodec.from_json(TextCodec(tokenizer).to_json())
    assert text.decode(text.encode("ROMEO: Ay.")) == "ROMEO: Ay."
    image = ImageCodec.from_json(ImageCodec((2, 3, 1), 4, ["a"]).to_json())
    assert image.decode(np.full((2, 3, 1), 3)).max() == 255
    assert image.model_fields() == {"image_shape": (2, 3, 1), "num_levels": 4}
    audio = AudioCodec.from_json(AudioCodec(8000, 255, ["x", "y"]).to_json())
    assert audio.model_fields() == {"vocab_size": 256, "num_classes": 2}
    assert audio.media == {"sample_rate": 8000}


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_a_format1_text_run_loads_without_its_data(tmp_path, monkeypatch):
    run_dir = copy_fixture("transformer", tmp_path)
    monkeypatch.setattr(restore, "build_data", no_data_pipeline)  # tokenizer.json is enough
    model, codec, step, _ = chainrule.load_run(run_dir)
    assert step == 2 and isinstance(codec, TextCodec)
    assert model.config.vocab_size == codec.tokenizer.vocab_size
    tokens = np.asarray(model.generate(n_samples=1, max_length=6, rngs=nnx.Rngs(sample=0)))
    assert tokens.shape == (1, 6) and isinstance(codec.decode(tokens[0]), str)
    assert not (run_dir / RunDir.RUN_FILE).exists()  # loading writes nothing


def test_a_format1_image_run_loads_and_samples(tmp_path):
    run_dir = copy_fixture("pixelcnn", tmp_path)
    model, codec, step, _ = chainrule.load_run(run_dir)  # digits are read once for the shape
    assert step == 2 and codec.shape == (8, 8, 1) and codec.levels == 17
    assert tuple(model.config.image_shape) == (8, 8, 1)
    sample(run_dir, "sampler.num_samples=2")
    assert list((run_dir / "samples").glob("sample_step_000002_0.png"))


def test_a_run_file_from_a_newer_chainrule_is_refused(tmp_path):
    run_dir = copy_fixture("transformer", tmp_path)
    (run_dir / RunDir.RUN_FILE).write_text(json.dumps({"format": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=f"has format {FORMAT_VERSION + 1}"):
        chainrule.load_run(run_dir)
