"""Training the shipped digits classifier (:mod:`diffsteps.reference.digits_classifier`) deterministically; run by
``experiments/train_digits_classifier.py``."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.images import DigitsData
from ..reference.digits_classifier import TRAIN_CONFIG, DigitsCNN, accuracy


def _random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Each image translated by an integer offset in [−max_shift, max_shift]² (pad with the background −1, crop)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


@contextlib.contextmanager
def _deterministic_single_thread():
    # One thread and deterministic kernels make the float summation order, hence the weights' bits, reproducible;
    # the caller's settings are restored afterwards.
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def fit_classifier(make_model: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor,
                   xv: torch.Tensor, yv: torch.Tensor, *, seed: int, epochs: int, batch_size: int, lr: float,
                   weight_decay: float,
                   augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                   log: Callable[[str], None] | None = None, log_every: int = 10, held_out_name: str = "val"):
    """The shipped reference classifiers' training: cross-entropy, AdamW, learning rate ``lr·(1 + cos(π·step /
    total))/2`` (cosine decay to 0 over the whole run, Loshchilov & Hutter 2017), ``epochs`` passes over a fresh
    permutation of (x, y) in full mini-batches, each optionally ``augment``-ed; then ``feature_scale`` = 1 / RMS of
    the penultimate pre-activations on x. Deterministic given the arguments: one thread, deterministic kernels,
    parameters drawn from the global generator seeded by ``seed`` (its state restored afterwards), shuffling and
    augmentation from a generator seeded by ``seed + 1``. ``log`` receives one line every ``log_every`` epochs
    with the accuracy on (xv, yv). Returns the model frozen and in eval mode."""
    steps_per_epoch = len(x) // batch_size
    total = epochs * steps_per_epoch
    t0 = time.perf_counter()
    with _deterministic_single_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # parameter initialisation draws from the global generator
        model = make_model()
        g = torch.Generator().manual_seed(seed + 1)  # shuffling and augmentation
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        step = 0
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(x), generator=g)
            losses = []
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                xb = x[idx] if augment is None else augment(x[idx], g)
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
            if log is not None and ((epoch + 1) % log_every == 0 or epoch + 1 == epochs):
                model.eval()
                c, n = accuracy(model, xv, yv)
                log(f"epoch {epoch + 1:3d}  train loss {sum(losses) / len(losses):.4f}  {held_out_name} acc {c}/{n} "
                    f"({100 * c / n:.2f} %)  {time.perf_counter() - t0:.1f} s")
        model.eval()
        with torch.no_grad():
            model.feature_scale.fill_(model._hidden(x).square().mean().rsqrt().item())
    return model.requires_grad_(False).eval()


def train_digits_classifier(seed: int = TRAIN_CONFIG["seed"], epochs: int = TRAIN_CONFIG["epochs"],
                            batch_size: int = TRAIN_CONFIG["batch_size"], lr: float = TRAIN_CONFIG["lr"],
                            weight_decay: float = TRAIN_CONFIG["weight_decay"],
                            val_fraction: float = TRAIN_CONFIG["val_fraction"],
                            data_seed: int = TRAIN_CONFIG["data_seed"],
                            log: Callable[[str], None] | None = None) -> DigitsCNN:
    """Train :class:`DigitsCNN` on the train split of ``DigitsData(val_fraction, seed=data_seed)`` with
    :func:`fit_classifier`, each image randomly shifted by up to one pixel; deterministic given the arguments.
    Returns the model frozen and in eval mode. Does not touch the global RNG state. ``log`` receives one line per 10
    epochs (train loss, val accuracy)."""
    data = DigitsData(val_fraction=val_fraction, seed=data_seed)
    return fit_classifier(DigitsCNN, data.real_samples(split="train"), data.labels("train"),
                          data.real_samples(split="val"), data.labels("val"), seed=seed, epochs=epochs,
                          batch_size=batch_size, lr=lr, weight_decay=weight_decay, augment=_random_shift, log=log)
