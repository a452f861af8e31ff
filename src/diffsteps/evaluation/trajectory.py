"""The converged probability-flow ODE solution that trajectory errors are measured against."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..core.schedules import Schedule
from ..sampling.api import sample
from ..sampling.registry import SAMPLERS, get_sampler


def trajectory_reference(net: Callable, noise: Tensor, *, schedule: Schedule, prediction: str,
                         sampler: str = "heun", steps: int = 200, spacing: str = "logsnr",
                         **denoiser_options) -> tuple[Tensor, Tensor]:
    """The converged end point of the probability-flow ODE from ``noise``, and a check that it converged.

    The reference is ``sampler`` (default Heun, 2nd order; Karras et al. 2022, Alg. 1) with ``steps`` steps from
    t = T−1 to the data, ``spacing`` uniform in log-SNR by default (even error per step, so it converges with far
    fewer steps than uniform t). Every deterministic sampler that starts at T−1 (trailing, linspace, karras, logsnr
    spacings) solves the same ODE from the same point, so its N-step result converges to this one as N → ∞.
    Returns (reference, gap) where gap (B,) is the per-sample mean squared difference to the same solver at
    ``steps // 2``: for a p-th order solver the reference's own error is ≈ gap / (2^p − 1), so a gap far below the
    smallest trajectory error measured shows convergence.
    """
    if not get_sampler(sampler).is_deterministic():
        raise ValueError(f"the reference sampler must be deterministic; got {sampler!r}; choose one of: "
                         f"{', '.join(n for n, s in SAMPLERS.items() if s.is_deterministic())}")
    kw = dict(schedule=schedule, prediction=prediction, sampler=sampler, spacing=spacing, **denoiser_options)
    ref = sample(net, noise, steps=steps, **kw).double()
    half = sample(net, noise, steps=max(steps // 2, 1), **kw).double()
    return ref, (ref - half).pow(2).flatten(1).mean(1)
