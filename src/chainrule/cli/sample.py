"""`python sample.py checkpoint=<run dir> [sampler=top_p] [prompt="ROMEO:"]`: draw from a run.

The run directory alone rebuilds the model and its codec (`chainrule.load_run`: the completed
model config and the tokenizer saved with the run; no data is read); parameters come from the
best checkpoint (or `step=`). Samples go to stdout and to <run dir>/samples/
(sample_step_<step>_<n>.txt / .png + .npy / _<i>.wav, never over the training previews):
text, an upscaled PNG grid with the native uint8 [N, H, W, C] samples beside it, or WAV
files, as the run's codec decides. The inputs a run takes follow its kind of samples: text
prompts, a WAV prefix
(prompt_audio=), an image and mask to inpaint (image= mask=); class_label= for any
class-conditional model. Every input is checked before anything is generated.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig

from chainrule.cli.common import (
    fail_cleanly,
    hydra_main,
    quiet_libraries,
    use_compilation_cache,
)
from chainrule.cli.schemas import register_configs
from chainrule.config import to_object
from chainrule.rundir import RunDir
from chainrule.sampling.config import SampleConfig
from chainrule.training.restore import load_run

# The keys that give each kind of run what its samples continue or fill in.
INPUT_KEYS = {"text": "prompt= / prompt_file=", "audio": "prompt_audio=",
              "image": "image= with mask="}


def input_file(value: str | None, key: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{key}={value!r} is not a readable file")
    return path


def read_prompts(sc: SampleConfig) -> list[str] | None:
    path = input_file(sc.prompt_file, "prompt_file")
    if path is not None:
        lines = [line.replace("\\n", "\n") for line in path.read_text().splitlines()]
        prompts = [line for line in lines if line]
        if not prompts:
            raise ValueError(f"prompt_file={sc.prompt_file!r} holds no prompt (one per line)")
        return prompts
    return None if sc.prompt is None else [sc.prompt.replace("\\n", "\n")]


def check_input_files(sc: SampleConfig) -> None:
    """Missing files fail here, before the run is loaded."""
    from chainrule.data.images import mask_file

    input_file(sc.prompt_audio, "prompt_audio")
    input_file(sc.image, "image")
    if sc.mask is not None:
        mask_file(sc.mask)


def conditioning(sc: SampleConfig, texts: list[str] | None, model, codec) -> dict[str, Any]:
    """draw()'s prompts / inpaint from the inputs given, each for the kind of samples the
    run's codec makes (text, audio or image)."""
    kind = codec.kind
    given = {"text": texts is not None, "audio": sc.prompt_audio is not None,
             "image": sc.image is not None}
    for wanted, present in given.items():
        if present and wanted != kind:
            raise ValueError(f"{INPUT_KEYS[wanted]}: for {wanted} models, but this run's "
                             f"{type(model).__name__} makes {kind} samples (its input: "
                             f"{INPUT_KEYS[kind]})")
    if not any(given.values()):
        return {}
    if texts is not None:
        return {"prompts": [np.asarray(codec.encode(t), np.int32) for t in texts]}
    if sc.prompt_audio is not None:
        return {"prompts": [np.asarray(codec.encode(str(Path(sc.prompt_audio).expanduser())))]}
    from chainrule.data.images import inpainting_mask

    height, width, _ = codec.shape
    image = codec.encode(str(Path(sc.image).expanduser()))
    return {"inpaint": (image, inpainting_mask(sc.mask, height, width))}


def free_stem(samples_dir: Path, step: int) -> str:
    """sample_step_<step>_<n> with the first n no earlier sample.py output in the folder uses
    (any of its files: .txt, .png, .npy, _<i>.wav)."""
    stems = (f"sample_step_{step:06d}_{n}" for n in itertools.count())
    return next(stem for stem in stems if not any(samples_dir.glob(f"{stem}.*"))
                and not any(samples_dir.glob(f"{stem}_*")))


@fail_cleanly
def run(cfg: DictConfig) -> None:
    quiet_libraries()
    sc: SampleConfig = to_object(cfg)
    use_compilation_cache(sc.compilation_cache_dir)
    from chainrule.sampling.draw import draw
    from chainrule.tracking import LoggerConfig, Tracker

    run_dir = RunDir.existing(sc.checkpoint)
    texts = read_prompts(sc)
    check_input_files(sc)
    model, codec, step, _ = load_run(run_dir.path, sc.step)
    inputs = conditioning(sc, texts, model, codec)
    draft = None
    if sc.sampler.name == "speculative":
        draft = load_run(RunDir.existing(sc.sampler.draft_checkpoint,
                                         "sampler.draft_checkpoint").path).model
    samples, notes = draw(model, sc.sampler, key=jax.random.key(sc.seed), draft=draft,
                          class_label=sc.class_label, **inputs)
    decoded = [codec.decode(s) for s in samples]
    out_dir = Path(sc.output) if sc.output else run_dir.path
    tracker = Tracker(out_dir, {}, LoggerConfig(backend="none"))
    paths = tracker.log_samples(codec.kind, decoded, step, captions=notes, **codec.media,
                                stem=free_stem(tracker.samples_dir, step))
    tracker.finish()
    print(f"{len(decoded)} samples from step {step}; written: "
          + ", ".join(str(p) for p in paths))


def main() -> None:
    register_configs()
    hydra_main(run, "sample")


if __name__ == "__main__":
    main()


