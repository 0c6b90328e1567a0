"""Exact likelihoods of trained runs on whole held-out splits (`evaluate.py`)."""

from chainrule.evaluation.config import EvaluateConfig
from chainrule.evaluation.evaluate import evaluate

__all__ = ["EvaluateConfig", "evaluate"]
