"""Samplers as differentiable functions of their noise levels, for back-propagating a trajectory error into the
timesteps (LD3, Tong et al. 2025). :func:`diffsteps.sample` runs under ``no_grad`` on Python-float levels; these
re-implement the same updates on float64 tensor levels, parameterised by the log-SNR λ = log(ᾱ/(1 − ᾱ)), so
ᾱ = sigmoid(λ) and the model time t = t(λ) (the schedule's inverse map) carry gradients.

The model's own dependence on t enters through a forward difference in t, (f(x, t + δ) − f(x, t))/δ, attached to
the exact forward value — networks that detach t (as :class:`~diffsteps.ExactEpsilon` does) still get the term.
It costs one more model call per step when gradients are wanted.

The multistep solvers with per-step coefficient tables (``dpmpp_3m``, ``unipc``) are not re-implemented: their
registry functions already take per-sample levels as float64 tensors (:mod:`diffsteps.sampling.levels`), so they
run unchanged on 0-D tensor levels that carry gradients, with a denoiser that attaches the t-derivative — the same
arithmetic as :func:`diffsteps.sample`, option for option (``variant``, ``order``, ``final``, …)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from ..core.parameterizations import to_x0_eps
from ..core.schedules import Schedule
from ..sampling.levels import Levels
from ..sampling.arith import Arith
from ..sampling.registry import get_sampler

__all__ = ["DIFFERENTIABLE", "check_differentiable_options", "run_differentiable"]

_F64 = torch.float64


def _denoiser(model: Callable, schedule: Schedule, prediction: str, fd: float):
    """``call(x, lam)`` → (x̂_0, ε̂) at log-SNR ``lam``, and ``call.at(x, t, alpha, sigma)`` at a level given as
    (t, √ᾱ, √(1 − ᾱ)) tensors — the form the registry's samplers call their denoiser in."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    dtype = next((p.dtype for p in params if p.is_floating_point()), _F64)  # as the Denoiser casts x

    def at(x: torch.Tensor, t: torch.Tensor, alpha, sigma):
        tt = t.detach().expand(x.shape[0]).to(torch.promote_types(dtype, torch.float32))
        out = model(x.to(dtype), tt).to(_F64)
        if t.requires_grad:
            with torch.no_grad():
                up = tt + fd if float(tt[0]) + fd <= schedule.num_timesteps - 1 else tt - fd
                slope = (model(x.detach().to(dtype), up).to(_F64) - out.detach()) / (up[0] - tt[0]).item()
            out = out + (t - t.detach()) * slope
        return to_x0_eps(out, x, alpha, sigma, prediction)

    def call(x: torch.Tensor, lam: torch.Tensor):
        abar = torch.sigmoid(lam)
        return at(x, schedule.t_from_log_snr(lam.clamp(*_lam_range(schedule))), abar.sqrt(), (1 - abar).sqrt())

    call.at = at
    return call


def _decoupled(denoise, model_lams: torch.Tensor):
    calls = iter(range(len(model_lams)))

    def call(x, lam):
        return denoise(x, model_lams[next(calls)])

    def at(x, t, alpha, sigma):
        return call(x, None)

    call.at = at
    return call


def _lam_range(schedule: Schedule) -> tuple[float, float]:
    lam = schedule.log_snr
    return lam[-1].item(), lam[0].item()


def _ddim(denoise, x, lams):
    """DDIM with η = 0 (= Euler in σ̃): x_n = α_n x̂_0 + σ_n ε̂; the last step returns x̂_0."""
    for i in range(len(lams)):
        x0, eps = denoise(x, lams[i])
        if i == len(lams) - 1:
            return x0
        a = torch.sigmoid(lams[i + 1])
        x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return x


def _dpmpp_2m(denoise, x, lams):
    """DPM-Solver++(2M) as :func:`~diffsteps.sampling.samplers.sample_dpmpp_2m`: h in the half log-SNR, first
    order on the first step and into the data."""
    half = 0.5 * lams
    prev, h_prev = None, None
    for i in range(len(lams)):
        x0, _ = denoise(x, lams[i])
        if i == len(lams) - 1:
            return x0
        a_s, a_n = torch.sigmoid(lams[i]), torch.sigmoid(lams[i + 1])
        h = half[i + 1] - half[i]
        d = x0
        if prev is not None:
            r = h_prev / h
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * prev
        x = ((1 - a_n) / (1 - a_s)).sqrt() * x - a_n.sqrt() * torch.expm1(-h) * d
        prev, h_prev = x0, h
    return x


def _heun(denoise, x, lams):
    """Heun in σ̃ = e^{−λ/2} as :func:`~diffsteps.sampling.samplers.sample_heun`; Euler into the data."""
    for i in range(len(lams)):
        x0, eps = denoise(x, lams[i])
        if i == len(lams) - 1:
            return x0
        a_s, a_n = torch.sigmoid(lams[i]), torch.sigmoid(lams[i + 1])
        sv_s, sv_n = torch.exp(-0.5 * lams[i]), torch.exp(-0.5 * lams[i + 1])
        xs = x / a_s.sqrt()
        x_next = xs + (sv_n - sv_s) * eps
        _, eps2 = denoise(a_n.sqrt() * x_next, lams[i + 1])
        x = a_n.sqrt() * (xs + (sv_n - sv_s) * 0.5 * (eps + eps2))
    return x


class _RegistryDenoiser:
    """The registry samplers' denoiser contract on tensor levels: called at a level (t, √ᾱ, √(1 − ᾱ)), with an
    :class:`~diffsteps.sampling.arith.Arith` that makes new tensors (no buffer reuse, which autograd cannot follow)."""

    def __init__(self, denoise):
        self.denoise, self.arith = denoise, Arith()

    def __call__(self, x, t, alpha, sigma, want="both", rows=None):
        # the Denoiser's contract: the pair, or the one asked for with the other None (never "linear": this Arith
        # does not fuse, so the samplers do not ask for it)
        x0, eps = self.denoise.at(x, t, alpha, sigma)
        return (None if want == "eps" else x0), (None if want == "x0" else eps)


def _registry(name: str, **options):
    """The registry's ``name`` sampler on tensor levels: λ → (t(λ), ᾱ = sigmoid(λ)) per visited level, then the
    data (t = −1, ᾱ = 1) — what :func:`~diffsteps.sampling.levels.make_levels` builds from t(λ), as 0-D tensors."""
    fn = get_sampler(name).fn

    def run(denoise, x, lams, schedule):
        one = torch.ones((), dtype=_F64)
        t = schedule.t_from_log_snr(lams.clamp(*_lam_range(schedule)))
        lv = Levels(tuple(t.unbind()) + (-one,), tuple(torch.sigmoid(lams).unbind()) + (one,))
        return fn(_RegistryDenoiser(denoise), x, lv, **options)

    run.needs_schedule = True
    return run


DIFFERENTIABLE: dict[str, Callable] = {"ddim": _ddim, "euler": _ddim, "dpmpp_2m": _dpmpp_2m, "heun": _heun,
                                       "dpmpp_3m": _registry("dpmpp_3m"), "unipc": _registry("unipc")}


def check_differentiable_options(sampler: str, options: dict) -> None:
    """Raises unless ``sampler`` has a differentiable form that computes what ``diffsteps.sample`` does with these
    sampler ``options``. The registry-backed ones (dpmpp_3m, unipc) run the sampler itself, so take any option it
    takes; the hand-written ones (ddim, euler, dpmpp_2m, heun) are the sampler at its defaults, so an option is
    accepted only at its default value (a config's explicit ``eta: 0.0`` for ddim)."""
    if sampler not in DIFFERENTIABLE:
        raise ValueError(f"method 'refine' supports samplers: {', '.join(DIFFERENTIABLE)}; got {sampler!r} "
                         "(use method='dp', which works for every deterministic sampler)")
    if getattr(DIFFERENTIABLE[sampler], "needs_schedule", False) or not options:
        return
    defaults = _option_defaults(sampler)
    bad = {k: v for k, v in options.items() if k not in defaults or defaults[k] != v}
    if bad:
        raise ValueError(f"the differentiable {sampler!r} is the sampler at its defaults "
                         f"({', '.join(f'{k}={v!r}' for k, v in defaults.items()) or 'it has no options'}); got "
                         f"{', '.join(f'{k}={v!r}' for k, v in bad.items())} — use method='dp', which runs the "
                         "sampler itself with any options")


@functools.cache
def _option_defaults(sampler: str) -> dict:
    """The sampler function's options and their defaults (read once per sampler: refine checks on every run)."""
    params = inspect.signature(get_sampler(sampler).fn).parameters.values()
    return {p.name: p.default for p in params
            if p.kind is p.KEYWORD_ONLY and p.name not in ("progress", "callback", "generator")}


def run_differentiable(model: Callable, noise: torch.Tensor, schedule: Schedule, sampler: str, lams: torch.Tensor, *,
                       prediction: str = "epsilon", fd: float = 1e-3, model_lams: torch.Tensor | None = None,
                       **options) -> torch.Tensor:
    """The output of ``sampler`` from ``noise`` (x at λ = lams[0]) through the visited log-SNRs ``lams`` (K,
    increasing; float64 tensor, may require grad) and then into the data — what ``diffsteps.sample(...,
    spacing=t(lams), **options)`` returns, differentiable w.r.t. ``lams``. ``fd``: the time step of the t-derivative;
    ``options``: sampler options (:func:`check_differentiable_options`). ``model_lams`` (K,): decoupled
    model-evaluation levels (LD3's ``timesteps2``) — the n-th model call is made at model_lams[n] (its t, α, σ)
    instead of the level the solver stands on; for samplers that call the model once per level, in order."""
    check_differentiable_options(sampler, options)
    fn = DIFFERENTIABLE[sampler]
    denoise = _denoiser(model, schedule, prediction, fd)
    if model_lams is not None:
        denoise = _decoupled(denoise, model_lams.to(_F64))
    if getattr(fn, "needs_schedule", False):
        fn = _registry(sampler, **options) if options else fn
        return fn(denoise, noise.to(_F64), lams.to(_F64), schedule)
    return fn(denoise, noise.to(_F64), lams.to(_F64))
