"""The pieces every schedule optimiser shares: the candidate grid of levels, the converged teacher trajectory
through it, the budget (NFE) ↔ step-count map of a sampler, and trajectory errors. Sampler-generic: everything goes
through :func:`diffsteps.sample` with explicit timesteps, so a sampler added to the registry works unchanged."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core.schedules import Schedule
from ..core.spacings import to_integer_timesteps
from ..sampling.api import plan_sampling, sample
from ..sampling.registry import SAMPLERS, get_sampler

__all__ = [
    "GRIDS",
    "CountingModel",
    "Teacher",
    "candidate_timesteps",
    "nfe_for_steps",
    "rms_error",
    "steps_for_nfe",
    "teacher_solve",
]

_F64 = torch.float64
GRIDS = ("logsnr", "karras")


class CountingModel(torch.nn.Module):
    """``model`` with its calls and evaluated rows counted (the cost an optimiser reports)."""

    def __init__(self, model: Callable):
        super().__init__()
        self.inner, self.calls, self.rows = model, 0, 0

    def forward(self, x, t, **cond):
        self.calls += 1
        self.rows += x.shape[0]
        return self.inner(x, t, **cond)


def candidate_timesteps(schedule: Schedule, n: int, grid: str = "logsnr", *, integer: bool = False,
                        rho: float = 7.0) -> torch.Tensor:
    """``n`` candidate levels from t = T−1 to t = 0, decreasing, float64: uniform in log-SNR (``logsnr``) or
    Karras's polynomial in σ with ρ = 7 (``karras``, Karras et al. 2022, eq. 5). ``integer``: rounded to distinct
    integers (for samplers that visit only integer timesteps), so there may be fewer than ``n``."""
    if grid not in GRIDS:
        raise ValueError(f"unknown candidate grid {grid!r}; valid choices: {', '.join(GRIDS)}")
    if not isinstance(n, int) or n < 3:
        raise ValueError(f"the candidate grid needs at least 3 levels, got {n!r}")
    lam = schedule.log_snr
    if not torch.isfinite(lam[-1]):
        raise ValueError("step optimisation needs a finite noise level at t = T−1 (this schedule has zero terminal "
                         "SNR)")
    ramp = torch.linspace(0, 1, n, dtype=_F64)
    if grid == "logsnr":
        t = schedule.t_from_log_snr(lam[-1] + ramp * (lam[0] - lam[-1]))
    else:
        s = schedule.sigmas
        sig = (s[-1] ** (1 / rho) + ramp * (s[0] ** (1 / rho) - s[-1] ** (1 / rho))) ** rho
        t = schedule.t_from_sigma(sig)
    t = t.clamp(0, schedule.num_timesteps - 1)
    t[0], t[-1] = schedule.num_timesteps - 1, 0.0
    if integer:
        t = torch.unique(to_integer_timesteps(t)).flip(0)
    return t


@dataclass
class Teacher:
    """The teacher's trajectory: ``t`` (N,) the candidate timesteps, ``states`` (N + 1, B, …) the teacher's state at
    each of them and, last, at the data; ``x0`` (N, B, …) the model's x̂_0 at each teacher state; ``calls`` model
    calls spent; ``settings`` how it was solved."""

    t: torch.Tensor
    states: torch.Tensor
    x0: torch.Tensor
    calls: int
    settings: dict


def teacher_solve(model: Callable, noise: torch.Tensor, schedule: Schedule, t: torch.Tensor, *,
                  solver: str = "dpmpp_3m", substeps: int = 8, prediction: str = "epsilon") -> Teacher:
    """Solve from ``noise`` (x at t[0]) through every candidate level with ``solver`` taking ``substeps`` steps,
    uniform in log-SNR, between neighbouring candidates (GITS's "teacher" trajectory, Chen et al. 2024, §4.1), in
    float64. The data state is the model's x̂_0 at the last candidate, the endpoint every sampler shares."""
    if substeps < 1:
        raise ValueError(f"teacher substeps must be ≥ 1, got {substeps!r}")
    lam = schedule.alpha_bar_at(t).logit()
    frac = torch.arange(substeps, dtype=_F64) / substeps
    fine = torch.cat([lam[i] + frac * (lam[i + 1] - lam[i]) for i in range(len(t) - 1)] + [lam[-1:]])
    fine_t = schedule.t_from_log_snr(fine.clamp(lam[0], lam[-1]))
    fine_t[::substeps] = t  # the candidates exactly, not their round trip through λ
    fine_t = torch.cummin(fine_t, 0).values
    keep = torch.cat([torch.ones(1, dtype=torch.bool), fine_t[1:] < fine_t[:-1]])
    pos = torch.cumsum(keep.long(), 0) - 1
    at_candidate = pos[::substeps].tolist()
    fine_t = fine_t[keep]
    states = [noise.to(_F64)]
    wanted = set(at_candidate[1:])
    x0s: list[torch.Tensor] = []

    def grab(info):
        if info.i + 1 in wanted:
            states.append(info.x)

    counter = CountingModel(model)
    out = sample(counter, noise.to(_F64), schedule=schedule, sampler=solver, spacing=fine_t, prediction=prediction,
                 callback=grab, denoise_final=True)
    states.append(out)
    for i in range(len(t)):
        x0s.append(_x0(counter, states[i], schedule, float(t[i]), prediction))
    return Teacher(t.clone(), torch.stack(states), torch.stack(x0s), counter.calls,
                   {"solver": solver, "substeps": substeps, "candidates": len(t), "steps": len(fine_t)})


def model_dtype(model) -> torch.dtype | None:
    """The dtype a module's first floating parameter has (what the Denoiser casts x to); None for a plain callable."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return next((p.dtype for p in params if p.is_floating_point()), None)


def _x0(model, x, schedule, t, prediction):
    from ..core.parameterizations import to_x0_eps

    a = schedule.alpha_bar_at(torch.tensor(t, dtype=_F64)).item()
    dtype = model_dtype(model) or x.dtype
    with torch.no_grad():
        out = model(x.to(dtype), torch.full((x.shape[0],), t, dtype=torch.promote_types(dtype, torch.float32)))
        out = out.to(_F64)
    return to_x0_eps(out, x, math.sqrt(a), math.sqrt(1 - a), prediction)[0]


class _Zero(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


def nfe_for_steps(sampler: str, steps: int, schedule: Schedule, **options) -> int:
    """Model evaluations ``sampler`` spends on ``steps`` timesteps (plus the step into the data), read off a run
    on a zero model with one 1-D sample — so any registered sampler answers it, whatever its call pattern."""
    get_sampler(sampler)
    ts = torch.linspace(schedule.num_timesteps - 1, 0, steps, dtype=_F64) if steps > 1 else \
        torch.tensor([schedule.num_timesteps - 1.0], dtype=_F64)
    res = sample(_Zero(), torch.zeros(1, 1, dtype=_F64), schedule=schedule, sampler=sampler, spacing=ts,
                 return_info=True, generator=torch.Generator().manual_seed(0), **options)
    return res.nfe


def steps_for_nfe(sampler: str, nfe: int, schedule: Schedule, **options) -> int:
    """The number of timesteps K at which ``sampler`` spends exactly ``nfe`` model calls; an error naming the
    reachable budgets if there is none (Heun: 2K − 1, so even budgets are unreachable)."""
    if sampler not in SAMPLERS:
        get_sampler(sampler)
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    reach = {}
    for k in range(1, nfe + 1):
        n = nfe_for_steps(sampler, k, schedule, **options)
        reach[n] = k
        if n == nfe:
            return k
        if n > nfe:
            break
    raise ValueError(f"sampler {sampler!r} cannot spend exactly nfe={nfe} model calls; reachable budgets up to "
                     f"there: {', '.join(map(str, sorted(reach)))}")


def check_request(schedule: Schedule, sampler: str, nfe: int | Sequence[int], **options) -> dict[int, int]:
    """Validate a request before any model call: {nfe: steps} for every budget."""
    budgets = [nfe] if isinstance(nfe, int) else list(nfe)
    if not budgets:
        raise ValueError("nfe must be a positive integer or a non-empty list of them")
    plan_sampling(schedule, sampler, 2, "logsnr" if torch.isfinite(schedule.log_snr[-1]) else "trailing",
                  **options)
    return {n: steps_for_nfe(sampler, n, schedule, **options) for n in budgets}


def rms_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """√mean (a − b)² over samples and dimensions."""
    return (a.to(_F64) - b.to(_F64)).square().mean().sqrt().item()


def run_schedule(model, noise, schedule, sampler, timesteps, prediction="epsilon", **options) -> torch.Tensor:
    """The sampler's output on ``timesteps`` (explicit, float64) from ``noise``, in float64."""
    return sample(model, noise.to(_F64), schedule=schedule, sampler=sampler, spacing=timesteps,
                  prediction=prediction, generator=torch.Generator().manual_seed(0), **options)
