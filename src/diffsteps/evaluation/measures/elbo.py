"""The negative ELBO of held-out data over the timesteps the sampler visits at each step count."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ...core.schedules import Schedule
from ...core.spacings import make_timesteps, to_integer_timesteps
from ..likelihood import VARIANCES, elbo_bpd
from ..plan import EvalPlan
from .base import Measure, Totals

log = logging.getLogger("diffsteps")

# elbo_bpd's entries in a row, in its order (the sample count, known from the config, is left out)
_KEYS = ("elbo_bpd", "elbo_prior_bpd", "elbo_kl_bpd", "elbo_decoder_bpd", "elbo_bpd_stderr")


class ChainELBO(Measure):
    """``elbo_bpd`` (bits/dim), its ``elbo_prior_bpd``, ``elbo_kl_bpd`` and ``elbo_decoder_bpd`` terms and
    ``elbo_bpd_stderr``: :func:`~diffsteps.evaluation.likelihood.elbo_bpd` of ``data`` over the integer timesteps
    that ``plan.spacing`` visits at each step count (a K-step chain); with ``full`` also ``elbo_full_bpd`` over all
    T timesteps (T model calls per sample), the same in every row.

    It needs no samples: each step count's bound is computed by the one process that owns it (``run_steps``) and
    shared through summed states (zeros elsewhere, so the sums are exact). Its noise is reseeded with
    ``plan.noise_seed`` for every step count, so a bound depends neither on the step counts before it nor on the
    process that computes it: the rows equal one process's, and W processes share the work.

    ``levels``: the number of equally spaced values of discrete data in [−1, 1] (images 256, digits 17), scored
    with the discretised decoder (Ho et al. 2020, §3.3) — a probability, so the bound is one on the discrete NLL;
    a density on discrete data would be unbounded below. Data not on that grid (e.g. images resized with
    interpolation) get the continuous decoder, with a warning."""

    def __init__(self, plan: EvalPlan, schedule: Schedule, prediction: str, data: Tensor, *,
                 variance: str = "posterior", levels: int | None = None, full: bool = False,
                 progress: bool = False):
        if variance not in VARIANCES:
            raise ValueError(f"unknown ELBO variance {variance!r}; valid choices: {', '.join(VARIANCES)}")
        if levels is not None:
            k = (data.double() + 1) * (levels - 1) / 2
            if not torch.allclose(k, k.round(), atol=1e-3):
                log.warning("the ELBO data are not on %d levels: using a continuous decoder (a density, not a "
                            "probability: it can be negative)", levels)
                levels = None
        self.plan, self.schedule, self.data, self.full, self.progress = plan, schedule, data, full, progress
        self.options = dict(prediction=prediction, variance=variance, batch_size=plan.batch_size,
                            discrete=levels is not None, levels=levels or 256)
        s = len(plan.steps)
        # one state for all step counts, read by every row while later step counts still add to it: synced at
        # every compute (a cached result would be stale on the ranks that added nothing since, and they would skip
        # the sync the others wait in)
        self.totals = Totals({"bpd": (s, len(_KEYS)), "done": (s,), "full": (), "full_done": ()},
                             compute_with_cache=False)

    def _bound(self, net: nn.Module, device: torch.device, timesteps: Tensor | None, **extra) -> dict:
        # reseeded for each step count: a row's ELBO does not depend on which step counts came before it
        g = torch.Generator(device=device).manual_seed(self.plan.noise_seed)
        with torch.no_grad():
            return elbo_bpd(net, self.data, self.schedule, timesteps=timesteps, generator=g, device=device,
                            **extra, **self.options)

    def run_steps(self, steps: int, net: nn.Module, device: torch.device) -> None:
        i = self.plan.steps.index(steps)
        ts = torch.unique(to_integer_timesteps(make_timesteps(self.plan.spacing, steps, self.schedule)))
        out = self._bound(net, device, ts)
        if set(out) != {*_KEYS, "elbo_num_samples"}:
            raise RuntimeError(f"elbo_bpd returned {sorted(out)}; this measure reports {_KEYS}: update _KEYS")
        bpd, done = torch.zeros(self.totals.bpd.shape, dtype=torch.float64), torch.zeros(len(self.plan.steps))
        bpd[i] = torch.tensor([out[k] for k in _KEYS], dtype=torch.float64)
        done[i] = 1
        self.totals.update(bpd=bpd, done=done)
        if self.full and i == 0:  # one bound for all rows, by the process of the first step count
            self.totals.update(full=self._bound(net, device, None, progress=self.progress)["elbo_bpd"], full_done=1)

    def compute(self, steps: int) -> dict:
        t = self.totals.compute()
        i = self.plan.steps.index(steps)
        done = float(t["done"].reshape(-1)[i])  # (torchmetrics returns a one-element state as a scalar)
        if done != 1 or (self.full and float(t["full_done"]) != 1):
            raise RuntimeError(f"the ELBO at {steps} steps was computed {done:g} times, not once: call "
                               "Evaluator.run_steps(net) on every process before compute()")
        row = dict(zip(_KEYS, t["bpd"][i].tolist()))
        if self.full:
            row["elbo_full_bpd"] = float(t["full"])
        return row
