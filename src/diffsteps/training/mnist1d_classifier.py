"""Training the shipped MNIST-1D classifier (:mod:`diffsteps.reference.mnist1d_classifier`) deterministically; run
by ``experiments/train_mnist1d_classifier.py``."""

from __future__ import annotations

from collections.abc import Callable

from ..data.signals import MNIST1DData
from ..reference.mnist1d_classifier import MNIST1DCNN, TRAIN_CONFIG
from .classifier import fit_classifier


def train_mnist1d_classifier(seed: int = TRAIN_CONFIG["seed"], epochs: int = TRAIN_CONFIG["epochs"],
                             batch_size: int = TRAIN_CONFIG["batch_size"], lr: float = TRAIN_CONFIG["lr"],
                             weight_decay: float = TRAIN_CONFIG["weight_decay"],
                             num_samples: int = TRAIN_CONFIG["num_samples"], data_seed: int = TRAIN_CONFIG["data_seed"],
                             log: Callable[[str], None] | None = None) -> MNIST1DCNN:
    """Train :class:`MNIST1DCNN` on the train split of ``MNIST1DData(num_samples, seed=data_seed)`` with
    :func:`~.classifier.fit_classifier` (AdamW, cosine decay to 0, no augmentation); deterministic given the
    arguments (the global RNG state is left as it was). ``log`` receives one line per 5 epochs with the accuracy on
    the published test split (``MNIST1DData()``'s val, generated from another seed)."""
    data = MNIST1DData(num_samples=num_samples, seed=data_seed)
    held_out = MNIST1DData()
    return fit_classifier(MNIST1DCNN, data.real_samples(split="train"), data.labels("train"),
                          held_out.real_samples(split="val"), held_out.labels("val"), seed=seed, epochs=epochs,
                          batch_size=batch_size, lr=lr, weight_decay=weight_decay, log=log, log_every=5,
                          held_out_name="held-out")
