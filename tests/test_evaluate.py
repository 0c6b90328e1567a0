"""evaluate.py scores every element of a split exactly once: checked against a slow, obvious
computation (one window at a time, the model's logits, numpy's log-softmax in float64), on one
device and on an 8-device mesh, and from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir
from PIL import Image

import chainrule
from chainrule.cli import CONF_DIR
from chainrule.cli.evaluate import data_overrides_as_additions
from chainrule.cli.schemas import register_configs
from chainrule.config import resolve
from chainrule.data.audio import load_clips
from chainrule.data.evaluation import window_plan
from chainrule.data.images import load_source, split_levels
from chainrule.data.text import load_text, split_text
from chainrule.evaluation import EvaluateConfig, evaluate
from chainrule.evaluation.evaluate import data_config
from chainrule.parallel.config import HardwareConfig, MeshConfig
from chainrule.tracking import write_wav
from chainrule.training.train import train

REPO = Path(__file__).resolve().parents[1]
register_configs()
CORPUS = "".join(f"{w} " for w in np.random.default_rng(0).choice(
    ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "'tis", "nobler",
     "in", "mind", "suffer", "\n"], 900))


def train_run(run_dir: Path, overrides: list[str]) -> Path:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["debug=smoke", "hardware=cpu", "trainer.steps=2",
                                          "trainer.eval_every=2", "trainer.checkpoint_every=2",
                                          "sampler.num_samples=1", "sampler.max_length=8",
                                          *overrides])
    train(resolve(cfg), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "corpus.txt").write_text(CORPUS)
    data = ["model=transformer", "data=text_file", f"data.path={root / 'corpus.txt'}",
            "data.sequence_length=16", "data.val_fraction=0.2", "data.test_fraction=0.2"]
    return {kind: train_run(root / kind, [*data, f"data.tokenizer={kind}",
                                          "data.bpe_vocab_size=300"])
            for kind in ("char", "bpe")}


@nnx.jit
def logits_of(model, inputs):
    """The model's logits for one input (compiled once per input shape: the reference makes
    a call per window)."""
    return model(inputs, training=False)["logits"]


def log_softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_sequence_nll(call, tokens: np.ndarray, context: int, stride: int) -> float:
    """Sum over targets 1..n-1 of -log p(token | its window), the window of each target being
    the first of the starts 0, stride, 2 stride, ... (the last moved back to end at the
    sequence's end) that holds it; one window per model call."""
    n = len(tokens)
    last_start = max(n - 1 - context, 0)
    starts, k = [], 0
    while not starts or starts[-1] < last_start:
        starts.append(min(k * stride, last_start))
        k += 1
    logp, total = {}, 0.0
    for i in range(1, n):
        s = next(s for s in starts if s < i <= s + context)
        if s not in logp:
            logp[s] = log_softmax64(call(tokens[s:s + context]))
        total -= logp[s][i - s - 1, tokens[i]]
    return total


def run_evaluation(run_dir, **kw) -> dict:
    kw.setdefault("hardware", HardwareConfig())
    kw.setdefault("wandb", False)
    return evaluate(EvaluateConfig(checkpoint=str(run_dir), progress=False, **kw))


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("stride", [None, 16])
def test_text_equals_a_window_by_window_computation(text_runs, kind, stride):
    run_dir = text_runs[kind]
    results = run_evaluation(run_dir, split="test", stride=stride, batch_size=3)
    model, codec, step, saved = chainrule.load_run(run_dir)
    config = data_config(saved, None)
    part = split_text(load_text(config), config.val_fraction, config.test_fraction)["test"]
    tokens = codec.tokenizer.encode(part)

    def call(window):
        return logits_of(model, jnp.asarray(window[None]))[0]

    expected = reference_sequence_nll(call, tokens, 16, stride or 8)
    assert results["num_scored"] == len(tokens) - 1
    assert results["nll_sum"] == pytest.approx(expected, rel=1e-6)
    assert results["step"] == step == 2 and results["about"]["stride"] == (stride or 8)
    assert results["split"] == "test"
    # Bits per character: total bits over the characters the scored tokens spell.
    chars = len(part) - len(codec.tokenizer.decode(tokens[:1]))
    assert results["characters"] == chars
    assert results["bits_per_char"] == pytest.approx(expected / np.log(2) / chars, rel=1e-6)
    assert results["bits_per_byte"] == pytest.approx(
        expected / np.log(2) / (len(part.encode()) - len(codec.tokenizer.decode(tokens[:1])
                                                             .encode())), rel=1e-6)
    saved_results = json.loads((run_dir / f"eval_test_step{step}.json").read_text())
    assert saved_results["nll_sum"] == results["nll_sum"]


def test_the_same_on_one_device_and_on_an_eight_device_mesh(text_runs):
    one = run_evaluation(text_runs["bpe"], split="val", batch_size=8)
    for mesh in (MeshConfig(data=8), MeshConfig(data=2, fsdp=2, tensor=2)):
        many = run_evaluation(text_runs["bpe"], split="val", batch_size=8,
                              hardware=HardwareConfig(mesh=mesh))
        assert many["num_scored"] == one["num_scored"]
        assert many["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-5)


@pytest.mark.parametrize("n,length,stride", [(1, 5, 2), (2, 5, 2), (5, 5, 4), (6, 5, 1),
                                             (37, 9, 3), (37, 9, 8), (100, 17, 16), (9, 9, 5)])
def test_every_target_is_scored_exactly_once_with_enough_context(n, length, stride):
    plan = window_plan([n, 3], length, stride)
    scored = {0: [], 1: []}
    for seq, start, first, last in plan:
        assert 0 < first <= last <= start + length - 1 and first > start
        for i in range(first, last + 1):
            scored[seq].append(i)
            # at least length - 1 - stride tokens of context (or all there is before it)
            assert i - start >= min(i, length - stride)
    assert sorted(scored[0]) == list(range(1, n)) and sorted(scored[1]) == [1, 2]


def make_images(folder: Path) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):  # 24 train, 3 validation, 3 test
        Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8)).save(folder / f"{i}.png")
    return ["model=pixelcnn", "data=image_folder", f"data.path={folder}", "data.batch_size=3",
            "data.num_levels=4"]


def test_images_equal_an_image_by_image_computation(tmp_path):
    run_dir = train_run(tmp_path / "run", make_images(tmp_path / "images"))
    results = run_evaluation(run_dir, split="all", batch_size=4)  # 30 images: 2 padded rows
    model, _, _, saved = chainrule.load_run(run_dir)
    config = data_config(saved, None)
    splits = load_source(config)
    images = np.concatenate([split_levels(config, splits, s) for s in ("train", "val", "test")])
    expected = 0.0
    for image in images:
        logp = log_softmax64(logits_of(model, jnp.asarray(image[None]))[0])
        expected -= np.take_along_axis(logp, image[..., None], -1).sum()
    assert results["images"] == 30 and results["num_scored"] == 30 * 5 * 6
    assert results["split"] == "all"
    assert results["nll_sum"] == pytest.approx(expected, rel=1e-6)
    assert results["nats_per_image"] == pytest.approx(expected / 30, rel=1e-6)
    assert results["bits_per_dim"] == pytest.approx(expected / np.log(2) / 900, rel=1e-6)


def make_audio(folder: Path) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    # 3 files: each is cut 80/10/10 in time; the train part of the 48-sample clip (38 samples)
    # is shorter than a 65-sample window, so its window is padded with silence
    for i, samples in enumerate((160, 400, 48)):
        write_wav(folder / f"clip{i}.wav", rng.normal(0, 0.3, samples), 8000)
    return ["model=wavenet", "data=wav_folder", f"data.path={folder}",
            "data.sequence_length=64"]


def test_audio_equals_a_window_by_window_computation_without_the_padding(tmp_path):
    run_dir = train_run(tmp_path / "run", make_audio(tmp_path / "audio"))
    results = run_evaluation(run_dir, split="train", stride=40, batch_size=4)
    model, _, _, saved = chainrule.load_run(run_dir)
    clips = load_clips(data_config(saved, None))[0]["train"].codes

    def call(window):
        return logits_of(model, jnp.asarray(window[None].astype(np.int32)))[0]

    assert min(len(c) for c in clips) < 65  # a padded window is scored too
    expected = sum(reference_sequence_nll(call, c, 64, 40) for c in clips)
    assert results["samples"] == results["num_scored"] == sum(len(c) - 1 for c in clips)
    assert results["nll_sum"] == pytest.approx(expected, rel=1e-6)
    assert results["bits_per_sample"] == pytest.approx(
        expected / np.log(2) / results["samples"], rel=1e-6)


def test_bad_input_is_one_clear_line(text_runs, tmp_path):
    run_dir = text_runs["char"]
    with pytest.raises(ValueError, match="data.pth is not a config key.*did you mean data.path"):
        run_evaluation(run_dir, data={"pth": "x"})
    with pytest.raises(ValueError, match="split='tset'; expected one of"):
        EvaluateConfig(checkpoint=str(run_dir), split="tset")
    no_test = {"test_fraction": 0.0}
    with pytest.raises(ValueError, match="split='test': the data has no test part"):
        run_evaluation(run_dir, data=no_test)
    with pytest.raises(ValueError, match="stride=20: expected 1..16"):
        run_evaluation(run_dir, stride=20)
    with pytest.raises(ValueError, match="is not a directory"):
        run_evaluation(tmp_path / "nowhere")


def test_data_keys_change_the_runs_own_data_on_the_command_line():
    assert data_overrides_as_additions(["checkpoint=r", "data.path=x"]) == [
        "checkpoint=r", "+data.path=x"]
    assert data_overrides_as_additions(["data=text_file", "data.path=x"]) == [
        "data=text_file", "data.path=x"]


def test_cli_scores_another_corpus_with_the_runs_tokenizer(text_runs, tmp_path):
    run_dir = text_runs["bpe"]
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("whether 'tis nobler in the mind to suffer\n" * 20)
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), f"checkpoint={run_dir}", "split=all",
         "data=text_file", f"data.path={held_out}", "hardware=cpu", "progress=false"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "all split, step 2: nll" in proc.stdout and "bits_per_char" in proc.stdout
    results = json.loads((run_dir / "eval_all_held_out_step2.json").read_text())
    text = held_out.read_text()
    assert results["characters"] + 1 >= len(text) - 8 and results["data"]["tokenizer"] == "bpe"
    # The run's BPE tokenizer scored it (a char tokenizer would have one token per character).
    assert results["num_scored"] < results["characters"]
    bad = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), f"checkpoint={run_dir}", "split=test",
         "data.val_fraction=2"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: data.val_fraction=2")


def test_results_go_into_the_runs_wandb_summary(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    run_dir = train_run(tmp_path / "run", [
        "model=transformer", "data=text_file", f"data.path={corpus}", "data.sequence_length=16",
        "logger=wandb"])  # WANDB_MODE=disabled in the tests: a run id, nothing sent
    added = {}
    monkeypatch.setattr("chainrule.tracking.Tracker.update_summary",
                        lambda self, values: added.update(values))
    results = run_evaluation(run_dir, split="val", wandb=True)
    assert added["eval/val/nll"] == results["nll"]
    assert added["eval/val/num_scored"] == results["num_scored"]
    added.clear()
    run_evaluation(run_dir, split="val", wandb=False)
    assert not added
