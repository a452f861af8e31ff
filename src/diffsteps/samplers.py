"""Samplers: each a short function that walks the state x from the noisiest visited level to the data.

The state is the variance-preserving x_t the network sees (x_t = α x_0 + σ ε, α = √ᾱ, σ = √(1 − ᾱ)); the noise
levels are precomputed once, in float64, as a :class:`Levels` table whose last entry is the data (ᾱ = 1) when the
sampler takes the final denoising step. Every sampler calls the network through one :class:`Denoiser`, which
converts the network's prediction to (x̂_0, ε̂), applies clipping or dynamic thresholding and counts evaluations.

Samplers written in the variance-exploding view x̃ = x/α, σ̃ = σ/α (Karras et al. 2022) — ``euler``, ``heun`` — map
to and from it per step; there a step is the textbook ODE step dx̃/dσ̃ = ε̂.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .parameterizations import check_prediction, to_x0_eps
from .process import posterior_coefficients
from .schedules import Schedule
from .spacings import make_timesteps, to_integer_timesteps

__all__ = ["sample", "plan_sampling", "SampleResult", "SAMPLERS", "Denoiser", "Levels", "make_levels"]


# -- the shared model wrapper ---------------------------------------------------------------------------------------
class Denoiser:
    """Calls ``model(x, t)`` and returns (x̂_0, ε̂) in the state's dtype.

    The input is cast to the model's own dtype (its first floating parameter's; the state's dtype for a
    parameter-free callable), so a float32 network can be driven by a float64 sampler; ``t`` is passed as a 1-D
    tensor (one entry per sample) in that dtype, but at least float32. ``clip_denoised=c`` clamps x̂_0 to [−c, c]; ``dynamic_threshold=p`` applies
    Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): s = max(quantile_p |x̂_0|, 1) per sample, optionally
    capped at ``threshold_max``, x̂_0 ← clamp(x̂_0, −s, s)/s. After either, ε̂ is re-derived from the new x̂_0 so the
    pair stays consistent with x_t (as diffusers does).
    """

    def __init__(self, model: Callable, prediction: str = "epsilon", *, clip_denoised: float | None = None,
                 dynamic_threshold: float | None = None, threshold_max: float | None = None):
        self.model = model
        self.prediction = check_prediction(prediction)
        if clip_denoised is not None and not clip_denoised > 0:
            raise ValueError(f"clip_denoised must be positive or None, got {clip_denoised!r}")
        if dynamic_threshold is not None and not 0 < dynamic_threshold <= 1:
            raise ValueError(f"dynamic_threshold is a quantile in (0, 1], got {dynamic_threshold!r}")
        self.clip_denoised, self.dynamic_threshold, self.threshold_max = clip_denoised, dynamic_threshold, threshold_max
        params = model.parameters() if isinstance(model, torch.nn.Module) else ()
        self.model_dtype = next((p.dtype for p in params if p.is_floating_point()), None)
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: float, alpha: float, sigma: float):
        dtype = self.model_dtype or x.dtype
        # t in at least float32: a bf16 t would round timesteps near 1000 to multiples of 4
        tt = torch.full((x.shape[0],), t, dtype=torch.promote_types(dtype, torch.float32), device=x.device)
        out = self.model(x.to(dtype), tt).to(x.dtype)
        self.nfe += 1
        x0, eps = to_x0_eps(out, x, alpha, sigma, self.prediction)
        if self.clip_denoised is None and self.dynamic_threshold is None:
            return x0, eps
        if self.dynamic_threshold is not None:
            flat = x0.reshape(len(x0), -1).abs()
            s = torch.quantile(flat.float(), self.dynamic_threshold, dim=1).to(x0.dtype).clamp(min=1.0)
            if self.threshold_max is not None:
                s = s.clamp(max=self.threshold_max)
            s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
            x0 = torch.maximum(torch.minimum(x0, s), -s) / s
        if self.clip_denoised is not None:
            x0 = x0.clamp(-self.clip_denoised, self.clip_denoised)
        if sigma > 0:
            eps = (x - alpha * x0) / sigma
        return x0, eps


@dataclass(frozen=True)
class Levels:
    """The noise levels a sampler walks through, in float64: ``t`` (training-time index; −1 for the data),
    ``abar`` ᾱ, ``alpha`` √ᾱ, ``sigma`` √(1 − ᾱ). Steps go from level i to i + 1; the model is evaluated at every
    level but the last."""

    t: tuple[float, ...]
    abar: tuple[float, ...]

    @property
    def alpha(self) -> tuple[float, ...]:
        return tuple(math.sqrt(a) for a in self.abar)

    @property
    def sigma(self) -> tuple[float, ...]:
        return tuple(math.sqrt(1.0 - a) for a in self.abar)

    @property
    def lam(self) -> tuple[float, ...]:
        """DPM-Solver's λ = log(α/σ) (half the log-SNR); +∞ at the data, −∞ at ᾱ = 0."""
        return tuple(0.5 * (math.log(a) - math.log1p(-a)) if 0 < a < 1 else (math.inf if a == 1 else -math.inf)
                     for a in self.abar)

    @property
    def sigma_ve(self) -> tuple[float, ...]:
        """σ̃ = σ/α, the variance-exploding noise level (0 at the data)."""
        return tuple(s / a for s, a in zip(self.sigma, self.alpha))

    def __len__(self) -> int:
        return len(self.t)


def make_levels(schedule: Schedule, timesteps: torch.Tensor, denoise_final: bool = True) -> Levels:
    """Levels for the given timesteps, plus the data (ᾱ = 1) as the last level when ``denoise_final``."""
    abar = schedule.alpha_bar_at(timesteps).tolist()
    t = timesteps.tolist()
    if denoise_final:
        t, abar = t + [-1.0], abar + [1.0]
    return Levels(tuple(t), tuple(abar))


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


# -- samplers -------------------------------------------------------------------------------------------------------
def sample_ddim(denoise: Denoiser, x: torch.Tensor, lv: Levels, *, eta: float = 0.0,
                generator: torch.Generator | None = None, progress: Callable = iter) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_n = √ᾱ_n x̂_0 + √(1 − ᾱ_n − c²) ε̂ + c z, with
    c = η √((1 − ᾱ_n)/(1 − ᾱ_s)) √(1 − ᾱ_s/ᾱ_n) (eq. 16). η = 0 is deterministic; η = 1 is ancestral sampling with
    the posterior variance."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"ddim needs eta in [0, 1], got {eta!r}")
    a, al, sg = lv.abar, lv.alpha, lv.sigma
    for i in progress(range(len(lv) - 1)):
        x0, eps = denoise(x, lv.t[i], al[i], sg[i])
        c = eta * math.sqrt((1 - a[i + 1]) / (1 - a[i]) * (1 - a[i] / a[i + 1]))
        x = al[i + 1] * x0 + math.sqrt(max(1 - a[i + 1] - c * c, 0.0)) * eps
        if c > 0:
            x = x + c * _randn(x, generator)
    return x


def sample_ddpm(denoise: Denoiser, x: torch.Tensor, lv: Levels, *, variance: str = "small",
                generator: torch.Generator | None = None, progress: Callable = iter) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) from the posterior q(x_n | x_s, x̂_0): mean c_0 x̂_0 + c_s x_s
    (:func:`~diffsteps.process.posterior_coefficients`), variance ``small`` = β̃ (posterior) or ``large`` =
    β_{s|n} = 1 − ᾱ_s/ᾱ_n (the two bounds of Ho et al. §3.2). No noise is added on the step into the data."""
    if variance not in ("small", "large"):
        raise ValueError(f"ddpm variance must be one of: small, large; got {variance!r}")
    a, al, sg = lv.abar, lv.alpha, lv.sigma
    for i in progress(range(len(lv) - 1)):
        x0, _ = denoise(x, lv.t[i], al[i], sg[i])
        c0, cs, var, beta = posterior_coefficients(a[i], a[i + 1])
        x = c0 * x0 + cs * x
        if a[i + 1] < 1:
            x = x + math.sqrt(var if variance == "small" else beta) * _randn(x, generator)
    return x


def sample_euler(denoise: Denoiser, x: torch.Tensor, lv: Levels, *,
                 progress: Callable = iter) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx̃/dσ̃ = ε̂(x̃, σ̃) (Karras et al. 2022, eq. 4 with s = 1,
    σ(t) = t): x̃_n = x̃_s + (σ̃_n − σ̃_s) ε̂. Algebraically the same update as DDIM with η = 0."""
    al, sg, sv = lv.alpha, lv.sigma, lv.sigma_ve
    for i in progress(range(len(lv) - 1)):
        _, eps = denoise(x, lv.t[i], al[i], sg[i])
        x = al[i + 1] * (x / al[i] + (sv[i + 1] - sv[i]) * eps)
    return x


def sample_heun(denoise: Denoiser, x: torch.Tensor, lv: Levels, *,
                progress: Callable = iter) -> torch.Tensor:
    """Heun's second-order method on the same ODE (Karras et al. 2022, Alg. 1, no churn): an Euler step to σ̃_n,
    then the trapezoidal correction x̃_n = x̃_s + (σ̃_n − σ̃_s)(ε̂_s + ε̂_n)/2; the step into σ̃ = 0 stays Euler."""
    al, sg, sv = lv.alpha, lv.sigma, lv.sigma_ve
    for i in progress(range(len(lv) - 1)):
        _, eps = denoise(x, lv.t[i], al[i], sg[i])
        xs = x / al[i]
        x_next = xs + (sv[i + 1] - sv[i]) * eps
        if sv[i + 1] > 0:
            _, eps2 = denoise(al[i + 1] * x_next, lv.t[i + 1], al[i + 1], sg[i + 1])
            x_next = xs + (sv[i + 1] - sv[i]) * 0.5 * (eps + eps2)
        x = al[i + 1] * x_next
    return x


def sample_sde_euler(denoise: Denoiser, x: torch.Tensor, lv: Levels, *, generator: torch.Generator | None = None,
                     progress: Callable = iter) -> torch.Tensor:
    """Euler–Maruyama on the reverse-time VP SDE dx = [−½β x − β ∇log p_t] dt + √β dw̄ (Song et al. 2021b, eq. 6
    and 11), with ∇log p_t = −ε̂/σ and the step's integrated rate B = ∫β dt = log(ᾱ_n/ᾱ_s) taken exactly:
    x_n = x_s + B(½ x_s − ε̂/σ_s) + √B z. The step into the data returns the Tweedie estimate x̂_0 (no noise)."""
    a, al, sg = lv.abar, lv.alpha, lv.sigma
    for i in progress(range(len(lv) - 1)):
        x0, eps = denoise(x, lv.t[i], al[i], sg[i])
        if a[i + 1] == 1:
            x = x0
            continue
        rate = math.log(a[i + 1] / a[i])
        x = x + rate * (0.5 * x - eps / sg[i]) + math.sqrt(rate) * _randn(x, generator)
    return x


def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, lv: Levels, *,
                    progress: Callable = iter) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), multistep in λ = log(α/σ) with data prediction:
    x_n = (σ_n/σ_s) x_s − α_n (e^{−h} − 1) D, h = λ_n − λ_s, D = (1 + 1/2r) x̂_0 − (1/2r) x̂_0^{prev}, r = h_prev/h.
    First order (D = x̂_0) on the first step and on the step into the data, as diffusers and k-diffusion do."""
    al, sg, lam = lv.alpha, lv.sigma, lv.lam
    prev, h_prev = None, None
    for i in progress(range(len(lv) - 1)):
        x0, _ = denoise(x, lv.t[i], al[i], sg[i])
        h = lam[i + 1] - lam[i]
        d = x0
        if prev is not None and sg[i + 1] > 0:
            r = h_prev / h
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * prev
        x = (sg[i + 1] / sg[i]) * x - al[i + 1] * math.expm1(-h) * d
        prev, h_prev = x0, h
    return x


def sample_dpmpp_3m(denoise: Denoiser, x: torch.Tensor, lv: Levels, *,
                    progress: Callable = iter) -> torch.Tensor:
    """DPM-Solver++(3M): the third-order multistep data-prediction solver (Lu et al. 2022b, App. B; the update of
    diffusers' ``multistep_dpm_solver_third_order_update``). With φ₁ = e^{−h} − 1:
    x_n = (σ_n/σ_s) x_s − α_n φ₁ D_0 + α_n (φ₁/h + 1) D_1 − α_n ((φ₁ + h)/h² − ½) D_2, where D_1, D_2 are the
    divided differences of the last three x̂_0 in λ. Warms up with orders 1 and 2; first order into the data."""
    al, sg, lam = lv.alpha, lv.sigma, lv.lam
    hist: list[tuple[torch.Tensor, float]] = []  # (x̂_0, its λ), newest last
    for i in progress(range(len(lv) - 1)):
        x0, _ = denoise(x, lv.t[i], al[i], sg[i])
        h = lam[i + 1] - lam[i]
        phi1 = math.expm1(-h)
        base = (sg[i + 1] / sg[i]) * x - al[i + 1] * phi1 * x0
        if sg[i + 1] == 0 or not hist:
            x = base
        elif len(hist) == 1:
            r0 = (lam[i] - hist[-1][1]) / h
            x = base - al[i + 1] * phi1 * (0.5 / r0) * (x0 - hist[-1][0])
        else:
            (m2, l2), (m1, l1) = hist[-2], hist[-1]
            r0, r1 = (lam[i] - l1) / h, (l1 - l2) / h
            d1_0, d1_1 = (x0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = base + al[i + 1] * (phi1 / h + 1) * d1 - al[i + 1] * ((phi1 + h) / h**2 - 0.5) * d2
        hist = (hist + [(x0, lam[i])])[-2:]
    return x


@dataclass(frozen=True)
class SamplerSpec:
    fn: Callable[..., torch.Tensor]
    integer_steps: bool  # visits only integer timesteps (the discrete chain)
    stochastic: bool  # draws fresh noise at every step, whatever its options
    finite_sigma: bool  # needs σ̃ < ∞ at the first level (not ᾱ = 0, i.e. no zero-terminal-SNR start)

    @property
    def options(self) -> tuple[str, ...]:
        params = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("progress", "generator"))

    def is_deterministic(self, **options) -> bool:
        """Whether the output is a fixed function of the initial noise (DDIM is, unless η > 0)."""
        return not self.stochastic and not options.get("eta", 0.0)


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, integer_steps=True, stochastic=True, finite_sigma=False),
    "ddim": SamplerSpec(sample_ddim, integer_steps=True, stochastic=False, finite_sigma=False),
    "euler": SamplerSpec(sample_euler, integer_steps=False, stochastic=False, finite_sigma=True),
    "heun": SamplerSpec(sample_heun, integer_steps=False, stochastic=False, finite_sigma=True),
    "sde_euler": SamplerSpec(sample_sde_euler, integer_steps=False, stochastic=True, finite_sigma=True),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, integer_steps=False, stochastic=False, finite_sigma=False),
    "dpmpp_3m": SamplerSpec(sample_dpmpp_3m, integer_steps=False, stochastic=False, finite_sigma=False),
}


# -- public entry point ---------------------------------------------------------------------------------------------
@dataclass
class SampleResult:
    """``sample``: the generated tensor; ``nfe``: model evaluations spent; ``timesteps``: the (float64) training-time
    indices visited, noisiest first."""

    sample: torch.Tensor
    nfe: int
    timesteps: torch.Tensor


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid choices: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


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
