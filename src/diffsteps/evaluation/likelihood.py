"""The variational bound on the negative log-likelihood of a diffusion model, in bits per dimension.

For a chain of integer timesteps τ_1 < … < τ_K (all of 0 … T−1 by default) the reverse model
p(x_{τ_{i−1}} | x_{τ_i}) = N(μ_θ, Σ), with p(x_{τ_K}) = N(0, I) and the decoder p(x_0 | x_{τ_1}), bounds the NLL by
(Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, eq. 10–13, there with K = T):

    −log p(x_0) ≤ L_vlb = L_T + Σ_{i=2}^{K} L_{i−1} + L_0,
    L_T     = KL(q(x_{τ_K} | x_0) ‖ N(0, I)),                                  the prior term,
    L_{i−1} = E_q KL(q(x_{τ_{i−1}} | x_{τ_i}, x_0) ‖ p(x_{τ_{i−1}} | x_{τ_i})),  one term per transition,
    L_0     = E_q −log p(x_0 | x_{τ_1}),                                          the decoder term.

The forward posterior between any s < t is q(x_s | x_t, x_0) = N(c_0 x_0 + c_t x_t, β̃_{t|s} I)
(:func:`~diffsteps.core.process.posterior_coefficients`: Ho et al. eq. 6–7 with β_t → β_{t|s} = 1 − ᾱ_t/ᾱ_s), and the
model mean is the same expression with the network's x̂_0 in place of x_0, μ_θ = c_0 x̂_0 + c_t x_t (Ho et al. §3.2,
eq. 11 in ε form). Both are Gaussians, so each transition term is the closed-form Gaussian KL, per dimension

    ½ (log(Σ/β̃) + (β̃ + c_0² (x_0 − x̂_0)²)/Σ − 1),

which for Σ = β̃ reduces to c_0² (x_0 − x̂_0)²/(2β̃) = ½ (SNR(s) − SNR(t)) (x_0 − x̂_0)², SNR = ᾱ/(1 − ᾱ) (Ho et al.
eq. 8/12; Kingma et al. 2021's discrete-time form). ``variance`` chooses Σ:

- ``posterior``: Σ = β̃_{t|s}, the lower of Ho et al.'s two choices (optimal for a deterministic x_0);
- ``beta``: Σ = β_{t|s} = 1 − ᾱ_t/ᾱ_s, the upper one (optimal for x_0 ~ N(0, I));
- ``learned``: the network returns 2C channels along dimension 1, the prediction first and then v, and
  Σ = exp(v log β_{t|s} + (1 − v) log β̃_{t|s}) (Nichol & Dhariwal 2021, eq. 15, v unconstrained as in the paper).
  So v = 0 is the ``posterior`` end and v = 1 the ``beta`` end. (improved-diffusion's and diffusers' checkpoints
  with ``learned_range`` emit v' ∈ [−1, 1] with v = (v' + 1)/2: map them before calling.)

The decoder at τ_1 is Gaussian with mean x̂_0 and variance σ² = 1 − ᾱ_{τ_1}, the β of the step from τ_1 into the
data (β_1 of Ho et al. for τ_1 = 0): the posterior variance of that step is 0, since x_0 is given, so the lower choice
is unavailable, and this is DDPM's choice. For ``learned`` the decoder variance interpolates, as in improved-diffusion
(which clips log β̃ at t = 0 to its value one step later), between σ² and β̃ of the transition τ_2 → τ_1; with a
single timestep there is nothing to interpolate and σ² is used. For continuous data L_0 = −log N(x_0; x̂_0, σ² I);
for 8-bit images scaled to [−1, 1] it is the discretised Gaussian of Ho et al. §3.3 (eq. 13): each of the 256 levels
owns the interval of width 2/255 around it, the outermost bins reaching to ±∞, and p(x_0 | x_{τ_1}) is the Gaussian
mass in that bin — a probability, so L_0 ≥ 0 and the bound is a bound on the discrete NLL.

Estimator: the prior term is exact given x_0; every other term is estimated with one independent draw
x_{τ_i} ~ q(x_{τ_i} | x_0) per sample and timestep, which is unbiased for each term (the KL inside is exact given
x_0 and x_{τ_i}). One model call per timestep for the whole batch, so memory is O(batch) and the cost is K calls.
All terms are reported in bits per dimension, i.e. divided by D ln 2 with D the number of dimensions per sample.

In continuous time (K → ∞ over a fixed ᾱ range, Σ = β̃) the sum of transition terms becomes the diffusion loss of
Kingma et al. 2021 ("Variational Diffusion Models", §3.5), −½ ∫ SNR′(t) ‖x_0 − x̂_0‖² dt; splitting a transition in
two with the same x̂_0 never loosens that bound (Kingma et al. 2021, §3.4), so few steps give a looser bound than all T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..core.parameterizations import check_prediction
from ..core.process import posterior_coefficients, q_posterior, q_sample
from ..core.schedules import Schedule
from ..sampling.denoiser import Denoiser

__all__ = ["ELBO", "VARIANCES", "check_discrete_data", "elbo", "elbo_bpd", "discretized_gaussian_log_likelihood"]

_F64 = torch.float64
_LN2 = math.log(2.0)

VARIANCES = ("posterior", "beta", "learned")

# 8-bit data on [−1, 1] by default: level k sits at −1 + k·2/255, and its bin reaches half a level spacing either side
_LEVELS = 256


@dataclass(frozen=True, eq=False)
class ELBO:
    """Per-sample terms of the bound, float64, in bits per dimension: ``total`` (N,) = ``prior`` (N,) +
    ``kl``.sum(1) + ``decoder`` (N,); ``kl`` (N, K − 1) has column i − 2 for the transition τ_i → τ_{i−1}
    (i = 2 … K, so column 0 is τ_2 → τ_1); ``timesteps`` (K,) long, increasing, the chain τ_1 … τ_K used."""

    total: torch.Tensor
    prior: torch.Tensor
    decoder: torch.Tensor
    kl: torch.Tensor
    timesteps: torch.Tensor


# -- Gaussian pieces ----------------------------------------------------------------------------------------------
def _normal_kl(mean_q, var_q, mean_p, var_p, log_var_q=None, log_var_p=None):
    """Elementwise KL(N(mean_q, var_q) ‖ N(mean_p, var_p)) in nats. Log-variances may be passed in when known so
    that equal variances cancel exactly (the ``posterior`` choice then has no rounding residue)."""
    log_var_q = torch.log(var_q) if log_var_q is None else log_var_q
    log_var_p = torch.log(var_p) if log_var_p is None else log_var_p
    return 0.5 * (log_var_p - log_var_q + (var_q + (mean_q - mean_p).square()) / var_p - 1.0)


def _log_sub_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) − exp(b)) for a > b, without cancellation in either regime of a − b."""
    d = b - a  # < 0
    # log1p(−e^d) loses precision as d → 0⁻, log(−expm1(d)) as d → −∞; switch at −ln 2 (Mächler 2012)
    return a + torch.where(d > -_LN2, torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, var, levels: int = _LEVELS) -> torch.Tensor:
    """Elementwise log P(bin of x) under N(mean, var) for data on ``levels`` equally spaced values in [−1, 1] (8-bit
    images: 256; Ho et al. 2020, §3.3, eq. 13): the bin of level x is [x − 1/(L−1), x + 1/(L−1)], with −∞ as the
    lower edge at x = −1 and +∞ as the upper edge at x = +1, so the L bin probabilities sum to 1 for any mean and
    variance. Computed in float64 from log-CDFs
    (``log_ndtr``); for a bin above the mean the mirrored bin below it is used, since Φ(b) − Φ(a) = Φ(−a) − Φ(−b)
    and the lower tail is where log Φ keeps its precision — so no bin, however far from the mean, rounds to
    probability 0 (no clamp at 1e-12 as in other implementations)."""
    # dtype given to as_tensor directly: a Python float would otherwise pass through float32 first
    x = torch.as_tensor(x, dtype=_F64)
    mean = torch.as_tensor(mean, dtype=_F64, device=x.device)
    std = torch.as_tensor(var, dtype=_F64, device=x.device).sqrt()
    half_bin = 1.0 / (levels - 1)
    lo = torch.where(x <= -1.0, -math.inf, (x - half_bin - mean) / std)
    hi = torch.where(x >= 1.0, math.inf, (x + half_bin - mean) / std)
    upper = (lo + hi) > 0  # the bin's centre lies above the mean (the edge bins resolve by their finite edge)
    lo, hi = torch.where(upper, -hi, lo), torch.where(upper, -lo, hi)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    # lo = −∞ (an edge bin): log Φ(lo) = −∞ and the difference is just log Φ(hi)
    return torch.where(torch.isinf(lo), log_hi, _log_sub_exp(log_hi, log_lo))


# -- input checks -------------------------------------------------------------------------------------------------
def _check_timesteps(timesteps, T: int) -> torch.Tensor:
    if timesteps is None:
        return torch.arange(T)
    ts = torch.as_tensor(timesteps).detach().cpu()
    if ts.ndim != 1 or ts.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {tuple(ts.shape)}")
    if ts.dtype == torch.bool or ts.is_complex():
        raise ValueError(f"timesteps must be integers, got dtype {ts.dtype}")
    if ts.is_floating_point():
        if not bool(torch.all(torch.isfinite(ts) & (ts == ts.round()))):
            raise ValueError("timesteps must be whole numbers: the bound is defined on the discrete chain "
                             "(round a sampler's timesteps with spacings.to_integer_timesteps)")
    ts = ts.long()
    if int(ts.min()) < 0 or int(ts.max()) > T - 1:
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got {int(ts.min())} … {int(ts.max())}")
    if len(ts) > 1 and not bool(torch.all(ts[1:] > ts[:-1])):
        raise ValueError("timesteps must be strictly increasing (τ_1 < … < τ_K); a sampler's timesteps run "
                         "noisiest first, so pass them reversed, e.g. timesteps.flip(0)")
    return ts


def check_discrete_data(x0: torch.Tensor, levels: int) -> None:
    """Raises unless ``x0`` lies on the ``levels``-value grid −1 + 2k/(levels − 1) that the discretised decoder
    scores (``levels`` an integer ≥ 2)."""
    if isinstance(levels, bool) or int(levels) != levels or levels < 2:
        raise ValueError(f"levels must be an integer ≥ 2, got {levels!r}")
    if float(x0.min()) < -1.0 - 1e-6 or float(x0.max()) > 1.0 + 1e-6:
        raise ValueError("discrete=True expects data scaled to [−1, 1], got values in "
                         f"[{float(x0.min()):.4g}, {float(x0.max()):.4g}]")
    k = (x0.to(_F64) + 1.0) * (levels - 1) / 2.0
    if float((k - k.round()).abs().max()) > 1e-3:
        raise ValueError(f"discrete=True expects values on the {levels}-level grid −1 + 2k/{levels - 1}; pass the "
                         "data's number of levels (levels=256 for 8-bit images), or discrete=False for continuous "
                         "or dequantised data")


class _Network(torch.nn.Module):
    """The user's model as :class:`~diffsteps.sampling.denoiser.Denoiser` sees it: rejects non-finite outputs and, for a
    learned variance, splits off the v channels (kept in ``v``) so the Denoiser only receives the prediction.
    Holding the model as a submodule keeps the Denoiser's dtype detection (its first floating parameter)."""

    def __init__(self, model: Callable, learned: bool):
        super().__init__()
        self.inner, self.learned = model, learned
        self.v: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.inner(x, t)
        where = f"at t = {t[0].item():g}"
        if self.learned:
            if out.ndim < 2 or out.shape[0] != x.shape[0] or out.shape[1] != 2 * x.shape[1] \
                    or out.shape[2:] != x.shape[2:]:
                raise ValueError(f"variance='learned' needs the model to return 2C channels along dimension 1 "
                                 f"(prediction, then v): input {tuple(x.shape)}, output {tuple(out.shape)}")
            out, self.v = out.chunk(2, dim=1)
        elif out.shape != x.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} differs from its input {tuple(x.shape)} "
                             "(a learned-variance network needs variance='learned')")
        if not bool(torch.isfinite(out).all()) or (self.learned and not bool(torch.isfinite(self.v).all())):
            raise ValueError(f"the model returned non-finite values {where}")
        return out


# -- the bound ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def elbo(model: Callable, x0: torch.Tensor, schedule: Schedule, *, prediction: str = "epsilon",
         timesteps=None, variance: str = "posterior", discrete: bool | None = None, levels: int = _LEVELS,
         clip_denoised: float | None = None, generator: torch.Generator | None = None) -> ELBO:
    """Per-sample variational bound L_vlb = L_T + Σ L_{i−1} + L_0 on −log p(x_0), in bits per dimension
    (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, eq. 10–13; module docstring for each term).

    ``model(x, t)`` is called through :class:`~diffsteps.sampling.denoiser.Denoiser` (x cast to the model's dtype, t a 1-D
    float tensor) and returns ``prediction`` (``epsilon``, ``x0`` or ``v``), plus the v channels when ``variance``
    is ``learned``. ``x0`` (N, ...): the data. ``timesteps``: the chain τ_1 < … < τ_K, strictly increasing integers
    in [0, T) (default: all T). ``variance``: Σ of the reverse steps, ``posterior`` (β̃), ``beta`` (1 − ᾱ_t/ᾱ_s) or
    ``learned``. ``discrete``: discretised-Gaussian decoder for data on ``levels`` values in [−1, 1] (8-bit images:
    256, the default; scikit-learn's digits: 17), else a Gaussian density (for discrete data that is a density, not
    a probability, and can be negative). Pass it from the data's declaration, ``discrete=spec.levels is not None,
    levels=spec.levels`` (:class:`~diffsteps.data.DataSpec`), as the runner does; left None, a convenience for direct
    calls takes (N, C, H, W) batches as 8-bit images and anything else (vectors (N, D), signals (N, C, L)) as
    continuous — data off the level grid then raise rather than pass silently. ``clip_denoised``: clamp
    x̂_0 to [−c, c] (as the sampler would).
    ``generator``: for the draws x_{τ_i} ~ q(x_{τ_i} | x_0), one per sample and timestep.

    Runs under ``no_grad``; the model's train/eval mode is left as it is. The KL and decoder arithmetic is
    float64 on x0's device, the model runs in its own dtype.
    """
    check_prediction(prediction)
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid choices: {', '.join(VARIANCES)}")
    if not isinstance(x0, torch.Tensor) or x0.ndim < 2 or x0.shape[0] == 0:
        shape = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a batch (N, ...) of at least one sample with a data dimension, got {shape}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 contains non-finite values")
    ts = _check_timesteps(timesteps, schedule.num_timesteps)
    discrete = x0.ndim == 4 if discrete is None else bool(discrete)
    if discrete:
        check_discrete_data(x0, levels)

    N, D = x0.shape[0], x0[0].numel()
    device = x0.device
    x0 = x0.to(_F64)
    net = _Network(model, learned=variance == "learned")
    denoise = Denoiser(net, prediction, clip_denoised=clip_denoised)
    gen_device = generator.device if generator is not None else device
    abar = schedule.alphas_cumprod
    bits = D * _LN2

    def predict(t: int):
        """x_t ~ q(x_t | x_0) and the model's x̂_0 (and v) there."""
        noise = torch.randn(x0.shape, generator=generator, dtype=_F64, device=gen_device).to(device)
        tt = torch.full((N,), t, dtype=torch.long)
        x_t = q_sample(schedule, x0, tt, noise)
        a = abar[t].item()
        x0_hat, _ = denoise(x_t, float(t), math.sqrt(a), math.sqrt(1.0 - a))
        if not bool(torch.isfinite(x0_hat).all()):
            hint = (" (ᾱ_t = 0: an ε-prediction cannot determine x̂_0 there; use prediction 'v' or 'x0', or a chain "
                    "that stops below the last timestep)" if a == 0.0 and prediction == "epsilon" else "")
            raise ValueError(f"x̂_0 is not finite at t = {t}{hint}")
        v = net.v.to(device, _F64) if variance == "learned" else None
        return tt, x_t, x0_hat, v

    def per_sample(terms: torch.Tensor) -> torch.Tensor:
        return terms.reshape(N, -1).sum(1) / bits

    # prior: KL(N(√ᾱ x_0, (1 − ᾱ) I) ‖ N(0, I)), exact given x_0
    aK = abar[ts[-1]].item()
    one_minus = 1.0 - aK
    log_one_minus = math.log(one_minus) if one_minus > 0 else -math.inf
    prior = per_sample(0.5 * (one_minus + aK * x0.square() - 1.0 - log_one_minus))

    kl = torch.zeros(N, len(ts) - 1, dtype=_F64, device=device)
    for i in range(len(ts) - 1, 0, -1):  # transition τ_{i+1} → τ_i in 0-based indices, noisiest first
        t, s = ts[i].item(), ts[i - 1].item()
        tt, x_t, x0_hat, v = predict(t)
        ss = torch.full((N,), s, dtype=torch.long)
        mean_q, var_q = q_posterior(schedule, x0, x_t, tt, ss)
        mean_p, _ = q_posterior(schedule, x0_hat, x_t, tt, ss)
        _, _, post_var, beta = posterior_coefficients(abar[t], abar[s])
        log_post, log_beta = post_var.log().item(), beta.log().item()
        if variance == "posterior":
            log_var_p = torch.tensor(log_post, dtype=_F64, device=device)
        elif variance == "beta":
            log_var_p = torch.tensor(log_beta, dtype=_F64, device=device)
        else:
            log_var_p = v * log_beta + (1.0 - v) * log_post
        terms = _normal_kl(mean_q, var_q, mean_p, log_var_p.exp(),
                           log_var_q=torch.tensor(log_post, dtype=_F64, device=device), log_var_p=log_var_p)
        kl[:, i - 1] = per_sample(terms)

    # decoder at τ_1, variance of the step τ_1 → data (module docstring)
    t1 = ts[0].item()
    _, _, x0_hat, v = predict(t1)
    log_var = torch.tensor(math.log(1.0 - abar[t1].item()), dtype=_F64, device=device)
    if variance == "learned" and len(ts) > 1:
        _, _, lower, _ = posterior_coefficients(abar[ts[1]], abar[t1])
        log_var = v * log_var + (1.0 - v) * lower.log().item()
    if discrete:
        nll = -discretized_gaussian_log_likelihood(x0, x0_hat, log_var.exp(), levels)
    else:
        nll = 0.5 * ((x0 - x0_hat).square() / log_var.exp() + log_var + math.log(2.0 * math.pi))
    decoder = per_sample(nll)

    total = prior + kl.sum(1) + decoder
    return ELBO(total=total, prior=prior, decoder=decoder, kl=kl, timesteps=ts)


def elbo_bpd(model: Callable, data, schedule: Schedule, *, batch_size: int = 256, progress: bool = False,
             device: torch.device | str | None = None, **kw) -> dict[str, float]:
    """Mean ELBO over a data set, in bits per dimension, for logging: :func:`elbo` on chunks of ``batch_size``.

    ``data``: a tensor (N, ...) or an iterable of batches (tensors, or tuples whose first entry is the data, as a
    DataLoader yields). Chunks are moved to ``device`` (default: the model's parameters' device, else left where
    they are). ``kw`` goes to :func:`elbo` (``prediction``, ``timesteps``, ``variance``, ``discrete``,
    ``clip_denoised``, ``generator``); ``progress`` shows a tqdm bar. Returns floats: ``elbo_bpd`` (the mean total),
    ``elbo_prior_bpd``, ``elbo_kl_bpd`` (the sum of the transition terms), ``elbo_decoder_bpd``, ``elbo_bpd_stderr``
    (the standard error of the mean total over samples) and ``elbo_num_samples``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if device is None and isinstance(model, torch.nn.Module):
        device = next((p.device for p in model.parameters()), None)
    if isinstance(data, torch.Tensor):
        batches: Iterable = data.split(batch_size)
        n_batches = math.ceil(len(data) / batch_size)
    else:
        batches, n_batches = data, (len(data) if hasattr(data, "__len__") else None)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, total=n_batches, desc="ELBO", leave=False)
    sums = {"total": 0.0, "prior": 0.0, "kl": 0.0, "decoder": 0.0}
    total_sq, n = 0.0, 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if device is not None:
            x = x.to(device)
        r = elbo(model, x, schedule, **kw)
        # sums in float64 on the host: per-chunk means would weight a short last chunk wrongly
        for key, val in (("total", r.total), ("prior", r.prior), ("kl", r.kl.sum(1)), ("decoder", r.decoder)):
            sums[key] += val.sum().item()
        total_sq += r.total.square().sum().item()
        n += len(r.total)
    if n == 0:
        raise ValueError("data holds no samples")
    mean = sums["total"] / n
    var = max(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return {"elbo_bpd": mean, "elbo_prior_bpd": sums["prior"] / n, "elbo_kl_bpd": sums["kl"] / n,
            "elbo_decoder_bpd": sums["decoder"] / n, "elbo_bpd_stderr": math.sqrt(var / n),
            "elbo_num_samples": float(n)}
