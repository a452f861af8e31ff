"""GITS's step-cost matrix (Chen et al. 2024, §4.2): the error of one sampler step between two teacher levels."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.schedules import Schedule
from ..sampling.api import sample
from .teacher import Teacher

__all__ = ["HISTORY_COSTS", "dpmpp_2m_history_costs", "step_costs"]

_F64 = torch.float64


def step_costs(model: Callable, schedule: Schedule, sampler: str, teacher: Teacher, *, prediction: str = "epsilon",
               **options) -> torch.Tensor:
    """c[i, j] = mean over noises of ‖x̂_j − x_j‖/√D, where x̂_j is one ``sampler`` step from the teacher's state
    x_i at level i to level j (node N is the data), for every pair i < j of the N candidate levels (N + 1 nodes).

    One step is run as the sampler itself runs it, through :func:`diffsteps.sample` with the two levels as per-sample
    timesteps (one call per i, every j in the batch), so any registered sampler works. For a multistep solver
    (dpmpp_2m/3m, and others with history) this is its first, history-free step — the DP then optimises the path
    for the solver's warm-up order, an approximation that ``method="refine"`` corrects with the full solver."""
    n = len(teacher.t)
    states = teacher.states
    B = states.shape[1]
    D = states[0, 0].numel()
    cost = torch.full((n + 1, n + 1), float("inf"), dtype=_F64)
    for i in range(n):
        x = states[i]
        targets = list(range(i + 1, n))
        if targets:
            rows = torch.tensor([[teacher.t[i].item(), teacher.t[j].item()] for j in targets], dtype=_F64)
            table = rows.repeat_interleave(B, 0)
            xs = x.repeat((len(targets),) + (1,) * (x.ndim - 1))
            out = sample(model, xs, schedule=schedule, sampler=sampler, spacing=table, prediction=prediction,
                         denoise_final=False, generator=torch.Generator().manual_seed(i), **options)
            ref = states[i + 1:n].reshape(len(targets) * B, -1)
            err = (out.reshape(len(targets) * B, -1).to(_F64) - ref).norm(dim=1) / D**0.5
            cost[i, i + 1:n] = err.reshape(len(targets), B).mean(1)
        # the step into the data: the sampler's own last step from level i
        out = sample(model, x, schedule=schedule, sampler=sampler, spacing=teacher.t[i:i + 1], prediction=prediction,
                     denoise_final=True, generator=torch.Generator().manual_seed(i), **options)
        cost[i, n] = ((out.reshape(B, -1).to(_F64) - states[n].reshape(B, -1)).norm(dim=1) / D**0.5).mean()
    return cost


def dpmpp_2m_history_costs(schedule: Schedule, teacher: Teacher) -> torch.Tensor:
    """c[k, i, j]: the error of DPM-Solver++(2M)'s step i → j from the teacher's state x_i when the previous path
    node was k, its history the teacher's own x̂_0 at k (the approximation: on the sampler's real path the history
    is x̂_0 at the sampler's state, not the teacher's). The step needs only x̂_0 at teacher states, so this costs no
    model calls beyond the teacher's. k = −1 is not stored: the first step (from node 0) has no history and is the
    first-order step of :func:`step_costs`; steps into the data are first order too. Shape (N + 1,) * 3, ∞ off the
    ordered triples k < i < j."""
    n = len(teacher.t)
    a = schedule.alpha_bar_at(teacher.t)
    al, sg = a.sqrt(), (1 - a).sqrt()
    lam = 0.5 * (a.log() - torch.log1p(-a))
    B = teacher.states.shape[1]
    D = teacher.states[0, 0].numel()
    x = teacher.states.reshape(n + 1, B, -1)
    x0 = teacher.x0.reshape(n, B, -1)
    cost = torch.full((n + 1, n + 1, n + 1), float("inf"), dtype=_F64)
    for i in range(1, n):
        j = torch.arange(i + 1, n)
        h = lam[j] - lam[i]  # (J,)
        base = (sg[j] / sg[i])[:, None, None] * x[i][None] - (al[j] * torch.expm1(-h))[:, None, None] * x0[i][None]
        for k in range(i):
            r = (lam[i] - lam[k]) / h  # (J,)
            corr = (al[j] * torch.expm1(-h) * 0.5 / r)[:, None, None] * (x0[i] - x0[k])[None]
            err = (base - corr - x[j]).norm(dim=2) / D**0.5  # (J, B)
            cost[k, i, i + 1:n] = err.mean(1)
            cost[k, i, n] = ((x0[i] - x[n]).norm(dim=1) / D**0.5).mean()
    return cost


# samplers whose step cost also depends on the previous path node, and how to compute it
HISTORY_COSTS = {"dpmpp_2m": dpmpp_2m_history_costs}
