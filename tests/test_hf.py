"""Hugging Face GPT-2 import and export, checked against `transformers` itself: a tiny random
GPT2LMHeadModel (2 layers, 64 wide, vocabulary 100) saved with `save_pretrained`."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from chainrule.models import TransformerConfig, TransformerNetworkConfig  # noqa: E402
from chainrule.models.hf import (  # noqa: E402
    from_pretrained,
    pretrained_tokenizer,
    read_safetensors,
    save_pretrained,
)
from chainrule.models.transformer import TransformerAutoregressiveModel  # noqa: E402

VOCAB = 100
REPO = Path(__file__).resolve().parents[1]
TEXT = ("the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs! "
        "how vexingly quick daft zebras jump. sphinx of black quartz, judge my vow.\n") * 20


def tiny_tokenizer():
    """A 100-token BPE (not byte-level: that needs 257 symbols) with GPT-2's eos token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False))
    assert tok.get_vocab_size() == VOCAB
    return tok


def save_tiny_gpt2(path, *, seed=0, **config):
    """A random GPT2LMHeadModel saved as transformers saves it, with a tokenizer.json; its
    weights are wider than GPT-2's init (std 0.3) so greedy continuations do not repeat one
    token."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2,
                                  n_head=4, bos_token_id=0, eos_token_id=0,
                                  initializer_range=0.3, **config)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    tiny_tokenizer().save(str(path / "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    return path, save_tiny_gpt2(path)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def test_imported_logits_equal_transformers(tiny_hf):
    path, reference = tiny_hf
    model = from_pretrained(path)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, 40))
    np.testing.assert_allclose(np.asarray(model(tokens)["logits"]), hf_logits(reference, tokens),
                               atol=1e-4, rtol=0)
    config = model.config
    assert (config.vocab_size, config.sequence_length, config.num_layers) == (VOCAB, 64, 2)
    assert config.network.positional_encoding == "learned" and config.tie_weights
    assert config.network.layer_norm_epsilon == reference.config.layer_norm_epsilon


def test_greedy_continuation_equals_generate(tiny_hf):
    """chainrule's cached decoder (prefill + one token per step) against transformers'
    generate(do_sample=False) with its KV cache, token for token."""
    path, reference = tiny_hf
    model = from_pretrained(path)
    for prompt in ([5, 17, 33], [42, 7, 7, 19, 88, 3, 61]):
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), do_sample=False,
                                        max_new_tokens=24, pad_token_id=0).numpy()[0]
        ours = np.asarray(model.generate(1, prompt=np.array(prompt), max_new_tokens=24,
                                         temperature=0.0))[0]
        # Both stop at the eos token (0); chainrule pads the rest of its row.
        np.testing.assert_array_equal(ours[:len(theirs)], theirs)
        assert len(set(theirs[len(prompt):].tolist())) > 3  # not a trivial repetition


def test_tokenizer_imported(tiny_hf):
    path, _ = tiny_hf
    tokenizer = pretrained_tokenizer(path)
    assert tokenizer.vocab_size == VOCAB and tokenizer.eos_id == 0
    assert tokenizer.decode(tokenizer.encode("the lazy dog")) == "the lazy dog"


def gpt2_shaped(seed=0, **fields):
    net = TransformerNetworkConfig(embed_dim=64, num_heads=4, positional_encoding="learned",
                                   dropout_rate=0.0, **fields)
    config = TransformerConfig(vocab_size=VOCAB, sequence_length=32, num_layers=2, network=net,
                               eos_token_id=0)
    return TransformerAutoregressiveModel(config, rngs=nnx.Rngs(params=seed))


@pytest.mark.parametrize("use_bias", [True, False])
def test_export_loads_in_transformers(tmp_path, use_bias):
    """export -> GPT2LMHeadModel.from_pretrained: the same logits; import(export(model)) gives
    the parameters back bitwise (a model without biases exports zero biases)."""
    model = gpt2_shaped(use_bias=use_bias)
    save_pretrained(model, tmp_path, tokenizer_json=tiny_tokenizer().to_str())
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 32))
    np.testing.assert_allclose(hf_logits(reference, tokens), np.asarray(model(tokens)["logits"]),
                               atol=1e-4, rtol=0)
    back = from_pretrained(tmp_path)
    ours = dict(nnx.state(model, nnx.Param).flat_state())
    for path, variable in nnx.state(back, nnx.Param).flat_state():
        expected = ours[path][...] if path in ours else np.zeros(variable.shape)  # biases
        np.testing.assert_array_equal(np.asarray(variable[...]), np.asarray(expected))
    assert pretrained_tokenizer(tmp_path).vocab_size == VOCAB


def test_export_refuses_what_gpt2_lacks(tmp_path):
    net = TransformerNetworkConfig(embed_dim=32, num_heads=2, positional_encoding="rope")
    rope = TransformerAutoregressiveModel(
        TransformerConfig(vocab_size=VOCAB, sequence_length=16, num_layers=1, network=net),
        rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="rope positions"):
        save_pretrained(rope, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_transformers_reference_reads_our_names(tiny_hf):
    """read_safetensors removes GPT2LMHeadModel's `transformer.` prefix and drops buffers."""
    path, _ = tiny_hf
    names = set(read_safetensors(path))
    assert "wte.weight" in names and "h.1.mlp.c_proj.weight" in names
    assert not any(n.startswith("transformer.") for n in names)
    assert json.loads((path / "config.json").read_text())["model_type"] == "gpt2"


# ----------------------------------------------------------------- adapting an imported base


def adapt_config(hf_dir, corpus, trainable, **model):
    from chainrule.data.text import TextDataConfig
    from chainrule.tracking import LoggerConfig
    from chainrule.training.config import TrainConfig, TrainerConfig
    from chainrule.training.optim import OptimizerConfig

    return TrainConfig(
        model=TransformerConfig(**model), init_from=str(hf_dir),
        data=TextDataConfig(source="text_file", path=str(corpus), tokenizer="bpe",
                            sequence_length=16, batch_size=4, val_batches=1),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0, trainable=trainable),
        logger=LoggerConfig(backend="none"),
        trainer=TrainerConfig(steps=6, log_every=3, eval_every=6, checkpoint_every=6,
                              progress=False))


@pytest.mark.parametrize("trainable, model", [("prefix", {"prefix_length": 4}),
                                              ("lora", {"lora": {"rank": 4}})])
def test_adapting_an_imported_base_leaves_it_bitwise(tiny_hf, tmp_path, trainable, model):
    """train.py init_from=<HF dir> optimizer.trainable=prefix|lora: the run takes the
    checkpoint's architecture and tokenizer, trains only the prefix / adapters, and its saved
    base parameters are the imported ones, bitwise."""
    from chainrule.models.lora import LoRAConfig
    from chainrule.training.restore import load_run
    from chainrule.training.train import train

    path, _ = tiny_hf
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 4)
    if "lora" in model:
        model = {"lora": LoRAConfig(**model["lora"])}
    train(adapt_config(path, corpus, trainable, **model), tmp_path / "run")
    adapted, codec, step, _ = load_run(tmp_path / "run")
    assert step == 6 and codec.tokenizer.vocab_size == VOCAB
    assert adapted.config.network.embed_dim == 64 and adapted.config.sequence_length == 64
    base = dict(nnx.state(from_pretrained(path), nnx.Param).flat_state())
    trained = dict(nnx.state(adapted, nnx.Param).flat_state())
    new = set(trained) - set(base)
    assert new and all(p[-1] in ("prefix_k", "prefix_v", "lora_a", "lora_b") for p in new)
    for p, variable in base.items():
        np.testing.assert_array_equal(np.asarray(trained[p][...]), np.asarray(variable[...]))
    fresh = from_pretrained(path, **({"prefix_length": 4} if trainable == "prefix" else
                                     {"lora": LoRAConfig(rank=4)}))
    fresh_new = dict(nnx.state(fresh, nnx.Param).flat_state())
    assert any(not np.array_equal(np.asarray(trained[p][...]), np.asarray(fresh_new[p][...]))
               for p in new)  # the prefix / adapters did train


# ----------------------------------------------------------------------------- bad input


def broken_copy(src, dst, change):
    """A copy of the tiny HF directory with one thing wrong."""
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    if change == "no_config":
        (dst / "config.json").unlink()
    elif change == "no_safetensors":
        (dst / "model.safetensors").rename(dst / "pytorch_model.bin")
    elif change == "model_type":
        config["model_type"] = "llama"
    elif change == "shape":
        config["n_positions"] = 128
    elif change == "layers":
        config["n_layer"] = 3
    elif change == "tokenizer":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
        tok.add_tokens(["<extra>"])
        tok.save(str(dst / "tokenizer.json"))
    if (dst / "config.json").exists():
        (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("change, message", [
    ("no_config", r"no chainrule checkpoint in .*or a Hugging Face model directory"),
    ("no_safetensors", r"has no model.safetensors: .*pytorch_model.bin is a pickle"),
    ("model_type", r"model_type='llama' is not supported; expected one of \['gpt2'\]"),
    ("shape", r"wpe.weight has shape \(64, 64\) but config.json says \(128, 64\)"),
    ("layers", r"lacks h.2.ln_1.weight"),
    ("tokenizer", r"vocabulary of 101 tokens but the weights have 100"),
])
def test_bad_pretrained_dir_is_one_line(tiny_hf, tmp_path, change, message):
    """load_run (what sample.py checkpoint=, export.py and init_from= call) on a broken HF
    directory: one ValueError line naming the file and what was expected."""
    from chainrule.training.restore import load_run

    path, _ = tiny_hf
    broken = broken_copy(path, tmp_path / change, change)
    with pytest.raises(ValueError, match=message) as err:
        load_run(broken)
    assert "\n" not in str(err.value)


def test_init_from_hf_needs_its_tokenizer_kind(tiny_hf, tmp_path):
    from chainrule.training.run import check_pretrained

    path, _ = tiny_hf
    cfg = adapt_config(path, tmp_path / "corpus.txt", "prefix", prefix_length=4)
    with pytest.raises(ValueError, match="expected data.tokenizer=bpe, got 'char'"):
        check_pretrained(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                           tokenizer="char")))
    with pytest.raises(ValueError, match="data.sequence_length=100 is longer than the context"):
        check_pretrained(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                           sequence_length=100)))


@pytest.mark.slow  # three commands in subprocesses and a training run: ~40 s
def test_export_cli_merges_lora_and_sample_cli_reads_hf(tiny_hf, tmp_path):
    """The commands: a LoRA run refuses to export unmerged (exit 2, one line), exports with
    merge_lora=true to a directory transformers loads with the merged logits; sample.py
    reads an HF directory."""
    import os
    import subprocess
    import sys

    from chainrule.models.lora import LoRAConfig, merge_lora
    from chainrule.training.restore import load_run
    from chainrule.training.train import train

    path, _ = tiny_hf
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 4)
    train(adapt_config(path, corpus, "lora", lora=LoRAConfig(rank=4)), tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}

    def cli(script, *args):
        return subprocess.run([sys.executable, str(REPO / script), *args], env=env,
                              capture_output=True, text=True, timeout=300)

    refused = cli("export.py", f"checkpoint={tmp_path / 'run'}", f"out={tmp_path / 'hf'}")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: cannot export to GPT-2: this model uses LoRA adapters (lora.rank=4): export "
        "with merge_lora=true to fold them into the weights"]
    done = cli("export.py", f"checkpoint={tmp_path / 'run'}", f"out={tmp_path / 'hf'}",
               "merge_lora=true")
    assert done.returncode == 0, done.stderr
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokens = np.random.default_rng(2).integers(0, VOCAB, (2, 24))
    merged = merge_lora(load_run(tmp_path / "run").model)
    np.testing.assert_allclose(hf_logits(reference, tokens), np.asarray(merged(tokens)["logits"]),
                               atol=1e-4, rtol=0)
    sampled = cli("sample.py", f"checkpoint={tmp_path / 'hf'}", "prompt=the quick",
                  "sampler=greedy", "sampler.max_new_tokens=8", "sampler.num_samples=1",
                  f"output={tmp_path / 'samples'}")
    assert sampled.returncode == 0, sampled.stderr
    assert "the quick" in sampled.stdout


def test_evaluate_refuses_an_hf_directory_in_one_line(tiny_hf):
    from chainrule.evaluation import EvaluateConfig, evaluate

    with pytest.raises(ValueError, match="is a Hugging Face model directory: it holds no data "
                                         "config to score"):
        evaluate(EvaluateConfig(checkpoint=str(tiny_hf[0]), progress=False, wandb=False))
