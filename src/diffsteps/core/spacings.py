"""Step spacings: which ``steps`` training timesteps (or noise levels) a sampler visits, from noisiest to cleanest.

Every spacing returns a strictly decreasing float64 tensor of real t ∈ [0, T−1]. Samplers that only know integer
timesteps (``ddpm``, ``ddim``) get them through :func:`to_integer_timesteps`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .schedules import Schedule

__all__ = ["SPACINGS", "make_timesteps", "to_integer_timesteps", "check_timesteps"]

_F64 = torch.float64


def _leading(T: int, n: int, schedule: Schedule) -> torch.Tensor:
    """diffusers ``leading`` (DDIM paper's uniform skip): t_i = i·⌊T/n⌋, i = n−1 … 0."""
    return torch.arange(n - 1, -1, -1, dtype=_F64) * (T // n)


def _trailing(T: int, n: int, schedule: Schedule) -> torch.Tensor:
    """diffusers ``trailing`` (Lin et al. 2024, Table 2): round(arange(T, 0, −T/n)) − 1, so it starts at T−1."""
    return torch.from_numpy(np.round(np.arange(T, 0, -T / n)) - 1).to(_F64)[:n]


def _linspace(T: int, n: int, schedule: Schedule) -> torch.Tensor:
    """diffusers ``linspace`` (DDIM/DDPM schedulers): round(linspace(0, T−1, n)) reversed."""
    return torch.from_numpy(np.linspace(0, T - 1, n).round()[::-1].copy()).to(_F64)


def _quadratic(T: int, n: int, schedule: Schedule) -> torch.Tensor:
    """Song et al. 2021 (DDIM, App. D.2) ``quad`` skip, stretched to the whole range: t_i = (T−1)(i/(n−1))²,
    denser near the data where the trajectory curves most."""
    if n == 1:
        return torch.tensor([T - 1.0], dtype=_F64)
    return (T - 1) * torch.linspace(1, 0, n, dtype=_F64) ** 2


def _karras(T: int, n: int, schedule: Schedule, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 (EDM), eq. 5: σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ with ρ = 7 and
    σ_max, σ_min the schedule's σ at t = T−1 and t = 0, mapped back to t through the continuous extension."""
    sig = schedule.sigmas
    smax, smin = sig[-1], sig[0]
    if not torch.isfinite(smax):
        raise ValueError("spacing 'karras' needs a finite σ at t = T−1; this schedule has zero terminal SNR")
    ramp = torch.linspace(0, 1, n, dtype=_F64) if n > 1 else torch.zeros(1, dtype=_F64)
    sigmas = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return _clip_ends(schedule.t_from_sigma(sigmas), T)


def _logsnr(T: int, n: int, schedule: Schedule) -> torch.Tensor:
    """Uniform in log-SNR λ between λ(T−1) and λ(0), the spacing DPM-Solver recommends (Lu et al. 2022, §3.4,
    ``time_uniform`` in λ = "logSNR")."""
    lam = schedule.log_snr
    if not torch.isfinite(lam[-1]):
        raise ValueError("spacing 'logsnr' needs a finite log-SNR at t = T−1; this schedule has zero terminal SNR")
    lams = torch.linspace(lam[-1].item(), lam[0].item(), n, dtype=_F64) if n > 1 else lam[-1:].clone()
    return _clip_ends(schedule.t_from_log_snr(lams), T)


def _clip_ends(t: torch.Tensor, T: int) -> torch.Tensor:
    # both spacings run from t = T−1 to t = 0 by definition; the inverse map only returns them to ~1e-12
    t = t.clamp(0, T - 1)
    t[0] = T - 1
    if len(t) > 1:
        t[-1] = 0
    return t


SPACINGS: dict[str, Callable[..., torch.Tensor]] = {
    "leading": _leading,
    "trailing": _trailing,
    "linspace": _linspace,
    "quadratic": _quadratic,
    "karras": _karras,
    "logsnr": _logsnr,
}


def check_timesteps(ts: torch.Tensor, T: int) -> torch.Tensor:
    """Validate an explicit timestep list: 1-D, finite, strictly decreasing, within [0, T−1]."""
    if ts.ndim != 1 or len(ts) == 0:
        raise ValueError("an explicit timestep list must be a non-empty 1-D sequence")
    if not torch.all(torch.isfinite(ts)):
        raise ValueError("timesteps must be finite")
    if torch.any(ts < 0) or torch.any(ts > T - 1):
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got {ts.min().item():g} … {ts.max().item():g}")
    if len(ts) > 1 and not torch.all(ts[1:] < ts[:-1]):
        raise ValueError("timesteps must be strictly decreasing (noisiest first)")
    return ts


def make_timesteps(spacing: str | Sequence[float] | torch.Tensor, steps: int | None, schedule: Schedule,
                   **options: float) -> torch.Tensor:
    """The timesteps a sampler visits: a named spacing from ``SPACINGS`` with ``steps`` entries, or an explicit list
    (then ``steps`` must be None or its length). Returns a strictly decreasing float64 tensor."""
    T = schedule.num_timesteps
    if not isinstance(spacing, str):
        ts = check_timesteps(torch.as_tensor(spacing, dtype=_F64).flatten().clone(), T)
        if steps is not None and steps != len(ts):
            raise ValueError(f"steps={steps} disagrees with the {len(ts)} explicit timesteps given")
        return ts
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid choices: {', '.join(SPACINGS)} or a list of timesteps")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > T:
        raise ValueError(f"steps={steps} exceeds the {T} training timesteps")
    return check_timesteps(SPACINGS[spacing](T, int(steps), schedule, **options), T)


def to_integer_timesteps(ts: torch.Tensor) -> torch.Tensor:
    """Round to integers, keeping the sequence strictly decreasing: where rounding merges neighbours (dense ends of
    ``quadratic``/``karras``), each later timestep is pushed one below its predecessor — and, at the clean end,
    earlier ones pushed up — so ``steps ≤ T`` always yields ``steps`` distinct integers in [0, T−1]."""
    asc = torch.round(ts).tolist()[::-1]  # increasing; a Python list: this runs on every sample() call
    n, T_max = len(asc), asc[-1]
    for i in range(n):  # from the clean end: t_i ≥ i so every entry fits above 0 ...
        asc[i] = max(asc[i], float(i) if i == 0 else asc[i - 1] + 1)
    if asc[-1] > T_max:  # ... and if that pushed past the top, slide the pushed block back down
        for i in range(n - 1, -1, -1):
            cap = T_max - (n - 1 - i)
            if asc[i] <= cap:
                break
            asc[i] = cap
    return torch.tensor(asc[::-1], dtype=ts.dtype, device=ts.device)
