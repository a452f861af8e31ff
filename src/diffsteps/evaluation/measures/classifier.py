"""The shipped classifier's confidence on each step count's samples (:mod:`diffsteps.evaluation.classifier`)."""

from __future__ import annotations

from torch import Tensor

from ...reference.digits_classifier import load_digits_classifier
from ..classifier import confidence_counts, confidence_from_counts
from ..plan import EvalPlan
from .base import Chunk, Measure, Totals


class ClassifierConfidence(Measure):
    """``classifier_confidence``, ``classifier_confident_fraction``, ``classifier_class_entropy`` and
    ``classifier_class_entropy_normalized`` of 8×8 digits in [−1, 1] (or of MNIST-1D signals with ``classifier`` its
    shipped classifier): sums of per-chunk counts, so they equal
    :func:`~diffsteps.evaluation.classifier.classifier_confidence` of all samples at once. In a class-conditional
    evaluation (``plan.num_classes`` > 0) also ``classifier_agreement``: the fraction classified as the class each
    sample was generated for."""

    def __init__(self, plan: EvalPlan, classifier=None):
        # loaded once: it is read, checksummed and built from its file on every load. Another 10-class classifier
        # (the MNIST-1D one for signals) may be passed instead of the digits one.
        self.classifier = classifier if classifier is not None else load_digits_classifier()
        self.conditional = plan.num_classes > 0
        sums = {"n": (), "pmax_sum": (), "confident": (), "class_counts": (10,)}
        if self.conditional:
            sums["agree"] = ()
        self.totals = {n: Totals(sums) for n in plan.steps}

    def update(self, steps: int, x: Tensor, chunk: Chunk) -> None:
        labels = chunk.cond.get("y") if self.conditional else None
        cc = confidence_counts(x.float(), classifier=self.classifier.to(chunk.device), labels=labels)
        self.totals[steps].update(**cc)

    def compute(self, steps: int) -> dict:
        t = self.totals[steps].compute()
        # the histogram (a tensor) stays out of the row
        return {f"classifier_{k}": v for k, v in confidence_from_counts(t).items() if isinstance(v, float)}
