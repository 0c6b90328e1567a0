"""What the root shims (train.py, sample.py) call."""

from pathlib import Path

# conf/ lives at the repository root, beside src/.
CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")
