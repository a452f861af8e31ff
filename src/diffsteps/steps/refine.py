"""LD3-style refinement (Tong et al. 2025, "Learning to Discretize Denoising Diffusion ODEs", ICLR): gradient descent
on the visited levels so the K-step sampler lands on the teacher's endpoint, validated on held-out noise."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.schedules import Schedule
from ..sampling.api import ONE_CALL_PER_LEVEL
from .differentiable import check_differentiable_options, run_differentiable

log = logging.getLogger("diffsteps")

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
    model_timesteps: torch.Tensor | None = None  # decoupled model-evaluation times (None: the timesteps themselves)


def _levels(logits: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    # K increments summing to hi − lo: the K − 1 free levels are their first K − 1 partial sums, so the levels stay
    # strictly increasing inside (lo, hi) whatever the logits
    inc = torch.softmax(logits, 0) * (hi - lo)
    return torch.cat([torch.tensor([lo], dtype=_F64), lo + torch.cumsum(inc, 0)[:-1]])


def _shifted(lams: torch.Tensor, shift: torch.Tensor, window: float) -> torch.Tensor:
    """LD3's decoupled model-evaluation levels (its reference code's second timestep list, ``timesteps2`` of
    ``discretize_model_wrapper`` in github.com/vinhsuhi/LD3 trainer.py):
    λ'_i = λ_i + clamp(δ_i, ±window · min gap), the first level fixed, so each evaluation level stays between its
    neighbours' midpoints for window ≤ ½."""
    gap = torch.diff(lams.detach()).min() * window
    mask = torch.ones_like(lams)
    mask[0] = 0.0
    return lams + mask * torch.maximum(torch.minimum(shift, gap), -gap)


def refine_timesteps(model: Callable, schedule: Schedule, sampler: str, init: torch.Tensor,
                     train: tuple[torch.Tensor, torch.Tensor], heldout: tuple[torch.Tensor, torch.Tensor], *,
                     prediction: str = "epsilon", iterations: int = 300, lr: float = 0.05, patience: int = 6,
                     eval_every: int = 5, decay: float = 0.5, min_lr: float = 2e-3, batch: int | None = None,
                     decoupled: bool = False, window: float = 0.5, radius: float = 0.0, seed: int = 0,
                     fd: float = 1e-3, options: dict | None = None) -> RefineResult:
    """Refine ``init`` (K decreasing timesteps, the first at T−1, then the data) for ``sampler``.

    Parameters: K logits whose softmax gives the log-SNR increments from λ(T−1) to λ(0), the free levels their
    cumulative sums (LD3's softmax-and-cumsum parameterisation, on the log-SNR as its code's ``lambda`` mode). Loss:
    the mean squared distance of the K-step output from the teacher's endpoint ``train = (noise, target)``, on a
    random ``batch`` of the training noises per iteration (all of them if None), minimised with Adam. Every
    ``eval_every`` iterations the RMS error on ``heldout`` decides which parameters are kept; after ``patience``
    evaluations without improvement the best parameters are restored and the learning rate multiplied by ``decay``
    (LD3's schedule: restore the best and decay on a plateau), until it falls below ``min_lr`` or ``iterations``
    run out.

    LD3's two additions, both off by default:
      - ``decoupled``: the model is evaluated at its own levels λ'_i = λ_i + δ_i, |δ_i| ≤ ``window`` × the smallest
        gap (LD3's ``timesteps2``): the solver steps between the λ_i but the network is told λ'_i, and x̂_0 is
        formed with λ'_i's α, σ (as LD3's ``model_fn`` at ``timesteps2``). Trained jointly with the levels from the
        first iteration (LD3 adds them in a second round; on the 64-D mixture joint training was as good or better
        in 3 of 4 sampler/NFE cases, docs/step_schedules.md). Needs one model call per level, in order (dpmpp_2m,
        dpmpp_3m, unipc); the result carries ``model_timesteps``, which :func:`diffsteps.sample` takes as
        ``model_timesteps=``.
      - ``radius`` > 0: LD3's soft teacher forcing (the paper's relaxed, ball-constrained objective; code:
        ``_update_latents`` with ``prior_bound``): each training noise x_T may move to x'_T within
        ‖x'_T − x_T‖ ≤ ``radius`` · √D so the K-step output from x'_T matches the teacher's from x_T; x'_T takes one
        gradient step per iteration and is projected back onto the ball. The student then need not reproduce the
        teacher exactly where it cannot (a noise near a boundary between modes); held-out errors are always
        measured from the original noise.
    Supported samplers: those in :data:`~diffsteps.steps.differentiable.DIFFERENTIABLE`; ``options`` are sampler
    options (:func:`~diffsteps.steps.differentiable.check_differentiable_options`)."""
    check_differentiable_options(sampler, options or {})
    if decoupled and sampler not in ONE_CALL_PER_LEVEL:
        raise ValueError(f"decoupled model times need one model call per level ({', '.join(ONE_CALL_PER_LEVEL)}); "
                         f"got {sampler!r}")
    opts = dict(options or {})
    lo, hi = schedule.log_snr[-1].item(), schedule.log_snr[0].item()
    lam0 = schedule.alpha_bar_at(init.to(_F64)).logit()
    inc = torch.diff(torch.cat([lam0, torch.tensor([hi], dtype=_F64)])).clamp(min=1e-3 * (hi - lo))
    logits = torch.log(inc / inc.sum()).clone().requires_grad_(True)
    shift = torch.zeros(len(init), dtype=_F64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    opt_shift = torch.optim.Adam([shift], lr=lr) if decoupled else None
    gen = torch.Generator().manual_seed(seed)
    x_train = train[0].to(_F64).clone()
    n_train = len(x_train)
    ball = radius * x_train[0].numel() ** 0.5

    def run(x, grad, lams=None):
        lams = _levels(logits, lo, hi) if lams is None else lams
        model_lams = _shifted(lams, shift, window) if decoupled else None
        return run_differentiable(model, x, schedule, sampler, lams, prediction=prediction,
                                  fd=fd if grad else 1e-3, model_lams=model_lams, **opts)

    def evaluate(x, y):
        with torch.no_grad():
            return (run(x, False) - y).square().mean().sqrt().item()

    best = (evaluate(*heldout), logits.detach().clone(), shift.detach().clone(), 0)
    history = [(0, evaluate(train[0], train[1]), best[0])]
    stale, it, rate = 0, 0, lr
    for it in range(1, iterations + 1):
        idx = torch.randperm(n_train, generator=gen)[:batch] if batch and batch < n_train else slice(None)
        x = x_train[idx].clone().requires_grad_(radius > 0)
        opt.zero_grad()
        if opt_shift is not None:
            opt_shift.zero_grad()
        out = run(x, True)
        loss = (out - train[1][idx]).square().mean()
        loss.backward()
        opt.step()
        if opt_shift is not None:
            opt_shift.step()
        if radius > 0:
            with torch.no_grad():
                # one normalised gradient step on the noises, then back onto the ball around the original ones
                g = x.grad.reshape(len(x), -1)
                step = rate * ball * g / g.norm(dim=1, keepdim=True).clamp(min=1e-30)
                moved = x.detach().reshape(len(x), -1) - step
                orig = train[0][idx].to(_F64).reshape(len(x), -1)
                d = moved - orig
                scale = (ball / d.norm(dim=1, keepdim=True).clamp(min=1e-30)).clamp(max=1.0)
                x_train[idx] = (orig + d * scale).reshape(x.shape)
        if it % eval_every == 0 or it == iterations:
            val = evaluate(*heldout)
            history.append((it, loss.sqrt().item(), val))
            if it % (4 * eval_every) == 0:  # a line every ~20 iterations: minutes apart on a real network
                log.info("refine %s, %d levels: iteration %d/%d, train RMS %.4g, held-out %.4g (best %.4g), lr %.3g",
                         sampler, len(init), it, iterations, loss.sqrt().item(), val, min(val, best[0]), rate)
            if val < best[0]:
                best, stale = (val, logits.detach().clone(), shift.detach().clone(), it), 0
                continue
            stale += 1
            if stale < patience:
                continue
            # a plateau: back to the best levels, and a smaller step
            stale = 0
            with torch.no_grad():
                logits.copy_(best[1])
                shift.copy_(best[2])
            rate *= decay
            if rate < min_lr:
                break
            for o in (opt, opt_shift):
                if o is not None:
                    for group in o.param_groups:
                        group["lr"] = rate
    with torch.no_grad():
        logits.copy_(best[1])
        shift.copy_(best[2])
        lams = _levels(logits, lo, hi).clamp(lo, hi)
        ts = schedule.t_from_log_snr(lams)
        model_ts = schedule.t_from_log_snr(_shifted(lams, shift, window).clamp(lo, hi)) if decoupled else None
    ts[0] = schedule.num_timesteps - 1
    if model_ts is not None:
        model_ts[0] = ts[0]
    return RefineResult(ts.detach(), evaluate(train[0], train[1]), best[0], it, best[3], history, model_ts)
