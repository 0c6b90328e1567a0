"""Hugging Face GPT-2 checkpoints in and out of chainrule's Transformer.

    model = from_pretrained("~/models/gpt2")        # a local HF directory, never a download
    tokenizer = pretrained_tokenizer("~/models/gpt2")
    save_pretrained(model, "exported/", tokenizer_json=...)  # GPT2LMHeadModel.from_pretrained reads it

An HF directory holds `config.json` (model_type "gpt2"), `model.safetensors` (or shards with
`model.safetensors.index.json`) and `tokenizer.json`. The GPT2LMHeadModel layout is chainrule's
Transformer with learned positions, pre-LN with biases, tied embeddings and the fused `c_attn`
projection: Conv1D weights are [in, out] like `nnx.Linear` kernels, and the query/key/value
split of `c_attn` is chainrule's, so weights map one to one (no permutation). Weights are read
with `safetensors` as numpy arrays (never a pickle, never `pytorch_model.bin`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from chainrule.data.tokenizers import BPETokenizer
from chainrule.models.transformer import (
    TransformerAutoregressiveModel,
    TransformerConfig,
    TransformerNetworkConfig,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
MODEL_TYPES = ("gpt2",)
# HF's activation names -> chainrule's (GPT-2's "gelu_new" is the tanh approximation).
HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu",
                  "gelu": "gelu_exact", "relu": "relu", "silu": "silu", "swish": "silu"}
TO_HF_ACTIVATION = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu",
                    "swish": "silu"}
# GPT2Config options chainrule's Transformer cannot follow: (key, the value it must have).
REQUIRED = (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False))
# Buffers old GPT-2 files carry beside the weights (the causal mask): not parameters.
BUFFERS = (".attn.bias", ".attn.masked_bias")


def is_pretrained_dir(path: str | Path) -> bool:
    """Whether `path` looks like an HF model directory (a config.json, no chainrule run.json)."""
    path = Path(path).expanduser()
    return (path / CONFIG_FILE).is_file() and not (path / "run.json").is_file()


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json of an HF directory, checked to be a GPT-2 chainrule can load."""
    path = Path(path).expanduser()
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{path} has no {CONFIG_FILE}: expected a Hugging Face model "
                         f"directory ({CONFIG_FILE} + {WEIGHTS_FILE} + {TOKENIZER_FILE})")
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(hf, dict) or hf.get("model_type") not in MODEL_TYPES:
        kind = hf.get("model_type") if isinstance(hf, dict) else None
        raise ValueError(f"{file}: model_type={kind!r} is not supported; expected one of "
                         f"{list(MODEL_TYPES)} (the GPT2LMHeadModel layout)")
    for key, value in REQUIRED:
        if hf.get(key, value) != value:
            raise ValueError(f"{file}: {key}={hf[key]!r} is not supported by chainrule's "
                             f"Transformer; expected {value!r}")
    if hf.get("activation_function", "gelu_new") not in HF_ACTIVATIONS:
        raise ValueError(f"{file}: activation_function={hf['activation_function']!r}; expected "
                         f"one of {sorted(HF_ACTIVATIONS)}")
    return hf


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """chainrule's TransformerConfig for a GPT-2 config.json (GPT2Config's defaults apply)."""
    d = int(hf.get("n_embd", 768))
    hidden = hf.get("n_inner") or 4 * d
    network = TransformerNetworkConfig(
        embed_dim=d, num_heads=int(hf.get("n_head", 12)), mlp_ratio=hidden / d,
        activation=HF_ACTIVATIONS[hf.get("activation_function", "gelu_new")],
        positional_encoding="learned", dropout_rate=float(hf.get("resid_pdrop", 0.1)),
        use_bias=True, layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)))
    if int(d * network.mlp_ratio) != hidden:
        raise ValueError(f"n_inner={hidden} is not a whole multiple of n_embd={d} chainrule "
                         "can express")
    eos = hf.get("eos_token_id", 50256)
    return TransformerConfig(
        vocab_size=int(hf.get("vocab_size", 50257)),
        sequence_length=int(hf.get("n_positions", 1024)), network=network,
        num_layers=int(hf.get("n_layer", 12)), tie_weights=bool(hf.get("tie_word_embeddings",
                                                                         True)),
        bos_token_id=int(hf.get("bos_token_id", eos if eos is not None else 0)),
        eos_token_id=None if eos is None else int(eos))


def _weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    if (path / WEIGHTS_INDEX).is_file():
        index = json.loads((path / WEIGHTS_INDEX).read_text(encoding="utf-8"))
        return [path / name for name in sorted(set(index.get("weight_map", {}).values()))]
    pickled = [p.name for p in path.glob("*.bin")]
    hint = (f" ({', '.join(pickled)} is a pickle, which chainrule never loads: convert it to "
            "safetensors)") if pickled else ""
    raise ValueError(f"{path} has no {WEIGHTS_FILE}: expected the weights as safetensors{hint}")


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory's safetensors file(s), as float32 numpy arrays, with
    the `transformer.` prefix of GPT2LMHeadModel's names removed."""
    from safetensors import safe_open

    tensors = {}
    for file in _weight_files(Path(path).expanduser()):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                tensors[name.removeprefix("transformer.")] = f.get_tensor(name)
    return {k: v.astype(np.float32) for k, v in tensors.items()
            if not k.endswith(BUFFERS)}


def _layout(config: TransformerConfig) -> dict[str, tuple[tuple, tuple[int, ...], bool]]:
    """HF tensor name -> (chainrule parameter path, HF shape, transposed) for a config."""
    d, v, n = config.network.embed_dim, config.vocab_size, config.sequence_length
    hidden = int(d * config.network.mlp_ratio)
    names = {"wte.weight": (("token_embed", "embedding"), (v, d), False),
             "wpe.weight": (("pos_embed", "embedding"), (n, d), False),
             "ln_f.weight": (("ln_f", "scale"), (d,), False),
             "ln_f.bias": (("ln_f", "bias"), (d,), False)}
    if not config.tie_weights:
        names["lm_head.weight"] = (("lm_head", "kernel"), (v, d), True)
    parts = {"ln_1": ("ln1", d, None), "ln_2": ("ln2", d, None), "attn.c_attn": (("attn", "qkv"), d, 3 * d),
             "attn.c_proj": (("attn", "proj"), d, d), "mlp.c_fc": ("fc", d, hidden),
             "mlp.c_proj": ("out", hidden, d)}
    for i in range(config.num_layers):
        for hf_name, (ours, d_in, d_out) in parts.items():
            ours = ("blocks", i) + (ours if isinstance(ours, tuple) else (ours,))
            if d_out is None:  # a layer norm
                names[f"h.{i}.{hf_name}.weight"] = (ours + ("scale",), (d_in,), False)
            else:  # Conv1D: weight [in, out], as nnx.Linear's kernel
                names[f"h.{i}.{hf_name}.weight"] = (ours + ("kernel",), (d_in, d_out), False)
            names[f"h.{i}.{hf_name}.bias"] = (ours + ("bias",), (d_out or d_in,), False)
    return names


def params_from_hf(tensors: dict[str, np.ndarray], config: TransformerConfig,
                   where: str = "model.safetensors") -> dict[tuple, np.ndarray]:
    """chainrule parameter path -> array, every tensor checked against the config's shape."""
    layout = _layout(config)
    missing = [name for name in layout if name not in tensors]
    if missing:
        raise ValueError(f"{where} lacks {missing[0]} ({len(missing)} tensor(s) missing) that "
                         "config.json's architecture needs")
    extra = sorted(set(tensors) - set(layout))
    if extra:
        raise ValueError(f"{where} holds {extra[0]} ({len(extra)} unexpected tensor(s)), which "
                         "a GPT2LMHeadModel of config.json's architecture does not have")
    params = {}
    for name, (path, shape, transposed) in layout.items():
        if tensors[name].shape != shape:
            raise ValueError(f"{where}: {name} has shape {tensors[name].shape} but config.json "
                             f"says {shape}; expected the weights of this config")
        params[path] = tensors[name].T if transposed else tensors[name]
    return params


def from_pretrained(path: str | Path, **overrides: Any) -> TransformerAutoregressiveModel:
    """chainrule's Transformer with the weights of a local HF GPT-2 directory. `overrides`
    replace fields of the imported TransformerConfig (e.g. prefix_length=10, dtype=...)."""
    path = Path(path).expanduser()
    config = dataclasses.replace(config_from_hf(read_hf_config(path)), **overrides)
    params = params_from_hf(read_safetensors(path), config, str(path / WEIGHTS_FILE))
    model = TransformerAutoregressiveModel(config, rngs=nnx.Rngs(params=0))
    load_params(model, params)
    return model


def load_params(model: nnx.Module, params: dict[tuple, np.ndarray]) -> None:
    """Set the parameters at `params`' paths (the rest, adapters or prefixes, stay fresh)."""
    ours = dict(nnx.state(model, nnx.Param).flat_state())
    nnx.update(model, nnx.State.from_flat_path(
        {path: ours[path].replace(np.asarray(value)) for path, value in params.items()}))


def pretrained_tokenizer(path: str | Path, vocab_size: int | None = None) -> BPETokenizer:
    """The directory's tokenizer.json (HF `tokenizers`), checked against the weights'
    vocabulary (`vocab_size`, default config.json's)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path).expanduser()
    file = path / TOKENIZER_FILE
    if not file.is_file():
        raise ValueError(f"{path} has no {TOKENIZER_FILE}: expected the checkpoint's tokenizer "
                         "(HF tokenizers' JSON)")
    try:
        tokenizer = BPETokenizer(HFTokenizer.from_file(str(file)))
    except Exception as err:  # the tokenizers library raises its own exception types
        raise ValueError(f"{file} is not a usable tokenizer: {str(err).splitlines()[0]}") from None
    if vocab_size is None:
        vocab_size = config_from_hf(read_hf_config(path)).vocab_size
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"{file} has a vocabulary of {tokenizer.vocab_size} tokens but the "
                         f"weights have {vocab_size} (config.json vocab_size); expected the "
                         "checkpoint's own tokenizer")
    return tokenizer


# ----------------------------------------------------------------------------- export


def exportable(config: TransformerConfig) -> None:
    """Refuse, in one line, a Transformer GPT-2 cannot express, naming what GPT-2 lacks."""
    net = config.network
    lacks = None
    if net.positional_encoding != "learned":
        lacks = (f"{net.positional_encoding} positions (network.positional_encoding); GPT-2 has "
                 "a learned position table only")
    elif net.activation not in TO_HF_ACTIVATION:
        lacks = f"the activation {net.activation!r}"
    elif config.prefix_length:
        lacks = (f"prefix tuning (prefix_length={config.prefix_length}): GPT-2 has no learned "
                 "key/value prefixes")
    elif config.lora.rank:
        lacks = (f"LoRA adapters (lora.rank={config.lora.rank}): export with merge_lora=true "
                 "to fold them into the weights")
    elif int(net.embed_dim * net.mlp_ratio) != net.embed_dim * net.mlp_ratio:
        lacks = f"an MLP width of embed_dim * mlp_ratio={net.embed_dim * net.mlp_ratio}"
    if lacks:
        raise ValueError(f"cannot export to GPT-2: this model uses {lacks}")


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    """The config.json of GPT2LMHeadModel for a chainrule Transformer (checked exportable)."""
    exportable(config)
    net = config.network
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.sequence_length,
            "n_ctx": config.sequence_length, "n_embd": net.embed_dim,
            "n_layer": config.num_layers, "n_head": net.num_heads,
            "n_inner": int(net.embed_dim * net.mlp_ratio),
            "activation_function": TO_HF_ACTIVATION[net.activation],
            "layer_norm_epsilon": net.layer_norm_epsilon,
            "resid_pdrop": config.effective_dropout, "embd_pdrop": config.effective_dropout,
            "attn_pdrop": 0.0, "scale_attn_weights": True,
            "tie_word_embeddings": config.tie_weights,
            "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
            "torch_dtype": "float32"}


def params_to_hf(model: TransformerAutoregressiveModel) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's tensors (`transformer.` names, as `save_pretrained` writes them).
    A model without biases gets zero biases: the same function."""
    config = model.config
    flat = {path: np.asarray(v[...], np.float32)
            for path, v in nnx.state(model, nnx.Param).flat_state()}
    tensors = {}
    for name, (path, shape, transposed) in _layout(config).items():
        value = flat[path].T if transposed else flat.get(path, np.zeros(shape, np.float32))
        prefix = "" if name == "lm_head.weight" else "transformer."
        tensors[prefix + name] = np.ascontiguousarray(value)
    return tensors


def save_pretrained(model: TransformerAutoregressiveModel, out: str | Path, *,
                    tokenizer_json: str | None = None) -> Path:
    """Write config.json, model.safetensors and (given its JSON) tokenizer.json into `out`
    so that `transformers.GPT2LMHeadModel.from_pretrained(out)` loads the model."""
    from safetensors.numpy import save_file

    hf_config = config_to_hf(model.config)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_file(params_to_hf(model), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    if tokenizer_json is not None:
        (out / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- fine-tuning

# What an imported checkpoint decides of a Transformer config; the rest (prefix_length, lora,
# dropout, dtype, remat, use_cache, pad_token_id) stays the run's own `model.` config.
ARCHITECTURE = ("vocab_size", "sequence_length", "num_layers", "tie_weights", "bos_token_id",
                "eos_token_id")
NETWORK_ARCHITECTURE = ("hidden_dims", "activation", "embed_dim", "num_heads", "mlp_ratio",
                        "positional_encoding", "use_bias", "rope_base", "layer_norm_epsilon")


def with_architecture(config: TransformerConfig, path: str | Path) -> TransformerConfig:
    """`config` with the architecture of the HF checkpoint at `path` (init_from=<HF dir>)."""
    if not isinstance(config, TransformerConfig):
        raise ValueError(f"init_from={str(path)!r} is a GPT-2 checkpoint: expected "
                         f"model=transformer, got a {type(config).__name__}")
    arch = config_from_hf(read_hf_config(path))
    network = dataclasses.replace(config.network, **{
        name: getattr(arch.network, name) for name in NETWORK_ARCHITECTURE})
    return dataclasses.replace(config, network=network, **{
        name: getattr(arch, name) for name in ARCHITECTURE})
