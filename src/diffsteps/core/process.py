"""The forward process q(x_t | x_0) and the posterior q(x_s | x_t, x_0) between any two noise levels s < t.

Written in ᾱ so the same formulas serve the full T-step chain (s = t − 1) and any sub-sequence of timesteps
(DDIM-style skipping), where the effective step variance is β_{t|s} = 1 − ᾱ_t/ᾱ_s.
"""

from __future__ import annotations

import torch

from .noise import randn
from .schedules import Schedule

__all__ = ["q_sample", "posterior_coefficients", "q_posterior"]


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)).to(like.dtype)


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (Ho et al. 2020, eq. 4) for a batch of (real) t."""
    if noise is None:
        noise = randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    t = t.detach()
    if t.dtype.is_floating_point:
        abar = schedule.alpha_bar_at(t.cpu())
    else:  # integer timesteps (training): a table lookup, no interpolation
        abar = schedule.alphas_cumprod[t.cpu()]
    abar = _expand(abar.to(x0.device), x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def posterior_coefficients(abar_t, abar_s):
    """Coefficients of q(x_s | x_t, x_0) = N(c_0 x_0 + c_t x_t, β̃ I) for ᾱ_s ≥ ᾱ_t (Ho et al. 2020, eq. 6–7, with
    β_t replaced by β_{t|s} = 1 − ᾱ_t/ᾱ_s and α_t by ᾱ_t/ᾱ_s):
        c_0 = √ᾱ_s β_{t|s} / (1 − ᾱ_t),   c_t = √(ᾱ_t/ᾱ_s) (1 − ᾱ_s) / (1 − ᾱ_t),   β̃ = (1 − ᾱ_s) β_{t|s} / (1 − ᾱ_t).
    Works on floats or float64 tensors; returns (c_0, c_t, β̃, β_{t|s})."""
    beta = 1 - abar_t / abar_s
    c0 = abar_s**0.5 * beta / (1 - abar_t)
    ct = (abar_t / abar_s) ** 0.5 * (1 - abar_s) / (1 - abar_t)
    var = (1 - abar_s) * beta / (1 - abar_t)
    return c0, ct, var, beta


def q_posterior(schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_s | x_t, x_0) for integer timesteps t (batch) and s (default t − 1; s = −1 means
    the data, ᾱ_{−1} = 1). Returns (mean, variance) with variance shaped for broadcasting against x_t."""
    t = torch.as_tensor(t).long().cpu()
    s = t - 1 if s is None else torch.as_tensor(s).long().cpu()
    table = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod])
    c0, ct, var, _ = posterior_coefficients(table[t + 1], table[s + 1])
    mean = _expand(c0, x0).to(x0.device) * x0 + _expand(ct, x_t).to(x_t.device) * x_t
    return mean, _expand(var, x_t).to(x_t.device)
