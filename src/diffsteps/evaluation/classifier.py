"""The digits classifier's confidence on generated digits: how recognisable the samples are."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..reference.digits_classifier import load_digits_classifier


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
    ``classifier`` defaults to the shipped one (:func:`~diffsteps.reference.digits_classifier.load_digits_classifier`).
    For batches evaluated apart (chunks, DDP ranks): sum the :func:`confidence_counts` of each, then
    :func:`confidence_from_counts`.
    """
    return confidence_from_counts(confidence_counts(images, threshold, classifier, chunk_size))


@torch.no_grad()
def confidence_counts(images: Tensor, threshold: float = 0.9, classifier: nn.Module | None = None,
                      chunk_size: int = 1024, labels: Tensor | None = None) -> dict[str, Tensor]:
    """The additive statistics behind :func:`classifier_confidence` (float64 tensors): ``n`` images,
    ``pmax_sum`` Σ max-probability, ``confident`` #images above ``threshold``, ``class_counts`` (K,) predictions;
    with ``labels`` (N,) (the classes the images were generated for) also ``agree``, #images classified as their
    requested class (class-conditional generation's "classifier accuracy", e.g. Ho & Salimans 2022 report Inception
    scores; on digits the shipped classifier plays that role)."""
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
    out = {"n": torch.tensor(float(len(pred)), **f64), "pmax_sum": pmax.sum().cpu(),
           "confident": (pmax > threshold).sum().to(**f64).cpu(),
           "class_counts": torch.bincount(pred, minlength=probs.shape[1]).to(**f64).cpu()}
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1)
        if len(labels) != len(pred):
            raise ValueError(f"{len(labels)} labels for {len(pred)} images")
        out["agree"] = (pred.cpu() == labels.cpu()).sum().to(**f64)
    return out


def class_agreement(images: Tensor, labels: Tensor, classifier: nn.Module | None = None) -> float:
    """The fraction of ``images`` (N, 1, 8, 8) in [−1, 1] the digits classifier assigns to their requested class
    ``labels`` (N,): how well a class-conditional model obeys its condition (chance: 1/10)."""
    c = confidence_counts(images, classifier=classifier, labels=labels)
    return float(c["agree"]) / float(c["n"])


def confidence_from_counts(counts: dict[str, Tensor]) -> dict:
    """:func:`classifier_confidence`'s summary from (summed) :func:`confidence_counts`."""
    n = float(counts["n"])
    hist = counts["class_counts"].double().cpu() / n
    nz = hist[hist > 0]
    entropy = float(-(nz * nz.log()).sum())
    out = {"confidence": float(counts["pmax_sum"]) / n, "confident_fraction": float(counts["confident"]) / n,
           "class_histogram": hist, "class_entropy": entropy,
           "class_entropy_normalized": entropy / math.log(len(hist))}
    if "agree" in counts:
        out["agreement"] = float(counts["agree"]) / n
    return out
