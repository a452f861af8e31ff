"""The public sampling entry points: :func:`plan_sampling` validates a request without a model, :func:`sample` runs
it; :class:`StepInfo` is what a per-step ``callback`` sees."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core.schedules import Schedule
from ..core.spacings import make_timesteps, to_integer_timesteps
from .arith import Arith
from .denoiser import Denoiser, check_cond
from .levels import Levels, make_levels
from .registry import SAMPLERS, SamplerSpec, get_sampler


@dataclass
class SampleResult:
    """``sample``: the generated tensor; ``nfe``: model calls made (a batched call counts once — for a fixed-step
    sampler the NFE of every sample; for ``adaptive`` at least the most any sample received); ``nfe_per_sample``
    (LongTensor [B]): model evaluations each sample received, rejected attempts included (Σ = rows evaluated);
    ``accepted`` / ``rejected`` (LongTensor [B]): steps taken and attempts thrown away per sample (fixed-step
    samplers: every step accepted); ``timesteps``: the (float64) training-time indices visited, noisiest first —
    (K,), or (B, K) for per-sample timesteps; for ``adaptive``, which picks its own, the range (start, end)."""

    sample: torch.Tensor
    nfe: int
    timesteps: torch.Tensor
    nfe_per_sample: torch.Tensor
    accepted: torch.Tensor
    rejected: torch.Tensor


@dataclass(frozen=True)
class StepInfo:
    """What ``callback`` receives after step ``i`` (0-based) of ``steps``: the step went from level ``t`` to
    ``t_next`` (training-time indices, −1 for the data; floats, or (B,) float64 tensors for per-sample timesteps);
    ``x`` is the state after it, ``x0`` the last x̂_0 the model gave during it (Heun: its second call's, where there
    is one), ``nfe`` the model evaluations so far.

    ``adaptive`` (per-sample steps, unknown in advance): ``steps`` is None and ``i`` counts the rounds in which some
    sample took a step (accepted it, or finished); ``t``, ``t_next`` are (B,) float64 tensors, each sample's level
    before and after the round — equal for samples that rejected their try or had finished; ``x`` is the whole
    batch's state (finished samples: their result), ``x0`` each sample's latest x̂_0, ``nfe`` the model calls."""

    i: int
    steps: int | None
    t: float | torch.Tensor
    t_next: float | torch.Tensor
    x: torch.Tensor
    x0: torch.Tensor
    nfe: int


def plan_sampling(schedule: Schedule, sampler: str = "ddim", steps: int | None = None,
                  spacing: str | Sequence[float] | torch.Tensor = "trailing", *, denoise_final: bool = True,
                  **options) -> tuple[SamplerSpec, Levels, torch.Tensor]:
    """Validate a sampling request without a model and return (spec, levels, timesteps): what :func:`sample` would
    do. Runners call it to reject a bad sampler, spacing, steps or option before any training. A 2-D ``spacing``
    (B, K) gives per-sample levels (:func:`sample`). For an adaptive sampler ``steps`` must be None and the
    timesteps are its (start, end)."""
    spec = get_sampler(sampler)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise ValueError(f"sampler {sampler!r} has no option(s) {sorted(unknown)}; its options: "
                         f"{', '.join(spec.options) or 'none'}")
    # a pass over zero steps runs the sampler's own option checks (eta range, variance name) and nothing else
    spec.fn(None, None, Levels((), ()), **options)
    if spec.adaptive:
        if steps is not None:
            raise ValueError(f"sampler {sampler!r} chooses its own steps (its cost is set by rtol, atol, max_nfe); "
                             f"give steps=None, got steps={steps!r}")
        timesteps = _adaptive_range(spacing, schedule)
    elif _is_table(spacing):
        timesteps = _per_sample_timesteps(spacing, steps, schedule, spec.integer_steps)
    else:
        if steps is None and isinstance(spacing, str):
            steps = 50
        timesteps = make_timesteps(spacing, steps, schedule)
        if spec.integer_steps:
            timesteps = to_integer_timesteps(timesteps)
    lv = make_levels(schedule, timesteps, denoise_final, half_steps=spec.half_steps)
    if len(lv) < 2:
        raise ValueError("nothing to do: one timestep and denoise_final=False make no step")
    first = lv.abar[0]
    if spec.finite_sigma and (bool((first == 0).any()) if lv.per_sample else first == 0):
        ok = ", ".join(n for n, s in SAMPLERS.items() if not s.finite_sigma)
        raise ValueError(f"sampler {sampler!r} needs a finite noise level at the first timestep, but ᾱ = 0 there "
                         f"(zero terminal SNR); use one of: {ok}, or start below t = T−1")
    return spec, lv, timesteps


def sample(model: Callable, noise: torch.Tensor, *, schedule: Schedule, sampler: str = "ddim",
           steps: int | None = None, spacing: str | Sequence[float] | torch.Tensor = "trailing",
           prediction: str = "epsilon", cond: Mapping[str, torch.Tensor] | None = None,
           callback: Callable[[StepInfo], object] | None = None, clip_denoised: float | None = None,
           dynamic_threshold: float | None = None, threshold_max: float | None = None, denoise_final: bool = True,
           generator: torch.Generator | None = None, return_info: bool = False, progress: bool = False,
           guidance_scale: float | None = None, guidance_interval: Sequence[float] | None = None,
           fuse: bool = False, model_timesteps: Sequence[float] | torch.Tensor | None = None,
           **options) -> torch.Tensor | SampleResult:
    """Generate samples from ``noise`` (x at the first visited timestep, i.e. N(0, I) when that is T−1).

    ``sampler``: a name in ``SAMPLERS``; ``steps`` (default 50) timesteps chosen by ``spacing`` (a name in
    ``SPACINGS`` or an explicit decreasing list, then ``steps`` may be omitted); ``prediction``: what ``model(x, t)``
    returns (``epsilon``, ``x0`` or ``v``); ``denoise_final``: take the last step into the data (one model call
    that returns x̂_0); otherwise the sample is the state at the last visited timestep. Sampler-specific options
    (``eta`` for ddim, ``variance`` for ddpm) go in ``options``. Everything is validated before the first model call.
    ``sampler="adaptive"`` (:func:`~.adaptive.sample_adaptive`) picks its own steps: ``steps`` must be None, and
    ``spacing`` gives only the start (its first timestep: T−1 for a named spacing) and the end (its last, else t = 0)
    of the error-controlled integration in λ; options ``rtol``, ``atol``, ``h_init``, ``pcoeff``, ``icoeff``,
    ``dcoeff``, ``accept_safety``, ``order``, ``max_nfe``, ``control``, and the growth probe and re-solve
    ``resolve_lambda`` (off by default), ``resolve_growth``, ``resolve_factor``, ``probe_calls``, or the spike and
    re-solve ``resolve_spike`` (off by default), ``spike_back``.
    The state keeps ``noise``'s dtype (with shared timesteps; see below); schedule coefficients are float64.

    ``cond``: keyword tensors for the model, called as ``model(x, t, **cond)`` (e.g. ``{"y": labels}``), each with
    the batch as its first dimension; floating ones are cast to the model's dtype like x, integer ones passed as
    they are. ``callback(info)`` is called after every step with a :class:`StepInfo`; its return value is ignored.
    A class-conditional model (``num_classes`` > 0) needs ``cond={"y": labels}``; ``guidance_scale`` w applies
    classifier-free guidance (1: conditional, 0: unconditional), only at t_lo ≤ t ≤ t_hi with
    ``guidance_interval=(t_lo, t_hi)`` (:mod:`diffsteps.sampling.guidance`; NFE counts both branches).

    Per-sample timesteps: ``spacing`` may be a 2-D (B, K) float tensor, row b the strictly decreasing timesteps of
    sample b (rows may start at different t — sample b's ``noise`` is then x at its own first timestep, as in
    SDEdit-style partial noising; every row gets the data as its last level). The model then receives each sample's
    own t, and each sample follows exactly the path it would follow alone with its row as a shared spacing. The
    state is held in float64 in this case (the level coefficients are float64 tensors) and the result returned in
    ``noise``'s dtype. Integer-step samplers (ddpm, ddim) round each row as they round a shared spacing.

    Arithmetic (:mod:`diffsteps.sampling.arith`): ``fuse=True`` computes each update c x + Σ c_j y_j in one
    ``torch.compile``d loop instead of one operator per term (the same results to float rounding; the first run
    compiles, seconds; eager with a warning where no compiler works). Without a ``callback`` the sampler reuses the
    memory of states and x̂_0's it no longer needs, so ``model`` must not keep a reference to its input x beyond
    the call (clone it); its output is never written to.

    ``model_timesteps``: decoupled model-evaluation times (LD3, Tong et al. 2025: its code's ``timesteps2``; what
    ``optimize_schedule(..., method="refine", decoupled=True)`` learns) — one per model call, the n-th call made at
    model_timesteps[n] (the network gets that t and x̂_0, ε̂ are formed with its α, σ) while the solver's
    coefficients stay those of the step levels. For samplers that call the model once per level, in order
    (``dpmpp_2m``, ``dpmpp_3m``, ``unipc``), with shared timesteps.
    """
    spec, lv, timesteps = plan_sampling(schedule, sampler, steps, spacing, denoise_final=denoise_final, **options)
    if lv.per_sample and timesteps.shape[0] != noise.shape[0]:
        raise ValueError(f"per-sample timesteps have {timesteps.shape[0]} rows but the batch has {noise.shape[0]} "
                         "samples; give one row per sample")
    check_cond(cond, batch=noise.shape[0])  # the Denoiser checks cond against the model's signature
    if "generator" in inspect.signature(spec.fn).parameters:
        options["generator"] = generator
    denoise = Denoiser(model, prediction, cond=cond, clip_denoised=clip_denoised,
                       dynamic_threshold=dynamic_threshold, threshold_max=threshold_max,
                       guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                       num_timesteps=schedule.num_timesteps, arith=Arith(fuse, recycle=callback is None))
    if model_timesteps is not None:
        denoise = _ModelTimes(denoise, _model_levels(model_timesteps, schedule, sampler, lv))
    x = noise
    if lv.per_sample:
        lv, x = lv.like(noise), noise.to(torch.float64)
    if callback is not None:
        options["callback"] = (_adaptive_callback if spec.adaptive else _step_callback)(callback, lv, denoise)
    bar = _progress_bar(progress, sampler)
    B = noise.shape[0]
    with torch.no_grad():
        try:
            if spec.adaptive:
                x, nfe, accepted, rejected = spec.fn(denoise, x, lv, schedule=schedule, progress=bar, **options)
            else:
                x = spec.fn(denoise, x, lv, progress=bar, **options)
                nfe, accepted = (torch.full((B,), v, dtype=torch.long) for v in (denoise.nfe, len(lv) - 1))
                rejected = torch.zeros(B, dtype=torch.long)
        finally:
            denoise.arith.close()
        x = x.to(noise.dtype)
    visited = timesteps if denoise_final or spec.adaptive else timesteps[..., :-1]
    if return_info:
        return SampleResult(x, denoise.nfe, visited, nfe.cpu(), accepted.cpu(), rejected.cpu())
    return x


# samplers whose n-th model call is at the n-th level: decoupled model times map one to one
ONE_CALL_PER_LEVEL = ("dpmpp_2m", "dpmpp_3m", "unipc")


def _model_levels(model_timesteps, schedule: Schedule, sampler: str, lv: Levels) -> list[tuple[float, float, float]]:
    """(t, α, σ) for each model call from ``model_timesteps``, validated before any model call."""
    if sampler not in ONE_CALL_PER_LEVEL:
        raise ValueError(f"model_timesteps needs a sampler that calls the model once per level "
                         f"({', '.join(ONE_CALL_PER_LEVEL)}), got {sampler!r}")
    if lv.per_sample:
        raise ValueError("model_timesteps needs shared timesteps, not a per-sample table")
    mt = torch.as_tensor(model_timesteps, dtype=torch.float64)
    calls = len(lv) - 1 if lv.abar[-1] == 1.0 else len(lv)
    if mt.ndim != 1 or len(mt) != calls:
        raise ValueError(f"model_timesteps must list one time per model call ({calls}), got shape {tuple(mt.shape)}")
    if not bool(torch.isfinite(mt).all()) or mt.min() < 0 or mt.max() > schedule.num_timesteps - 1:
        raise ValueError(f"model_timesteps must lie in [0, {schedule.num_timesteps - 1}]")
    abar = schedule.alpha_bar_at(mt).tolist()
    return [(t, a ** 0.5, (1 - a) ** 0.5) for t, a in zip(mt.tolist(), abar)]


class _ModelTimes:
    """A Denoiser whose n-th call is made at the n-th decoupled level instead of the sampler's."""

    def __init__(self, inner: Denoiser, levels: list[tuple[float, float, float]]):
        self.inner, self.levels, self.calls = inner, levels, 0

    def __call__(self, x, t, alpha, sigma, want: str = "both", rows=None):
        t, alpha, sigma = self.levels[self.calls]
        self.calls += 1
        return self.inner(x, t, alpha, sigma, want, rows)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _adaptive_range(spacing, schedule: Schedule) -> torch.Tensor:
    """The (start, end) timesteps of an adaptive sampler: a named spacing's (T−1, 0), or the first and last entry of
    an explicit list (a (B, K) table: per row); a single entry ends at t = 0."""
    if _is_table(spacing):
        ts = _per_sample_timesteps(spacing, None, schedule, False)
        end = ts[:, -1] if ts.shape[1] > 1 else torch.zeros_like(ts[:, 0])
        return torch.stack([ts[:, 0], end], 1)
    if isinstance(spacing, str):
        make_timesteps(spacing, 1, schedule)  # a name in SPACINGS: it only says "start at T−1"
        return torch.tensor([schedule.num_timesteps - 1.0, 0.0], dtype=torch.float64)
    ts = make_timesteps(spacing, None, schedule)
    ends = [ts[0].item(), ts[-1].item() if len(ts) > 1 else 0.0]
    return torch.tensor(ends[:1] if ends[0] == ends[1] else ends, dtype=torch.float64)


def _is_table(spacing) -> bool:
    return not isinstance(spacing, str) and torch.as_tensor(spacing).ndim == 2


def _per_sample_timesteps(spacing, steps: int | None, schedule: Schedule, integer: bool) -> torch.Tensor:
    """Validate a (B, K) timestep table (each row finite, in [0, T−1], strictly decreasing) and, for integer-step
    samplers, round it row by row as :func:`~diffsteps.core.spacings.to_integer_timesteps` rounds one sequence."""
    ts = torch.as_tensor(spacing, dtype=torch.float64).clone()
    T = schedule.num_timesteps
    if ts.shape[0] == 0 or ts.shape[1] == 0:
        raise ValueError(f"per-sample timesteps must be a non-empty (B, K) table, got shape {tuple(ts.shape)}")
    if steps is not None and steps != ts.shape[1]:
        raise ValueError(f"steps={steps} disagrees with the {ts.shape[1]} timesteps per sample given")
    if not torch.all(torch.isfinite(ts)):
        raise ValueError("timesteps must be finite")
    if torch.any(ts < 0) or torch.any(ts > T - 1):
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got {ts.min().item():g} … {ts.max().item():g}")
    bad = ~(ts[:, 1:] < ts[:, :-1]).all(1)
    if bad.any():
        raise ValueError(f"timesteps must be strictly decreasing (noisiest first) in every row; row "
                         f"{bad.nonzero()[0].item()} is not")
    if integer:
        r = ts.round()
        # plain rounding is what to_integer_timesteps returns unless it merges neighbours; only those rows need it
        for b in (~(r[:, 1:] < r[:, :-1]).all(1)).nonzero().flatten().tolist():
            r[b] = to_integer_timesteps(ts[b])
        ts = r
    return ts


def _step_callback(callback: Callable[[StepInfo], object], lv: Levels, denoise: Denoiser) -> Callable:
    """The samplers' ``callback(i, x, x0)`` → the user's ``callback(StepInfo)``, levels and NFE filled in."""
    steps = len(lv) - 1
    t = [v.reshape(-1) for v in lv.t] if lv.per_sample else lv.t

    def step(i: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        callback(StepInfo(i, steps, t[i], t[i + 1], x, x0, denoise.nfe))

    return step


def _adaptive_callback(callback: Callable[[StepInfo], object], lv: Levels, denoise: Denoiser) -> Callable:
    """The adaptive sampler's ``callback(i, x, x0, t, t_next)`` (per-sample levels, steps unknown) → StepInfo."""

    def step(i: int, x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> None:
        callback(StepInfo(i, None, t, t_next, x, x0, denoise.nfe))

    return step


def _progress_bar(enabled: bool, name: str) -> Callable:
    if not enabled:
        return iter
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=f"sampling ({name})", leave=False)
