"""LD3-style refinement (Tong et al. 2025, "Learning to Discretize Denoising Diffusion ODEs"): gradient descent on
the visited levels so the K-step sampler lands on the teacher's endpoint, with early stopping on held-out noise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.schedules import Schedule
from .differentiable import DIFFERENTIABLE, run_differentiable

__all__ = ["RefineResult", "refine_timesteps"]

_F64 = torch.float64


@dataclass
class RefineResult:
    timesteps: torch.Tensor
    train_error: float
    heldout_error: float
    iterations: int
    best_iteration: int
    history: list[tuple[int, float, float]] = field(default_factory=list)


def _levels(logits: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    # K increments summing to hi − lo: the K − 1 free levels are their first K − 1 partial sums, so the levels stay
    # strictly increasing inside (lo, hi) whatever the logits
    inc = torch.softmax(logits, 0) * (hi - lo)
    return torch.cat([torch.tensor([lo], dtype=_F64), lo + torch.cumsum(inc, 0)[:-1]])


def refine_timesteps(model: Callable, schedule: Schedule, sampler: str, init: torch.Tensor,
                     train: tuple[torch.Tensor, torch.Tensor], heldout: tuple[torch.Tensor, torch.Tensor], *,
                     prediction: str = "epsilon", iterations: int = 150, lr: float = 0.05, patience: int = 6,
                     eval_every: int = 5, fd: float = 1e-3) -> RefineResult:
    """Refine ``init`` (K decreasing timesteps, the first at T−1, then the data) for ``sampler``.

    Parameters: K logits whose softmax gives the log-SNR increments from λ(T−1) to λ(0), the free levels their
    cumulative sums (LD3 §3.2 parameterises the same way). Loss: the mean squared distance of the K-step output
    from the teacher's endpoint over the training noises ``train = (noise, target)``, minimised with Adam; every
    ``eval_every`` iterations the RMS error on ``heldout`` decides which parameters are kept, and ``patience``
    evaluations without improvement stop the run (LD3 uses the same early stop). Supported samplers: those in
    :data:`~diffsteps.steps.differentiable.DIFFERENTIABLE`."""
    if sampler not in DIFFERENTIABLE:
        raise ValueError(f"method 'refine' supports samplers: {', '.join(DIFFERENTIABLE)}; got {sampler!r}")
    lo, hi = schedule.log_snr[-1].item(), schedule.log_snr[0].item()
    lam0 = schedule.alpha_bar_at(init.to(_F64)).logit()
    inc = torch.diff(torch.cat([lam0, torch.tensor([hi], dtype=_F64)])).clamp(min=1e-3 * (hi - lo))
    logits = torch.log(inc / inc.sum()).clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)

    def evaluate(x, y):
        with torch.no_grad():
            out = run_differentiable(model, x, schedule, sampler, _levels(logits, lo, hi), prediction=prediction)
        return (out - y).square().mean().sqrt().item()

    best = (evaluate(*heldout), logits.detach().clone(), 0)
    history = [(0, evaluate(*train), best[0])]
    stale, it = 0, 0
    for it in range(1, iterations + 1):
        opt.zero_grad()
        out = run_differentiable(model, train[0], schedule, sampler, _levels(logits, lo, hi), prediction=prediction,
                                 fd=fd)
        loss = (out - train[1]).square().mean()
        loss.backward()
        opt.step()
        if it % eval_every == 0 or it == iterations:
            val = evaluate(*heldout)
            history.append((it, loss.sqrt().item(), val))
            if val < best[0]:
                best, stale = (val, logits.detach().clone(), it), 0
            else:
                stale += 1
                if stale >= patience:
                    break
    with torch.no_grad():
        logits.copy_(best[1])
        ts = schedule.t_from_log_snr(_levels(logits, lo, hi).clamp(lo, hi))
    ts[0] = schedule.num_timesteps - 1
    return RefineResult(ts.detach(), evaluate(*train), best[0], it, best[2], history)
