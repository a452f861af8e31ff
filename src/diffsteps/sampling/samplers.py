"""Samplers: each a short function that walks the state x from the noisiest visited level to the data.

The state is the variance-preserving x_t the network sees (x_t = α x_0 + σ ε, α = √ᾱ, σ = √(1 − ᾱ)); the noise
levels are precomputed once, in float64, as a :class:`Levels` table whose last entry is the data (ᾱ = 1) when the
sampler takes the final denoising step. Every sampler calls the network through one :class:`Denoiser`, which
converts the network's prediction to (x̂_0, ε̂), applies clipping or dynamic thresholding and counts evaluations.

Samplers written in the variance-exploding view x̃ = x/α, σ̃ = σ/α (Karras et al. 2022) — ``euler``, ``heun`` — map
to and from it per step; there a step is the textbook ODE step dx̃/dσ̃ = ε̂.

Per-sample levels: the same code runs on shared levels (Python floats) and per-sample ones (float64 tensors of shape
[B, 1, …, 1]); level arithmetic goes through the float/tensor helpers of :mod:`.levels` (``sqrt``, ``log``,
``expm1``, ``relu``) and every branch on a level through ``every`` — an all()-check, exact because the only thing a
sampler branches on is whether the next level is the data, which all samples reach at the same, last, level. So
every sampler supports per-sample levels, and the shared case runs the float code it always ran.

Callbacks: each sampler ends its step with one line, ``callback(i, x, x0)`` (as k-diffusion's samplers call
``callback({'x', 'i', 'sigma', 'sigma_hat', 'denoised'})``), x the state after step i and x0 the last x̂_0 the model
gave during it; the default does nothing. :func:`~.api.sample` turns it into a :class:`~.api.StepInfo` with the
levels and the NFE count, so the samplers stay free of bookkeeping.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..core.process import posterior_coefficients
from .denoiser import Denoiser
from .levels import Levels, every, expm1, log, relu, sqrt


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _quiet(i: int, x: torch.Tensor, x0: torch.Tensor) -> None:
    pass


# -- samplers -------------------------------------------------------------------------------------------------------
def sample_ddim(denoise: Denoiser, x: torch.Tensor, lv: Levels, *, eta: float = 0.0,
                generator: torch.Generator | None = None, progress: Callable = iter,
                callback: Callable = _quiet) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_n = √ᾱ_n x̂_0 + √(1 − ᾱ_n − c²) ε̂ + c z, with
    c = η √((1 − ᾱ_n)/(1 − ᾱ_s)) √(1 − ᾱ_s/ᾱ_n) (eq. 16). η = 0 is deterministic; η = 1 is ancestral sampling with
    the posterior variance."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"ddim needs eta in [0, 1], got {eta!r}")
    a, al, sg = lv.abar, lv.alpha, lv.sigma
    for i in progress(range(len(lv) - 1)):
        x0, eps = denoise(x, lv.t[i], al[i], sg[i])
        c = eta * sqrt((1 - a[i + 1]) / (1 - a[i]) * (1 - a[i] / a[i + 1]))
        x = al[i + 1] * x0 + sqrt(relu(1 - a[i + 1] - c * c)) * eps
        if every(c > 0):
            x = x + c * _randn(x, generator)
        callback(i, x, x0)
    return x


def sample_ddpm(denoise: Denoiser, x: torch.Tensor, lv: Levels, *, variance: str = "small",
                generator: torch.Generator | None = None, progress: Callable = iter,
                callback: Callable = _quiet) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) from the posterior q(x_n | x_s, x̂_0): mean c_0 x̂_0 + c_s x_s
    (:func:`~diffsteps.core.process.posterior_coefficients`), variance ``small`` = β̃ (posterior) or ``large`` =
    β_{s|n} = 1 − ᾱ_s/ᾱ_n (the two bounds of Ho et al. §3.2). No noise is added on the step into the data."""
    if variance not in ("small", "large"):
        raise ValueError(f"ddpm variance must be one of: small, large; got {variance!r}")
    a, al, sg = lv.abar, lv.alpha, lv.sigma
    for i in progress(range(len(lv) - 1)):
        x0, _ = denoise(x, lv.t[i], al[i], sg[i])
        c0, cs, var, beta = posterior_coefficients(a[i], a[i + 1])
        x = c0 * x0 + cs * x
        if every(a[i + 1] < 1):
            x = x + sqrt(var if variance == "small" else beta) * _randn(x, generator)
        callback(i, x, x0)
    return x


def sample_euler(denoise: Denoiser, x: torch.Tensor, lv: Levels, *,
                 progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx̃/dσ̃ = ε̂(x̃, σ̃) (Karras et al. 2022, eq. 4 with s = 1,
    σ(t) = t): x̃_n = x̃_s + (σ̃_n − σ̃_s) ε̂. Algebraically the same update as DDIM with η = 0."""
    al, sg, sv = lv.alpha, lv.sigma, lv.sigma_ve
    for i in progress(range(len(lv) - 1)):
        x0, eps = denoise(x, lv.t[i], al[i], sg[i])
        x = al[i + 1] * (x / al[i] + (sv[i + 1] - sv[i]) * eps)
        callback(i, x, x0)
    return x


def sample_heun(denoise: Denoiser, x: torch.Tensor, lv: Levels, *,
                progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """Heun's second-order method on the same ODE (Karras et al. 2022, Alg. 1, no churn): an Euler step to σ̃_n,
    then the trapezoidal correction x̃_n = x̃_s + (σ̃_n − σ̃_s)(ε̂_s + ε̂_n)/2; the step into σ̃ = 0 stays Euler."""
    al, sg, sv = lv.alpha, lv.sigma, lv.sigma_ve
    for i in progress(range(len(lv) - 1)):
        x0, eps = denoise(x, lv.t[i], al[i], sg[i])
        xs = x / al[i]
        x_next = xs + (sv[i + 1] - sv[i]) * eps
        if every(sv[i + 1] > 0):
            x0, eps2 = denoise(al[i + 1] * x_next, lv.t[i + 1], al[i + 1], sg[i + 1])
            x_next = xs + (sv[i + 1] - sv[i]) * 0.5 * (eps + eps2)
        x = al[i + 1] * x_next
        callback(i, x, x0)
    return x


def sample_sde_euler(denoise: Denoiser, x: torch.Tensor, lv: Levels, *, generator: torch.Generator | None = None,
                     progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """Euler–Maruyama on the reverse-time VP SDE dx = [−½β x − β ∇log p_t] dt + √β dw̄ (Song et al. 2021b, eq. 6
    and 11), with ∇log p_t = −ε̂/σ and the step's integrated rate B = ∫β dt = log(ᾱ_n/ᾱ_s) taken exactly:
    x_n = x_s + B(½ x_s − ε̂/σ_s) + √B z. The step into the data returns the Tweedie estimate x̂_0 (no noise)."""
    a, al, sg = lv.abar, lv.alpha, lv.sigma
    for i in progress(range(len(lv) - 1)):
        x0, eps = denoise(x, lv.t[i], al[i], sg[i])
        if every(a[i + 1] == 1):
            x = x0
        else:
            rate = log(a[i + 1] / a[i])
            x = x + rate * (0.5 * x - eps / sg[i]) + sqrt(rate) * _randn(x, generator)
        callback(i, x, x0)
    return x


def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, lv: Levels, *,
                    progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), multistep in λ = log(α/σ) with data prediction:
    x_n = (σ_n/σ_s) x_s − α_n (e^{−h} − 1) D, h = λ_n − λ_s, D = (1 + 1/2r) x̂_0 − (1/2r) x̂_0^{prev}, r = h_prev/h.
    First order (D = x̂_0) on the first step and on the step into the data, as diffusers and k-diffusion do."""
    al, sg, lam = lv.alpha, lv.sigma, lv.lam
    prev, h_prev = None, None
    for i in progress(range(len(lv) - 1)):
        x0, _ = denoise(x, lv.t[i], al[i], sg[i])
        h = lam[i + 1] - lam[i]
        d = x0
        if prev is not None and every(sg[i + 1] > 0):
            r = h_prev / h
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * prev
        x = (sg[i + 1] / sg[i]) * x - al[i + 1] * expm1(-h) * d
        prev, h_prev = x0, h
        callback(i, x, x0)
    return x


def sample_dpmpp_3m(denoise: Denoiser, x: torch.Tensor, lv: Levels, *,
                    progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """DPM-Solver++(3M): the third-order multistep data-prediction solver (Lu et al. 2022b, App. B; the update of
    diffusers' ``multistep_dpm_solver_third_order_update``). With φ₁ = e^{−h} − 1:
    x_n = (σ_n/σ_s) x_s − α_n φ₁ D_0 + α_n (φ₁/h + 1) D_1 − α_n ((φ₁ + h)/h² − ½) D_2, where D_1, D_2 are the
    divided differences of the last three x̂_0 in λ. Warms up with orders 1 and 2; first order into the data."""
    al, sg, lam = lv.alpha, lv.sigma, lv.lam
    hist: list[tuple[torch.Tensor, float | torch.Tensor]] = []  # (x̂_0, its λ), newest last
    for i in progress(range(len(lv) - 1)):
        x0, _ = denoise(x, lv.t[i], al[i], sg[i])
        h = lam[i + 1] - lam[i]
        phi1 = expm1(-h)
        base = (sg[i + 1] / sg[i]) * x - al[i + 1] * phi1 * x0
        if every(sg[i + 1] == 0) or not hist:
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
        callback(i, x, x0)
    return x
