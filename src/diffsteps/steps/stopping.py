"""A per-sample stopping rule with a calibrated tolerance: each sample leaves the sampler as soon as its estimated
remaining error is small, and the tolerance is set by split-conformal calibration so that a stated fraction 1 − α
of samples ends within an error target of the converged solution.

The sampler runs on a fixed fine grid of K steps. After step k the model has given x̂₀⁽ᵏ⁾ (the Tweedie estimate
E[x₀ | x_k]); the error estimate is s_k = RMS(x̂₀⁽ᵏ⁾ − x̂₀⁽ᵏ⁻¹⁾), how much the answer still moves. A sample stops at
the first k ≥ 1 (below the last step) with s_k ≤ τ and returns x̂₀⁽ᵏ⁾ — the jump to the data the sampler's own last
step would make from there — having spent the model calls made so far; a sample that never stops returns the
sampler's output. While running, stopped samples are dropped from every later model call (the model sees only the
active rows), and the run ends when all have stopped: the NFE counted per sample is what that sample cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..core.schedules import Schedule
from ..sampling.api import sample

__all__ = ["StopTrace", "StoppingRule", "binomial_interval", "calibrate_stopping", "sample_with_stopping",
           "stop_outcome", "stopping_trace"]

_F64 = torch.float64


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.to(_F64) - b.to(_F64)).pow(2).flatten(1).mean(1)


@dataclass
class StopTrace:
    """One full run on the fine grid: ``scores`` (K, B) s_k (NaN at k = 0), ``errors`` (K + 1, B) the per-sample MSE
    of x̂₀⁽ᵏ⁾ to the teacher, the last row the sampler's output's, ``nfe`` (K + 1,) model calls when each is known."""

    scores: torch.Tensor
    errors: torch.Tensor
    nfe: torch.Tensor


def stopping_trace(model: Callable, noise: torch.Tensor, teacher: torch.Tensor, *, schedule: Schedule,
                   sampler: str, steps: int, spacing="trailing", prediction: str = "epsilon",
                   **options) -> StopTrace:
    """Run ``sampler`` with ``steps`` steps from ``noise`` and record, after every step, the error estimate s_k and
    the error of stopping there against ``teacher`` (the converged solution from the same noise)."""
    scores, errors, nfe, last = [], [], [], [None]

    def grab(info):
        x0 = info.x0.to(_F64)
        scores.append(torch.full((len(x0),), math.nan, dtype=_F64) if last[0] is None else
                      _per_sample_mse(x0, last[0]).sqrt())
        errors.append(_per_sample_mse(x0, teacher))
        nfe.append(info.nfe)
        last[0] = x0

    res = sample(model, noise, schedule=schedule, sampler=sampler, steps=steps, spacing=spacing,
                 prediction=prediction, callback=grab, return_info=True, **options)
    errors.append(_per_sample_mse(res.sample, teacher))
    nfe.append(res.nfe)
    return StopTrace(torch.stack(scores), torch.stack(errors), torch.tensor(nfe, dtype=torch.long))


def _stop_steps(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Per sample the first step k in [1, K − 2] with s_k ≤ τ; K (the sampler's output) if none."""
    K = scores.shape[0]
    ok = scores[1:K - 1] <= tau
    first = torch.where(ok.any(0), ok.int().argmax(0) + 1, torch.full_like(ok[0], K, dtype=torch.long))
    return first.long()


def stop_outcome(trace: StopTrace, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(error, nfe) per sample of a recorded trace when stopping with tolerance τ (what :func:`sample_with_stopping`
    returns for the same noise, without running it again)."""
    k = _stop_steps(trace.scores, tau)
    err = trace.errors.gather(0, k[None]).squeeze(0)
    return err, trace.nfe[k]


def _failure_tolerance(trace: StopTrace, error_target: float) -> torch.Tensor:
    """g_i = inf{τ : sample i stopped with tolerance τ misses the target}: for τ < g_i it meets it. As τ falls the
    stop step moves later, changing only where the running minimum of s_k drops; on [m_k, m_{k−1}) it is k (m the
    running minimum), so g_i is the smallest m_k over the failing such k, −∞ if the sampler's own output fails."""
    K, B = trace.scores.shape
    g = torch.full((B,), math.inf, dtype=_F64)
    running = torch.full((B,), math.inf, dtype=_F64)
    for k in range(1, K - 1):
        s = trace.scores[k]
        drop = s < running
        running = torch.minimum(running, s)
        fail = drop & (trace.errors[k] > error_target)
        g = torch.where(fail, torch.minimum(g, running), g)
    return torch.where(trace.errors[K] > error_target, torch.full_like(g, -math.inf), g)


@dataclass
class StoppingRule:
    """Stop when s_k ≤ ``tau`` on ``sampler`` with ``steps`` fine steps (``spacing``, ``options``); calibrated so
    that a fraction ≥ 1 − ``alpha`` of samples ends with per-sample MSE ≤ ``error_target`` to the teacher."""

    tau: float
    alpha: float
    error_target: float
    sampler: str
    steps: int
    spacing: object = "trailing"
    options: dict | None = None
    calibration_samples: int = 0
    calibration_coverage: float = math.nan

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate_stopping(trace: StopTrace, *, error_target: float, alpha: float, sampler: str, steps: int,
                       spacing="trailing", options: dict | None = None) -> StoppingRule:
    """Split-conformal tolerance (Vovk et al. 2005; Angelopoulos & Bates 2021, §1): with g_i the failure tolerance
    of each of n calibration samples (:func:`_failure_tolerance`), τ = the ⌊α(n + 1)⌋-th smallest g_i. A fresh,
    exchangeable sample meets the target whenever τ < g_new, so P(meets) ≥ 1 − ⌊α(n + 1)⌋/(n + 1) ≥ 1 − α."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if not error_target > 0:
        raise ValueError(f"error_target must be positive, got {error_target!r}")
    g = _failure_tolerance(trace, error_target)
    n = len(g)
    k = math.floor(alpha * (n + 1))
    if k < 1:
        raise ValueError(f"{n} calibration samples cannot certify 1 − α = {1 - alpha:g}: need at least "
                         f"{math.ceil(1 / alpha) - 1}")
    tau = float(torch.sort(g).values[k - 1])
    if not math.isfinite(tau) or tau <= 0:
        # more than α of the samples fail even at the sampler's own output (−∞), or τ hits 0: never stop early
        tau = 0.0
    else:
        tau = math.nextafter(tau, -math.inf)  # strictly below g_(k), so that sample's own failure is excluded
    err, _ = stop_outcome(trace, tau)
    return StoppingRule(tau, alpha, error_target, sampler, steps, spacing, dict(options or {}), n,
                        float((err <= error_target).double().mean()))


class _ActiveRows(torch.nn.Module):
    """The model called on the rows still active only (stopped samples cost nothing more); the others get zeros,
    which the sampler carries along and :func:`sample_with_stopping` discards."""

    def __init__(self, model: Callable, active: torch.Tensor):
        super().__init__()
        self.inner, self.active = model, active
        self.rows = 0
        # a class-conditional model stays one to the sampler: its labels are checked and guidance allowed
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)

    def forward(self, x, t, **cond):
        out = torch.zeros_like(x)
        # classifier-free guidance stacks the batch with itself ([conditional; unconditional]): the mask follows
        a = self.active.repeat(x.shape[0] // len(self.active))
        self.rows += int(a.sum())
        out[a] = self.inner(x[a], t[a], **{k: v[a] for k, v in cond.items()})
        return out


class _AllStopped(Exception):
    pass


def sample_with_stopping(model: Callable, noise: torch.Tensor, rule: StoppingRule, *, schedule: Schedule,
                         prediction: str = "epsilon", cond: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples under ``rule``, and the model calls each sample cost (its NFE): a sample that stops after step k
    returns x̂₀⁽ᵏ⁾ and is left out of every later model call; the run ends once every sample has stopped."""
    B = noise.shape[0]
    active = torch.ones(B, dtype=torch.bool, device=noise.device)
    net = _ActiveRows(model, active)
    out = torch.empty_like(noise)
    nfe = torch.zeros(B, dtype=torch.long)
    last, K = [None], rule.steps

    def step(info):
        x0 = info.x0
        if last[0] is not None and info.i < K - 1:
            s = _per_sample_mse(x0, last[0]).sqrt()
            stop = active & (s <= rule.tau)
            out[stop] = x0[stop].to(out.dtype)
            nfe[stop.cpu()] = info.nfe
            active.logical_and_(~stop)
            if not bool(active.any()):
                raise _AllStopped
        last[0] = x0.clone()

    try:
        res = sample(net, noise, schedule=schedule, sampler=rule.sampler, steps=K, spacing=rule.spacing,
                     prediction=prediction, cond=cond, callback=step, return_info=True, **(rule.options or {}))
    except _AllStopped:
        return out, nfe
    rest = active.clone()
    out[rest] = res.sample[rest].to(out.dtype)
    nfe[rest.cpu()] = res.nfe
    return out, nfe


def binomial_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson interval for a binomial proportion (exact, conservative)."""
    from scipy.stats import beta

    a = 1 - level
    lo = 0.0 if successes == 0 else float(beta.ppf(a / 2, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(beta.ppf(1 - a / 2, successes + 1, n - successes))
    return lo, hi
