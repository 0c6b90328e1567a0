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
from flax import nnx
from omegaconf import DictConfig

from chainrule.cli import CONF_DIR
from chainrule.cli.common import fail_cleanly, quiet_libraries
from chainrule.config import SampleConfig, register_configs, to_object
from chainrule.training.restore import load_run


@fail_cleanly
def run(cfg: DictConfig) -> None:
    quiet_libraries()
    sc: SampleConfig = to_object(cfg)
    from chainrule.tracking import LoggerConfig, Tracker

    run_dir = Path(sc.checkpoint).expanduser()
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    if not run_dir.is_dir():
        raise ValueError(f"checkpoint={sc.checkpoint!r} is not a directory: expected a run "
                         f"directory written by train.py")
    model, data, step, _ = load_run(run_dir, sc.step)
    kwargs = sc.sampler.kwargs()
    if sc.sampler.max_length is not None:
        kwargs["max_length"] = sc.sampler.max_length
    if sc.prompt is not None:
        if data.encode is None:
            raise ValueError("prompt= is for token models; this run's data has no tokenizer")
        kwargs["prompt"] = np.asarray(data.encode(sc.prompt), np.int32)
    key = jax.random.key(sc.seed)
    samples = np.asarray(model.generate(n_samples=sc.sampler.num_samples,
                                        rngs=nnx.Rngs(sample=key), **kwargs))
    decoded = [data.decode(s) if data.decode else s for s in samples]
    out_dir = Path(sc.output) if sc.output else run_dir
    tracker = Tracker(out_dir, {}, LoggerConfig(backend="none"))
    paths = tracker.log_samples(data.sample_kind, decoded, step,
                                sample_rate=data.info.get("sample_rate"))
    tracker.finish()
    if data.sample_kind != "text":
        print(f"{len(decoded)} samples from step {step}")
    print("written: " + ", ".join(str(p) for p in paths))


def main() -> None:
    register_configs()
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")(run)()


if __name__ == "__main__":
    main()


