"""Noise schedules of the discrete-time variance-preserving diffusion q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I).

Every schedule is a vector of T betas in float64; everything else (α, ᾱ, σ, log-SNR) derives from it. Index
convention (as in diffusers and improved-diffusion): t = 0 … T−1, ᾱ_t = Π_{s≤t} (1 − β_s), so x_0 (the data) sits
"before" t = 0 and ᾱ_{−1} = 1.

Continuous extension: samplers that step in σ or log-SNR visit non-integer t. We interpolate the log-SNR
λ(t) = log(ᾱ_t / (1 − ᾱ_t)) linearly between integer t. Reasons: λ is the variable the ODE solvers integrate over
(DPM-Solver), it is strictly monotone so the map t ↔ λ ↔ σ is exactly invertible, and linear interpolation in
λ = −2 log σ is the same as k-diffusion's linear interpolation in log σ, so fractional timesteps mean the same thing
there and here. Where λ is infinite (ᾱ_{T−1} = 0 after zero-terminal-SNR rescaling) the last interval interpolates
ᾱ linearly instead, which keeps ᾱ(t) continuous and monotone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable

import torch

__all__ = ["Schedule", "make_schedule", "SCHEDULES", "rescale_zero_terminal_snr", "diffusers_sampling_options"]

_F64 = torch.float64


def t_from_neg_log_snr(neg: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """t at log-SNR λ from the table −λ_t of a schedule's finite entries (increasing in t), λ linear between
    integer steps (the module docstring's continuous extension); λ must lie in the table's range. Split out so a
    sampler can keep the table on its own device and call this once per model call, without checks or a host
    round trip."""
    idx = torch.searchsorted(neg, -lam).clamp(1, len(neg) - 1)
    a, b = neg[idx - 1], neg[idx]
    return (idx - 1).to(_F64) + (((-lam) - a) / (b - a)).clamp(0, 1)


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete noise schedule: ``betas`` (float64, length T) and the quantities derived from it.

    - ``alphas`` = 1 − β_t, ``alphas_cumprod`` ᾱ_t = Π_{s≤t} α_s (Ho et al. 2020, eq. 4);
    - ``sigmas`` σ_t = √((1 − ᾱ_t)/ᾱ_t), the noise level of the variance-exploding view x/√ᾱ (Karras et al. 2022);
    - ``log_snr`` λ_t = log(ᾱ_t/(1 − ᾱ_t)) = −2 log σ_t (Kingma et al. 2021).
    """

    name: str
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=_F64).clone()
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D sequence of at least 2 values, got shape {tuple(betas.shape)}")
        if not (torch.all(betas > 0) and torch.all(betas <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, 0))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """ᾱ_{t−1} for t = 0 … T−1, with ᾱ_{−1} = 1 (the data): the other end of each posterior step."""
        return torch.cat([torch.ones(1, dtype=_F64), self.alphas_cumprod[:-1]])

    @property
    def sigmas(self) -> torch.Tensor:
        a = self.alphas_cumprod
        return ((1.0 - a) / a).sqrt()

    @property
    def log_snr(self) -> torch.Tensor:
        a = self.alphas_cumprod
        return torch.log(a) - torch.log1p(-a)

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    # -- continuous extension -------------------------------------------------------------------------------------
    def alpha_bar_at(self, t: torch.Tensor | float) -> torch.Tensor:
        """ᾱ(t) for real t ∈ [0, T−1]: λ interpolated linearly between integer steps (module docstring)."""
        t = torch.as_tensor(t, dtype=_F64)
        T = self.num_timesteps
        if torch.any(t < 0) or torch.any(t > T - 1):
            raise ValueError(f"t must lie in [0, {T - 1}], got range [{t.min().item()}, {t.max().item()}]")
        lo = t.floor().clamp(max=T - 2).long()
        w = t - lo
        lam, abar = self.log_snr, self.alphas_cumprod
        lam_t = torch.lerp(lam[lo], lam[lo + 1], w)
        abar_lin = torch.lerp(abar[lo], abar[lo + 1], w)
        finite = torch.isfinite(lam[lo]) & torch.isfinite(lam[lo + 1])
        out = torch.where(finite, torch.sigmoid(lam_t), abar_lin)
        # at integer t the result is the tabulated value itself, not its round trip through λ
        return torch.where(w == 0, abar[lo], torch.where(w == 1, abar[lo + 1], out))

    def t_from_log_snr(self, lam: torch.Tensor | float) -> torch.Tensor:
        """Inverse of λ(t) under the same interpolation; λ must lie within [λ_{T−1}, λ_0] and be finite."""
        lam = torch.as_tensor(lam, dtype=_F64)
        table = self.log_snr
        finite = table[torch.isfinite(table)]
        lo_lam, hi_lam = finite[-1].item(), finite[0].item()
        if torch.any(~torch.isfinite(lam)) or torch.any(lam < lo_lam - 1e-12) or torch.any(lam > hi_lam + 1e-12):
            raise ValueError(f"log-SNR must lie in [{lo_lam:.6g}, {hi_lam:.6g}]")
        return t_from_neg_log_snr(-finite, lam)

    def t_from_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Inverse of σ(t): t such that σ(t) = sigma, under the λ interpolation."""
        sigma = torch.as_tensor(sigma, dtype=_F64)
        return self.t_from_log_snr(-2.0 * torch.log(sigma))

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> Schedule:
        """The schedule of a diffusers scheduler config (``scheduler_config.json`` as a dict; no diffusers import):
        ``trained_betas`` as given, else ``beta_schedule`` over ``num_train_timesteps`` with ``beta_start`` /
        ``beta_end`` exactly as diffusers builds it (``linear``: linspace, not rescaled by 1000/T;
        ``scaled_linear``: linspace of √β squared; ``squaredcos_cap_v2``: Nichol & Dhariwal's cosine with
        max_beta 0.999; ``sigmoid``), then ``rescale_betas_zero_snr``. An unsupported value names the key and the
        valid choices (:func:`diffusers_sampling_options` checks the sampling keys)."""
        diffusers_sampling_options(config)  # reject the whole config before building anything
        c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        T = c["num_train_timesteps"]
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise ValueError(f"diffusers scheduler config: num_train_timesteps must be an integer ≥ 2, got {T!r}")
        if config.get("trained_betas") is not None:
            betas, name = torch.as_tensor(list(config["trained_betas"]), dtype=_F64), "diffusers:trained_betas"
            if len(betas) != T:
                raise ValueError(f"diffusers scheduler config: trained_betas has {len(betas)} values but "
                                 f"num_train_timesteps is {T}")
        else:
            kind = c["beta_schedule"]
            if kind not in _DIFFUSERS_BETAS:
                raise ValueError(f"diffusers scheduler config: unsupported beta_schedule {kind!r}; valid choices: "
                                 f"{', '.join(_DIFFUSERS_BETAS)} (or trained_betas)")
            betas, name = _DIFFUSERS_BETAS[kind](T, float(c["beta_start"]), float(c["beta_end"])), f"diffusers:{kind}"
        if c["rescale_betas_zero_snr"]:
            betas = rescale_zero_terminal_snr(betas)
        return cls(name, betas)

    def __repr__(self) -> str:
        a = self.alphas_cumprod
        return f"Schedule({self.name!r}, T={self.num_timesteps}, ᾱ_0={a[0].item():.6g}, ᾱ_T-1={a[-1].item():.6g})"


# -- schedule definitions -----------------------------------------------------------------------------------------
def _linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020: β linear from 1e-4 to 0.02 at T = 1000; for other T both ends are scaled by 1000/T so the
    total noise Σβ stays the same (Nichol & Dhariwal 2021, improved-diffusion ``get_named_beta_schedule``)."""
    scale = 1000.0 / T
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=_F64)


def _scaled_linear(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Latent/Stable Diffusion: β = (linspace(√β_start, √β_end, T))² (diffusers ``scaled_linear``)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=_F64) ** 2


def _quadratic(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDIM repository ``quad``: β = (linspace(√β_start, √β_end, T))², ends scaled by 1000/T like ``linear``."""
    scale = 1000.0 / T
    return torch.linspace((scale * beta_start) ** 0.5, (scale * beta_end) ** 0.5, T, dtype=_F64) ** 2


def _sigmoid(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDIM repository / GeoDiff ``sigmoid``: β = sigmoid(linspace(−6, 6, T)) (β_end − β_start) + β_start."""
    scale = 1000.0 / T
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=_F64)) * scale * (beta_end - beta_start) + scale * beta_start


def _cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: ᾱ(τ) = f(τ)/f(0), f(τ) = cos²((τ/T + s)/(1 + s) · π/2), and
    β_t = min(1 − ᾱ(t+1)/ᾱ(t), max_beta) for t = 0 … T−1 (so ᾱ_t = f(t+1)/f(0) wherever no clipping occurs)."""
    tau = torch.arange(T + 1, dtype=_F64)
    f = torch.cos((tau / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": _linear,
    "scaled_linear": _scaled_linear,
    "cosine": _cosine,
    "quadratic": _quadratic,
    "sigmoid": _sigmoid,
}


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1: shift and scale
    √ᾱ so that √ᾱ_{T−1} = 0 while √ᾱ_0 is unchanged, then recover β. The last β becomes exactly 1."""
    abar_sqrt = torch.cumprod(1.0 - betas.to(_F64), 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_schedule(name: str = "linear", num_timesteps: int = 1000, *, zero_terminal_snr: bool = False,
                  **options: float) -> Schedule:
    """Build a named schedule over ``num_timesteps`` training steps.

    ``name`` is one of ``SCHEDULES``; ``options`` go to the schedule (``beta_start``/``beta_end`` for the β-ramps,
    ``s``/``max_beta`` for ``cosine``); ``zero_terminal_snr`` applies :func:`rescale_zero_terminal_snr`.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid choices: {', '.join(SCHEDULES)}")
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer ≥ 2, got {num_timesteps!r}")
    try:
        betas = SCHEDULES[name](num_timesteps, **options)
    except TypeError as err:
        raise ValueError(f"bad options for schedule {name!r}: {err}") from None
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return Schedule(name, betas)


# -- diffusers scheduler configs --------------------------------------------------------------------------------------
# the defaults of diffusers' DDPMScheduler / DDIMScheduler for keys a saved config may omit
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0, "clip_sample": True,
    "clip_sample_range": 1.0, "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
    "rescale_betas_zero_snr": False, "use_karras_sigmas": False, "variance_type": "fixed_small"}
# diffusers' own β tables, without diffsteps' 1000/T rescaling of the named schedules (diffusers never rescales)
_DIFFUSERS_BETAS: dict[str, Callable[[int, float, float], torch.Tensor]] = {
    "linear": lambda T, b0, b1: torch.linspace(b0, b1, T, dtype=_F64),
    "scaled_linear": _scaled_linear,
    "squaredcos_cap_v2": lambda T, b0, b1: _cosine(T),
    "sigmoid": lambda T, b0, b1: torch.sigmoid(torch.linspace(-6, 6, T, dtype=_F64)) * (b1 - b0) + b0,
}
_DIFFUSERS_PREDICTIONS = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}
_DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")
# the sampling noise of ancestral schedulers; the learned ones need a network with 2C output channels
_DIFFUSERS_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
_DIFFUSERS_UNSUPPORTED_FLAGS = ("use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas")


def diffusers_sampling_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a diffusers scheduler config says about sampling, in diffsteps' terms (missing keys take diffusers'
    DDPM/DDIM defaults): ``prediction`` (``prediction_type`` epsilon → epsilon, sample → x0, v_prediction → v),
    ``spacing`` (``timestep_spacing`` leading / trailing / linspace, the same rules in
    :mod:`~diffsteps.core.spacings`; ``use_karras_sigmas`` → karras), ``clip_denoised`` (``clip_sample_range``
    when ``clip_sample``, else None) and, with ``thresholding``, ``dynamic_threshold``
    (``dynamic_thresholding_ratio``) and ``threshold_max`` (``sample_max_value``) — Imagen's dynamic thresholding
    as :class:`~diffsteps.sampling.Denoiser` applies it. Which solver to run is diffsteps' ``sampler`` choice, so
    solver keys (``solver_order``, ``algorithm_type``, …) are not read. An unsupported value raises, naming it."""
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}

    def check(key: str, valid) -> Any:
        if c[key] not in valid:
            raise ValueError(f"diffusers scheduler config: unsupported {key} {c[key]!r}; valid choices: "
                             f"{', '.join(map(str, valid))}")
        return c[key]

    prediction = _DIFFUSERS_PREDICTIONS[check("prediction_type", tuple(_DIFFUSERS_PREDICTIONS))]
    spacing = check("timestep_spacing", _DIFFUSERS_SPACINGS)
    check("variance_type", _DIFFUSERS_VARIANCES)
    if c["steps_offset"] != 0:
        raise ValueError(f"diffusers scheduler config: unsupported steps_offset {c['steps_offset']!r}; valid "
                         "choices: 0 (diffsteps' spacings start at the timesteps diffusers' spacings name)")
    for flag in _DIFFUSERS_UNSUPPORTED_FLAGS:
        if c.get(flag):
            raise ValueError(f"diffusers scheduler config: unsupported {flag}=true; valid choices: false "
                             "(use_karras_sigmas=true is supported)")
    if c["use_karras_sigmas"]:
        spacing = "karras"
    clip = None
    if c["clip_sample"]:
        clip = float(c["clip_sample_range"])
        if not clip > 0:
            raise ValueError(f"diffusers scheduler config: clip_sample_range must be positive, got {clip!r}")
    options: dict[str, Any] = {"prediction": prediction, "spacing": spacing, "clip_denoised": clip,
                               "dynamic_threshold": None, "threshold_max": None}
    if c["thresholding"]:
        ratio = float(c["dynamic_thresholding_ratio"])
        if not 0 < ratio <= 1:
            raise ValueError(f"diffusers scheduler config: dynamic_thresholding_ratio must lie in (0, 1], got "
                             f"{ratio!r}")
        options.update(dynamic_threshold=ratio, threshold_max=float(c["sample_max_value"]))
    return options
