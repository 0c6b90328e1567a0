"""`python export.py checkpoint=<run dir> format=hf out=<dir> [merge_lora=true] [step=N]`:
a trained run as a Hugging Face GPT-2 directory (`chainrule.training.export`)."""

from __future__ import annotations

from omegaconf import DictConfig

from chainrule.cli.common import fail_cleanly, hydra_main, quiet_libraries
from chainrule.cli.schemas import register_configs
from chainrule.config import to_object


@fail_cleanly
def run(cfg: DictConfig) -> None:
    quiet_libraries()
    config = to_object(cfg)
    from chainrule.training.export import export_run

    files = export_run(config.checkpoint, config.out, format=config.format,
                       merge_lora_adapters=config.merge_lora, step=config.step)
    if not any(f.name == "tokenizer.json" for f in files):
        print("note: the run's tokenizer is not an HF tokenizers one (char/byte): no "
              "tokenizer.json written")
    print("written: " + ", ".join(str(f) for f in files))


def main() -> None:
    register_configs()
    hydra_main(run, "export")


if __name__ == "__main__":
    main()
