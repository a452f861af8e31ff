"""Feature extractors for sample-quality metrics (``FEATURES``, built by :func:`make_features`).


Each is frozen — ``requires_grad_(False)`` — stays in
eval mode even when a containing model calls ``.train()``, and has ``num_features``, ``name``, ``fingerprint``):

- ``digits`` (:class:`DigitsFeatures`): the 64-d penultimate layer (pre-activations, scaled to unit mean square) of a
  small CNN trained on the scikit-learn digits (:mod:`diffsteps.reference.digits_classifier`; 99.2 % held-out accuracy;
  weights shipped in the package, sha256-checked).
  Input (N, 1, 8, 8) in [−1, 1], as :class:`~diffsteps.data.DigitsData` yields.
- ``inception`` (:class:`InceptionFeatures`): the standard FID features, Inception-v3 pool3 (2048-d), built exactly as
  ``torchmetrics.image.fid.FrechetInceptionDistance(feature=2048)`` builds them (torch-fidelity's port of the
  TensorFlow graph of Heusel et al.). Needs ``torch-fidelity`` (``pip install torch-fidelity`` or the project extra
  ``diffsteps[inception]``) and its weights file (downloaded once, or given as ``weights_path`` offline). Input
  (N, C, H, W), C ∈ {1, 3}, in [−1, 1]; converted to uint8 0…255 and resized to 299×299 inside.
- ``mnist1d`` (:class:`MNIST1DFeatures`): the 64-d penultimate layer (pre-activations, scaled to unit mean square)
  of a small 1-D CNN trained on MNIST-1D (:mod:`diffsteps.reference.mnist1d_classifier`; weights shipped,
  sha256-checked). Input (N, 1, 40) as :class:`~diffsteps.data.MNIST1DData` yields.
- ``identity`` (:class:`IdentityFeatures`): the flattened raw coordinates, for vector data. For Gaussian data the
  Fréchet distance in this space is then the exact 2-Wasserstein distance between the fitted Gaussians.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..reference.digits_classifier import (
    WEIGHTS_SHA256,
    DigitsCNN,
    load_digits_classifier,
)
from ..reference.mnist1d_classifier import MNIST1DCNN, load_mnist1d_classifier
from ..reference.mnist1d_classifier import WEIGHTS_SHA256 as MNIST1D_SHA256

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


class _ShippedCNNFeatures(_Features):
    # The shipped reference CNNs' penultimate layer: the loader checks the weights' SHA-256, and the fingerprint
    # names it, so cached reference statistics follow the weights.
    _load = None  # staticmethod(weights_path, sha256) -> a net with .features

    def __init__(self, weights_path: str | Path | None, sha256: str | None):
        super().__init__()
        self.net = self._load(weights_path, sha256)
        self._fingerprint = f"{self.name}-cnn-{sha256 or 'unverified'}"
        _freeze(self)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x)


class DigitsFeatures(_ShippedCNNFeatures):
    """Penultimate-layer features (64 pre-activations, scaled; see :class:`~diffsteps.reference.digits_classifier.DigitsCNN`)
    of the shipped digits CNN (:mod:`diffsteps.reference.digits_classifier`).

    Input: (N, 1, 8, 8) floats in [−1, 1] (``DigitsData`` scaling), taken directly; values outside are clamped, as
    writing a sample out as an image would. ``weights_path``/``sha256`` select other weights (``sha256=None``
    skips the checksum).
    """

    name = "digits"
    num_features = DigitsCNN.num_features
    _load = staticmethod(load_digits_classifier)

    def __init__(self, weights_path: str | Path | None = None, sha256: str | None = WEIGHTS_SHA256):
        super().__init__(weights_path, sha256)


class MNIST1DFeatures(_ShippedCNNFeatures):
    """Penultimate-layer features (64 pre-activations, scaled) of the shipped MNIST-1D CNN
    (:mod:`diffsteps.reference.mnist1d_classifier`). Input: (N, 1, 40) signals in ``MNIST1DData``'s scaling.
    ``weights_path``/``sha256`` select other weights (``sha256=None`` skips the checksum)."""

    name = "mnist1d"
    num_features = MNIST1DCNN.num_features
    _load = staticmethod(load_mnist1d_classifier)

    def __init__(self, weights_path: str | Path | None = None, sha256: str | None = MNIST1D_SHA256):
        super().__init__(weights_path, sha256)


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
    "mnist1d": MNIST1DFeatures,
}


def make_features(name: str, **kwargs) -> nn.Module:
    """A frozen, eval-mode feature extractor from :data:`FEATURES` (``kwargs`` go to its constructor)."""
    if name not in FEATURES:
        raise ValueError(f"unknown features {name!r}; choose one of {sorted(FEATURES)}")
    return FEATURES[name](**kwargs)
