"""What the root shims (train.py, sample.py) and the console scripts call."""

from pathlib import Path

# The config tree ships inside the package (package data: pyproject.toml), so an installed
# wheel finds it as an editable checkout does; Hydra gets it as an absolute directory.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
