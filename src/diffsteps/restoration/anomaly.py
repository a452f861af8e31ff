"""Anomaly detection and repair by partial noising and denoising (SDEdit, Meng et al. 2022; AnoDDPM, Wyatt et al.
2022): x_{t*} = √ᾱ_{t*} x + √(1 − ᾱ_{t*}) ε, then any sampler from t* to the data. The model can only rebuild what
it has learned, so the output is a repaired image and the reconstruction error ‖x − x̂‖² an anomaly score. t*
trades the two: too small and the anomaly survives the noise, too large and normal detail is lost too.

Synthetic anomalies to evaluate on (:func:`corrupt`): a bright or dark Gaussian ``blob``, a ``flip``-ped patch
(mirrored in both axes), two ``swap``-ped patches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.noise import randn
from ..core.process import q_sample
from ..core.schedules import Schedule
from ..sampling.api import SampleResult, plan_sampling, sample
from .inpaint import _OPTIONS

__all__ = ["ANOMALIES", "check_t_star", "corrupt", "pixel_score", "reconstruct"]

ANOMALIES = ("blob", "flip", "swap")


def check_t_star(schedule: Schedule, t_star, steps: int | None = None) -> int:
    """t* must be an integer timestep in [0, T); with ``steps`` it must also leave room for that many integer
    levels (t* + 1 ≥ steps)."""
    T = schedule.num_timesteps
    if isinstance(t_star, bool) or not isinstance(t_star, int) or not 0 <= t_star < T:
        raise ValueError(f"t* (the noise level to restart from) must be an integer in [0, {T}), got {t_star!r}")
    if steps is not None and steps > t_star + 1:
        raise ValueError(f"{steps} steps do not fit between t* = {t_star} and the data; use at most {t_star + 1}")
    return t_star


def reconstruct(model: Callable, x: torch.Tensor, t_star: int, *, schedule: Schedule, sampler: str = "ddim",
                steps: int | None = None, generator: torch.Generator | None = None,
                **sample_kwargs) -> SampleResult:
    """Noise ``x`` to t* and denoise it with ``steps`` levels evenly spaced from t* to 0 (default: one per 20
    timesteps, at least 1). Validated before any model call."""
    check_t_star(schedule, t_star, steps)
    if steps is None:
        steps = max(1, min(t_star + 1, round((t_star + 1) / 20)))
    levels = torch.linspace(t_star, 0, steps, dtype=torch.float64) if steps > 1 else torch.tensor([float(t_star)])
    levels = levels.round()  # integer levels: every sampler visits the same ones
    plan_sampling(schedule, sampler, None, levels, **{k: v for k, v in sample_kwargs.items() if k in _OPTIONS})
    t = torch.full((len(x),), t_star, dtype=torch.long)
    eps = randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    x_t = q_sample(schedule, x, t, eps)
    return sample(model, x_t, schedule=schedule, sampler=sampler, spacing=levels, generator=generator,
                  return_info=True, **sample_kwargs)


def corrupt(x: torch.Tensor, kind: str, *, size: float = 0.375, strength: float = 1.5,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic anomaly in every image of ``x`` (B, C, H, W) in [−1, 1]: ``blob`` adds ±``strength`` × a
    Gaussian bump of width ``size`` × H/2 at a random place, cut at 0.1 of its peak, (clamped to the range); ``flip`` mirrors a random
    square patch of side ``size`` × H in both axes; ``swap`` exchanges two such patches. Returns (corrupted images,
    (B, 1, H, W) masks of the changed region)."""
    if kind not in ANOMALIES:
        raise ValueError(f"unknown anomaly {kind!r}; valid choices: {', '.join(ANOMALIES)}")
    B, _, H, W = x.shape
    out, region = x.clone(), torch.zeros(B, 1, H, W, dtype=x.dtype)
    k = max(2, round(size * H))
    yy, xx = torch.meshgrid(torch.arange(H, dtype=x.dtype), torch.arange(W, dtype=x.dtype), indexing="ij")

    def corner():
        return [int(v) for v in torch.randint(0, H - k + 1, (2,), generator=generator)]

    for b in range(B):
        if kind == "blob":
            c = torch.rand(2, generator=generator) * torch.tensor([H - 1, W - 1])
            sign = 1.0 if torch.rand(1, generator=generator).item() < 0.5 else -1.0
            bump = torch.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / (2 * (size * H / 2) ** 2))
            bump = torch.where(bump > 0.1, bump, torch.zeros_like(bump))  # a bounded region
            out[b] = (x[b] + sign * strength * bump).clamp(-1, 1)
            region[b, 0] = (bump > 0).to(x.dtype)
        else:
            i, j = corner()
            if kind == "flip":
                out[b, :, i:i + k, j:j + k] = x[b, :, i:i + k, j:j + k].flip(-1, -2)
                region[b, 0, i:i + k, j:j + k] = 1
            else:
                p, q = corner()
                while abs(p - i) < k and abs(q - j) < k:  # two patches that do not overlap
                    p, q = corner()
                out[b, :, i:i + k, j:j + k], out[b, :, p:p + k, q:q + k] = \
                    x[b, :, p:p + k, q:q + k], x[b, :, i:i + k, j:j + k]
                region[b, 0, i:i + k, j:j + k] = region[b, 0, p:p + k, q:q + k] = 1
    return out, region


def pixel_score(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """The pixel-intensity baseline: the mean squared z-score of each pixel against the training set's per-pixel
    mean and standard deviation (a diagonal-Gaussian log-likelihood up to constants); (B,) float64."""
    mu, sd = train.double().mean(0), train.double().std(0).clamp_min(1e-3)
    return ((x.double() - mu) / sd).square().flatten(1).mean(1)
