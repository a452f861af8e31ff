"""The experiment runner behind ``run.py``: validate → build → train (or reuse) → evaluate → write and log."""

from .run import run

__all__ = ["run"]
