"""`python evaluate.py checkpoint=<run dir> [split=test|val|train|all] [step=N] [stride=N]`:
score every element of a split of a trained run, exactly once, in paper units.

    python evaluate.py checkpoint=outputs/... split=test
    python evaluate.py checkpoint=outputs/... data.path=other.npz          # the run's data, moved
    python evaluate.py checkpoint=outputs/... split=all data=text_file data.path=held_out.txt

The run directory gives the model, its codec (tokenizer) and its data config; `data.<key>=`
changes keys of that config, `data=<option>` scores another source with the run's tokenizer.
Results: printed, written to <run dir>/eval_<split>_step<N>.json and, when the run logged to
W&B, added to its summary (eval/<split>/...). Any `hardware=` mesh works; each process of a
multi-process run scores its own rows of every batch.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from chainrule.cli.common import fail_cleanly, hydra_main, quiet_libraries, use_compilation_cache
from chainrule.cli.schemas import register_configs
from chainrule.config import resolve

# The headline numbers, by kind of data, in the order printed.
HEADLINE = ("nll", "perplexity", "bits_per_token", "bits_per_char", "bits_per_byte",
            "bits_per_dim", "nats_per_image", "bits_per_sample")


@fail_cleanly
def run(cfg: DictConfig) -> dict:
    quiet_libraries()
    config = resolve(cfg)
    use_compilation_cache(config.compilation_cache_dir)
    from chainrule.evaluation import evaluate

    results = evaluate(config)
    shown = ", ".join(f"{k} {results[k]:.4f}" for k in HEADLINE if k in results)
    print(f"{results['split']} split, step {results['step']}: {shown} "
          f"({results['num_scored']:,} targets scored)")
    print(f"written: {results['path']}")
    return results


def data_overrides_as_additions(argv: list[str]) -> list[str]:
    """`data.path=x` changes the run's own data config, which the composed config does not
    hold (`data` is empty unless `data=<option>` picks a source): Hydra adds such keys only
    when written `+data.path=x`, so they are passed on that way."""
    picks_source = any(a.startswith("data=") for a in argv)
    return [("+" + a) if a.startswith("data.") and not picks_source else a for a in argv]


def main() -> None:
    register_configs()
    sys.argv[1:] = data_overrides_as_additions(sys.argv[1:])
    hydra_main(run, "evaluate")


if __name__ == "__main__":
    main()
