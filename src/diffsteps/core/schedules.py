"""Noise schedules of the discrete-time variance-preserving diffusion q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I).

Every schedule is a vector of T betas in float64; everything else (α, ᾱ, σ, log-SNR) derives from it. Index
convention (as in diffusers and improved-diffusion): t = 0 … T−1, ᾱ_t = Π_{s≤t} (1 − β_s), so x_0 (the data) sits
"before" t = 0 and ᾱ_{−1} = 1.

Continuous extension: samplers that step in σ or log-SNR visit non-integer t. We interpolate the log-SNR
λ(t) = log(ᾱ_t / (1 − ᾱ_t)) linearly between integer t. Reasons: λ is the variable the ODE solvers integrate over
(DPM-Solver), it is strictly monotone so the map t ↔ λ ↔ σ is exactly invertible, and linear interpolation in
λ = −2 log σ is the same as k-diffusion's linear interpolation in log σ, so fractional timesteps mean the same thing
there and here. Where λ is infinite (ᾱ_{T−1} = 0 after zero-terminal-SNR rescaling) the last interval interpolates
ᾱ linearly instead, which keeps ᾱ(t) continuous and monotone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Schedule", "make_schedule", "SCHEDULES", "rescale_zero_terminal_snr"]

_F64 = torch.float64


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete noise schedule: ``betas`` (float64, length T) and the quantities derived from it.

    - ``alphas`` = 1 − β_t, ``alphas_cumprod`` ᾱ_t = Π_{s≤t} α_s (Ho et al. 2020, eq. 4);
    - ``sigmas`` σ_t = √((1 − ᾱ_t)/ᾱ_t), the noise level of the variance-exploding view x/√ᾱ (Karras et al. 2022);
    - ``log_snr`` λ_t = log(ᾱ_t/(1 − ᾱ_t)) = −2 log σ_t (Kingma et al. 2021).
    """

    name: str
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=_F64).clone()
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D sequence of at least 2 values, got shape {tuple(betas.shape)}")
        if not (torch.all(betas > 0) and torch.all(betas <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, 0))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """ᾱ_{t−1} for t = 0 … T−1, with ᾱ_{−1} = 1 (the data): the other end of each posterior step."""
        return torch.cat([torch.ones(1, dtype=_F64), self.alphas_cumprod[:-1]])

    @property
    def sigmas(self) -> torch.Tensor:
        a = self.alphas_cumprod
        return ((1.0 - a) / a).sqrt()

    @property
    def log_snr(self) -> torch.Tensor:
        a = self.alphas_cumprod
        return torch.log(a) - torch.log1p(-a)

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    # -- continuous extension -------------------------------------------------------------------------------------
    def alpha_bar_at(self, t: torch.Tensor | float) -> torch.Tensor:
        """ᾱ(t) for real t ∈ [0, T−1]: λ interpolated linearly between integer steps (module docstring)."""
        t = torch.as_tensor(t, dtype=_F64)
        T = self.num_timesteps
        if torch.any(t < 0) or torch.any(t > T - 1):
            raise ValueError(f"t must lie in [0, {T - 1}], got range [{t.min().item()}, {t.max().item()}]")
        lo = t.floor().clamp(max=T - 2).long()
        w = t - lo
        lam, abar = self.log_snr, self.alphas_cumprod
        lam_t = torch.lerp(lam[lo], lam[lo + 1], w)
        abar_lin = torch.lerp(abar[lo], abar[lo + 1], w)
        finite = torch.isfinite(lam[lo]) & torch.isfinite(lam[lo + 1])
        out = torch.where(finite, torch.sigmoid(lam_t), abar_lin)
        # at integer t the result is the tabulated value itself, not its round trip through λ
        return torch.where(w == 0, abar[lo], torch.where(w == 1, abar[lo + 1], out))

    def t_from_log_snr(self, lam: torch.Tensor | float) -> torch.Tensor:
        """Inverse of λ(t) under the same interpolation; λ must lie within [λ_{T−1}, λ_0] and be finite."""
        lam = torch.as_tensor(lam, dtype=_F64)
        table = self.log_snr
        finite = table[torch.isfinite(table)]
        lo_lam, hi_lam = finite[-1].item(), finite[0].item()
        if torch.any(~torch.isfinite(lam)) or torch.any(lam < lo_lam - 1e-12) or torch.any(lam > hi_lam + 1e-12):
            raise ValueError(f"log-SNR must lie in [{lo_lam:.6g}, {hi_lam:.6g}]")
        neg = -finite  # increasing in t
        idx = torch.searchsorted(neg, -lam).clamp(1, len(neg) - 1)
        a, b = neg[idx - 1], neg[idx]
        w = ((-lam) - a) / (b - a)
        return (idx - 1).to(_F64) + w.clamp(0, 1)

    def t_from_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Inverse of σ(t): t such that σ(t) = sigma, under the λ interpolation."""
        sigma = torch.as_tensor(sigma, dtype=_F64)
        return self.t_from_log_snr(-2.0 * torch.log(sigma))

    def __repr__(self) -> str:
        a = self.alphas_cumprod
        return f"Schedule({self.name!r}, T={self.num_timesteps}, ᾱ_0={a[0].item():.6g}, ᾱ_T-1={a[-1].item():.6g})"


# -- schedule definitions -----------------------------------------------------------------------------------------
def _linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020: β linear from 1e-4 to 0.02 at T = 1000; for other T both ends are scaled by 1000/T so the
    total noise Σβ stays the same (Nichol & Dhariwal 2021, improved-diffusion ``get_named_beta_schedule``)."""
    scale = 1000.0 / T
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=_F64)


def _scaled_linear(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Latent/Stable Diffusion: β = (linspace(√β_start, √β_end, T))² (diffusers ``scaled_linear``)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=_F64) ** 2


def _quadratic(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDIM repository ``quad``: β = (linspace(√β_start, √β_end, T))², ends scaled by 1000/T like ``linear``."""
    scale = 1000.0 / T
    return torch.linspace((scale * beta_start) ** 0.5, (scale * beta_end) ** 0.5, T, dtype=_F64) ** 2


def _sigmoid(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDIM repository / GeoDiff ``sigmoid``: β = sigmoid(linspace(−6, 6, T)) (β_end − β_start) + β_start."""
    scale = 1000.0 / T
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=_F64)) * scale * (beta_end - beta_start) + scale * beta_start


def _cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(τ) = f(τ)/f(0), f(τ) = cos²((τ/T + s)/(1 + s) · π/2), and
    β_t = min(1 − ᾱ(t+1)/ᾱ(t), max_beta) for t = 0 … T−1 (so ᾱ_t = f(t+1)/f(0) wherever no clipping occurs)."""
    tau = torch.arange(T + 1, dtype=_F64)
    f = torch.cos((tau / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": _linear,
    "scaled_linear": _scaled_linear,
    "cosine": _cosine,
    "quadratic": _quadratic,
    "sigmoid": _sigmoid,
}


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1: shift and scale
    √ᾱ so that √ᾱ_{T−1} = 0 while √ᾱ_0 is unchanged, then recover β. The last β becomes exactly 1."""
    abar_sqrt = torch.cumprod(1.0 - betas.to(_F64), 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_schedule(name: str = "linear", num_timesteps: int = 1000, *, zero_terminal_snr: bool = False,
                  **options: float) -> Schedule:
    """Build a named schedule over ``num_timesteps`` training steps.

    ``name`` is one of ``SCHEDULES``; ``options`` go to the schedule (``beta_start``/``beta_end`` for the β-ramps,
    ``s``/``max_beta`` for ``cosine``); ``zero_terminal_snr`` applies :func:`rescale_zero_terminal_snr`.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid choices: {', '.join(SCHEDULES)}")
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer ≥ 2, got {num_timesteps!r}")
    try:
        betas = SCHEDULES[name](num_timesteps, **options)
    except TypeError as err:
        raise ValueError(f"bad options for schedule {name!r}: {err}") from None
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return Schedule(name, betas)
