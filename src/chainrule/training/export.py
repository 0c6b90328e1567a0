"""A trained run (or an imported checkpoint) written out in another framework's format.

    python export.py checkpoint=<run dir> format=hf out=<dir> [merge_lora=true] [step=N]
    export_run("outputs/...", "exported/", merge_lora=True)   # the same from Python

`format=hf`: config.json, model.safetensors and tokenizer.json that `transformers`'
`GPT2LMHeadModel.from_pretrained` and `AutoTokenizer` load (`chainrule.models.hf`). Only runs
whose architecture GPT-2 can express export (learned positions, a GELU/ReLU/SiLU MLP, no
prefix, adapters merged); any other fails with one line naming what GPT-2 lacks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from omegaconf import MISSING

from chainrule.config import check
from chainrule.data.text import TextCodec
from chainrule.models import TransformerAutoregressiveModel, hf
from chainrule.models.lora import merge_lora
from chainrule.training.restore import load_run

FORMATS = ("hf",)


@dataclasses.dataclass
class ExportConfig:
    """export.py: a run directory (or an HF directory) written out as `format`."""

    checkpoint: str = MISSING  # a run directory
    out: str = MISSING  # the directory to write (created; files in it are replaced)
    format: str = "hf"
    merge_lora: bool = False  # fold LoRA adapters into the weights (needed to export them)
    step: int | None = None  # None: the best checkpoint if there is one, else the latest

    def __post_init__(self) -> None:
        check(self.format in FORMATS, f"format={self.format!r}; expected one of {list(FORMATS)}")


def tokenizer_json(codec) -> str | None:
    """The HF `tokenizers` JSON of a text run's tokenizer (bpe runs and imported ones);
    None when the tokenizer is not an HF one (char, byte)."""
    if not isinstance(codec, TextCodec) or codec.tokenizer.kind != "bpe":
        return None
    return json.dumps(codec.tokenizer.to_json()["tokenizer"], ensure_ascii=False)


def export_run(checkpoint: str | Path, out: str | Path, *, format: str = "hf",
               merge_lora_adapters: bool = False, step: int | None = None) -> list[Path]:
    """Write the run's model (and tokenizer) into `out`; returns the files written."""
    check(format in FORMATS, f"format={format!r}; expected one of {list(FORMATS)}")
    model, codec, _, _ = load_run(checkpoint, step)
    if not isinstance(model, TransformerAutoregressiveModel):
        raise ValueError(f"cannot export to GPT-2: {checkpoint} holds a "
                         f"{type(model).__name__}, not a Transformer")
    if merge_lora_adapters:
        model = merge_lora(model)
    hf.exportable(model.config)  # before anything is written
    text = tokenizer_json(codec)
    out = hf.save_pretrained(model, out, tokenizer_json=text)
    names = [hf.CONFIG_FILE, hf.WEIGHTS_FILE] + ([hf.TOKENIZER_FILE] if text else [])
    return [out / name for name in names]
