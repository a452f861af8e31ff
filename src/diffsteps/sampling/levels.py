"""The noise levels a sampler walks through, precomputed once in float64.

Shared levels (one timestep sequence for the whole batch) are Python floats: the samplers then do float × tensor
arithmetic, the cheapest there is. Per-sample levels (a [B, K] timestep table, one row per sample) are float64
tensors of shape [B, 1, …, 1] that broadcast against the state. The samplers are written once for both: level
arithmetic goes through :func:`sqrt`, :func:`log`, :func:`expm1`, :func:`relu`, which dispatch on float vs tensor,
and a branch on a level goes through :func:`every` (see there for why an all()-check is exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.schedules import Schedule

Level = float | torch.Tensor


def sqrt(v: Level) -> Level:
    return v.sqrt() if isinstance(v, torch.Tensor) else math.sqrt(v)


def log(v: Level) -> Level:
    return v.log() if isinstance(v, torch.Tensor) else math.log(v)


def expm1(v: Level) -> Level:
    return v.expm1() if isinstance(v, torch.Tensor) else math.expm1(v)


def relu(v: Level) -> Level:
    return v.clamp(min=0.0) if isinstance(v, torch.Tensor) else max(v, 0.0)


def lincomb(c: Level, x: torch.Tensor, terms, out: torch.Tensor | None = None) -> torch.Tensor:
    """c x + Σ c_j y_j in one new tensor (or in ``out``, which may be x but none of the y_j): one scaling, then a
    fused multiply-add in place per term (``alpha=`` for a float coefficient, ``addcmul_`` for a per-sample one).
    No y_j, and x only when it is ``out``, is written to."""
    out = x * c if out is None else torch.mul(x, c, out=out)
    for cj, y in terms:
        if isinstance(cj, torch.Tensor):
            out.addcmul_(cj, y)
        else:
            out.add_(y, alpha=cj)
    return out


def every(cond: bool | torch.Tensor) -> bool:
    """A branch condition on the levels as one bool: the condition itself for shared levels, all() for per-sample
    ones. The samplers only branch on whether the next level is the data (σ = 0, ᾱ = 1) — and, for DDIM, on whether
    its noise scale c is positive, which for η > 0 is the same question — and every sample reaches the data at the
    same, last, level (:func:`make_levels` appends it to every row), so the condition never differs between samples.
    A mixed condition (hand-built :class:`Levels`) is an error, never a silently wrong branch."""
    if not isinstance(cond, torch.Tensor):
        return cond
    if bool(cond.all()):
        return True
    if not bool(cond.any()):
        return False
    raise ValueError("per-sample levels disagree on a branch (some samples at the data, some not); every row must "
                     "reach the data at the same, last, level")


def _lam(a: Level) -> Level:
    if isinstance(a, torch.Tensor):  # log 0 = −∞ gives λ = +∞ at the data and −∞ at ᾱ = 0 without a branch
        return 0.5 * (torch.log(a) - torch.log1p(-a))
    return 0.5 * (math.log(a) - math.log1p(-a)) if 0 < a < 1 else (math.inf if a == 1 else -math.inf)


@dataclass(frozen=True)
class Levels:
    """The noise levels a sampler walks through, in float64: ``t`` (training-time index; −1 for the data),
    ``abar`` ᾱ, ``alpha`` √ᾱ, ``sigma`` √(1 − ᾱ). Steps go from level i to i + 1; the model is evaluated at every
    level but the last. Each entry is a Python float (shared levels) or, for per-sample levels, a float64 tensor with
    one value per sample: shape [B] as :func:`make_levels` returns it, [B, 1, …, 1] after :meth:`like`.
    ``t_half``, ``abar_half``: the half-step levels t_{i+½} = (t_i + t_{i+1})/2 between consecutive timesteps (not
    into the data), for samplers that evaluate the model there (PNDM's Runge–Kutta warm-up); empty unless asked for."""

    t: tuple[Level, ...]
    abar: tuple[Level, ...]
    t_half: tuple[Level, ...] = ()
    abar_half: tuple[Level, ...] = ()

    @property
    def per_sample(self) -> bool:
        return bool(self.t) and isinstance(self.t[0], torch.Tensor)

    @property
    def alpha(self) -> tuple[Level, ...]:
        return tuple(sqrt(a) for a in self.abar)

    @property
    def sigma(self) -> tuple[Level, ...]:
        return tuple(sqrt(1.0 - a) for a in self.abar)

    @property
    def lam(self) -> tuple[Level, ...]:
        """DPM-Solver's λ = log(α/σ) (half the log-SNR); +∞ at the data, −∞ at ᾱ = 0."""
        return tuple(_lam(a) for a in self.abar)

    @property
    def sigma_ve(self) -> tuple[Level, ...]:
        """σ̃ = σ/α, the variance-exploding noise level (0 at the data)."""
        return tuple(s / a for s, a in zip(self.sigma, self.alpha))

    def like(self, x: torch.Tensor) -> Levels:
        """Per-sample levels shaped [B, 1, …, 1] on x's device, to broadcast against x; shared levels unchanged."""
        if not self.per_sample:
            return self
        shape = (-1,) + (1,) * (x.ndim - 1)

        def move(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=x.device, dtype=torch.float64).reshape(shape)

        return Levels(*(tuple(map(move, v)) for v in (self.t, self.abar, self.t_half, self.abar_half)))

    def __len__(self) -> int:
        return len(self.t)


def make_levels(schedule: Schedule, timesteps: torch.Tensor, denoise_final: bool = True,
                half_steps: bool = False) -> Levels:
    """Levels for the given timesteps, plus the data (ᾱ = 1) as the last level when ``denoise_final``, and with
    ``half_steps`` the K − 1 midpoints between consecutive timesteps. ``timesteps`` 1-D (K,) gives shared levels;
    2-D (B, K), one row per sample, gives per-sample levels."""
    if timesteps.ndim == 2:
        ts = timesteps.to(torch.float64)
        mid = 0.5 * (ts[:, :-1] + ts[:, 1:])

        def cols(v: torch.Tensor) -> list[torch.Tensor]:
            return list(v.T.contiguous().unbind())

        t, abar = cols(ts), cols(schedule.alpha_bar_at(ts))
        if denoise_final:
            t, abar = t + [torch.full_like(ts[:, 0], -1.0)], abar + [torch.ones_like(ts[:, 0])]
        half = (cols(mid), cols(schedule.alpha_bar_at(mid))) if half_steps else ((), ())
        return Levels(tuple(t), tuple(abar), *map(tuple, half))
    abar = schedule.alpha_bar_at(timesteps).tolist()
    t = timesteps.tolist()
    if denoise_final:
        t, abar = t + [-1.0], abar + [1.0]
    half = ((), ())
    if half_steps:
        mid = 0.5 * (timesteps[:-1].to(torch.float64) + timesteps[1:].to(torch.float64))
        half = (mid.tolist(), schedule.alpha_bar_at(mid).tolist())
    return Levels(tuple(t), tuple(abar), *map(tuple, half))
