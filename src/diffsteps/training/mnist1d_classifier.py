"""Training the shipped MNIST-1D classifier (:mod:`diffsteps.reference.mnist1d_classifier`) deterministically; run
by ``experiments/train_mnist1d_classifier.py``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..data.signals import MNIST1DData
from ..reference.digits_classifier import accuracy
from ..reference.mnist1d_classifier import MNIST1DCNN, TRAIN_CONFIG
from .classifier import _deterministic_single_thread


def train_mnist1d_classifier(seed: int = TRAIN_CONFIG["seed"], epochs: int = TRAIN_CONFIG["epochs"],
                             batch_size: int = TRAIN_CONFIG["batch_size"], lr: float = TRAIN_CONFIG["lr"],
                             weight_decay: float = TRAIN_CONFIG["weight_decay"],
                             num_samples: int = TRAIN_CONFIG["num_samples"], data_seed: int = TRAIN_CONFIG["data_seed"],
                             log: Callable[[str], None] | None = None) -> MNIST1DCNN:
    """Train :class:`MNIST1DCNN` on the train split of ``MNIST1DData(num_samples, seed=data_seed)`` with AdamW and
    cosine decay to 0; deterministic given the arguments (one thread, deterministic kernels, own generators; the
    global RNG state is left as it was). ``log`` receives one line per 5 epochs with the accuracy on the published
    test split (``MNIST1DData()``'s val, generated from another seed)."""
    data = MNIST1DData(num_samples=num_samples, seed=data_seed)
    x, y = data.real_samples(split="train"), data.labels("train")
    held_out = MNIST1DData()
    xv, yv = held_out.real_samples(split="val"), held_out.labels("val")
    steps_per_epoch = len(x) // batch_size
    total = epochs * steps_per_epoch
    t0 = time.perf_counter()
    with _deterministic_single_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # parameter initialisation draws from the global generator
        model = MNIST1DCNN()
        g = torch.Generator().manual_seed(seed + 1)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        step = 0
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(x), generator=g)
            losses = []
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
            if log is not None and ((epoch + 1) % 5 == 0 or epoch + 1 == epochs):
                model.eval()
                c, n = accuracy(model, xv, yv)
                log(f"epoch {epoch + 1:3d}  train loss {sum(losses) / len(losses):.4f}  held-out acc {c}/{n} "
                    f"({100 * c / n:.2f} %)  {time.perf_counter() - t0:.1f} s")
        model.eval()
        with torch.no_grad():
            model.feature_scale.fill_(model._hidden(x).square().mean().rsqrt().item())
    return model.requires_grad_(False).eval()
