"""Run configuration: dataclasses that are both the Python API and Hydra's structured configs.

Every config group (model, data, optimizer, sampler, hardware, logger) is a dataclass with
defaults; `register_configs()` stores each as `<group>/<name>_schema` in Hydra's ConfigStore and
the YAML files in conf/ extend those schemas. So a misspelled key or a wrong type fails at
composition, before anything is built, and `resolve(cfg)` turns the composed DictConfig back
into the dataclasses (running each `__post_init__` check) — the same objects a Python user
builds by hand.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

OPTIMIZERS = ("adamw", "adam", "sgd", "lion")
SCHEDULES = ("constant", "cosine", "transformer", "linear")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass
class OptimizerConfig:
    """optax optimizer, learning-rate schedule and gradient clipping.

    Schedules: `constant`; `cosine` (linear warmup, cosine decay to `min_learning_rate` at
    `decay_steps`, default the run's length); `linear` (warmup, linear decay); `transformer`
    (Vaswani et al.: learning_rate * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)).
    Weight decay applies to matrices only, never to norms or biases.
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_steps: int | None = None
    min_learning_rate: float = 1e-4
    d_model: int = 512  # only for the `transformer` schedule
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9  # sgd
    grad_clip_norm: float | None = 1.0
    trainable: str = "all"  # "all" | "prefix" (prefix tuning: everything else frozen)

    def __post_init__(self) -> None:
        _check(self.trainable in ("all", "prefix"),
               f"optimizer.trainable={self.trainable!r}; expected 'all' or 'prefix'")
        _check(self.name in OPTIMIZERS, f"optimizer.name={self.name!r}; expected one of {OPTIMIZERS}")
        _check(self.schedule in SCHEDULES,
               f"optimizer.schedule={self.schedule!r}; expected one of {SCHEDULES}")
        _check(self.learning_rate > 0, f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
        _check(self.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.grad_clip_norm is None or self.grad_clip_norm > 0,
               f"optimizer.grad_clip_norm must be > 0 or null, got {self.grad_clip_norm}")
        _check(self.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")


SAMPLERS = ("greedy", "temperature", "top_k", "top_p", "beam", "speculative")


@dataclasses.dataclass
class SamplerConfig:
    """How samples are drawn (train-time previews and sample.py). temperature 0 = greedy.

    `name` picks the strategy: greedy / temperature / top_k / top_p all sample token by token
    (the knobs combine); `beam` runs beam search (token models); `speculative` drafts with
    the model of `draft_checkpoint` and verifies with the trained one (token models).
    """

    name: str = "top_p"
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = 0.9
    repetition_penalty: float = 1.0
    num_samples: int = 4  # per prompt
    max_length: int | None = None  # in all, prompt included; None = the model's context
    max_new_tokens: int | None = None  # instead of max_length: this many after the prompt
    min_new_tokens: int = 0
    stop_tokens: tuple[int, ...] = ()
    beam_size: int = 4
    length_penalty: float = 0.0
    draft_checkpoint: str | None = None
    num_draft_tokens: int = 4

    def __post_init__(self) -> None:
        _check(self.name in SAMPLERS, f"sampler.name={self.name!r}; expected one of {SAMPLERS}")
        _check(self.temperature >= 0, f"sampler.temperature must be >= 0, got {self.temperature}")
        _check(self.top_k is None or self.top_k >= 0, f"sampler.top_k must be >= 0, got {self.top_k}")
        _check(self.top_p is None or 0 < self.top_p <= 1,
               f"sampler.top_p must be in (0, 1], got {self.top_p}")
        _check(self.repetition_penalty > 0,
               f"sampler.repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check(self.num_samples > 0, f"sampler.num_samples must be > 0, got {self.num_samples}")
        _check(self.beam_size > 0, f"sampler.beam_size must be > 0, got {self.beam_size}")
        _check(self.num_draft_tokens > 0,
               f"sampler.num_draft_tokens must be > 0, got {self.num_draft_tokens}")
        _check(self.name != "speculative" or self.draft_checkpoint is not None,
               "sampler=speculative needs sampler.draft_checkpoint=<run dir of the draft model>")

    def kwargs(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


MESH_AXES = ("data", "fsdp", "tensor")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

# MaxText-style logical axis rules: the models name their parameter dimensions ("embed",
# "mlp", ...) and these map the names to mesh axes. Data parallel shards the batch over `data`;
# FSDP shards parameters (and optimizer state) along "embed" over `fsdp` and the batch over it
# too; tensor parallel splits attention heads, MLP width, vocabulary and channels over `tensor`.
DEFAULT_AXIS_RULES = {
    "batch": ["data", "fsdp"],
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
    "channels": "tensor",
}


@dataclasses.dataclass
class MeshConfig:
    """Devices per mesh axis; -1 (at most one axis) takes the devices the others leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        for name, size in sizes.items():
            _check(size == -1 or size >= 1,
                   f"hardware.mesh.{name}={size}; expected a device count >= 1, or -1 (fill)")
        _check(list(sizes.values()).count(-1) <= 1,
               f"hardware.mesh={sizes}: at most one axis may be -1 (fill with the rest)")


@dataclasses.dataclass
class DistributedConfig:
    """Multi-process start-up (`jax.distributed.initialize`). `enabled: auto` starts it when
    the environment describes a multi-process job (SLURM with more than one task, or
    JAX_COORDINATOR_ADDRESS); unset fields are then read from the environment by JAX."""

    enabled: str = "false"  # "true" | "false" | "auto"
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int = 300  # seconds to wait for every process

    def __post_init__(self) -> None:
        self.enabled = str(self.enabled).lower()
        _check(self.enabled in ("true", "false", "auto"),
               f"hardware.distributed.enabled={self.enabled!r}; expected true, false or auto")
        _check(self.num_processes is None or self.num_processes >= 1,
               f"hardware.distributed.num_processes must be >= 1, got {self.num_processes}")
        _check(self.process_id is None or self.process_id >= 0,
               f"hardware.distributed.process_id must be >= 0, got {self.process_id}")
        if self.num_processes is not None and self.process_id is not None:
            _check(self.process_id < self.num_processes,
                   f"hardware.distributed.process_id={self.process_id} must be < "
                   f"num_processes={self.num_processes}")


@dataclasses.dataclass
class HardwareConfig:
    """Where and how a run executes: platform, device mesh, axis rules, precision, start-up.

    `platform` must be what JAX finds (cpu, gpu, tpu). `num_cpu_devices` splits the host CPU
    into that many JAX devices (to try sharding anywhere; it must be set before JAX starts, as
    train.py does); -1 means one device per core, data parallel (`parallel.fit_to_cores`).
    `compute_dtype` is the dtype of activations and matmuls; parameters and optimizer state
    stay float32. `peak_tflops_per_device` overrides the table used for MFU.
    """

    name: str = "cpu"
    platform: str = "cpu"
    mesh: MeshConfig = dataclasses.field(default_factory=lambda: MeshConfig(data=1))
    axis_rules: dict[str, Any] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_AXIS_RULES))
    compute_dtype: str = "float32"
    num_cpu_devices: int | None = None
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    peak_tflops_per_device: float | None = None

    def __post_init__(self) -> None:
        _check(self.platform in ("cpu", "gpu", "tpu"),
               f"hardware.platform={self.platform!r}; expected cpu, gpu or tpu")
        _check(self.compute_dtype in COMPUTE_DTYPES,
               f"hardware.compute_dtype={self.compute_dtype!r}; expected one of {COMPUTE_DTYPES}")
        _check(self.num_cpu_devices is None or self.num_cpu_devices >= 1
               or self.num_cpu_devices == -1,
               f"hardware.num_cpu_devices must be >= 1 or -1 (one per core), got "
               f"{self.num_cpu_devices}")
        _check(self.num_cpu_devices != -1 or (self.mesh.data == -1 and self.mesh.fsdp == 1
                                              and self.mesh.tensor == 1),
               f"hardware.num_cpu_devices=-1 (one device per core) splits the batch over the "
               f"cores: expected mesh {{data: -1, fsdp: 1, tensor: 1}}, got {self.mesh}")
        _check(self.num_cpu_devices is None or self.platform == "cpu",
               f"hardware.num_cpu_devices is for platform cpu, not {self.platform!r}")
        for logical, axes in self.axis_rules.items():
            names = [axes] if isinstance(axes, str) or axes is None else list(axes)
            bad = [a for a in names if a is not None and a not in MESH_AXES]
            _check(not bad, f"hardware.axis_rules.{logical}={axes}: {bad} are not mesh axes; "
                            f"expected names from {MESH_AXES} (or null)")
        _check(self.peak_tflops_per_device is None or self.peak_tflops_per_device > 0,
               f"hardware.peak_tflops_per_device must be > 0, got {self.peak_tflops_per_device}")


@dataclasses.dataclass
class TrainerConfig:
    """The training loop's schedule of work."""

    steps: int = 2000
    log_every: int = 50
    eval_every: int = 250
    sample_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    progress: bool = True
    grad_accum_steps: int = 1  # micro-batches per step: the batch is split, gradients averaged
    # A step with a NaN/Inf loss or gradient is never applied; "stop" ends the run there
    # (naming the step), "skip" drops the step and goes on (chainrule.training.nonfinite).
    on_nonfinite: str = "stop"

    def __post_init__(self) -> None:
        _check(self.on_nonfinite in ("stop", "skip"),
               f"trainer.on_nonfinite={self.on_nonfinite!r}; expected 'stop' or 'skip'")
        for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                     "grad_accum_steps"):
            _check(getattr(self, name) > 0, f"trainer.{name} must be > 0, got {getattr(self, name)}")
        _check(self.sample_every >= 0, f"trainer.sample_every must be >= 0, got {self.sample_every}")


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run needs; conf/train.yaml composes it."""

    model: Any = MISSING
    data: Any = MISSING
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    hardware: HardwareConfig = dataclasses.field(default_factory=HardwareConfig)
    logger: Any = MISSING
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    seed: int = 0
    resume: bool = True  # continue from the run directory's latest checkpoint, if any
    init_from: str | None = None  # start from another run's weights (e.g. to prefix-tune it)
    experiment: str | None = None  # set by experiment presets, recorded with the run
    # Compiled programs kept across runs (a resume or a re-run loads them); null: off.
    compilation_cache_dir: str | None = "~/.cache/chainrule/jax"


@dataclasses.dataclass
class SampleConfig:
    """sample.py: draw from a trained run.

    What the samples continue or fill in is for the kind of samples the run makes: text
    (`prompt` / `prompt_file`), audio (`prompt_audio`, a WAV file) or images (`image` + `mask`,
    inpainting); `class_label` is for any class-conditional model (PixelCNN, WaveNet).
    """

    checkpoint: str = MISSING  # a run directory (or its checkpoints/ folder)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    prompt: str | None = None
    prompt_file: str | None = None  # one prompt per line ("\\n" for a line break inside one)
    prompt_audio: str | None = None  # a WAV file every sample continues (resampled, μ-law coded)
    class_label: int | None = None  # every sample of this class id (class-conditional models)
    image: str | None = None  # inpainting: a PNG/JPEG, resized to the model's H x W and levels
    mask: str | None = None  # with image: top:N / left:N (keep N rows / columns) or an H x W PNG
    step: int | None = None  # None = the best checkpoint if there is one, else the latest
    seed: int = 0
    output: str | None = None  # default: <run dir>/samples/
    compilation_cache_dir: str | None = "~/.cache/chainrule/jax"  # as in train.py; null: off

    def __post_init__(self) -> None:
        inputs = [k for k in ("prompt", "prompt_file", "prompt_audio", "image")
                  if getattr(self, k) is not None]
        _check(len(inputs) <= 1, f"give one of prompt=, prompt_file=, prompt_audio=, image= "
                                 f"(got {' and '.join(f'{k}=' for k in inputs)})")
        _check((self.image is None) == (self.mask is None),
               "inpainting needs both image= (the picture) and mask= (which pixels to keep), "
               f"got only {'image' if self.mask is None else 'mask'}=")


def _schemas() -> dict[str, dict[str, type]]:
    from chainrule.data.audio import AudioDataConfig
    from chainrule.data.images import ImageDataConfig
    from chainrule.data.text import TextDataConfig
    from chainrule.models import PixelCNNConfig, TransformerConfig, WaveNetConfig
    from chainrule.tracking import LoggerConfig

    return {
        "model": {"transformer": TransformerConfig, "pixelcnn": PixelCNNConfig,
                  "wavenet": WaveNetConfig},
        "data": {"text": TextDataConfig, "image": ImageDataConfig, "audio": AudioDataConfig},
        "optimizer": {"optimizer": OptimizerConfig},
        "sampler": {"sampler": SamplerConfig},
        "hardware": {"hardware": HardwareConfig},
        "logger": {"logger": LoggerConfig},
        "trainer": {"trainer": TrainerConfig},
    }


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    for group, schemas in _schemas().items():
        for name, node in schemas.items():
            cs.store(group=group, name=f"{name}_schema", node=node)


def to_object(node: Any) -> Any:
    """A composed config node back to its dataclass, with every __post_init__ check run."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_object(node)
    return node


def unknown_key_message(full_key: str, known: list[str]) -> str:
    """One line for a key a schema does not have, suggesting the closest known one."""
    prefix, _, key = full_key.rpartition(".")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
    return f"{full_key} is not a config key{hint}; expected one of: {', '.join(known)}"


def check_known_keys(node: DictConfig, path: str = "") -> None:
    """Refuse keys a schema does not have: Hydra lets `+key=value` add them, and turning the
    config into dataclasses would then drop them without a word."""
    schema = OmegaConf.get_type(node)
    known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) \
        else None
    for key in node:
        full_key = f"{path}{key}"
        if known is not None and key not in known:
            raise ValueError(unknown_key_message(full_key, known))
        child = node[key]
        if isinstance(child, DictConfig):
            check_known_keys(child, f"{full_key}.")


def resolve(cfg: DictConfig) -> TrainConfig:
    """The composed training config as dataclasses (raises ValueError on bad values)."""
    train_cfg = to_object(cfg)
    check_known_keys(cfg)
    return train_cfg
