"""The public sampling entry points: :func:`plan_sampling` validates a request without a model, :func:`sample` runs it."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core.schedules import Schedule
from ..core.spacings import make_timesteps, to_integer_timesteps
from .denoiser import Denoiser
from .levels import Levels, make_levels
from .registry import SAMPLERS, SamplerSpec, get_sampler


@dataclass
class SampleResult:
    """``sample``: the generated tensor; ``nfe``: model evaluations spent; ``timesteps``: the (float64) training-time
    indices visited, noisiest first."""

    sample: torch.Tensor
    nfe: int
    timesteps: torch.Tensor



def plan_sampling(schedule: Schedule, sampler: str = "ddim", steps: int | None = None,
                  spacing: str | Sequence[float] = "trailing", *, denoise_final: bool = True,
                  **options) -> tuple[SamplerSpec, Levels, torch.Tensor]:
    """Validate a sampling request without a model and return (spec, levels, timesteps): what :func:`sample` would
    do. Runners call it to reject a bad sampler, spacing, steps or option before any training."""
    spec = get_sampler(sampler)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise ValueError(f"sampler {sampler!r} has no option(s) {sorted(unknown)}; its options: "
                         f"{', '.join(spec.options) or 'none'}")
    # a pass over zero steps runs the sampler's own option checks (eta range, variance name) and nothing else
    spec.fn(None, None, Levels((), ()), **options)
    if steps is None and isinstance(spacing, str):
        steps = 50
    timesteps = make_timesteps(spacing, steps, schedule)
    if spec.integer_steps:
        timesteps = to_integer_timesteps(timesteps)
    lv = make_levels(schedule, timesteps, denoise_final)
    if len(lv) < 2:
        raise ValueError("nothing to do: one timestep and denoise_final=False make no step")
    if spec.finite_sigma and lv.abar[0] == 0:
        ok = ", ".join(n for n, s in SAMPLERS.items() if not s.finite_sigma)
        raise ValueError(f"sampler {sampler!r} needs a finite noise level at the first timestep, but ᾱ = 0 there "
                         f"(zero terminal SNR); use one of: {ok}, or start below t = T−1")
    return spec, lv, timesteps


def sample(model: Callable, noise: torch.Tensor, *, schedule: Schedule, sampler: str = "ddim",
           steps: int | None = None, spacing: str | Sequence[float] = "trailing", prediction: str = "epsilon",
           clip_denoised: float | None = None, dynamic_threshold: float | None = None,
           threshold_max: float | None = None, denoise_final: bool = True,
           generator: torch.Generator | None = None, return_info: bool = False, progress: bool = False,
           **options) -> torch.Tensor | SampleResult:
    """Generate samples from ``noise`` (x at the first visited timestep, i.e. N(0, I) when that is T−1).

    ``sampler``: a name in ``SAMPLERS``; ``steps`` (default 50) timesteps chosen by ``spacing`` (a name in
    ``SPACINGS`` or an explicit decreasing list, then ``steps`` may be omitted); ``prediction``: what ``model(x, t)``
    returns (``epsilon``, ``x0`` or ``v``); ``denoise_final``: take the last step into the data (one model call
    that returns x̂_0); otherwise the sample is the state at the last visited timestep. Sampler-specific options
    (``eta`` for ddim, ``variance`` for ddpm) go in ``options``. Everything is validated before the first model call.
    The state keeps ``noise``'s dtype; schedule coefficients are float64.
    """
    spec, lv, timesteps = plan_sampling(schedule, sampler, steps, spacing, denoise_final=denoise_final, **options)
    if "generator" in inspect.signature(spec.fn).parameters:
        options["generator"] = generator
    denoise = Denoiser(model, prediction, clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold,
                       threshold_max=threshold_max)
    bar = _progress_bar(progress, sampler)
    with torch.no_grad():
        x = spec.fn(denoise, noise, lv, progress=bar, **options)
    visited = timesteps if denoise_final else timesteps[:-1]
    if return_info:
        return SampleResult(x, denoise.nfe, visited)
    return x


def _progress_bar(enabled: bool, name: str) -> Callable:
    if not enabled:
        return iter
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=f"sampling ({name})", leave=False)
