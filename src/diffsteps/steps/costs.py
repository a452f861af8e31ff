"""GITS's step-cost matrix (Chen et al. 2024, §4.2): the error of one sampler step between two teacher levels."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.schedules import Schedule
from ..sampling.api import sample
from .teacher import Teacher

__all__ = ["step_costs"]

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
