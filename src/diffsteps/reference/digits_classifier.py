"""A small CNN classifier for the 8×8 scikit-learn digits, used as the feature extractor of sample-quality metrics
on :class:`~diffsteps.data.DigitsData` (the role Inception-v3 plays for natural images, which is meaningless at 8×8).

The architecture is :class:`DigitsCNN`; :func:`train_digits_classifier` trains it deterministically on the train
split of ``DigitsData(val_fraction=0.2, seed=0)``, and ``experiments/train_digits_classifier.py`` runs that and writes
the shipped weights ``diffsteps/reference/assets/digits_classifier.pt`` (a plain ``state_dict``, 95 KB).
:func:`load_digits_classifier` checks the file's sha256 against :data:`WEIGHTS_SHA256` before loading it with
``torch.load(weights_only=True)``.

Held-out accuracy of the shipped weights on the val split of ``DigitsData(val_fraction=0.2, seed=0)`` (359 images,
never seen in training): **356 / 359 = 99.16 %** (:data:`HELD_OUT_CORRECT`; recomputed by ``tests/test_metrics.py``).

Input: (N, 1, 8, 8) in [−1, 1], exactly what ``DigitsData`` yields (pixel 0…16 → −1…1); values outside are clamped,
as they would be when a sample is written out as an image. Features (:meth:`DigitsCNN.features`) are the 64-d
penultimate pre-activations, scaled to unit mean square on the training images (why: :class:`DigitsCNN`) — the
analogue of Inception's pool3.

Training: AdamW, cosine learning-rate decay, 40 epochs of mini-batches of 64, each image randomly shifted by up to
one pixel (padding with the background value −1) so that the features do not hinge on exact registration, which
generated samples need not share. Everything random draws from generators seeded by ``seed``, and the run is
single-threaded with deterministic algorithms, so re-running on the same platform and torch version reproduces the
weights bit for bit (and hence the sha256); other CPUs or torch versions may differ in the last bits (different
kernels), giving the same accuracy to within an image or two but a different hash — then record the new hash.
"""

from __future__ import annotations

import hashlib
import io
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DigitsCNN", "accuracy", "serialize_state_dict", "load_digits_classifier", "load_checked_weights",
    "default_weights_path", "WEIGHTS_SHA256", "HELD_OUT_CORRECT", "HELD_OUT_ACCURACY", "TRAIN_CONFIG",
    "REGENERATE_HINT",
]

# sha256 of the shipped assets/digits_classifier.pt; update it (and HELD_OUT_CORRECT) whenever the script rewrites
# the file — the script prints both.
WEIGHTS_SHA256 = "3e4ecd2077082c025856f9bb429d58293c0cadb5d2ef9f69caf41da7e9be0605"
# (correct, total) on DigitsData(val_fraction=0.2, seed=0).labels("val"), 359 images (20 % of each class, rounded).
HELD_OUT_CORRECT = (356, 359)
HELD_OUT_ACCURACY = HELD_OUT_CORRECT[0] / HELD_OUT_CORRECT[1]
# The data the shipped weights were trained on (train split) and evaluated on (val split).
TRAIN_CONFIG = {"val_fraction": 0.2, "data_seed": 0, "seed": 0, "epochs": 40, "batch_size": 64, "lr": 3e-3,
                "weight_decay": 1e-4}
REGENERATE_HINT = "regenerate it with `python experiments/train_digits_classifier.py` (from the repository root)"


class _FeatureCNN(nn.Module):
    # The shipped classifiers' common head: ``_hidden`` (the subclass's trunk) gives the penultimate
    # pre-activations, ``fc2`` the logits; ``feature_scale`` is a buffer set after training.
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, …) input → (N, num_features) scaled penultimate pre-activations."""
        return self._hidden(x) * self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, …) input → (N, num_classes) logits."""
        return self.fc2(F.relu(self._hidden(x)))


class DigitsCNN(_FeatureCNN):
    """conv3×3(1→16) · ReLU · conv3×3(16→32) · ReLU · maxpool2 · conv3×3(32→32) · ReLU · maxpool2 · linear(128→64)
    [= features, × feature_scale] · ReLU · linear(64→10). 22,954 parameters. No batch norm or dropout, so train and
    eval mode compute the same function (a feature extractor must not change with the mode of a model that contains
    it).

    Features are the 64 pre-activations of the penultimate layer, not its ReLU outputs: about a third of the units
    are never active on real digits (dead ReLUs), and post-ReLU outputs are zero-inflated, far from the Gaussian that
    FID fits; the pre-activations are all informative and closer to Gaussian. ``feature_scale`` (a buffer, set after
    training) scales them so that their mean square over the training images is 1, which puts xᵀy/d in KID's
    polynomial kernel (xᵀy/d + 1)³ at order 1 — the regime of Inception features — instead of letting the cubic
    term dominate; FID is in these units too.
    """

    num_features = 64
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, self.num_features)
        self.fc2 = nn.Linear(self.num_features, self.num_classes)
        self.register_buffer("feature_scale", torch.ones(()))

    @staticmethod
    def _check(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"the digits classifier takes (N, 1, 8, 8) images in [-1, 1], got shape {tuple(x.shape)}")
        return x

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check(x).to(self.conv1.weight.dtype).clamp(-1.0, 1.0)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc1(x.flatten(1))


def default_weights_path() -> Path:
    """Where the shipped weights live inside the installed package."""
    return Path(str(resources.files("diffsteps.reference").joinpath("assets", "digits_classifier.pt")))


def serialize_state_dict(model: nn.Module) -> bytes:
    """The weights file's exact bytes. Saved through a buffer, not a path: ``torch.save(path)`` names the archive's
    root folder after the file, so the same weights saved under another (e.g. temporary) name hash differently."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_checked_weights(model_cls: type[nn.Module], path: Path, sha256: str | None, what: str, sha_name: str,
                         hint: str) -> nn.Module:
    """A shipped classifier's ``model_cls()`` with the state dict at ``path`` (``torch.load(weights_only=True)``),
    frozen and in eval mode, after checking the file's sha256 against ``sha256`` (None skips the check). A missing,
    corrupt or mismatching file raises a ``RuntimeError`` naming ``what``, the constant ``sha_name`` to update and
    how to regenerate the file (``hint``)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RuntimeError(f"{what} weights not readable at {path} ({type(e).__name__}: {e}); {hint}") from e
    if sha256 is not None and _sha256(data) != sha256:
        raise RuntimeError(
            f"{what} weights at {path} have sha256 {_sha256(data)}, expected {sha256} (the file is corrupt or was "
            f"retrained without updating {sha_name}); {hint}, then record the sha256 it prints")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model = model_cls()
        model.load_state_dict(state)
    except Exception as e:
        raise RuntimeError(f"could not load {what} weights from {path} ({type(e).__name__}: {e}); {hint}") from e
    return model.requires_grad_(False).eval()


def load_digits_classifier(path: str | Path | None = None, sha256: str | None = WEIGHTS_SHA256) -> DigitsCNN:
    """The trained classifier, frozen (``requires_grad_(False)``) and in eval mode.

    ``path`` defaults to the shipped file. The file's sha256 must equal ``sha256`` (the recorded
    :data:`WEIGHTS_SHA256`; pass None to skip the check, e.g. for weights you trained yourself). A missing, corrupt
    or mismatching file raises a ``RuntimeError`` saying how to regenerate it.
    """
    return load_checked_weights(DigitsCNN, Path(path) if path is not None else default_weights_path(), sha256,
                                "digits classifier", "diffsteps.reference.digits_classifier.WEIGHTS_SHA256",
                                REGENERATE_HINT)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[int, int]:
    """(number correct, total) of argmax predictions."""
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct, len(x)
