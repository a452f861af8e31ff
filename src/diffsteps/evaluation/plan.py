"""What an evaluation generates: the plan, and the noise of each chunk (common random numbers)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

# options of the shared model wrapper (any sampler), as opposed to one sampler's own (eta, variance, ...)
DENOISER_OPTIONS = ("clip_denoised", "dynamic_threshold", "threshold_max", "denoise_final", "guidance_scale",
                    "guidance_interval", "fuse")


def _seed(*words: int) -> int:
    digest = hashlib.sha256(("diffsteps-eval:" + ",".join(map(str, words))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class EvalPlan:
    """What to generate: ``num_samples`` of shape ``shape`` with ``sampler`` (``spacing``, ``options``) at each
    of ``steps``, ``batch_size`` at a time. ``mse_samples`` > 0 measures the trajectory error of a deterministic
    sampler on the first that many samples, against ``reference_sampler`` at ``reference_steps``.
    ``keep_samples``: how many samples of each step count rank 0 keeps (for grids and sample files).
    ``num_classes`` > 0: a class-conditional evaluation; sample i is asked for class :func:`eval_labels` [i]
    (balanced over the classes, in an order drawn from ``noise_seed``)."""

    sampler: str
    steps: tuple[int, ...]
    shape: tuple[int, ...]
    num_samples: int = 1000
    batch_size: int = 500
    spacing: str = "trailing"
    options: dict = field(default_factory=dict)
    noise_seed: int = 1234
    mse_samples: int = 0
    reference_sampler: str = "heun"
    reference_steps: int = 200
    reference_spacing: str = "logsnr"
    keep_samples: int = 64
    num_classes: int = 0

    def __post_init__(self):
        if isinstance(self.num_classes, bool) or int(self.num_classes) != self.num_classes or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: unconditional), got {self.num_classes!r}")
        if self.num_samples < 2 or self.batch_size < 1:
            raise ValueError(f"num_samples must be ≥ 2 and batch_size ≥ 1, got {self.num_samples} and "
                             f"{self.batch_size}")
        if not self.steps:
            raise ValueError("steps is empty")
        if self.mse_samples < 0 or self.reference_steps < 2:
            raise ValueError("mse_samples must be ≥ 0 and reference_steps ≥ 2")

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def chunk(self, c: int) -> tuple[int, int]:
        """(first global index, size) of chunk ``c``."""
        start = c * self.batch_size
        return start, min(self.batch_size, self.num_samples - start)

    @property
    def denoiser_options(self) -> dict:
        return {k: v for k, v in self.options.items() if k in DENOISER_OPTIONS}

    @property
    def sampler_options(self) -> dict:
        return {k: v for k, v in self.options.items() if k not in DENOISER_OPTIONS}


def chunk_noise(plan: EvalPlan, c: int, device=None, dtype=torch.float32) -> Tensor:
    """The initial noise x_T of chunk ``c``: a function of (``plan.noise_seed``, c) only."""
    _, size = plan.chunk(c)
    g = torch.Generator().manual_seed(_seed(plan.noise_seed, c))
    return torch.randn((size, *plan.shape), generator=g, dtype=dtype).to(device)


def _sampler_generator(plan: EvalPlan, c: int, device) -> torch.Generator:
    # the stochastic sampler's own noise: common across step counts too, and on the device that draws it
    return torch.Generator(device=device).manual_seed(_seed(plan.noise_seed, c, "sampler"))


def eval_labels(plan: EvalPlan) -> Tensor:
    """The class requested of each of the ``num_samples`` samples of a conditional evaluation: every class
    ⌊N/K⌋ or ⌈N/K⌉ times (i mod K), in a random order drawn from ``noise_seed`` alone, so the same at every step
    count and guidance scale, and any prefix is close to balanced."""
    if plan.num_classes < 1:
        raise ValueError("eval_labels needs a conditional plan (num_classes > 0)")
    g = torch.Generator().manual_seed(_seed(plan.noise_seed, "labels"))
    return (torch.arange(plan.num_samples) % plan.num_classes)[torch.randperm(plan.num_samples, generator=g)]


def chunk_cond(plan: EvalPlan, c: int, device=None) -> dict[str, Tensor]:
    """The conditioning of chunk ``c``: ``{"y": its slice of eval_labels}`` for a conditional plan, else {}."""
    if plan.num_classes < 1:
        return {}
    start, size = plan.chunk(c)
    return {"y": eval_labels(plan)[start:start + size].to(device)}
