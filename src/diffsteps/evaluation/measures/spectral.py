"""The log-spectral distance between the mean power spectra of generated and real signals
(:func:`~diffsteps.evaluation.distances.log_spectral_distance`)."""

from __future__ import annotations

from torch import Tensor

from ..distances import log_spectral_distance, mean_power_spectrum, power_spectrum_sum
from ..plan import EvalPlan
from .base import Chunk, Measure, Totals


class SpectralDistance(Measure):
    """``spectral_distance`` (dB) of signals (N, C, L): the generated samples' power spectra are summed per chunk
    (float64, synced across processes), so the result equals the distance computed from all samples at once. The
    real spectrum is computed once from ``real`` (the evaluation's reference samples)."""

    def __init__(self, plan: EvalPlan, real: Tensor):
        if len(plan.shape) != 2:
            raise ValueError(f"the spectral distance needs signal samples (C, L), got sample shape {plan.shape}")
        self.real = mean_power_spectrum(real)
        self.totals = {n: Totals({"power": tuple(self.real.shape), "n": ()}) for n in plan.steps}

    def update(self, steps: int, x: Tensor, chunk: Chunk) -> None:
        self.totals[steps].update(power=power_spectrum_sum(x), n=x.shape[0] * x.shape[1])

    def compute(self, steps: int) -> dict:
        t = self.totals[steps].compute()
        return {"spectral_distance": log_spectral_distance(self.real, t["power"].cpu() / float(t["n"]))}
