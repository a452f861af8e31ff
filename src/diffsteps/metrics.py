r"""Sample-quality metrics: Fréchet distance (FID) and kernel distance (KID) in a pluggable feature space, and the
confidence of a digits classifier on generated digits.

Feature extractors (``FEATURES``, built by :func:`make_features`; each is frozen — ``requires_grad_(False)`` — stays in
eval mode even when a containing model calls ``.train()``, and has ``num_features``, ``name``, ``fingerprint``):

- ``digits`` (:class:`DigitsFeatures`): the 64-d penultimate layer (pre-activations, scaled to unit mean square) of a
  small CNN trained on the scikit-learn digits (:mod:`diffsteps.digits_classifier`; 99.2 % held-out accuracy;
  weights shipped in the package, sha256-checked).
  Input (N, 1, 8, 8) in [−1, 1], as :class:`~diffsteps.data.DigitsData` yields.
- ``inception`` (:class:`InceptionFeatures`): the standard FID features, Inception-v3 pool3 (2048-d), built exactly as
  ``torchmetrics.image.fid.FrechetInceptionDistance(feature=2048)`` builds them (torch-fidelity's port of the
  TensorFlow graph of Heusel et al.). Needs ``torch-fidelity`` (``pip install torch-fidelity`` or the project extra
  ``diffsteps[inception]``) and its weights file (downloaded once, or given as ``weights_path`` offline). Input
  (N, C, H, W), C ∈ {1, 3}, in [−1, 1]; converted to uint8 0…255 and resized to 299×299 inside.
- ``identity`` (:class:`IdentityFeatures`): the flattened raw coordinates, for vector data. For Gaussian data the
  Fréchet distance in this space is then the exact 2-Wasserstein distance between the fitted Gaussians.

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

averaged over ``kid_subsets`` random subsets of ``kid_subset_size`` points from each side; ``kid_std`` is the
standard deviation of the subset values (as in torchmetrics and Bińkowski et al.'s code), not a standard error. Its
expectation is exactly 0 when both samples come from one distribution, so — unlike FID — it can come out negative.

Why :class:`SampleQuality` is its own torchmetrics ``Metric`` rather than a wrapper of torchmetrics'
``FrechetInceptionDistance`` / ``KernelInceptionDistance`` (both accept a custom feature module, and vector inputs
work; tests check that the numbers agree with them):

1. The reference statistics are cached and loaded on every process. torchmetrics keeps the real side in metric states
   that are all-reduced under DDP even with ``reset_real_features=False``, so a reference loaded on each of W ranks
   is counted W times: FID's sums survive that almost unharmed (covariance denominators W·N − 1 instead of N − 1),
   but KID gathers W copies of every reference point, and copies drawn into one subset act as i = j terms in
   Σ_{i≠j} k(xᵢ, xⱼ), biasing the "unbiased" estimate upwards. Here the reference is held in plain attributes (not
   states, not buffers) and only generated features are synced (``dist_reduce_fx="cat"``); injecting cached
   statistics would also have meant writing torchmetrics' private state tensors.
2. The two classes would each run the feature extractor on every batch (twice the cost); here it runs once.
3. torchmetrics' KID draws its subsets from the global RNG, so results are not reproducible and evaluating in the
   middle of training shifts the training's random stream; here they come from a private generator (``kid_seed``),
   which also gives the same subsets at every step count (common random numbers for comparisons).
4. torchmetrics' FID takes eigenvalues of the non-symmetric Σ₁Σ₂; :func:`frechet_distance` uses symmetric
   eigendecompositions in float64, which are stable and never return complex values.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from .digits_classifier import WEIGHTS_SHA256, DigitsCNN, load_digits_classifier

__all__ = [
    "FEATURES", "make_features", "DigitsFeatures", "InceptionFeatures", "IdentityFeatures",
    "frechet_distance", "expected_null_fid", "polynomial_mmd2", "kernel_distance", "SampleQuality",
    "classifier_confidence", "INCEPTION_WEIGHTS_URL", "INCEPTION_WEIGHTS_FILE",
]

# torch-fidelity's Inception-v3 weights (converted from the TensorFlow graph of the original FID code); torch-fidelity
# downloads them into torch.hub's checkpoint folder on first use.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_WEIGHTS_ENV = "DIFFSTEPS_INCEPTION_WEIGHTS"
_CACHE_FORMAT = 1


# -- feature extractors ------------------------------------------------------------------------------------------------
class _Features(nn.Module):
    """Base of the extractors: (N, ...) → (N, num_features), frozen and always in eval mode."""

    name: str = ""
    num_features: int | None = None

    def train(self, mode: bool = True) -> "_Features":
        # A LightningModule holding an extractor calls .train() on all its children at every epoch; a feature space
        # that changed with that call would make FIDs from different phases incomparable.
        return super().train(False)

    @property
    def fingerprint(self) -> str:
        """Changes whenever the features would (weights, preprocessing): stored with cached reference statistics."""
        return self.name


def _freeze(m: nn.Module) -> nn.Module:
    return m.requires_grad_(False).eval()


class DigitsFeatures(_Features):
    """Penultimate-layer features (64 pre-activations, scaled; see :class:`~diffsteps.digits_classifier.DigitsCNN`)
    of the shipped digits CNN (:mod:`diffsteps.digits_classifier`).

    Input: (N, 1, 8, 8) floats in [−1, 1] (``DigitsData`` scaling), taken directly; values outside are clamped, as
    writing a sample out as an image would. ``weights_path``/``sha256`` select other weights (``sha256=None``
    skips the checksum).
    """

    name = "digits"
    num_features = DigitsCNN.num_features

    def __init__(self, weights_path: str | Path | None = None, sha256: str | None = WEIGHTS_SHA256):
        super().__init__()
        self.net = load_digits_classifier(weights_path, sha256)
        self._fingerprint = f"digits-cnn-{sha256 or 'unverified'}"
        _freeze(self)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x)


def _require_torch_fidelity():
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as e:
        raise ModuleNotFoundError(
            "the 'inception' features need torch-fidelity, which is not installed: `pip install torch-fidelity` "
            "(or install this project with its extra: `pip install 'diffsteps[inception]'`). The Inception-v3 "
            f"weights are downloaded on first use from {INCEPTION_WEIGHTS_URL}; on a machine without internet, "
            f"download that file elsewhere and pass weights_path=<file> (or set ${INCEPTION_WEIGHTS_ENV}), or put "
            f"it at {_hub_weights_path()}") from e


def _hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


class InceptionFeatures(_Features):
    """Inception-v3 pool3 features (2048-d): torchmetrics' ``NoTrainInceptionV3("inception-v3-compat", ["2048"])``,
    the very module ``FrechetInceptionDistance(feature=2048)`` uses (torch-fidelity's port of the TF-slim graph of
    Heusel et al. 2017; Szegedy et al. 2016).

    Input: (N, C, H, W) floats in [−1, 1] with C = 1 (repeated to RGB) or 3. Converted to uint8 by
    round((x + 1) · 127.5) after clamping — the exact inverse of how the data modules decode 8-bit images, so real
    images reach the network with their original pixel values — then resized to 299×299 by the network itself.
    ``antialias=False`` (default) resizes like TensorFlow 1.x bilinear, as torch-fidelity and the original FID code
    do, so numbers are comparable with published FIDs; ``True`` is torchmetrics' default (antialiased bilinear).

    Weights: ``weights_path`` (or the environment variable ``DIFFSTEPS_INCEPTION_WEIGHTS``) names a local copy of
    :data:`INCEPTION_WEIGHTS_URL`; without it torch-fidelity downloads the file once into torch.hub's cache,
    ``$TORCH_HOME/hub/checkpoints/`` (default ``~/.cache/torch/hub/checkpoints/``), where a copy placed by hand is
    also found offline.
    """

    name = "inception"
    num_features = 2048

    def __init__(self, weights_path: str | Path | None = None, antialias: bool = False):
        super().__init__()
        _require_torch_fidelity()
        from torchmetrics.image.fid import NoTrainInceptionV3

        weights_path = weights_path or os.environ.get(INCEPTION_WEIGHTS_ENV) or None
        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"Inception weights file {weights_path} does not exist (download "
                                    f"{INCEPTION_WEIGHTS_URL})")
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=None if weights_path is None
                                          else str(weights_path), antialias=bool(antialias))
        except Exception as e:
            if weights_path is not None:
                raise
            # Most likely no internet: say where the file goes instead of surfacing a bare URLError.
            raise RuntimeError(
                f"could not obtain the Inception-v3 weights ({type(e).__name__}: {e}). Download "
                f"{INCEPTION_WEIGHTS_URL} and pass weights_path=<file> (or set ${INCEPTION_WEIGHTS_ENV}), or put "
                f"it at {_hub_weights_path()}") from e
        self.antialias = bool(antialias)
        _freeze(self)

    @property
    def fingerprint(self) -> str:
        return f"inception-v3-compat-2048-{'antialias' if self.antialias else 'tf1resize'}"

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"inception features take (N, 1 or 3, H, W) images in [-1, 1], got {tuple(x.shape)}")
        x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)


class IdentityFeatures(_Features):
    """The raw coordinates, flattened to (N, num_features). ``num_features=None`` takes the dimension of the first
    input and then insists on it. Input: any range (no conversion)."""

    name = "identity"

    def __init__(self, num_features: int | None = None):
        super().__init__()
        if num_features is not None and (int(num_features) != num_features or num_features < 1):
            raise ValueError(f"num_features must be a positive integer or None, got {num_features!r}")
        self.num_features = None if num_features is None else int(num_features)
        _freeze(self)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(len(x), -1)
        if self.num_features is None:
            self.num_features = x.shape[1]
        elif x.shape[1] != self.num_features:
            raise ValueError(f"identity features: expected {self.num_features} coordinates per sample, got "
                             f"{x.shape[1]}")
        return x


FEATURES: dict[str, Callable[..., _Features]] = {
    "digits": DigitsFeatures,
    "inception": InceptionFeatures,
    "identity": IdentityFeatures,
}


def make_features(name: str, **kwargs) -> nn.Module:
    """A frozen, eval-mode feature extractor from :data:`FEATURES` (``kwargs`` go to its constructor)."""
    if name not in FEATURES:
        raise ValueError(f"unknown features {name!r}; choose one of {sorted(FEATURES)}")
    return FEATURES[name](**kwargs)


# -- distances ---------------------------------------------------------------------------------------------------------
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


# -- the metric --------------------------------------------------------------------------------------------------------
def _tensor_digest(h, name: str, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _payload_checksum(payload: dict) -> str:
    h = hashlib.sha256()
    for k in ("format", "features", "fingerprint", "input_sha256", "n"):
        h.update(f"{k}={payload[k]!r};".encode())
    for k in ("mean", "cov", "features_matrix"):
        _tensor_digest(h, k, payload[k])
    return h.hexdigest()


def _input_sha256(x: Tensor) -> str:
    h = hashlib.sha256()
    _tensor_digest(h, "real", x)
    return h.hexdigest()


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class SampleQuality(Metric):
    r"""FID and KID of generated samples against a fixed reference set, in the feature space ``features``.

    ``features`` is a :data:`FEATURES` name (``feature_kwargs`` go to it, e.g. ``weights_path`` for ``inception``)
    or any frozen ``nn.Module`` mapping (N, ...) → (N, d) with a ``num_features`` attribute. The extractor is not a
    child module (it would otherwise be written into every checkpoint and appear among the model's parameters); it
    is moved to the metric's device when used, never cast to another dtype.

    Usage: ``set_reference(real, key)`` once; then per evaluation (e.g. per number of sampling steps) ``update(fake)``
    on any number of batches, ``compute()`` → ``{"fid", "kid_mean", "kid_std"}`` (floats), ``reset()``.

    - ``set_reference`` computes the reference features, their mean and covariance (float64), and with ``cache_dir``
      stores them in ``cache_dir/<key>-<features>.pt`` with a sha256 checksum, the extractor's fingerprint and a
      hash of ``real``. Later calls load that file instead of running the extractor — unless it is unreadable,
      fails its checksum (both: corrupt), or was made by other features or from other data (stale); then it is
      recomputed and rewritten, with a warning. Written atomically, so DDP ranks sharing a folder are safe.
    - Inputs are run through the extractor in chunks of ``chunk_size`` under ``no_grad``; non-finite inputs raise.
    - Minimum sizes: FID needs ≥ 2 samples per side (the covariance divides by n − 1); KID needs ≥
      ``kid_subset_size`` per side. Fewer raise ``ValueError``. Between 2 and d samples the covariance is singular:
      FID is still defined but dominated by its O(d²/N) bias (a warning says so); compare FIDs only at equal N.
    - KID subsets come from a private generator seeded with ``kid_seed`` at every ``compute``.
    - Under DDP each rank updates with its own generated samples; ``compute`` gathers them (``cat``). The reference
      is not synced: every rank holds the full one.

    ``metric_kwargs`` go to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``, ``process_group``).
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    fake_features: list[Tensor]

    def __init__(self, features: str | nn.Module = "digits", kid_subset_size: int = 100, kid_subsets: int = 50,
                 cache_dir: str | Path | None = None, device: str | torch.device = "cpu", *, chunk_size: int = 512,
                 kid_seed: int = 0, metric_kwargs: dict | None = None, **feature_kwargs):
        super().__init__(**(metric_kwargs or {}))
        if isinstance(features, str):
            extractor = make_features(features, **feature_kwargs)
            self.features_name = features
        elif isinstance(features, nn.Module):
            if feature_kwargs:
                raise ValueError("feature_kwargs are only for features given by name")
            if not hasattr(features, "num_features"):
                raise ValueError("a custom feature module needs a num_features attribute")
            extractor = _freeze(features)
            self.features_name = str(getattr(features, "name", "") or type(features).__name__)
        else:
            raise TypeError(f"features must be a name in {sorted(FEATURES)} or an nn.Module, got {type(features)}")
        # Stored outside the module tree on purpose (see the class docstring).
        self.__dict__["_extractor"] = extractor
        self.fingerprint = str(getattr(extractor, "fingerprint", self.features_name))
        self.kid_subset_size = _check_int("kid_subset_size", kid_subset_size, 2)
        self.kid_subsets = _check_int("kid_subsets", kid_subsets, 1)
        self.chunk_size = _check_int("chunk_size", chunk_size, 1)
        self.kid_seed = int(kid_seed)
        self.cache_dir = None if cache_dir is None else Path(os.path.expanduser(str(cache_dir)))
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")
        # the global sample index of each feature row: after a DDP gather the rows are put back in index order, so
        # KID's random subsets (and float sums) see exactly what one process would
        self.add_state("fake_index", default=[], dist_reduce_fx="cat")
        # Reference statistics: plain attributes, not buffers or states — not synced under DDP (every rank holds the
        # full reference), not written into checkpoints, and moved by .to(device) (see _apply) but never cast by a
        # containing model's .half()/.double(): a float16 covariance would ruin the FID.
        self.ref_mean: Tensor | None = None
        self.ref_cov: Tensor | None = None
        self.ref_features: Tensor | None = None
        self.reference_key: str | None = None
        self.reference_source: str | None = None  # "computed" or "cache"
        self.to(device)

    def _apply(self, fn, *args, **kwargs):
        this = super()._apply(fn, *args, **kwargs)  # updates self.device (torchmetrics tracks it)
        for k in ("ref_mean", "ref_cov", "ref_features"):
            v = getattr(this, k, None)
            if v is not None:
                setattr(this, k, v.to(this.device))
        return this

    @property
    def extractor(self) -> nn.Module:
        return self.__dict__["_extractor"]

    @property
    def min_samples(self) -> int:
        """The fewest samples per side that ``compute`` accepts: max(2, kid_subset_size)."""
        return max(2, self.kid_subset_size)

    # -- features ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _extract(self, x: Tensor, what: str) -> Tensor:
        x = torch.as_tensor(x)
        if x.ndim == 0:
            raise ValueError(f"{what}: expected a batch (N, ...), got a scalar")
        bad = (~torch.isfinite(x)).sum().item() if x.is_floating_point() else 0
        if bad:
            raise ValueError(f"{what} contains {bad} non-finite values (a diverged sampler?)")
        ext = self.extractor.to(self.device)  # device only: never a dtype conversion of the extractor
        out = []
        for i in range(0, len(x), self.chunk_size):
            f = ext(x[i:i + self.chunk_size].to(self.device))
            out.append(f.reshape(f.shape[0], -1))
        if not out:
            return torch.empty(0, self.extractor.num_features or 0, device=self.device)
        f = torch.cat(out)
        if self.extractor.num_features is not None and f.shape[1] != self.extractor.num_features:
            raise ValueError(f"the feature extractor returned {f.shape[1]} features, its num_features is "
                             f"{self.extractor.num_features}")
        return f

    # -- reference ---------------------------------------------------------------------------------------------------
    def cache_path(self, key: str) -> Path:
        if self.cache_dir is None:
            raise ValueError("no cache_dir was given")
        return self.cache_dir / f"{key}-{self.features_name}.pt"

    def set_reference(self, real: Tensor, key: str | None = None) -> None:
        """Fix the reference set ``real`` (N, ...), N ≥ max(2, kid_subset_size); with ``cache_dir``, ``key`` (a
        file-name-safe string naming the reference data, e.g. ``f"{data.name}-val"``) names the cache file."""
        real = torch.as_tensor(real)
        n = len(real) if real.ndim else 0
        if n < self.min_samples:
            raise ValueError(f"the reference set needs at least {self.min_samples} samples (FID: 2; KID: "
                             f"kid_subset_size={self.kid_subset_size}), got {n}")
        path = None
        if self.cache_dir is not None:
            if not key or not isinstance(key, str) or any(c in key for c in "/\\\0") or key in (".", ".."):
                raise ValueError(f"key must be a non-empty file-name-safe string, got {key!r}")
            path = self.cache_path(key)
        input_sha = _input_sha256(real)
        payload = self._load_cache(path, input_sha) if path is not None else None
        if payload is None:
            feats = self._extract(real, "the reference set")
            mu, cov = _mean_cov(feats)
            payload = {"format": _CACHE_FORMAT, "features": self.features_name, "fingerprint": self.fingerprint,
                       "input_sha256": input_sha, "n": n, "mean": mu.cpu(), "cov": cov.cpu(),
                       "features_matrix": feats.cpu()}
            payload["checksum"] = _payload_checksum(payload)
            if path is not None:
                self._write_cache(path, payload)
            self.reference_source = "computed"
        else:
            self.reference_source = "cache"
        self.ref_mean = payload["mean"].to(self.device)
        self.ref_cov = payload["cov"].to(self.device)
        self.ref_features = payload["features_matrix"].to(self.device)
        self.reference_key = key
        self._computed = None

    def share_reference(self, other: "SampleQuality") -> None:
        """Use ``other``'s reference statistics (same features): several metrics over one reference — one per step
        count — then read, hash and hold it once."""
        if other.ref_features is None:
            raise RuntimeError("the other metric has no reference: call its set_reference first")
        if other.fingerprint != self.fingerprint:
            raise ValueError(f"features differ: {other.fingerprint!r} vs {self.fingerprint!r}")
        self.ref_mean, self.ref_cov, self.ref_features = (t.to(self.device) for t in
                                                          (other.ref_mean, other.ref_cov, other.ref_features))
        self.reference_key, self.reference_source = other.reference_key, other.reference_source
        self._computed = None

    def _load_cache(self, path: Path, input_sha: str) -> dict | None:
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            ok = isinstance(payload, dict) and payload.get("checksum") == _payload_checksum(payload)
            problem = None if ok else "its checksum does not match its content"
        except Exception as e:  # unreadable: truncated, not a torch file, missing keys, ...
            payload, problem = None, f"it cannot be read ({type(e).__name__}: {e})"
        if problem is None:
            if payload["format"] != _CACHE_FORMAT:
                problem = f"it has format {payload['format']}, expected {_CACHE_FORMAT}"
            elif payload["fingerprint"] != self.fingerprint:
                problem = f"it was made with features {payload['fingerprint']!r}, not {self.fingerprint!r}"
            elif payload["input_sha256"] != input_sha:
                problem = "it was computed from different reference data (same key, other samples)"
        if problem is not None:
            warnings.warn(f"reference statistics cache {path} not used: {problem}; recomputing and overwriting it",
                          stacklevel=3)
            return None
        return payload

    @staticmethod
    def _write_cache(path: Path, payload: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temporary file + rename: a reader (another DDP rank, a crashed run) never sees a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- torchmetrics interface -------------------------------------------------------------------------------------
    def update(self, fake: Tensor, index: Tensor | None = None) -> None:
        """Add a batch of generated samples (N, ...), same layout and range as the reference. ``index`` (N,) are
        the samples' global indices (default: in order of arrival); ``compute`` orders the features by them, which
        makes the result independent of how samples were split among DDP ranks."""
        if self.ref_features is None:
            raise RuntimeError("call set_reference(real, key) before update()")
        f = self._extract(fake, "the generated batch")
        if index is None:
            start = sum(len(i) for i in self.fake_index)
            index = torch.arange(start, start + len(f))
        index = torch.as_tensor(index, dtype=torch.long, device=self.device).reshape(-1)
        if len(index) != len(f):
            raise ValueError(f"index has {len(index)} entries for {len(f)} samples")
        if len(f):
            self.fake_features.append(f)
            self.fake_index.append(index)

    def compute(self) -> dict[str, float]:
        """``{"fid": FID, "kid_mean": KID, "kid_std": std of KID over subsets}`` for all samples since ``reset``."""
        if self.ref_features is None:
            raise RuntimeError("call set_reference(real, key) before compute()")
        fake = self.fake_features
        if isinstance(fake, Tensor) or len(fake):
            fake = dim_zero_cat(fake)[torch.argsort(dim_zero_cat(self.fake_index), stable=True)]
        else:
            fake = self.ref_features[:0]
        n, d = len(fake), self.ref_features.shape[1]
        if n < self.min_samples:
            raise ValueError(f"need at least {self.min_samples} generated samples (FID: 2; KID: "
                             f"kid_subset_size={self.kid_subset_size}), got {n}")
        if n <= d:
            warnings.warn(f"{n} generated samples in a {d}-d feature space: the covariance is singular and FID is "
                          f"dominated by its finite-sample bias; use N >> {d}", stacklevel=2)
        mu, cov = _mean_cov(fake)
        fid = frechet_distance(self.ref_mean, self.ref_cov, mu, cov)
        g = torch.Generator().manual_seed(self.kid_seed)
        kid_mean, kid_std = kernel_distance(self.ref_features, fake, self.kid_subset_size, self.kid_subsets, g)
        return {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std}


# -- classifier confidence ---------------------------------------------------------------------------------------------
@torch.no_grad()
def classifier_confidence(images: Tensor, threshold: float = 0.9, classifier: nn.Module | None = None,
                          chunk_size: int = 1024) -> dict:
    """How confidently the digits classifier recognises generated digits (N, 1, 8, 8) in [−1, 1]:

    - ``confidence``: mean over images of the max softmax probability;
    - ``confident_fraction``: fraction of images whose max probability exceeds ``threshold``;
    - ``class_histogram``: (10,) float tensor, fraction of images predicted as each class;
    - ``class_entropy``: entropy −Σ pₖ ln pₖ of that histogram in nats (ln 10 ≈ 2.303 for balanced classes, 0 when
      every sample is the same digit — mode collapse), and ``class_entropy_normalized`` = that / ln 10.

    High confidence with low class entropy means sharp but collapsed samples; the reverse, varied but blurry ones.
    ``classifier`` defaults to the shipped one (:func:`~diffsteps.digits_classifier.load_digits_classifier`).
    For batches evaluated apart (chunks, DDP ranks): sum the :func:`confidence_counts` of each, then
    :func:`confidence_from_counts`.
    """
    return confidence_from_counts(confidence_counts(images, threshold, classifier, chunk_size))


@torch.no_grad()
def confidence_counts(images: Tensor, threshold: float = 0.9, classifier: nn.Module | None = None,
                      chunk_size: int = 1024) -> dict[str, Tensor]:
    """The additive statistics behind :func:`classifier_confidence` (float64 tensors): ``n`` images,
    ``pmax_sum`` Σ max-probability, ``confident`` #images above ``threshold``, ``class_counts`` (K,) predictions."""
    model = classifier if classifier is not None else load_digits_classifier()
    images = torch.as_tensor(images)
    if len(images) == 0:
        raise ValueError("classifier_confidence needs at least one image")
    if not torch.isfinite(images).all():
        raise ValueError("images contain non-finite values")
    device = next(model.parameters()).device
    probs = torch.cat([torch.softmax(model(images[i:i + chunk_size].to(device)).double(), dim=1)
                       for i in range(0, len(images), chunk_size)])
    pmax, pred = probs.max(1)
    f64 = dict(dtype=torch.float64)
    return {"n": torch.tensor(float(len(pred)), **f64), "pmax_sum": pmax.sum().cpu(),
            "confident": (pmax > threshold).sum().to(**f64).cpu(),
            "class_counts": torch.bincount(pred, minlength=probs.shape[1]).to(**f64).cpu()}


def confidence_from_counts(counts: dict[str, Tensor]) -> dict:
    """:func:`classifier_confidence`'s summary from (summed) :func:`confidence_counts`."""
    n = float(counts["n"])
    hist = counts["class_counts"].double().cpu() / n
    nz = hist[hist > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {"confidence": float(counts["pmax_sum"]) / n, "confident_fraction": float(counts["confident"]) / n,
            "class_histogram": hist, "class_entropy": entropy,
            "class_entropy_normalized": entropy / math.log(len(hist))}
