"""`python sample.py checkpoint=<run dir> [sampler=top_p] [prompt="ROMEO:"]`: draw from a run.

The run's own saved config rebuilds the model and its data pipeline (the tokenizer saved
with the run, never refitted); parameters come from the best checkpoint (or `step=`).
Samples go to stdout and to <run dir>/samples/.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import jax
import numpy as np
from omegaconf import DictConfig

from chainrule.cli import CONF_DIR
from chainrule.cli.common import fail_cleanly, quiet_libraries
from chainrule.config import SampleConfig, register_configs, to_object
from chainrule.training.restore import load_run


def read_prompts(sc: SampleConfig) -> list[str] | None:
    if sc.prompt is not None and sc.prompt_file is not None:
        raise ValueError("give prompt= or prompt_file=, not both")
    if sc.prompt_file is not None:
        path = Path(sc.prompt_file).expanduser()
        if not path.is_file():
            raise ValueError(f"prompt_file={sc.prompt_file!r} is not a readable file")
        lines = [line.replace("\\n", "\n") for line in path.read_text().splitlines()]
        prompts = [line for line in lines if line]
        if not prompts:
            raise ValueError(f"prompt_file={sc.prompt_file!r} holds no prompt (one per line)")
        return prompts
    return None if sc.prompt is None else [sc.prompt.replace("\\n", "\n")]


@fail_cleanly
def run(cfg: DictConfig) -> None:
    quiet_libraries()
    sc: SampleConfig = to_object(cfg)
    from chainrule.sampling.draw import draw
    from chainrule.tracking import LoggerConfig, Tracker

    run_dir = Path(sc.checkpoint).expanduser()
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    if not run_dir.is_dir():
        raise ValueError(f"checkpoint={sc.checkpoint!r} is not a directory: expected a run "
                         f"directory written by train.py")
    texts = read_prompts(sc)
    model, data, step, _ = load_run(run_dir, sc.step)
    prompts = None
    if texts is not None:
        if data.encode is None:
            raise ValueError("prompts are for token models; this run's data has no tokenizer")
        prompts = [np.asarray(data.encode(t), np.int32) for t in texts]
    draft = None
    if sc.sampler.name == "speculative":
        draft, _, _, _ = load_run(Path(sc.sampler.draft_checkpoint).expanduser())
    samples, notes = draw(model, sc.sampler, key=jax.random.key(sc.seed), prompts=prompts,
                          draft=draft)
    decoded = [data.decode(s) if data.decode else s for s in samples]
    out_dir = Path(sc.output) if sc.output else run_dir
    tracker = Tracker(out_dir, {}, LoggerConfig(backend="none"))
    paths = tracker.log_samples(data.sample_kind, decoded, step, captions=notes,
                                sample_rate=data.info.get("sample_rate"))
    tracker.finish()
    print(f"{len(decoded)} samples from step {step}; written: "
          + ", ".join(str(p) for p in paths))


def main() -> None:
    register_configs()
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")(run)()


if __name__ == "__main__":
    main()


