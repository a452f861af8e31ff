"""Training losses of a denoiser, as weightings of the per-timestep denoising error.

Every prediction type is a linear reparameterisation of ε at fixed x_t (x_t = α x_0 + σ ε, α = √ᾱ_t,
σ = √(1 − ᾱ_t), SNR = ᾱ_t/(1 − ᾱ_t)):
    ‖x̂_0 − x_0‖² = ‖ε̂ − ε‖² / SNR,        ‖v̂ − v‖² = ‖ε̂ − ε‖² (1 + SNR)/SNR = ‖ε̂ − ε‖² / ᾱ_t,
so the error in a network's own space is c_p(t)·‖ε̂ − ε‖² with c_ε = 1, c_x0 = 1/SNR, c_v = (1 + SNR)/SNR. Each loss
is therefore one function w_ε(t), the weight it puts on the ε-space error (mean over data dimensions); a network of
prediction type p is trained on its own-space MSE times the own-space weight w_ε(t)/c_p(t). The MSE is computed in
the network's own space because that is where it is well conditioned (converting x̂_0 to ε̂ divides by σ, converting
ε̂ to x̂_0 divides by α, and either blows up at one end of the schedule).

The own-space weights below are written out per prediction type in terms of ᾱ_t, ᾱ_{t−1} and β_t rather than as
w_ε/c_p, because the quotient is 0·∞ or ∞/∞ at ᾱ_t = 0 (zero terminal SNR, Lin et al. 2024) or ᾱ_t = 1 even where
the weight itself is finite. A weight is +∞ only where the true weight is infinite (e.g. the ELBO of an
ε-prediction network at ᾱ_t = 0, where x̂_0 = (x_t − σ ε̂)/α is undetermined); it is never NaN.

Index convention as in :mod:`diffsteps.core.schedules`: t = 0 … T−1, ᾱ_t = Π_{s≤t}(1 − β_s), ᾱ_{−1} = 1 (the data).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.parameterizations import check_prediction, prediction_target
from ..core.schedules import Schedule

__all__ = ["DiffusionLoss", "LOSSES", "VARIANCES", "sample_timesteps", "loss_weights"]

_F64 = torch.float64

VARIANCES = ("small", "large")


# -- schedule quantities at integer t --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Terms:
    """Schedule tables gathered at a batch of integer timesteps, float64 on the CPU."""

    t: torch.Tensor           # (B,) long
    beta: torch.Tensor        # β_t
    abar: torch.Tensor        # ᾱ_t
    abar_prev: torch.Tensor   # ᾱ_{t−1}, 1 at t = 0

    @property
    def one_minus_abar(self) -> torch.Tensor:
        # the same 1 − ᾱ_t that q_sample uses for σ², so the weights and the regression targets agree exactly
        return 1.0 - self.abar


def _as_timesteps(t, num_timesteps: int) -> torch.Tensor:
    """Integer timesteps as a 1-D long CPU tensor; floats are accepted only when they are whole numbers."""
    t = torch.as_tensor(t).detach().cpu()
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        raise ValueError(f"t must be a 1-D batch of timesteps, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if not bool(torch.all(torch.isfinite(t) & (t == t.round()))):
            raise ValueError("t must hold integer timesteps (these losses are defined on the discrete chain)")
    elif t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"t must hold integer timesteps, got dtype {t.dtype}")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > num_timesteps - 1):
        raise ValueError(f"t must lie in [0, {num_timesteps - 1}], got {int(t.min())} … {int(t.max())}")
    return t


def _gather(schedule: Schedule, t) -> _Terms:
    t = _as_timesteps(t, schedule.num_timesteps)
    return _Terms(t=t, beta=schedule.betas[t], abar=schedule.alphas_cumprod[t],
                  abar_prev=schedule.alphas_cumprod_prev[t])


# -- the variants: own-space weight w_ε/c_p for each prediction ------------------------------------------------------
# Each function takes the gathered terms, the prediction type and the DiffusionLoss (for its options) and returns the
# float64 own-space weight (B,). Torch float division gives ±inf for x/0 without warnings; every formula is arranged
# so that no 0/0 or 0·∞ can occur for ᾱ_t ∈ [0, 1], β_t ∈ (0, 1].

def _simple(terms: _Terms, prediction: str, loss: "DiffusionLoss") -> torch.Tensor:
    """L_simple (Ho et al. 2020, eq. 14): the plain MSE on the network's own target, w_ε = c_p."""
    return torch.ones_like(terms.abar)


def _vlb(terms: _Terms, prediction: str, loss: "DiffusionLoss") -> torch.Tensor:
    """L_{t−1} = KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)) in nats per dimension, for a reverse process with the
    fixed variance σ_t² (β̃_t for ``small``, β_t for ``large``) and mean μ_θ = c_0 x̂_0 + c_t x_t (the posterior mean
    with x̂_0 in place of x_0; c_0 = √ᾱ_{t−1} β_t/(1 − ᾱ_t), :func:`~diffsteps.core.process.posterior_coefficients`).
    Both are Gaussians with μ_q − μ_θ = c_0 (x_0 − x̂_0), so, dropping the θ-independent variance terms
    (½(β̃/σ² − 1 − log(β̃/σ²)), zero for ``small``):
        x0-space  c_0²/(2σ_t²) = ᾱ_{t−1} β_t² / (2 σ_t² (1 − ᾱ_t)²),
        ε-space   w_ε = β_t² / (2 σ_t² (1 − β_t)(1 − ᾱ_t))            (Ho et al. 2020, eq. 12),
        v-space   w_ε ᾱ_t = ᾱ_{t−1} β_t² / (2 σ_t² (1 − ᾱ_t)),
    using ᾱ_t/(1 − β_t) = ᾱ_{t−1}; the x0 and v forms stay finite at ᾱ_t = 0 (β_t = 1), the ε form is +∞ there.
    With σ_t² = β̃_t, w_ε = ½(SNR(t−1) − SNR(t))/SNR(t) (Kingma et al. 2021, VDM, eq. 13 discretised).

    t = 0 is the decoder term −log p_θ(x_0 | x_{t=0}) with p_θ = N(x̂_0, σ_0² I), σ_0² = β_0, up to its constant
    ½ log(2π β_0): ‖x̂_0 − x_0‖²/(2β_0) per dimension, i.e. w_ε = 1/(2(1 − β_0)). Why β_0: the posterior variance
    β̃_0 is 0 (the step into the data is deterministic given x_0), so the KL form is infinite and a fixed positive
    variance must be chosen; β_0 is Ho et al.'s "large" choice and the natural noise level of the first step. And
    since 1 − ᾱ_0 = β_0 and ᾱ_{−1} = 1, the Gaussian NLL up to its constant is *exactly* the L_{t−1} formula above
    evaluated at t = 0 with σ_0² = β_0, so both readings of the decoder term coincide; the weight (≈ ½) also
    continues smoothly into t = 1 (w_ε(1) ≈ β_1/(2β_0) ≈ 0.6 for the linear schedule). (improved-diffusion instead
    uses β̃_1 as the t = 0 variance and a discretised likelihood for 8-bit images; that is a data-specific choice.)
    """
    b, _a, ap, oma = terms.beta, terms.abar, terms.abar_prev, terms.one_minus_abar
    if loss.variance == "small":
        var = (1.0 - ap) * b / oma  # β̃_t = (1 − ᾱ_{t−1}) β_t / (1 − ᾱ_t)
    else:
        var = b
    var = torch.where(terms.t == 0, b, var)  # decoder variance σ_0² = β_0 (docstring)
    if prediction == "x0":
        return ap * b**2 / (2.0 * var * oma**2)
    if prediction == "v":
        return ap * b**2 / (2.0 * var * oma)
    return b**2 / (2.0 * var * oma * (1.0 - b))


def _sgm(terms: _Terms, prediction: str, loss: "DiffusionLoss") -> torch.Tensor:
    """Likelihood weighting of score-based models (Song et al. 2021, "Maximum Likelihood Training of Score-Based
    Diffusion Models", Thm. 1): λ(t) = g(t)² = β(t) on the score error ‖s_θ − ∇log p(x_t|x_0)‖². The score is
    −ε/σ_t, so on the ε error w_ε = β_t/(1 − ᾱ_t), with the per-step β_t standing for β(t)Δt. Own spaces:
    ε: β_t/(1 − ᾱ_t); x0: β_t ᾱ_t/(1 − ᾱ_t)²; v: β_t ᾱ_t/(1 − ᾱ_t). (The continuous-time ELBO is ½ of this
    weighting, and ``vlb`` tends to ½·``sgm`` as β_t → 0.)"""
    b, a, oma = terms.beta, terms.abar, terms.one_minus_abar
    if prediction == "x0":
        return b * a / oma**2
    if prediction == "v":
        return b * a / oma
    return b / oma


def _snr(terms: _Terms, prediction: str, loss: "DiffusionLoss") -> torch.Tensor:
    """P2 weighting (Choi et al. 2022, "Perception Prioritized Training of Diffusion Models", eq. 8) on the ε error:
    w_ε = 1/(k + SNR)^γ. With k + SNR = (k(1 − ᾱ) + ᾱ)/(1 − ᾱ) and k > 0 the denominator k(1 − ᾱ) + ᾱ never
    vanishes, so ε: ((1 − ᾱ)/(k(1 − ᾱ) + ᾱ))^γ; x0 (× SNR): ᾱ (1 − ᾱ)^{γ−1}/(k(1 − ᾱ) + ᾱ)^γ (→ 1 at ᾱ = 1 for
    γ = 1, +∞ for γ < 1 — the true limit SNR^{1−γ}); v (× ᾱ): ᾱ ((1 − ᾱ)/(k(1 − ᾱ) + ᾱ))^γ."""
    a, oma = terms.abar, terms.one_minus_abar
    k, g = loss.k, loss.gamma
    den = k * oma + a
    if prediction == "x0":
        return a * oma ** (g - 1.0) / den**g
    w_eps = (oma / den) ** g
    return a * w_eps if prediction == "v" else w_eps


def _min_snr(terms: _Terms, prediction: str, loss: "DiffusionLoss") -> torch.Tensor:
    """Min-SNR-γ weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 9–10):
    w_ε = min(SNR, γ)/SNR = min(1, γ/SNR). Own spaces: ε: min(1, γ(1 − ᾱ)/ᾱ) (γ/0 = ∞ gives 1 at ᾱ = 0);
    x0: min(SNR, γ); v: min(SNR, γ)/(SNR + 1) = min(ᾱ, γ(1 − ᾱ)) — the published x0 and v forms."""
    a, oma, g = terms.abar, terms.one_minus_abar, loss.gamma
    if prediction == "x0":
        return torch.clamp(a / oma, max=g)
    if prediction == "v":
        return torch.minimum(a, g * oma)
    return torch.clamp(g * oma / a, max=1.0)


def _hybrid(terms: _Terms, prediction: str, loss: "DiffusionLoss") -> torch.Tensor:
    """λ·L_simple + (1 − λ)·L_vlb, λ = ``denoise_weight`` (Nichol & Dhariwal 2021, §3.1, here with a fixed reverse
    variance rather than a learned one). λ = 1 and λ = 0 return the pure terms, so λ = 1 never touches an infinite
    vlb weight (which would give 0·∞)."""
    lam = loss.denoise_weight
    simple = _simple(terms, prediction, loss)
    if lam == 1.0:
        return simple
    vlb = _vlb(terms, prediction, loss)
    if lam == 0.0:
        return vlb
    return lam * simple + (1.0 - lam) * vlb


LOSSES: dict[str, Callable[[_Terms, str, "DiffusionLoss"], torch.Tensor]] = {
    "simple": _simple,
    "vlb": _vlb,
    "sgm": _sgm,
    "snr": _snr,
    "min_snr": _min_snr,
    "hybrid": _hybrid,
}

# the γ each kind uses when none is given (only snr and min_snr have one)
_DEFAULT_GAMMA = {"snr": 1.0, "min_snr": 5.0}


# -- public API ------------------------------------------------------------------------------------------------------
class DiffusionLoss:
    """Per-sample training loss of a denoiser: own-space MSE times the own-space weight of ``kind`` at t.

    ``kind``: a name in ``LOSSES`` — ``simple``, ``vlb``, ``sgm``, ``snr`` (P2), ``min_snr``, ``hybrid`` (module and
    function docstrings give each formula and its source); ``prediction``: ``epsilon``, ``x0`` or ``v``, what the
    network outputs; ``gamma``: γ of ``snr`` (default 1) or ``min_snr`` (default 5), must be finite and > 0;
    ``k``: k of ``snr`` (default 1, must be finite and > 0: it keeps the weight bounded as SNR → 0);
    ``denoise_weight``: λ ∈ [0, 1], the weight of the denoising term against the bound: λ·L_kind + (1 − λ)·L_vlb
    for every kind but ``vlb`` (Nichol & Dhariwal 2021's hybrid objective generalised; ``hybrid`` is ``simple``
    with λ, default 1 = the pure kind); ``variance``: the fixed reverse variance of the L_vlb term, ``small`` (β̃_t)
    or ``large`` (β_t). Options that ``kind`` does not use are validated but
    ignored, so one config can sweep over kinds. Plain constructor arguments, for Hydra's ``_target_``.

    Nothing derived from a schedule is stored: weights are recomputed from the schedule's tables on every call
    (a gather of B entries), so one loss object serves any schedule.
    """

    def __init__(self, kind: str = "simple", prediction: str = "epsilon", gamma: float | None = None,
                 k: float = 1.0, denoise_weight: float = 1.0, variance: str = "small"):
        if kind not in LOSSES:
            raise ValueError(f"unknown loss kind {kind!r}; valid choices: {', '.join(LOSSES)}")
        check_prediction(prediction)
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; valid choices: {', '.join(VARIANCES)}")
        if gamma is not None:
            gamma = _real("gamma", gamma)
            if not (gamma > 0 and math.isfinite(gamma)):
                raise ValueError(f"gamma must be a finite number > 0 (or None for the default), got {gamma!r}")
        k = _real("k", k)
        if not (k > 0 and math.isfinite(k)):
            raise ValueError(f"k must be a finite number > 0, got {k!r}")
        denoise_weight = _real("denoise_weight", denoise_weight)
        if not 0.0 <= denoise_weight <= 1.0:
            raise ValueError(f"denoise_weight must lie in [0, 1], got {denoise_weight!r}")
        self.kind, self.prediction, self.variance = kind, prediction, variance
        self.gamma = gamma if gamma is not None else _DEFAULT_GAMMA.get(kind)
        self.k, self.denoise_weight = k, denoise_weight

    def weights(self, schedule: Schedule, t) -> torch.Tensor:
        """Own-space weight w_ε(t)/c_p(t) at integer timesteps ``t`` (B,), float64 on the CPU. Entries are finite
        wherever the true weight is, +∞ where it is infinite (the ELBO of an ε-network at ᾱ_t = 0), never NaN."""
        return self._weight(_gather(schedule, t))

    def _weight(self, terms: _Terms) -> torch.Tensor:
        w = LOSSES[self.kind](terms, self.prediction, self)
        lam = self.denoise_weight
        if lam == 1.0 or self.kind in ("vlb", "hybrid"):  # hybrid mixes inside; λ = 1 never touches an ∞ vlb weight
            return w
        return lam * w + (1.0 - lam) * _vlb(terms, self.prediction, self)

    def __call__(self, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t,
                 schedule: Schedule) -> torch.Tensor:
        """Per-sample loss (B,) in ``model_output``'s dtype: weight(t) × mean over data dims of
        (model_output − target)², target = ε, x_0 or v = α ε − σ x_0 built from ``x0`` and ``noise`` at the integer
        timesteps ``t`` (as for x_t = q_sample(schedule, x0, t, noise)). The squared error is taken in at least
        float32 (half-precision outputs are upcast) and cast back. Raises ValueError where a selected weight is
        infinite, rather than returning ∞ (and NaN gradients)."""
        if model_output.shape != x0.shape or noise.shape != x0.shape:
            raise ValueError(f"model_output, x0 and noise must have one shape, got {tuple(model_output.shape)}, "
                             f"{tuple(x0.shape)}, {tuple(noise.shape)}")
        if model_output.ndim < 1:
            raise ValueError("model_output must have a batch dimension")
        B = model_output.shape[0]
        terms = _gather(schedule, t)
        if terms.t.shape != (B,):
            raise ValueError(f"t must have one timestep per sample ({B}), got shape {tuple(terms.t.shape)}")
        w = self._weight(terms)
        bad = ~torch.isfinite(w)
        if bool(bad.any()):
            ts = sorted(set(terms.t[bad].tolist()))
            hint = (" (ᾱ_t = 0: an ε-prediction network cannot determine x̂_0 = (x_t − σ ε̂)/α there, so its ELBO "
                    "term is infinite; use prediction 'v' or 'x0' with a zero-terminal-SNR schedule)"
                    if self.prediction == "epsilon" and bool(torch.all(terms.abar[bad] == 0)) else "")
            raise ValueError(f"the {self.kind!r} loss weight for prediction {self.prediction!r} is infinite at "
                             f"t = {ts[:8]}{hint}")
        device, out_dtype = model_output.device, model_output.dtype
        work = torch.promote_types(torch.promote_types(out_dtype, x0.dtype), torch.float32)
        shape = (B,) + (1,) * (model_output.ndim - 1)
        # coefficients in float64 on the CPU first, then cast: some devices (MPS) have no float64
        alpha = terms.abar.sqrt().to(work).reshape(shape).to(device)
        sigma = terms.one_minus_abar.sqrt().to(work).reshape(shape).to(device)
        target = prediction_target(x0.to(device, work), noise.to(device, work), alpha, sigma, self.prediction)
        sq = (model_output.to(work) - target).square()
        mse = sq.flatten(1).mean(1) if sq.ndim > 1 else sq
        return (w.to(work).to(device) * mse).to(out_dtype)

    def __repr__(self) -> str:
        opts = [f"kind={self.kind!r}", f"prediction={self.prediction!r}"]
        if self.kind in _DEFAULT_GAMMA:
            opts.append(f"gamma={self.gamma!r}")
        if self.kind == "snr":
            opts.append(f"k={self.k!r}")
        mixed = self.kind == "hybrid" or (self.kind != "vlb" and self.denoise_weight != 1.0)
        if mixed:
            opts.append(f"denoise_weight={self.denoise_weight!r}")
        if self.kind == "vlb" or mixed:
            opts.append(f"variance={self.variance!r}")
        return f"DiffusionLoss({', '.join(opts)})"


def loss_weights(kind: str, schedule: Schedule, t, prediction: str = "epsilon", **options) -> torch.Tensor:
    """Shorthand for ``DiffusionLoss(kind, prediction, **options).weights(schedule, t)`` (plots, logging)."""
    return DiffusionLoss(kind, prediction, **options).weights(schedule, t)


def sample_timesteps(batch: int, schedule: Schedule, generator: torch.Generator | None = None, *,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Training timesteps drawn uniformly from {0, …, T−1} (Ho et al. 2020, Alg. 1), a long tensor (batch,).
    Drawn on the generator's device (CPU without one), then moved to ``device`` if given."""
    try:
        n = operator.index(batch)
    except TypeError:
        n = -1
    if n < 0 or isinstance(batch, bool):
        raise ValueError(f"batch must be a non-negative integer, got {batch!r}")
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(0, schedule.num_timesteps, (n,), generator=generator, device=gen_device)
    return t if device is None else t.to(device)


def _real(name: str, value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
