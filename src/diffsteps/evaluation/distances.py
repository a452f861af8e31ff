"""Distances between feature distributions: the Fréchet distance (FID) and the kernel distance (KID); and between
the mean power spectra of signals (the log-spectral distance, :func:`log_spectral_distance`).

Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂) (Dowson & Landau 1982; as FID: Heusel et al. 2017)::

    d² = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)

FID is d² between the Gaussians fitted (mean, unbiased covariance) to the features of real and generated samples. It
is biased upwards at finite N (Chong & Forsyth 2020): for two independent samples of sizes n₁, n₂ from the *same*
Gaussian with covariance eigenvalues λᵢ, to leading order (see :func:`expected_null_fid`)::

    E[FID] ≈ tr Σ · (1/n₁ + 1/n₂) + ½ (1/(n₁−1) + 1/(n₂−1)) Σᵢⱼ λᵢλⱼ(1 + δᵢⱼ) / (λᵢ + λⱼ)

— e.g. 2d/N + d(d+1)/(2(N−1)) for Σ = I, n₁ = n₂ = N: compare FIDs only at equal N.

KID (Bińkowski et al. 2018) is the unbiased estimate of the squared maximum mean discrepancy (Gretton et al. 2012,
Lemma 6) with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³, for x (m points) and y (n points)::

    MMD²ᵤ = Σ_{i≠j} k(xᵢ, xⱼ) / (m(m−1)) + Σ_{i≠j} k(yᵢ, yⱼ) / (n(n−1)) − 2 Σ_{i,j} k(xᵢ, yⱼ) / (mn)

"""

from __future__ import annotations

import torch
from torch import Tensor


def _f64(x, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains non-finite values")
    return t


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    r"""Squared Fréchet (2-Wasserstein) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂) (Dowson & Landau 1982)::

        ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½

    In float64 on the CPU via two symmetric eigendecompositions: Σ₁ = U diag(λ) Uᵀ gives Σ₁^½ = U diag(√λ) Uᵀ, and
    tr (Σ₁^½ Σ₂ Σ₁^½)^½ = Σᵢ √νᵢ for the eigenvalues νᵢ of that symmetric PSD matrix (they equal those of Σ₁Σ₂, which
    FID code usually takes from a non-symmetric, less stable product). Eigenvalues that rounding made slightly negative
    are set to 0, so singular (N ≤ d) covariances are fine. Inputs: tensors or arrays (d,), (d, d), (d,), (d, d),
    covariances symmetric PSD. The result is ≥ 0 (a tiny negative from rounding is returned as 0).
    """
    mu1, mu2 = _f64(mu1, "mu1").reshape(-1), _f64(mu2, "mu2").reshape(-1)
    s1, s2 = _f64(sigma1, "sigma1"), _f64(sigma2, "sigma2")
    d = mu1.numel()
    if mu2.numel() != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, mu2 {tuple(mu2.shape)}, "
                         f"sigma2 {tuple(s2.shape)}; expected (d,), (d, d) twice")
    s1, s2 = _sym(s1), _sym(s2)
    lam, u = torch.linalg.eigh(s1)
    root1 = (u * lam.clamp_min(0.0).sqrt()) @ u.T
    nu = torch.linalg.eigvalsh(_sym(root1 @ s2 @ root1)).clamp_min(0.0)
    value = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2.0 * nu.sqrt().sum()
    return max(float(value), 0.0)


def expected_null_fid(sigma, n1: int, n2: int) -> float:
    r"""Leading-order expectation of FID between two independent samples (sizes n₁, n₂) of one Gaussian N(μ, Σ), i.e.
    FID's finite-sample bias for features that are exactly Gaussian (valid for n ≫ d)::

        tr Σ · (1/n₁ + 1/n₂) + ½ (1/(n₁−1) + 1/(n₂−1)) Σᵢⱼ λᵢλⱼ(1 + δᵢⱼ) / (λᵢ + λⱼ)

    with λ the eigenvalues of Σ. Derivation: the mean term is E‖μ̂₁ − μ̂₂‖² = tr Σ (1/n₁ + 1/n₂) exactly. The trace
    term is the squared Bures–Wasserstein distance between Σ̂₁ and Σ̂₂, which to second order is the metric at Σ,
    ½ Σᵢⱼ Hᵢⱼ² / (λᵢ + λⱼ) in Σ's eigenbasis with H = Σ̂₁ − Σ̂₂ (Bhatia, Jain & Lim 2019); and for Gaussian data
    Var(Σ̂ᵢⱼ) = λᵢλⱼ(1 + δᵢⱼ) / (n − 1) there (Wishart moments). For Σ = I and n₁ = n₂ = N it is
    2d/N + d(d + 1) / (2(N − 1)). The O(1/N) scaling is the bias Chong & Forsyth (2020) extrapolate away.
    """
    lam = torch.linalg.eigvalsh(_sym(_f64(sigma, "sigma"))).clamp_min(0.0)
    if n1 < 2 or n2 < 2:
        raise ValueError("expected_null_fid needs n1, n2 >= 2")
    li, lj = lam[:, None], lam[None, :]
    num = li * lj * (1.0 + torch.eye(len(lam), dtype=lam.dtype))
    den = li + lj
    cov_term = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0).sum()
    return float(lam.sum() * (1.0 / n1 + 1.0 / n2) + 0.5 * (1.0 / (n1 - 1) + 1.0 / (n2 - 1)) * cov_term)


def polynomial_mmd2(x: Tensor, y: Tensor, degree: int = 3, coef: float = 1.0) -> Tensor:
    r"""Unbiased MMD² estimate (Gretton et al. 2012, Lemma 6) between samples x (m, d) and y (n, d), m, n ≥ 2, with the
    polynomial kernel k(a, b) = (aᵀb / d + coef)^degree (Bińkowski et al. 2018); computed in float64::

        Σ_{i≠j} k(xᵢ, xⱼ) / (m(m−1)) + Σ_{i≠j} k(yᵢ, yⱼ) / (n(n−1)) − 2 Σ_{i,j} k(xᵢ, yⱼ) / (mn)
    """
    x, y = x.double(), y.double()
    m, n, d = len(x), len(y), x.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD estimate needs at least 2 points per sample, got {m} and {n}")
    kxx = (x @ x.T / d + coef) ** degree
    kyy = (y @ y.T / d + coef) ** degree
    kxy = (x @ y.T / d + coef) ** degree
    return ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
            - 2.0 * kxy.sum() / (m * n))


def kernel_distance(real: Tensor, fake: Tensor, subset_size: int, subsets: int,
                    generator: torch.Generator | None = None) -> tuple[float, float]:
    """KID: mean and (population) standard deviation of :func:`polynomial_mmd2` over ``subsets`` pairs of random
    subsets, each ``subset_size`` points drawn without replacement from each side (Bińkowski et al. 2018)."""
    if len(real) < subset_size or len(fake) < subset_size:
        raise ValueError(f"KID needs at least {subset_size} samples (the subset size) on each side, got "
                         f"{len(real)} real and {len(fake)} generated")
    values = []
    for _ in range(subsets):
        # Indices are drawn on the CPU from the given generator, so the subsets do not depend on the device.
        i = torch.randperm(len(real), generator=generator)[:subset_size].to(real.device)
        j = torch.randperm(len(fake), generator=generator)[:subset_size].to(fake.device)
        values.append(polynomial_mmd2(real[i], fake[j]))
    v = torch.stack(values)
    return float(v.mean()), float(v.std(unbiased=False))


def _mean_cov(f: Tensor) -> tuple[Tensor, Tensor]:
    # Two-pass (centre, then multiply) in float64: the one-pass Σxxᵀ − n μμᵀ loses digits when |μ| ≫ spread.
    f = f.double()
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (len(f) - 1)


# -- signals: power spectra --------------------------------------------------------------------------------------------
def power_spectrum_sum(x) -> Tensor:
    """Σ over samples and channels of the power spectrum |rfft(x)|² (float64, (L//2 + 1,)) of signals x (N, C, L):
    the additive statistic behind :func:`mean_power_spectrum`, so chunks and processes can be summed first."""
    x = _f64(x, "signals")
    if x.ndim != 3:
        raise ValueError(f"signals are batches (N, C, L), got shape {tuple(x.shape)}")
    return torch.fft.rfft(x, dim=-1).abs().square().sum((0, 1))


def mean_power_spectrum(x) -> Tensor:
    """The mean power spectrum P(k) = E |X(k)|², X = rfft(x) along L (numpy's unnormalised DFT), averaged over the
    N samples and C channels of x (N, C, L); float64 (L//2 + 1,)."""
    x = torch.as_tensor(x)
    return power_spectrum_sum(x) / (x.shape[0] * x.shape[1])


def log_spectral_distance(p_real, p_gen, floor: float = 1e-12) -> float:
    r"""The log-spectral distance in dB between two power spectra (Gray & Markel 1976; the speech-coding measure,
    here between the *mean* spectra of real and generated signals)::

        D_LS = sqrt( (1/K) Σ_k (10 log₁₀(P_gen(k) / P_real(k)))² )

    over the K = L//2 + 1 frequencies of :func:`mean_power_spectrum`. 0 for equal spectra; 1 dB ≈ 26 % power error
    at every frequency. Powers are floored at ``floor`` × the largest real power, so a frequency with (numerically)
    no power does not give an infinite distance."""
    p_real, p_gen = _f64(p_real, "p_real"), _f64(p_gen, "p_gen")
    if p_real.shape != p_gen.shape or p_real.ndim != 1:
        raise ValueError(f"power spectra must be 1-D of equal length, got {tuple(p_real.shape)} and "
                         f"{tuple(p_gen.shape)}")
    if (p_real < 0).any() or (p_gen < 0).any():
        raise ValueError("power spectra must be non-negative")
    tiny = floor * float(p_real.max()) if float(p_real.max()) > 0 else floor
    db = 10.0 * torch.log10(p_gen.clamp_min(tiny) / p_real.clamp_min(tiny))
    return float(db.square().mean().sqrt())
