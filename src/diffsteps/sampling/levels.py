"""The noise levels a sampler walks through, precomputed once in float64."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.schedules import Schedule


@dataclass(frozen=True)
class Levels:
    """The noise levels a sampler walks through, in float64: ``t`` (training-time index; −1 for the data),
    ``abar`` ᾱ, ``alpha`` √ᾱ, ``sigma`` √(1 − ᾱ). Steps go from level i to i + 1; the model is evaluated at every
    level but the last."""

    t: tuple[float, ...]
    abar: tuple[float, ...]

    @property
    def alpha(self) -> tuple[float, ...]:
        return tuple(math.sqrt(a) for a in self.abar)

    @property
    def sigma(self) -> tuple[float, ...]:
        return tuple(math.sqrt(1.0 - a) for a in self.abar)

    @property
    def lam(self) -> tuple[float, ...]:
        """DPM-Solver's λ = log(α/σ) (half the log-SNR); +∞ at the data, −∞ at ᾱ = 0."""
        return tuple(0.5 * (math.log(a) - math.log1p(-a)) if 0 < a < 1 else (math.inf if a == 1 else -math.inf)
                     for a in self.abar)

    @property
    def sigma_ve(self) -> tuple[float, ...]:
        """σ̃ = σ/α, the variance-exploding noise level (0 at the data)."""
        return tuple(s / a for s, a in zip(self.sigma, self.alpha))

    def __len__(self) -> int:
        return len(self.t)


def make_levels(schedule: Schedule, timesteps: torch.Tensor, denoise_final: bool = True) -> Levels:
    """Levels for the given timesteps, plus the data (ᾱ = 1) as the last level when ``denoise_final``."""
    abar = schedule.alpha_bar_at(timesteps).tolist()
    t = timesteps.tolist()
    if denoise_final:
        t, abar = t + [-1.0], abar + [1.0]
    return Levels(tuple(t), tuple(abar))
