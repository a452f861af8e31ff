"""Restoration metrics against the ground truth: MSE and PSNR (on a region), SSIM, AUROC, FID of a set of results,
and the digits classifier's class consistency. Images are in [−1, 1] (the data modules' scaling), so the peak-to-peak
range in PSNR and SSIM is 2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..evaluation.distances import _mean_cov, frechet_distance

__all__ = ["auroc", "class_consistency", "fid", "mse", "psnr", "ssim"]

DATA_RANGE = 2.0  # images live in [−1, 1]


def mse(x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample mean squared error over the entries where ``mask`` is 1 (all when None); (B,) float64."""
    d = (x.double() - y.double()).square()
    if mask is None:
        return d.flatten(1).mean(1)
    m = mask.double().expand_as(d)
    return (d * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)


def psnr(x: Tensor, y: Tensor, mask: Tensor | None = None, data_range: float = DATA_RANGE) -> Tensor:
    """Per-sample PSNR = 10 log₁₀(R² / MSE) in dB, R the data range (2 for [−1, 1]); on ``mask``'s entries."""
    return 10 * torch.log10(data_range**2 / mse(x, y, mask).clamp_min(1e-20))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, data_range: float = DATA_RANGE, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Per-sample SSIM (Wang et al. 2004, eq. 13): the mean over positions and channels of
    (2μ_xμ_y + C₁)(2σ_xy + C₂) / ((μ_x² + μ_y² + C₁)(σ_x² + σ_y² + C₂)), C₁ = (K₁R)², C₂ = (K₂R)², with local
    statistics under an 11×11 Gaussian window of σ = 1.5, normalised, over the positions where it fits entirely
    ("valid"; Wang et al.'s reference code). Images smaller than the window (8×8 digits) use a window of the
    image's size. Inputs (B, C, H, W); returns (B,) float64."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) batches of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    size = min(win_size, x.shape[-1], x.shape[-2])
    g = _gaussian_window(size, sigma)
    w = (g[:, None] * g[None, :])[None, None].to(x.device)
    B, C, H, W = x.shape
    a, b = x.double().reshape(B * C, 1, H, W), y.double().reshape(B * C, 1, H, W)

    def filt(z):
        return F.conv2d(z, w)

    mx, my = filt(a), filt(b)
    sxx, syy, sxy = filt(a * a) - mx**2, filt(b * b) - my**2, filt(a * b) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.reshape(B, -1).mean(1)


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = anomalous): the Mann–Whitney probability
    P(s⁺ > s⁻) + ½ P(s⁺ = s⁻), from ranks with ties averaged."""
    s, lab = torch.as_tensor(scores, dtype=torch.float64).flatten(), torch.as_tensor(labels).flatten().bool()
    n1, n0 = int(lab.sum()), int((~lab).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError(f"auroc needs both classes; got {n1} positive and {n0} negative labels")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    uniq, inv = torch.unique(s, return_inverse=True)
    mean_rank = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
    mean_rank /= torch.bincount(inv, minlength=len(uniq)).double()
    r = mean_rank[inv]
    return float((r[lab].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def fid(features: torch.nn.Module, real: Tensor, fake: Tensor, batch: int = 1024) -> float:
    """FID between the ``features`` of real and restored images (e.g. ``DigitsFeatures``): the Fréchet distance of
    the Gaussians fitted to them (:func:`~diffsteps.evaluation.distances.frechet_distance`)."""
    with torch.no_grad():
        fr = torch.cat([features(real[i:i + batch].float()) for i in range(0, len(real), batch)])
        ff = torch.cat([features(fake[i:i + batch].float()) for i in range(0, len(fake), batch)])
    return frechet_distance(*_mean_cov(fr), *_mean_cov(ff))


def class_consistency(classifier: torch.nn.Module, restored: Tensor, truth: Tensor) -> float:
    """Fraction of restored digits the classifier assigns the class it assigns their ground truth."""
    with torch.no_grad():
        a = classifier(restored.float().clamp(-1, 1)).argmax(1)
        b = classifier(truth.float()).argmax(1)
    return float((a == b).double().mean())

