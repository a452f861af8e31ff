"""A small 1-D CNN classifier for MNIST-1D signals, used as the feature extractor of sample-quality metrics on
:class:`~diffsteps.data.MNIST1DData` (the role the digits CNN plays for the 8×8 digits) and to check that generated
signals are recognisable.

The architecture is :class:`MNIST1DCNN`; ``diffsteps.training.mnist1d_classifier.train_mnist1d_classifier`` trains
it deterministically on the train split of ``MNIST1DData(num_samples=20000, seed=2020)`` (16,000 signals: more than the
published 4,000, since a CNN needs them to pass 90 %), and ``experiments/train_mnist1d_classifier.py`` runs that and
writes the shipped weights ``diffsteps/reference/assets/mnist1d_classifier.pt`` (a plain ``state_dict``, 258 KB).
:func:`load_mnist1d_classifier` checks its sha256 against :data:`WEIGHTS_SHA256` before loading it with
``torch.load(weights_only=True)``.

Held-out accuracy of the shipped weights on the published MNIST-1D test split (``MNIST1DData()``'s val split:
seed 42, 1000 signals, generated independently of the training set): **981 / 1000 = 98.1 %**
(:data:`HELD_OUT_CORRECT`; recomputed by ``tests/test_signals.py``). Training takes ~1.5 min on one core.

Why seed 2020 for the training set: ``make_dataset`` draws signals class by class from one seeded stream, so two
sets with the same seed but different sizes share their first class's signals; 2020 keeps the training set apart
from the data of runs with the usual seeds (0, 1, 2, … and the published 42).

Input: (N, 1, 40) in the data module's scaling (standardised units / 3). Features (:meth:`MNIST1DCNN.features`)
are the 64 penultimate pre-activations scaled to unit mean square on the training signals (why: the digits
classifier's :class:`~diffsteps.reference.digits_classifier.DigitsCNN`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .digits_classifier import _FeatureCNN, load_checked_weights

__all__ = [
    "HELD_OUT_ACCURACY",
    "HELD_OUT_CORRECT",
    "MNIST1DCNN",
    "REGENERATE_HINT",
    "TRAIN_CONFIG",
    "WEIGHTS_SHA256",
    "default_weights_path",
    "load_mnist1d_classifier",
]

# sha256 of the shipped assets/mnist1d_classifier.pt; update it (and HELD_OUT_CORRECT) whenever the script rewrites
# the file — the script prints both.
WEIGHTS_SHA256 = "4788c3e44c1cfd32bc8db1d6fbf75bce23a841eade0761e98320f8f86742ef18"
# (correct, total) on MNIST1DData().labels("val"): the published test split (seed 42), never seen in training.
HELD_OUT_CORRECT = (981, 1000)
HELD_OUT_ACCURACY = HELD_OUT_CORRECT[0] / HELD_OUT_CORRECT[1]
TRAIN_CONFIG = {"num_samples": 20000, "data_seed": 2020, "seed": 0, "epochs": 20, "batch_size": 128, "lr": 3e-3,
                "weight_decay": 1e-4}
REGENERATE_HINT = "regenerate it with `python experiments/train_mnist1d_classifier.py` (from the repository root)"


class MNIST1DCNN(_FeatureCNN):
    """conv5(1→32) · ReLU · conv3(32→32) · ReLU · maxpool2 · conv3(32→64) · ReLU · maxpool2 · conv3(64→64) · ReLU ·
    linear(640→64) [= features, × feature_scale] · ReLU · linear(64→10). No batch norm or dropout, so train and
    eval mode compute the same function. Features are the penultimate pre-activations, scaled so that their mean
    square over the training signals is 1 (as :class:`~diffsteps.reference.digits_classifier.DigitsCNN`)."""

    num_features = 64
    num_classes = 10
    length = 40

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv1d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv1d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv1d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * self.length // 4, self.num_features)
        self.fc2 = nn.Linear(self.num_features, self.num_classes)
        self.register_buffer("feature_scale", torch.ones(()))

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or tuple(x.shape[1:]) != (1, self.length):
            raise ValueError(f"the MNIST-1D classifier takes (N, 1, {self.length}) signals, got shape "
                             f"{tuple(x.shape)}")
        x = x.to(self.conv1.weight.dtype)
        x = F.max_pool1d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.max_pool1d(F.relu(self.conv3(x)), 2)
        return self.fc1(F.relu(self.conv4(x)).flatten(1))


def default_weights_path() -> Path:
    """Where the shipped weights live inside the installed package."""
    return Path(str(resources.files("diffsteps.reference").joinpath("assets", "mnist1d_classifier.pt")))


def load_mnist1d_classifier(path: str | Path | None = None, sha256: str | None = WEIGHTS_SHA256) -> MNIST1DCNN:
    """The trained classifier, frozen and in eval mode. ``path`` defaults to the shipped file, whose sha256 must
    equal ``sha256`` (None skips the check, for weights you trained yourself); a missing, corrupt or mismatching
    file raises a ``RuntimeError`` saying how to regenerate it."""
    return load_checked_weights(MNIST1DCNN, Path(path) if path is not None else default_weights_path(), sha256,
                                "MNIST-1D classifier", "diffsteps.reference.mnist1d_classifier.WEIGHTS_SHA256",
                                REGENERATE_HINT)
