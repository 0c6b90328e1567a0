"""Data pipelines: every config type registers a builder; `build_data` returns a `DataBundle`."""

from chainrule.data import tokenizers
from chainrule.data.base import DataBundle, build_data, register_data
from chainrule.data.text import TextDataConfig  # importing registers the text builder

__all__ = ["DataBundle", "TextDataConfig", "build_data", "register_data", "tokenizers"]
