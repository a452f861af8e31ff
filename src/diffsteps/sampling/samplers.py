"""Samplers: each a short function that walks the state x from the noisiest visited level to the data.

The state is the variance-preserving x_t the network sees (x_t = α x_0 + σ ε, α = √ᾱ, σ = √(1 − ᾱ)); the noise
levels are precomputed once, in float64, as a :class:`Levels` table whose last entry is the data (ᾱ = 1) when the
sampler takes the final denoising step. Every sampler calls the network through one :class:`Denoiser`, which
converts the network's prediction to x̂_0 or ε̂ or both (``want``: only what the sampler uses), applies clipping or
dynamic thresholding and counts evaluations.

Lean loops: each sampler computes its per-step coefficients once per call, in float64, and a step is one linear
combination c x + Σ c_j y_j through the Denoiser's :class:`~.arith.Arith` — one scaling and one fused multiply-add
per term, or one compiled loop with ``fuse`` — into a tensor of its own. The ε-solvers fold x̂_0 = (x − σ ε̂)/α into
their coefficients (:func:`_step_eps`), so with an ε-network they convert nothing. With ``fuse`` the data-prediction
solvers take the network output as it is (``want="linear"``) and form x̂_0 and the update (unipc: and its corrector)
in one two-output loop (:func:`_x0_and_step`). The samplers hand back
(``release``, ``update``, :func:`_push`) what they no longer need; with recycling on (:func:`~.api.sample` without a
callback) the next step writes into it. Nothing else is written in place: the caller's noise, the model's output and
what a callback saw stay as they were.

Samplers written in the variance-exploding view x̃ = x/α, σ̃ = σ/α (Karras et al. 2022) — ``euler``, ``heun`` — map
to and from it per step; there a step is the textbook ODE step dx̃/dσ̃ = ε̂.

Per-sample levels: the same code runs on shared levels (Python floats) and per-sample ones (float64 tensors of shape
[B, 1, …, 1]); level arithmetic goes through the float/tensor helpers of :mod:`.levels` (``sqrt``, ``log``,
``expm1``, ``relu``) and every branch on a level through ``every`` — an all()-check, exact because the only thing a
sampler branches on is whether the next level is the data, which all samples reach at the same, last, level. So
every sampler supports per-sample levels, and the shared case runs the float code it always ran.

Endpoints. With ``denoise_final`` (the default) the last level is the data, σ = 0, and each sampler returns
- ``x̂_0`` predicted at the last visited level (the Tweedie estimate E[x_0 | x_t], one first-order step to σ = 0):
  ddim, euler, heun (its step into σ̃ = 0 stays Euler), ddpm, sde_euler, and dpmpp_2m, dpmpp_3m, unipc, ipndm with
  ``final="tweedie"`` (the default, today's and diffusers' behaviour);
- the state at σ = 0, the ODE continued to the data with the solver's own order: plms and pndm (their AB step
  into ᾱ = 1, as diffusers' PNDM with ``set_alpha_to_one=True``), ipndm with ``final="ode"`` (its Adams–Bashforth
  step to σ̃ = 0), and dpmpp_2m, dpmpp_3m, unipc with ``final="ode"``. For the data-prediction solvers "own order"
  cannot mean a polynomial in λ: the interval [λ_s, +∞) is unbounded. The exact solution of
  dx̃/dσ̃ = (x̃ − x̂_0(σ̃))/σ̃ from σ̃_s to 0 for any polynomial x̂_0(σ̃) is x̂_0(0), so the step is the order-k
  interpolant of the last k x̂_0 — in σ̃², since
  along the flow x̂_0 is a smooth function of σ̃² for smooth data — evaluated at σ̃ = 0; k = 1 is x̂_0 itself.
  ``lower_order_final`` lowers k to 1 below 15 steps (unipc: always), where the two endpoints coincide.
The difference matters at high NFE: x̂_0 at t = 0 of the linear schedule (σ̃ = 0.01) is O(σ̃²) away from the σ = 0
solution, about 1e-4 RMS on the test Gaussian and 3e-4 on the 64-D mixture, more than a good solver's error at 100
NFE. With ``denoise_final=False`` every sampler returns the state at the last visited level.

``lower_order_final``: diffusers' rule for its multistep solvers, default on. dpmpp_2m, dpmpp_3m, ipndm: with fewer
than 15 steps, at most order n − i on step i (DPMSolverMultistepScheduler); unipc: at most n − i at any step count
(UniPCMultistepScheduler).

Callbacks: each sampler ends its step with one line, ``callback(i, x, x0)`` (as k-diffusion's samplers call
``callback({'x', 'i', 'sigma', 'sigma_hat', 'denoised'})``), x the state after step i and x0 the last x̂_0 the model
gave during it; the default does nothing. :func:`~.api.sample` turns it into a :class:`~.api.StepInfo` with the
levels and the NFE count, so the samplers stay free of bookkeeping.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..core.process import posterior_coefficients
from .arith import Arith
from .denoiser import Denoiser, X0Map
from .levels import Levels, every, expm1, log, relu, sqrt


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
    steps = []
    for i in range(len(lv) - 1):
        c = eta * sqrt((1 - a[i + 1]) / (1 - a[i]) * (1 - a[i] / a[i + 1]))
        steps.append(_step_eps(al[i], sg[i], 0.0, al[i + 1], sqrt(relu(1 - a[i + 1] - c * c)), callback,
                               denoise) + (c,))
    for i in progress(range(len(lv) - 1)):
        want, cx, terms, c = steps[i]
        x0, eps = denoise(x, lv.t[i], al[i], sg[i], want)
        x = denoise.arith.update(cx, x, terms(x0, eps))
        if every(c > 0):
            _add_noise(denoise.arith, x, c, generator)
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
    steps = []
    for i in range(len(lv) - 1):
        c0, cs, var, beta = posterior_coefficients(a[i], a[i + 1])
        steps.append(_step_eps(al[i], sg[i], cs, c0, 0.0, callback, denoise)
                     + (sqrt(var if variance == "small" else beta),))
    for i in progress(range(len(lv) - 1)):
        want, cx, terms, c = steps[i]
        x0, eps = denoise(x, lv.t[i], al[i], sg[i], want)
        x = denoise.arith.update(cx, x, terms(x0, eps))
        if every(a[i + 1] < 1):
            _add_noise(denoise.arith, x, c, generator)
        callback(i, x, x0)
    return x


def sample_euler(denoise: Denoiser, x: torch.Tensor, lv: Levels, *,
                 progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx̃/dσ̃ = ε̂(x̃, σ̃) (Karras et al. 2022, eq. 4 with s = 1,
    σ(t) = t): x̃_n = x̃_s + (σ̃_n − σ̃_s) ε̂. Algebraically the same update as DDIM with η = 0."""
    al, sg, sv = lv.alpha, lv.sigma, lv.sigma_ve
    want = _want_eps(callback)
    coeffs = [(al[i + 1] / al[i], al[i + 1] * (sv[i + 1] - sv[i])) for i in range(len(lv) - 1)]
    for i in progress(range(len(lv) - 1)):
        x0, eps = denoise(x, lv.t[i], al[i], sg[i], want)
        cx, ce = coeffs[i]
        x = denoise.arith.update(cx, x, [(ce, eps)])
        callback(i, x, x0)
    return x


def sample_heun(denoise: Denoiser, x: torch.Tensor, lv: Levels, *,
                progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """Heun's second-order method on the same ODE (Karras et al. 2022, Alg. 1, no churn): an Euler step to σ̃_n,
    then the trapezoidal correction x̃_n = x̃_s + (σ̃_n − σ̃_s)(ε̂_s + ε̂_n)/2; the step into σ̃ = 0 stays Euler."""
    al, sg, sv = lv.alpha, lv.sigma, lv.sigma_ve
    want = _want_eps(callback)
    coeffs = [(al[i + 1] / al[i], al[i + 1] * (sv[i + 1] - sv[i])) for i in range(len(lv) - 1)]
    for i in progress(range(len(lv) - 1)):
        x0, eps = denoise(x, lv.t[i], al[i], sg[i], want)
        cx, ce = coeffs[i]
        ar = denoise.arith
        if every(sv[i + 1] > 0):
            x_euler = ar.lincomb(cx, x, [(ce, eps)])
            x0, eps2 = denoise(x_euler, lv.t[i + 1], al[i + 1], sg[i + 1], want)
            x = ar.update(cx, x, [(0.5 * ce, eps), (0.5 * ce, eps2)])  # x is spent: the corrected state over it
            ar.release(x_euler, eps2, eps)
        else:
            x = ar.update(cx, x, [(ce, eps)])
            ar.release(eps)
        callback(i, x, x0)
    return x


def sample_sde_euler(denoise: Denoiser, x: torch.Tensor, lv: Levels, *, generator: torch.Generator | None = None,
                     progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """Euler–Maruyama on the reverse-time VP SDE dx = [−½β x − β ∇log p_t] dt + √β dw̄ (Song et al. 2021b, eq. 6
    and 11), with ∇log p_t = −ε̂/σ and the step's integrated rate B = ∫β dt = log(ᾱ_n/ᾱ_s) taken exactly:
    x_n = x_s + B(½ x_s − ε̂/σ_s) + √B z. The step into the data returns the Tweedie estimate x̂_0 (no noise)."""
    a, al, sg = lv.abar, lv.alpha, lv.sigma
    want = _want_eps(callback)
    for i in progress(range(len(lv) - 1)):
        if every(a[i + 1] == 1):
            x0, _ = denoise(x, lv.t[i], al[i], sg[i], "x0")
            denoise.arith.release(x)
            x = x0
        else:
            x0, eps = denoise(x, lv.t[i], al[i], sg[i], want)
            rate = log(a[i + 1] / a[i])
            x = denoise.arith.update(1 + 0.5 * rate, x, [(-rate / sg[i], eps)])
            _add_noise(denoise.arith, x, sqrt(rate), generator)
        callback(i, x, x0)
    return x


def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, lv: Levels, *, lower_order_final: bool = True,
                    final: str = "tweedie", progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), multistep in λ = log(α/σ) with data prediction:
    x_n = (σ_n/σ_s) x_s − α_n (e^{−h} − 1) D, h = λ_n − λ_s, D = (1 + 1/2r) x̂_0 − (1/2r) x̂_0^{prev}, r = h_prev/h.
    First order on the first step; with ``lower_order_final`` (diffusers' rule) first order on the last step when
    there are fewer than 15. The step into the data: ``final`` (module docstring)."""
    return _dpmpp_multistep(denoise, x, lv, 2, lower_order_final, final, progress, callback)


def sample_dpmpp_3m(denoise: Denoiser, x: torch.Tensor, lv: Levels, *, lower_order_final: bool = True,
                    final: str = "tweedie", progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """DPM-Solver++(3M): the third-order multistep data-prediction solver (Lu et al. 2022b, App. B; the update of
    diffusers' ``multistep_dpm_solver_third_order_update``). With φ₁ = e^{−h} − 1:
    x_n = (σ_n/σ_s) x_s − α_n φ₁ D_0 + α_n (φ₁/h + 1) D_1 − α_n ((φ₁ + h)/h² − ½) D_2, where D_1, D_2 are the
    divided differences of the last three x̂_0 in λ. Warms up with orders 1 and 2; with ``lower_order_final``
    (diffusers' rule, fewer than 15 steps) orders 2 and 1 on the last two steps. Into the data: ``final``."""
    return _dpmpp_multistep(denoise, x, lv, 3, lower_order_final, final, progress, callback)


def _dpmpp_multistep(denoise: Denoiser, x: torch.Tensor, lv: Levels, order: int, lower_order_final: bool,
                     final: str, progress: Callable, callback: Callable) -> torch.Tensor:
    """The DPM-Solver++ multistep loop of order 2 (2M) or 3 (3M): step i is x_{i+1} = c_x x_i + Σ_k c_k x̂_0 at
    levels i, i − 1, …, its coefficients (:func:`_dpmpp_coeffs`) precomputed in float64."""
    _check_final(final)
    al, sg = lv.alpha, lv.sigma
    n = len(lv) - 1
    orders = _multistep_orders(n, order, lower_order_final)

    def make():
        lam = lv.lam
        return [None if every(sg[i + 1] == 0) else _dpmpp_coeffs(al, sg, lam, i, orders[i]) for i in range(n)]
    coeffs = _memo(lv, ("dpmpp", order, lower_order_final), make)
    hist: list[torch.Tensor] = []  # x̂_0 at levels i, i − 1, …, newest first
    ar = denoise.arith if n > 0 else None  # plan_sampling validates the options with no Denoiser and no levels
    for i in progress(range(n)):
        fold = ar.fuse and coeffs[i] is not None  # x̂_0 and the update in one loop (_x0_and_step)
        y, conv = denoise(x, lv.t[i], al[i], sg[i], "linear" if fold else "x0")
        x0, x_next = y, None
        if conv is not None:
            cx, cm = coeffs[i]
            # between steps only the last order − 1 x̂_0's are needed (the update, or the final step into the data,
            # adds the new one): the oldest this step reads is spent with it, and x with it
            x0, x_next = _x0_and_step(ar, conv, x, y, cx, cm[0], cm[1:], hist, spent=[x] + hist[order - 2:])
            if x_next is not None:
                hist, x = [x0] + hist[:order - 2], x_next
                callback(i, x, x0)
                continue
        hist = _push(ar, hist, x0, order)
        if x_next is None:
            if coeffs[i] is None:
                x_next = _to_data(ar, final, hist, lv, i, orders[i])
            else:
                cx, cm = coeffs[i]
                x_next = ar.lincomb(cx, x, list(zip(cm, hist)))
        ar.release(x)
        x = x_next
        callback(i, x, x0)
    return x


def _dpmpp_coeffs(al, sg, lam, i: int, order: int):
    """DPM-Solver++(2M/3M)'s step i as (c_x, [c for x̂_0 at levels i, i − 1, i − 2]): the divided differences
    D_1 = D1_0 + r_0/(r_0 + r_1) (D1_0 − D1_1), D_2 = (D1_0 − D1_1)/(r_0 + r_1), D1_0 = (m_0 − m_1)/r_0,
    D1_1 = (m_1 − m_2)/r_1 expanded into weights on m_0, m_1, m_2 (order 2, 2M's update: D = m_0 + (m_0 − m_1)/(2 r_0),
    r_0 = h_prev/h)."""
    h = lam[i + 1] - lam[i]
    phi1 = expm1(-h)
    c0 = -al[i + 1] * phi1  # on D_0 = m_0
    if order == 1:
        return sg[i + 1] / sg[i], [c0]
    r0 = (lam[i] - lam[i - 1]) / h
    if order == 2:
        w = c0 * (0.5 / r0)
        return sg[i + 1] / sg[i], [c0 + w, -w]
    r1 = (lam[i - 1] - lam[i - 2]) / h
    c1, c2 = al[i + 1] * (phi1 / h + 1), -al[i + 1] * ((phi1 + h) / h**2 - 0.5)
    # D_1 = (1 + q) D1_0 − q D1_1, q = r0/(r0 + r1); D_2 = (D1_0 − D1_1)/(r0 + r1)
    q, s = r0 / (r0 + r1), 1 / (r0 + r1)
    a0, a1 = c1 * (1 + q) + c2 * s, -(c1 * q + c2 * s)  # weights on D1_0, D1_1
    return sg[i + 1] / sg[i], [c0 + a0 / r0, -a0 / r0 + a1 / r1, -a1 / r1]


def sample_unipc(denoise: Denoiser, x: torch.Tensor, lv: Levels, *, order: int = 2, variant: str = "bh2",
                 corrector: bool = True, lower_order_final: bool = True, final: str = "tweedie",
                 progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, Alg. 2/3) with data prediction, as diffusers' ``UniPCMultistepScheduler``
    (predict_x0=True). Predictor UniP-p from level s to n: x_n = (σ_n/σ_s) x_s − α_n φ₁ m_0 − α_n B(h) Σ_k ρ_k D_k,
    D_k = (m_k − m_0)/r_k, r_k = (λ_{s_k} − λ_s)/h, φ₁ = e^{−h} − 1, B(h) = −h (``bh1``) or e^{−h} − 1 (``bh2``),
    ρ solving the order conditions R ρ = b (eq. 7; ρ = ½ at order 2). Corrector UniC: once the model has given
    m_n = x̂_0 at the predicted x_n, the same formula with m_n added (one order higher) replaces x_n — before the
    next predictor step, so it reuses that step's model call and NFE = steps. Orders warm up 1, 2, …;
    ``lower_order_final`` caps the order at the number of steps left (diffusers' UniPC rule, at any step count).
    Into the data: ``final`` (module docstring)."""
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be one of: 1, 2, 3; got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc variant must be one of: bh1, bh2; got {variant!r}")
    _check_final(final)
    n = len(lv) - 1
    al, sg = lv.alpha, lv.sigma
    orders = [min(order, i + 1, n - i if lower_order_final else order) for i in range(n)]

    def make():
        # coefficients, float64, once: step i's predictor (on x_i, m_i, m_{i−1}, …) and its corrector (on x_i, m_i,
        # …, and the model's m_{i+1} at the predicted point), applied at step i + 1
        lam, pred, corr = lv.lam, [], []
        for i in range(n):
            if every(sg[i + 1] == 0):
                pred.append(None)
                corr.append(None)
                continue
            pred.append(_unipc_coeffs(lv, al, sg, lam, i, orders[i], variant, corrector=False))
            corr.append(_unipc_coeffs(lv, al, sg, lam, i, orders[i], variant, corrector=True) if corrector else None)
        # with fuse: the corrector as an offset from the predicted state (_unipc_offset), folded into the next
        # predictor
        return pred, corr, [None if c is None else _unipc_offset(p, c) for p, c in zip(pred, corr)]
    pred, corr, offset = _memo(lv, ("unipc", order, variant, corrector, lower_order_final), make)
    hist: list[torch.Tensor] = []  # x̂_0 at levels i, i − 1, …, newest first
    ar = denoise.arith if n > 0 else None
    x_prev = x  # the (corrected) state at the last level: the corrector starts from it; None after a folded step
    for i in progress(range(n)):
        fold = ar.fuse and pred[i] is not None  # x̂_0, the corrector and the predictor in one loop
        y, conv = denoise(x, lv.t[i], al[i], sg[i], "linear" if fold else "x0")
        x0, x_next = y, None
        if conv is not None:
            cx, cm = pred[i]
            c0, cs = cm[0], list(cm[1:])
            if i > 0 and offset[i - 1] is not None:  # predict from x + Σ Δ_k m_{i−1−k} + c_t x̂_0, the corrected x
                ct, dl = offset[i - 1]
                c0 = c0 + cx * ct
                cs = [(cs[k] if k < len(cs) else 0.0) + (cx * dl[k] if k < len(dl) else 0.0)
                      for k in range(max(len(cs), len(dl)))]
            # the corrector of the next step needs the last `order` x̂_0's: the one that drops out is spent, and x
            x0, x_next = _x0_and_step(ar, conv, x, y, cx, c0, cs, hist, spent=[x] + hist[order - 1:])
        if x_next is not None:
            hist = [x0] + hist[:order - 1]
            if x_prev is not x:  # a corrected state an eager step left (the caller's noise at the start: x itself)
                ar.release(x_prev)
            x, x_prev = x_next, None
            callback(i, x, x0)
            continue
        if i > 0 and corr[i - 1] is not None and (x_prev is not None or pred[i] is not None):
            cx, cm, ct = corr[i - 1]
            if x_prev is None:  # the step before was folded: correct x by its offset
                ct, dl = offset[i - 1]
                x_pred, x = x, ar.lincomb(1.0, x, list(zip(dl, hist)) + [(ct, x0)])
            else:
                x_pred, x = x, ar.lincomb(cx, x_prev, list(zip(cm, hist)) + [(ct, x0)])
            ar.release(x_pred)  # replaced by the corrected state
        hist = _push(ar, hist, x0, order)
        if x_prev is not x:
            ar.release(x_prev)
        x_prev = x
        if pred[i] is None:
            x = _to_data(ar, final, hist, lv, i, orders[i])
        else:
            cx, cm = pred[i]
            x = ar.lincomb(cx, x, list(zip(cm, hist)))
        callback(i, x, x0)
    return x


def _unipc_offset(pred: tuple, corr: tuple) -> tuple:
    """UniPC's corrector as an offset from the predicted state: both step from the same state x_s with the same
    c_x = σ_n/σ_s, so x_n^c = x_n^pred + Σ_k (c_k^corr − c_k^pred) m_k + c_t m_n. (c_t, [Δ_k]): the state it
    corrects is the predictor's output, and the one it starts from need not be kept."""
    (_, cp), (_, cc, ct) = pred, corr
    return ct, [a - b for a, b in zip(cc, cp)]


def sample_ipndm(denoise: Denoiser, x: torch.Tensor, lv: Levels, *, order: int = 4, lower_order_final: bool = True,
                 final: str = "tweedie", progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """Improved PNDM (Zhang & Chen 2023, DEIS, §4 "iPNDM"): Adams–Bashforth on the probability-flow ODE
    dx̃/dσ̃ = ε̂ in x̃ = x/α, σ̃ = σ/α, with the lower orders 1, 2, 3 as warm-up instead of PNDM's Runge–Kutta
    steps, so NFE = steps. The AB weights are those of the actual grid, ∫_{σ̃_s}^{σ̃_n} ℓ_j(σ̃) dσ̃ for the Lagrange
    basis ℓ_j on the last ``order`` σ̃'s (variable-step AB), which on a uniform σ̃ grid are the classical
    (55, −59, 37, −9)/24 of the paper. ``lower_order_final``: at most n − i on step i when there are fewer than 15
    steps (diffusers' DPM-Solver rule). Into the data (σ̃ = 0): ``final="tweedie"`` takes the Euler step, which is
    x̂_0 of the last level (to round-off); ``final="ode"`` the AB step of the step's order."""
    if order not in (1, 2, 3, 4):
        raise ValueError(f"ipndm order must be one of: 1, 2, 3, 4; got {order!r}")
    _check_final(final)
    n = len(lv) - 1
    al, sg, sv = lv.alpha, lv.sigma, lv.sigma_ve
    orders = _multistep_orders(n, order, lower_order_final)
    def make():
        coeffs = []
        for i in range(n):
            k = 1 if final == "tweedie" and every(sv[i + 1] == 0) else orders[i]
            w = _ab_weights([sv[i - j] for j in range(k)], sv[i], sv[i + 1])
            coeffs.append((al[i + 1] / al[i], [al[i + 1] * v for v in w]))
        return coeffs
    coeffs = _memo(lv, ("ipndm", order, lower_order_final, final), make)
    want = _want_eps(callback)
    eps_hist: list[torch.Tensor] = []
    for i in progress(range(n)):
        x0, eps = denoise(x, lv.t[i], al[i], sg[i], want)
        eps_hist = _push(denoise.arith, eps_hist, eps, order)
        cx, ce = coeffs[i]
        x = denoise.arith.update(cx, x, list(zip(ce, eps_hist)))
        callback(i, x, x0)
    return x


def sample_plms(denoise: Denoiser, x: torch.Tensor, lv: Levels, *,
                progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, eq. 12), exactly as diffusers'
    ``PNDMScheduler(skip_prk_steps=True)`` computes it (crowsonkb's PLMS): every step is the DDIM transfer
    (= Euler in x̃, σ̃) with ε' = the fixed-coefficient Adams–Bashforth combination of the ε̂'s, (3, −1)/2,
    (23, −16, 5)/12, (55, −59, 37, −9)/24; the first step is Heun's (ε' = the mean of ε̂ at both ends, one extra
    model call, NFE = steps + 1). The step into the data is that same AB step (diffusers with ``set_alpha_to_one``):
    the state at σ̃ = 0."""
    n = len(lv) - 1
    al, sg, sv = lv.alpha, lv.sigma, lv.sigma_ve
    want = _want_eps(callback)
    coeffs = [(al[i + 1] / al[i], [al[i + 1] * (sv[i + 1] - sv[i]) * w for w in AB[min(i, 3)]]) for i in range(n)]
    ets: list[torch.Tensor] = []
    for i in progress(range(n)):
        cx, ce = coeffs[i]
        x0, eps = denoise(x, lv.t[i], al[i], sg[i], want)
        ets = _push(denoise.arith, ets, eps, 4)
        ar = denoise.arith
        if i == 0 and every(sv[1] > 0):
            x_euler = ar.lincomb(cx, x, [(ce[0], eps)])
            x0, eps2 = denoise(x_euler, lv.t[1], al[1], sg[1], want)
            x = ar.update(cx, x, [(0.5 * ce[0], eps), (0.5 * ce[0], eps2)])
            ar.release(x_euler, eps2)
        else:
            x = ar.update(cx, x, list(zip(ce, ets)))
        callback(i, x, x0)
    return x


def sample_pndm(denoise: Denoiser, x: torch.Tensor, lv: Levels, *,
                progress: Callable = iter, callback: Callable = _quiet) -> torch.Tensor:
    """PNDM (Liu et al. 2022, eq. 11–13) exactly as diffusers' ``PNDMScheduler(skip_prk_steps=False)`` computes it:
    every step is the DDIM transfer φ(x_s, ε', s → n) (= Euler in x̃, σ̃); the first three steps are the pseudo
    Runge–Kutta warm-up (PRK): ε_1 = ε̂(x_s, t_s), ε_2 = ε̂(φ(x_s, ε_1, s → m), t_m), ε_3 = ε̂(φ(x_s, ε_2, s → m), t_m),
    ε_4 = ε̂(φ(x_s, ε_3, s → n), t_n), ε' = (ε_1 + 2ε_2 + 2ε_3 + ε_4)/6, at the half-step level
    t_m = (t_s + t_n)/2 (diffusers: t_n + ⌊T/2N⌋, the same level when T/N is even); then PLMS, ε' the
    Adams–Bashforth combination (55, −59, 37, −9)/24 of the ε_1's of the last four steps. NFE = steps + 9 (four
    calls per warm-up step). The warm-up never steps into the data: with fewer than four steps it covers all but
    the last, which is then AB of the order reached. The step into the data is a PLMS step: the state at σ̃ = 0
    (diffusers with ``set_alpha_to_one``)."""
    n = len(lv) - 1
    al, sg, sv = lv.alpha, lv.sigma, lv.sigma_ve
    n_rk = min(3, n - 1)
    if len(lv.abar_half) < n_rk:
        raise ValueError("pndm needs the half-step levels: make_levels(..., half_steps=True)")
    ah = [sqrt(a) for a in lv.abar_half[:n_rk]]
    sh = [sqrt(1 - a) for a in lv.abar_half[:n_rk]]
    want = _want_eps(callback)
    full = [(al[i + 1] / al[i], al[i + 1] * (sv[i + 1] - sv[i])) for i in range(n)]
    half = [(ah[i] / al[i], ah[i] * (sh[i] / ah[i] - sv[i])) for i in range(n_rk)]
    ets: list[torch.Tensor] = []
    for i in progress(range(n)):
        (cx, ce), tm = full[i], lv.t_half[i] if i < n_rk else None
        x0, eps = denoise(x, lv.t[i], al[i], sg[i], want)
        ets = _push(denoise.arith, ets, eps, 4)
        ar = denoise.arith
        if i < n_rk:
            hx, he = half[i]
            x0, e2 = _probe(denoise, ar.lincomb(hx, x, [(he, eps)]), tm, ah[i], sh[i], want)
            x0, e3 = _probe(denoise, ar.lincomb(hx, x, [(he, e2)]), tm, ah[i], sh[i], want)
            x0, e4 = _probe(denoise, ar.lincomb(cx, x, [(ce, e3)]), lv.t[i + 1], al[i + 1], sg[i + 1], want)
            x = ar.update(cx, x, [(ce / 6, eps), (ce / 3, e2), (ce / 3, e3), (ce / 6, e4)])
            ar.release(e2, e3, e4)
        else:
            x = ar.update(cx, x, [(ce * w, e) for w, e in zip(AB[len(ets) - 1], ets)])
        callback(i, x, x0)
    return x


# the fixed-coefficient Adams–Bashforth weights of orders 1–4 (PLMS, PNDM), newest ε̂ first
AB = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


# -- helpers ----------------------------------------------------------------------------------------------------------
FINALS = ("tweedie", "ode")


def _want_eps(callback: Callable) -> str:
    """What an ε-solver asks the Denoiser for: ε̂ alone, and x̂_0 too only when a callback will see it."""
    return "eps" if callback is _quiet else "both"


def _step_eps(al, sg, cx, c0, ce, callback: Callable, denoise: Denoiser):
    """A step's update c_x x + c_0 x̂_0 + c_e ε̂ for an ε-solver, from the level (α, σ) it starts at, as
    (want, c_x', terms(x̂_0, ε̂)). Where α > 0, x̂_0 = (x − σ ε̂)/α is folded into the coefficients — c_x' = c_x + c_0/α
    on x, c_e − c_0 σ/α on ε̂ — so the Denoiser forms ε̂ only (for an ε-network, nothing) and the step is one scaling
    and one multiply-add. At α = 0 (a zero-terminal-SNR start, where x̂_0 is no function of x and ε̂) the three-term
    form — and also when the Denoiser clips or thresholds x̂_0: ε̂ is then re-derived from the changed x̂_0, and folding
    it back costs float32 round-off of order 1e-3 against diffusers' explicit x̂_0 (tests/test_diffusers_interop)."""
    if denoise.transforms_x0:
        return "both", cx, lambda x0, eps: [(c0, x0), (ce, eps)]
    if bool((al > 0).all()) if isinstance(al, torch.Tensor) else al > 0:
        cx, ce = cx + c0 / al, ce - c0 * sg / al
        return _want_eps(callback), cx, lambda x0, eps: [(ce, eps)]
    return "both", cx, lambda x0, eps: [(c0, x0), (ce, eps)]


def _add_noise(ar: Arith, x: torch.Tensor, c, generator: torch.Generator | None) -> None:
    """x += c z, z ~ N(0, I), in place: x is always the step's own new tensor, which no one else holds yet."""
    z = ar.randn_like(x, generator)
    if isinstance(c, torch.Tensor):
        x.addcmul_(c, z)
    else:
        x.add_(z, alpha=c)
    ar.release(z)


# (what, options, ᾱ of every level) → a sampler's precomputed coefficients, for shared levels (floats: the key is
# their values). A run of 50 steps spends up to 10 µs per step on them (unipc's order-condition solves, ipndm's AB
# weights) — a tenth of a pass over a 10,000 × 64 state, on every sample() call with the same levels. The lists are
# only read. At most _MEMO_SIZE kept (all dropped when full).
_MEMO: dict[tuple, object] = {}
_MEMO_SIZE = 64


def _memo(lv: Levels, what: tuple, make: Callable):
    """make(), computed once per (``what``, levels) where the levels are Python floats; tensor levels (per-sample,
    or 0-D ones a differentiable run builds: a tensor hashes by identity, and would keep its graph) always compute
    it."""
    if not all([type(a) is float for a in lv.abar]):
        return make()
    key = what + (lv.abar,)
    hit = _MEMO.get(key)
    if hit is None:
        if len(_MEMO) >= _MEMO_SIZE:
            _MEMO.clear()
        hit = _MEMO[key] = make()
    return hit


def _push(ar: Arith, hist: list, v: torch.Tensor, keep: int) -> list:
    """A multistep history, newest first, with v prepended and only ``keep`` entries kept; the one dropped is handed
    back to ``ar`` for reuse."""
    hist = [v] + hist
    ar.release(*hist[keep:])
    return hist[:keep]


def _x0_and_step(ar: Arith, conv: X0Map, x: torch.Tensor, out: torch.Tensor, cx, c0, cs: list, hist: list,
                 spent: list):
    """A data-prediction step from the network output: x̂_0 = (p x + q·out)·s (``conv``) and the update
    c_x x + c_0 x̂_0 + Σ_j c_j hist_j, as (x̂_0, x_next), in one fused loop over x, out and hist that writes both (the
    update takes x̂_0 from the register, rounded as the eager path rounds it). With x0-prediction x̂_0 is out itself
    and the update one linear combination. ``spent`` (x, old x̂_0's) is not needed afterwards: handed back, and where
    the loop reads it, written over (:meth:`~.arith.Arith.lincombs`). (x̂_0 formed as the Denoiser forms it, None),
    nothing handed back, where the fused loop cannot be built: the caller then takes its eager path."""
    others = list(hist[:len(cs)])
    ins = [x, out] + others
    if conv.is_output:
        x_next = ar.lincomb(cx, x, [(c0, out)] + list(zip(cs, others)))
        ar.release(*spent)
        return out, x_next
    rows = [[conv.p, conv.q] + [None] * len(others), [cx, None] + list(cs) + [c0]]
    read = [j for t in spent for j, y in enumerate(ins) if y is t and j != 1]  # never the network's output
    res = ar.lincombs(rows, ins, scales=[conv.s, None], eager=False, spent=read[1:] + read[:1])  # x̂_0 over an x̂_0
    if res is None:
        return conv.x0(ar, x, out), None
    ar.release(*(t for t in spent if not any(t is y for y in ins)))
    return tuple(res)


def _probe(denoise: Denoiser, x: torch.Tensor, *level):
    """The Denoiser at an intermediate state that nothing else needs afterwards (its buffer is handed back)."""
    out = denoise(x, *level)
    denoise.arith.release(x)
    return out


def _check_final(final: str) -> None:
    if final not in FINALS:
        raise ValueError(f"final must be one of: {', '.join(FINALS)}; got {final!r}")


def _multistep_orders(n: int, order: int, lower_order_final: bool) -> list[int]:
    """The order of each of n steps: warm-up min(order, i + 1); with ``lower_order_final`` and fewer than 15 steps
    at most n − i on step i (diffusers' DPM-Solver rule: its 3M takes orders 2, 1 on the last two steps)."""
    cap = lower_order_final and n < 15
    return [min(order, i + 1, n - i if cap else order) for i in range(n)]


def _to_data(ar: Arith, final: str, x0s: list, lv: Levels, i: int, k: int) -> torch.Tensor:
    """The step from level i into the data (σ̃ = 0) of a data-prediction solver, x0s the x̂_0 at levels i, i − 1, ….
    The exact solution over [σ̃_i, 0] of dx̃/dσ̃ = (x̃ − x̂_0(σ̃))/σ̃ (the exponential integrator in σ̃ = e^{−λ})
    for a polynomial x̂_0 is x̂_0's value at σ̃ = 0: every other term vanishes there. ``tweedie``: x̂_0 of level i.
    ``ode``: the order-k interpolant of x̂_0 through levels i, …, i − k + 1, in σ̃² (along the flow x̂_0 is a smooth
    function of σ̃² for smooth data, as ε̂ = O(σ̃)), evaluated at 0; k = 1 is the same as tweedie."""
    if final == "tweedie" or k == 1:
        return x0s[0]
    sv = lv.sigma_ve
    u = [sv[i - j] ** 2 for j in range(k)]
    w = []
    for j in range(k):
        wj = 1.0
        for m in range(k):
            if m != j:
                wj = wj * u[m] / (u[m] - u[j])
        w.append(wj)
    return ar.lincomb(w[0], x0s[0], list(zip(w[1:], x0s[1:k])))


def _ab_weights(nodes: list, a, b) -> list:
    """∫_a^b ℓ_j(u) du for the Lagrange basis on ``nodes`` (≤ 4, so degree ≤ 3): two-point Gauss–Legendre, exact."""
    k = len(nodes)
    half, mid = 0.5 * (b - a), 0.5 * (b + a)
    pts = (mid - half / math.sqrt(3.0), mid + half / math.sqrt(3.0))
    out = []
    for j in range(k):
        total = 0.0
        for p in pts:
            lj = 1.0
            for m in range(k):
                if m != j:
                    lj = lj * (p - nodes[m]) / (nodes[j] - nodes[m])
            total = total + half * lj
        out.append(total)
    return out


def _solve(R: list[list], b: list) -> list:
    """R ρ = b for n ≤ 3 by Cramer's rule: entries may be floats or per-sample tensors alike."""
    n = len(b)
    if n == 1:
        return [b[0] / R[0][0]]

    def det(M):
        if len(M) == 2:
            return M[0][0] * M[1][1] - M[0][1] * M[1][0]
        return (M[0][0] * (M[1][1] * M[2][2] - M[1][2] * M[2][1])
                - M[0][1] * (M[1][0] * M[2][2] - M[1][2] * M[2][0])
                + M[0][2] * (M[1][0] * M[2][1] - M[1][1] * M[2][0]))

    d = det(R)
    return [det([[b[r] if c == j else R[r][c] for c in range(n)] for r in range(n)]) / d for j in range(n)]


def _unipc_coeffs(lv, al, sg, lam, i: int, p: int, variant: str, corrector: bool):
    """UniPC's update from level i to i + 1 of order p as a linear combination: (c_x, [c_{m_i}, c_{m_{i−1}}, …])
    for the predictor, plus c for the new x̂_0 for the corrector (diffusers' ``multistep_uni_p/c_bh_update``)."""
    h = lam[i + 1] - lam[i]
    hh = -h
    rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)] + [1.0]
    h_phi_1 = expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B_h = hh if variant == "bh1" else expm1(hh)
    R, b, fact = [], [], 1
    for k in range(1, p + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * fact / B_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    cx = sg[i + 1] / sg[i]
    scale = al[i + 1] * B_h
    if corrector:
        rhos = [0.5] if p == 1 else _solve(R, b)
        ct = -scale * rhos[-1]
        rhos = rhos[:-1]
    else:
        rhos = [] if p == 1 else [0.5] if p == 2 else _solve([row[:-1] for row in R[:-1]], b[:-1])
    # Σ ρ_k (m_k − m_0)/r_k: m_k gets −scale ρ_k/r_k, m_0 gets −α φ₁ + scale Σ ρ_k/r_k (+ scale ρ_p for the corrector)
    cm = [-al[i + 1] * h_phi_1]
    for k, rho in enumerate(rhos, start=1):
        cm[0] = cm[0] + scale * rho / rks[k - 1]
        cm.append(-scale * rho / rks[k - 1])
    if corrector:
        cm[0] = cm[0] - ct
        return cx, cm, ct
    return cx, cm
