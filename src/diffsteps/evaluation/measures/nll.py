"""The exact negative log-likelihood of the samples under a known data density."""

from __future__ import annotations

from torch import Tensor

from ..plan import EvalPlan
from .base import Chunk, Measure, Totals


class MixtureNLL(Measure):
    """``nll``: −E log p(x) / D over the samples, in nats per dimension, under the data's exact density ``mixture``
    (anything with ``log_prob`` of (N, D) float64, e.g. a
    :class:`~diffsteps.reference.gaussian_mixture.GaussianMixture`). With the exact model and enough steps it
    approaches the entropy of p per dimension."""

    def __init__(self, plan: EvalPlan, mixture):
        self.mixture = mixture
        self.totals = {n: Totals({"nll_sum": (), "n": ()}) for n in plan.steps}

    def update(self, steps: int, x: Tensor, chunk: Chunk) -> None:
        flat = x.reshape(len(x), -1).double().cpu()
        self.totals[steps].update(nll_sum=-(self.mixture.log_prob(flat) / flat.shape[1]).sum(), n=len(flat))

    def compute(self, steps: int) -> dict:
        t = self.totals[steps].compute()
        return {"nll": float(t["nll_sum"]) / float(t["n"])}
