"""`python prepare.py data=<option> [data.path=...] [out=<dir>]`: prepare a data source once into
token / record shards (chainrule.data.prepare), for corpora larger than memory.

    python prepare.py data=text_file data.path=corpus/ data.tokenizer=bpe      # into the cache
    python prepare.py data=text_file data.path=shard.jsonl.gz out=prepared/web
    python prepare.py data=mnist out=prepared/mnist
    python train.py data=prepared data.path=prepared/web                       # train from it

Without out=, the result goes to the data cache, where `train.py` with the same data options
finds it (so `python train.py data=text_file data.path=...` needs no separate step). A killed
preparation resumes where it stopped; an unchanged source is not prepared twice.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from chainrule.cli.common import fail_cleanly, hydra_main, quiet_libraries
from chainrule.cli.schemas import register_configs
from chainrule.config import resolve


@fail_cleanly
def run(cfg: DictConfig) -> str:
    quiet_libraries()
    config = resolve(cfg)
    from chainrule.data.prepare import prepare_from_config, summary

    start = time.perf_counter()
    root = prepare_from_config(config)
    print(summary(root))
    print(f"ready in {time.perf_counter() - start:.1f} s: train with "
          f"`python train.py data=prepared data.path={root}`")
    return str(root)


def main() -> None:
    register_configs()
    hydra_main(run, "prepare")


if __name__ == "__main__":
    main()
