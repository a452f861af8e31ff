"""Trajectory error: each step count's samples against a converged solution of the probability-flow ODE from the
same noise (:func:`~diffsteps.evaluation.trajectory.trajectory_reference`)."""

from __future__ import annotations

import time

from torch import Tensor
from torchmetrics import CatMetric

from ...core.schedules import Schedule
from ...sampling.registry import get_sampler
from ..plan import EvalPlan
from ..trajectory import trajectory_reference
from .base import Chunk, Measure, Totals


class TrajectoryError(Measure):
    """``mse`` and ``mse_median``: the per-sample mean squared difference to the reference on the first
    ``plan.mse_samples`` samples; ``mse_reference_gap``: the reference's own convergence check (mean over those
    samples); ``mse_reference_seconds``: the reference solver's seconds, summed over processes and shared by all
    rows. Only for a deterministic sampler (a stochastic one does not follow the ODE): otherwise no entries. Each
    chunk's reference is solved once, the first time the chunk is seen, and kept for the other step counts."""

    def __init__(self, plan: EvalPlan, schedule: Schedule, prediction: str):
        self.plan, self.schedule, self.prediction = plan, schedule, prediction
        self.active = plan.mse_samples > 0 and get_sampler(plan.sampler).is_deterministic(**plan.sampler_options)
        steps = plan.steps if self.active else ()
        self.totals = {n: Totals({"mse_sum": (), "mse_n": ()}) for n in steps}
        # per-sample errors, for the median: on a nonlinear flow one trajectory near a basin boundary can dominate
        # the mean
        self.errors = {n: CatMetric(nan_strategy="disable") for n in steps}
        # read by every row: synced each time (no cached result that one rank could hold and another not)
        self.reference = Totals({"gap_sum": (), "n": (), "seconds": ()}, compute_with_cache=False)
        # chunk → its reference solution (None: no sample of the chunk is measured). The solve depends on the
        # chunk's noise alone, so it is done once per chunk and reused by every step count, whichever order the
        # evaluator takes them in
        self._refs: dict[int, Tensor | None] = {}

    def begin_chunk(self, chunk: Chunk) -> None:
        if chunk.c in self._refs:
            return
        self._refs[chunk.c] = None
        n_ref = min(chunk.size, self.plan.mse_samples - chunk.start) if self.active else 0
        if n_ref > 0:
            p = self.plan
            t0 = time.perf_counter()
            cond = {k: v[:n_ref] for k, v in chunk.cond.items()} or None  # the same classes (and guidance)
            self._refs[chunk.c], gap = trajectory_reference(chunk.net, chunk.noise[:n_ref], schedule=self.schedule,
                                                            prediction=self.prediction, sampler=p.reference_sampler,
                                                            steps=p.reference_steps, spacing=p.reference_spacing,
                                                            cond=cond, **p.denoiser_options)
            self.reference.update(gap_sum=gap.sum(), n=n_ref, seconds=time.perf_counter() - t0)

    def update(self, steps: int, x: Tensor, chunk: Chunk) -> None:
        ref = self._refs.get(chunk.c)
        if ref is None:
            return
        err = (x[:len(ref)].double() - ref).pow(2).flatten(1).mean(1)
        self.totals[steps].update(mse_sum=err.sum(), mse_n=len(err))
        self.errors[steps].update(err)

    def compute(self, steps: int) -> dict:
        if not self.active:
            return {}
        t = self.totals[steps].compute()
        gap = self.reference.compute()
        return {"mse": float(t["mse_sum"]) / float(t["mse_n"]),
                "mse_median": float(self.errors[steps].compute().median()),
                "mse_reference_gap": float(gap["gap_sum"]) / float(gap["n"]),
                "mse_reference_seconds": float(gap["seconds"])}
