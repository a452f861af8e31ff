"""What several test files share that is not a fixture: noise, a call-counting model wrapper, the closed-form
probability-flow solution for Gaussian data, and how to start ``run.py`` as a user does (tiny settings)."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from diffsteps import GaussianMixture
from diffsteps.data import DataSpec
from diffsteps.data.base import _InMemoryData

ROOT = Path(__file__).resolve().parents[1]

# a run.py configuration that trains and evaluates in seconds (toy 2-D data, a small MLP)
FAST = ["data=toy2d", "data.n_train=2048", "data.n_val=1024", "model=mlp", "model.hidden=64", "model.depth=2",
        "train.max_steps=30", "trainer.val_check_interval=15", "callbacks.model_checkpoint.every_n_train_steps=15",
        "lr_scheduler.warmup_steps=5", "callbacks.progress.every_n_steps=10", "eval.num_samples=256",
        "eval.batch_size=128", "eval.kid_subset_size=64", "objective=nll"]


def run_py(tmp: Path, *overrides: str, name: str = "run", check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIFFSTEPS_ROOT": str(tmp), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={tmp}/{name}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def noise(n, d, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class CountingModel(torch.nn.Module):
    """Wraps a model, counts calls and records the t it was given."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.ts = inner, 0, []

    def forward(self, x, t):
        self.calls += 1
        self.ts.append(t.clone())
        return self.inner(x, t)


def exact_flow(gauss, schedule, x_T):
    """The probability-flow ODE solution for Gaussian data, in closed form. In x̃ = x/√ᾱ each eigen-direction of Σ
    (eigenvalue e) scales as √(e + σ̃²), so x̃(0) − μ = U diag(√(e/(e + σ̃_T²))) Uᵀ (x̃_T − μ) (Karras et al. 2022,
    eq. 4 with p_t = N(μ, Σ + σ̃² I))."""
    mu, cov = gauss.means[0].numpy(), gauss.covs[0].numpy()
    e, U = np.linalg.eigh(cov)
    s2 = schedule.sigmas[-1].item() ** 2
    xt = x_T.numpy() / math.sqrt(schedule.alphas_cumprod[-1].item())
    return torch.from_numpy(mu + ((xt - mu) @ U) * np.sqrt(e / (e + s2)) @ U.T)


# -- data made here ----------------------------------------------------------------------------------------------
TRAIN_SIZES = (3, 4, 5, 6, 7)  # unequal, so a wrong concatenation order shows
TEST_SIZE = 5


def write_fake_cifar(root, numpy1_style: bool = True):
    """The official python-version layout: pickled dicts with bytes keys, b"data" uint8 (N, 3072), b"labels" list."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in [*((f"data_batch_{i + 1}", s) for i, s in enumerate(TRAIN_SIZES)), ("test_batch", TEST_SIZE)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        d = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        raw = pickle.dumps(d, protocol=2)
        if numpy1_style:  # the official files name numpy 1's module
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(raw)
        written[name] = (data, labels)
    return written


class SineSignals(_InMemoryData):
    """A tiny signal data set (C, L), standing in for MNIST-1D until it lands: a sine per channel, random phase."""

    def __init__(self, channels: int = 2, length: int = 40, n: int = 16, batch_size: int = 4):
        super().__init__(batch_size=batch_size)
        self.channels, self.length, self.n = channels, length, n

    @property
    def sample_shape(self):
        return (self.channels, self.length)

    @property
    def spec(self):
        return DataSpec("signal", self.sample_shape)

    @property
    def name(self):
        return f"sines-c{self.channels}-l{self.length}"

    def _load(self):
        g = torch.Generator().manual_seed(0)
        phase = 2 * math.pi * torch.rand(self.n, self.channels, 1, generator=g)
        x = torch.sin(torch.linspace(0, 4 * math.pi, self.length) + phase)
        k = self.n * 3 // 4
        return {"train": x[:k], "val": x[k:]}, None


def agreement_mixture():
    """A 16-D, 3-component mixture with full covariances: the model diffusers' schedulers are compared on."""
    g = torch.Generator().manual_seed(0)
    K, D = 3, 16
    # means 3.6 … 4.8 apart, component standard deviations 0.7 … 2.0: multimodal, so ε* is far from linear (at
    # ᾱ = 0.5 29% of noised points have no component with responsibility ≥ 0.9), yet overlapping enough that no
    # sampling trajectory sits on a knife-edge between modes and amplifies float32 rounding into the max-norm
    means = 0.7 * torch.randn(K, D, generator=g, dtype=torch.float64)
    A = torch.randn(K, D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    covs = A @ A.transpose(1, 2) + 0.5 * torch.eye(D, dtype=torch.float64)
    covs[2] = torch.diag(0.5 + torch.rand(D, generator=g, dtype=torch.float64))
    return GaussianMixture(means, covs, weights=[0.5, 0.3, 0.2])
