"""Inpainting with an unconditional model on any sampler: the replacement method and RePaint.

Both run :func:`~diffsteps.sampling.api.sample` unchanged and act through its per-step ``callback``: after every
step the hook overwrites the known coordinates of the state, in place (each sampler continues from the tensor it
hands to the callback), with the ground truth noised to the level just reached — the replacement method of Song et
al. 2021b (App. I.2). On the step into the data it writes the ground truth itself, so the known coordinates of every
result equal it exactly.

The replacement method samples the unknown part from the model's marginal next to a *fresh* noising of the known
part, not from p(x_unknown | x_known): for correlated data it is biased (on a 2-D Gaussian with correlation 0.95
the conditional variance comes out about twice the true one, tests/test_restoration.py). RePaint (Lugmayr et al.
2022, Alg. 1 and its ``get_schedule_jump``) harmonises the two parts by going back up the chain: after every
``jump_length`` levels it re-noises the whole state ``jump_length`` levels up, q(x_t' | x_t), and descends again,
``jump_n_sample − 1`` extra times; each extra descent costs model calls, counted in the NFE it returns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.noise import randn
from ..core.schedules import Schedule
from ..sampling.api import SampleResult, StepInfo, plan_sampling, sample
from ..sampling.registry import SAMPLERS, get_sampler
from .masks import check_mask

__all__ = ["inpaint", "repaint", "repaint_path", "replacement_hook"]


def _abar(schedule: Schedule, t: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ at level t (−1: the data, ᾱ = 1), shaped to broadcast against ``like`` (B, ...)."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    ab = torch.where(t < 0, torch.ones_like(t), schedule.alpha_bar_at(t.clamp(min=0)))
    return ab.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.device)


def replacement_hook(known: torch.Tensor, mask: torch.Tensor, schedule: Schedule, *,
                     generator: torch.Generator | None = None,
                     then: Callable[[StepInfo], object] | None = None) -> Callable[[StepInfo], None]:
    """A ``callback`` for :func:`sample` that applies the replacement method (Song et al. 2021b, App. I.2): after the
    step to level t, x ← m ⊙ (√ᾱ_t y + √(1 − ᾱ_t) z) + (1 − m) ⊙ x with fresh z ~ N(0, I), and x ← m ⊙ y + (1 − m) ⊙ x
    on the step into the data. ``known``: y, (B, ...); ``mask``: m, 1 where y is known, broadcastable to y.
    ``then`` is called afterwards with the same StepInfo (e.g. to record frames)."""
    m = mask.to(known.dtype).to(known.device)

    def hook(info: StepInfo) -> None:
        x = info.x
        ab = _abar(schedule, info.t_next, x).to(x.dtype)
        y = known.to(x.dtype)
        z = randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        noised = torch.where(ab >= 1, y, ab.sqrt() * y + (1 - ab).sqrt() * z)
        x.copy_(torch.where(m.to(x.dtype) > 0, noised, x))
        if then is not None:
            then(info)

    return hook


def inpaint(model: Callable, known: torch.Tensor, mask: torch.Tensor, *, schedule: Schedule,
            noise: torch.Tensor | None = None, sampler: str = "ddim", steps: int | None = None,
            spacing="trailing", generator: torch.Generator | None = None, callback: Callable | None = None,
            **sample_kwargs) -> SampleResult:
    """Fill the unknown part (mask = 0) of ``known`` with the replacement method on any sampler. ``noise``: x at
    the first level (default N(0, I) from ``generator``); the remaining keywords go to :func:`sample`. Returns the
    :class:`SampleResult` (sample, NFE, timesteps). Mask and request are checked before any model call."""
    m = check_mask(mask, known)
    _check_fixed_steps(sampler)
    plan_sampling(schedule, sampler, steps, spacing, **{k: v for k, v in sample_kwargs.items() if k in _OPTIONS})
    if noise is None:
        noise = randn(known.shape, generator=generator, dtype=known.dtype, device=known.device)
    hook = replacement_hook(known, m, schedule, generator=generator, then=callback)
    return sample(model, noise, schedule=schedule, sampler=sampler, steps=steps, spacing=spacing, callback=hook,
                  generator=generator, return_info=True, **sample_kwargs)


def _check_fixed_steps(sampler: str) -> None:
    # the hook rewrites the state between steps; an adaptive sampler's state and levels are per-sample and
    # compacted, so the noised ground truth would not line up with them
    if get_sampler(sampler).adaptive:
        raise ValueError(f"inpainting needs a fixed-step sampler; {sampler!r} picks its own steps. Choose one of: "
                         f"{', '.join(n for n, s in SAMPLERS.items() if not s.adaptive)}")


# sampler options a request may carry (the rest of sample()'s keywords are not plan_sampling's)
_OPTIONS = ("eta", "variance", "order", "variant", "corrector", "lower_order_final", "final")


def repaint_path(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's walk over level indices 0 … steps−1 (0 the noisiest) and ``steps`` (the data), as its
    ``get_schedule_jump``: descend one level at a time; on reaching a level whose distance from the clean end is a
    multiple of ``jump_length`` (and that lies at least ``jump_length`` below the top), climb back ``jump_length``
    levels, ``jump_n_sample − 1`` times in all. Returns the visited indices in order."""
    for name, v in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"repaint {name} must be a positive integer, got {v!r}")
    jumps = {j: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
    tau, path = steps, []
    while tau >= 1:  # tau counts levels from the clean end: level index = steps − tau
        tau -= 1
        path.append(steps - 1 - tau)
        if jumps.get(tau, 0) > 0:
            jumps[tau] -= 1
            for _ in range(jump_length):
                tau += 1
                path.append(steps - 1 - tau)
    return path + [steps]


def repaint(model: Callable, known: torch.Tensor, mask: torch.Tensor, *, schedule: Schedule,
            steps: int, jump_length: int = 10, jump_n_sample: int = 10, sampler: str = "ddpm",
            spacing="trailing", noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
            **sample_kwargs) -> SampleResult:
    """RePaint (Lugmayr et al. 2022): replacement inpainting along :func:`repaint_path`. Each descending run of the
    path is one :func:`sample` call (any sampler; RePaint's own is ``ddpm``) over those levels with the
    replacement hook; each climb from level t to t' > t draws x_t' ~ q(x_t' | x_t) = N(√(ᾱ_t'/ᾱ_t) x_t,
    (1 − ᾱ_t'/ᾱ_t) I). NFE in the result = every model call of every descent: steps + (jump_n_sample − 1) ×
    jump_length × (number of jump points) for one-call-per-step samplers."""
    m = check_mask(mask, known)
    _check_fixed_steps(sampler)
    opts = {k: v for k, v in sample_kwargs.items() if k in _OPTIONS}
    _, _, levels = plan_sampling(schedule, sampler, steps, spacing, **opts)  # rounded as the sampler rounds
    n = len(levels)
    x = noise if noise is not None else randn(known.shape, generator=generator, dtype=known.dtype,
                                              device=known.device)
    hook = replacement_hook(known, m, schedule, generator=generator)
    nfe, per_sample, accepted = 0, 0, 0
    for a, b in _runs(repaint_path(n, jump_length, jump_n_sample)):
        if b > a:  # descend from level a to level b (b = n: into the data)
            ts = levels[a:] if b == n else levels[a:b + 1]
            out = sample(model, x, schedule=schedule, sampler=sampler, spacing=ts, denoise_final=b == n,
                         callback=hook, generator=generator, return_info=True, **sample_kwargs)
            x, nfe = out.sample, nfe + out.nfe
            per_sample, accepted = per_sample + out.nfe_per_sample, accepted + out.accepted
        else:  # climb from level a up to level b
            ratio = (schedule.alpha_bar_at(levels[b]) / schedule.alpha_bar_at(levels[a])).item()
            z = randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = ratio ** 0.5 * x + (1 - ratio) ** 0.5 * z
    return SampleResult(x, nfe, levels, per_sample, accepted, torch.zeros_like(accepted))


def _runs(path: list[int]) -> list[tuple[int, int]]:
    """Split a walk over level indices into its monotone runs (start, end): descents (end > start), climbs."""
    runs, i = [], 0
    while i < len(path) - 1:
        up = path[i + 1] < path[i]
        j = i + 1
        while j + 1 < len(path) and (path[j + 1] < path[j]) == up:
            j += 1
        runs.append((path[i], path[j]))
        i = j
    return runs
