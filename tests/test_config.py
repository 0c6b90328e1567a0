"""Every config in every group, and every experiment preset, composes and validates."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from chainrule.cli import CONF_DIR
from chainrule.cli.schemas import register_configs
from chainrule.config import resolve

register_configs()
CONF = Path(CONF_DIR)
GROUPS = ["model", "data", "optimizer", "sampler", "hardware", "logger", "debug", "experiment"]
# Data that a given option needs beside it (an image set needs an image model, ...).
FAMILY_OF_DATA = {"TextDataConfig": "transformer", "ImageDataConfig": "pixelcnn",
                  "AudioDataConfig": "wavenet", "PreparedDataConfig": "transformer"}
NEEDS_PATH = {"text_file": ["data.path=README.md"], "image_folder": ["data.path=."],
              "wav_folder": ["data.path=."], "mnist": [], "cifar10": ["data.path=."],
              "speculative": ["sampler.draft_checkpoint=."], "prepared": ["data.path=."],
              "gpt2_prefix_tune": ["init_from=.", "data.path=README.md"],
              "gpt2_lora_tune": ["init_from=.", "data.path=README.md"]}


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"] + NEEDS_PATH.get(option, [])
    cfg = compose_train(overrides)
    if group == "data":  # pair the data with its model family
        family = FAMILY_OF_DATA[OmegaConf.get_type(cfg.data).__name__]
        cfg = compose_train(overrides + [f"model={family}"])
    train_cfg = resolve(cfg)
    assert train_cfg.trainer.steps > 0
    OmegaConf.to_yaml(cfg, resolve=True)  # every interpolation resolves


def test_each_model_family_brings_its_default_data():
    for family, data_type in [("transformer", "TextDataConfig"), ("pixelcnn", "ImageDataConfig"),
                              ("wavenet", "AudioDataConfig")]:
        cfg = resolve(compose_train([f"model={family}"]))
        assert type(cfg.data).__name__ == data_type


@pytest.mark.parametrize("overrides, match", [
    (["trainer.stepz=10"], "stepz"),
    (["trainer.steps=ten"], "steps"),
    (["model.network.num_heads=5"], "num_heads=5 must divide"),
    (["optimizer.name=adamz"], "adamz"),
    (["sampler.top_p=1.5"], "top_p"),
    (["trainer.steps=0"], "trainer.steps must be > 0"),
])
def test_bad_values_fail_with_a_message_naming_them(overrides, match):
    with pytest.raises(Exception, match=match):
        resolve(compose_train(overrides))
