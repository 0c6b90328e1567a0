"""Data pipelines: every config type registers a builder; `build_data` returns a `DataBundle`."""

from chainrule.data import tokenizers
from chainrule.data.audio import AudioDataConfig  # importing each module registers its builder
from chainrule.data.base import DataBundle, build_data, register_data
from chainrule.data.images import ImageDataConfig
from chainrule.data.prepare import prepare_data
from chainrule.data.prepared import PreparedDataConfig
from chainrule.data.text import TextDataConfig

__all__ = ["AudioDataConfig", "DataBundle", "ImageDataConfig", "PreparedDataConfig",
           "TextDataConfig", "build_data", "prepare_data", "register_data", "tokenizers"]
