"""Super-resolution on the same sampling machinery: an SR3 conditional model (Saharia et al. 2022) sampled with
``cond={"low_res": lr}``, and ILVR (Choi et al. 2021), training-free low-pass guidance of an unconditional model.

The degradation is average pooling by an integer factor f, ``down``; its right inverse is nearest-neighbour
repetition, ``up_nearest``, so φ = up_nearest ∘ down is an orthogonal projection onto the images that are constant
on f × f blocks, and down(up_nearest(y)) = y. ILVR's filter φ_N is this projection.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core.noise import randn
from ..core.process import q_sample
from ..core.schedules import Schedule
from ..sampling.api import SampleResult, StepInfo, plan_sampling, sample
from ..training.losses import DiffusionLoss, sample_timesteps
from .inpaint import _OPTIONS, _abar

__all__ = [
    "bicubic",
    "check_factor",
    "consistency",
    "down",
    "ilvr",
    "ilvr_hook",
    "low_pass",
    "sr3",
    "train_sr3",
    "up_nearest",
]


def check_factor(size: int, low_res: torch.Tensor | int) -> int:
    """The integer factor between a target ``size`` and a low-resolution side (or (B, C, h, h) tensor); raises
    when it does not divide the target."""
    h = low_res if isinstance(low_res, int) else low_res.shape[-1]
    if not isinstance(low_res, int) and (low_res.ndim != 4 or low_res.shape[-1] != low_res.shape[-2]):
        raise ValueError(f"the low-resolution input must be (B, C, h, h), got shape {tuple(low_res.shape)}")
    if h < 1 or h > size or size % h:
        ok = ", ".join(str(d) for d in range(1, size) if size % d == 0)
        raise ValueError(f"a low-resolution side of {h} does not divide the target size {size}; valid sides: {ok}")
    return size // h


def down(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The degradation: mean over f × f blocks."""
    return F.avg_pool2d(x, factor) if factor > 1 else x


def up_nearest(y: torch.Tensor, factor: int) -> torch.Tensor:
    return y.repeat_interleave(factor, -1).repeat_interleave(factor, -2) if factor > 1 else y


def bicubic(y: torch.Tensor, size: int) -> torch.Tensor:
    """The bicubic-upsampling baseline (PyTorch's bicubic, a = −0.75), clamped to the data range."""
    return F.interpolate(y.double(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def low_pass(x: torch.Tensor, factor: int) -> torch.Tensor:
    """ILVR's φ_N: the projection up_nearest(down(x))."""
    return up_nearest(down(x, factor), factor)


def consistency(x: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS of down(x) − y: how far a result is from reproducing its low-resolution input."""
    f = check_factor(x.shape[-1], low_res)
    return (down(x.double(), f) - low_res.double()).square().flatten(1).mean(1).sqrt()


def ilvr_hook(low_res: torch.Tensor, schedule: Schedule, size: int, *,
              generator: torch.Generator | None = None) -> Callable[[StepInfo], None]:
    """ILVR (Choi et al. 2021, Alg. 1) as a ``callback``: after the step to level t,
    x ← x − φ(x) + φ(y_t) with y_t = √ᾱ_t up(y) + √(1 − ᾱ_t) z a fresh noising of the reference; on the step into
    the data y_t = up(y), so down(result) = y exactly."""
    f = check_factor(size, low_res)
    ref = up_nearest(low_res, f)

    def hook(info: StepInfo) -> None:
        x = info.x
        ab = _abar(schedule, info.t_next, x).to(x.dtype)
        z = randn(ref.shape, generator=generator, dtype=x.dtype, device=x.device)
        y_t = ab.sqrt() * ref.to(x.dtype) + (1 - ab).sqrt() * low_pass(z, f)
        x.sub_(low_pass(x, f)).add_(low_pass(y_t, f))

    return hook


def ilvr(model: Callable, low_res: torch.Tensor, size: int, *, schedule: Schedule, sampler: str = "ddpm",
         steps: int | None = None, spacing="trailing", noise: torch.Tensor | None = None,
         generator: torch.Generator | None = None, **sample_kwargs) -> SampleResult:
    """Super-resolve ``low_res`` (B, C, h, h) to size × size with an unconditional ``model`` by ILVR on any sampler
    (the paper's is DDPM). Everything is validated before the first model call."""
    check_factor(size, low_res)
    plan_sampling(schedule, sampler, steps, spacing, **{k: v for k, v in sample_kwargs.items() if k in _OPTIONS})
    shape = (*low_res.shape[:2], size, size)
    if noise is None:
        noise = randn(shape, generator=generator, dtype=low_res.dtype, device=low_res.device)
    hook = ilvr_hook(low_res, schedule, size, generator=generator)
    return sample(model, noise, schedule=schedule, sampler=sampler, steps=steps, spacing=spacing, callback=hook,
                  generator=generator, return_info=True, **sample_kwargs)


def sr3(model: Callable, low_res: torch.Tensor, size: int, *, schedule: Schedule, sampler: str = "ddim",
        steps: int | None = None, spacing="trailing", noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None, **sample_kwargs) -> SampleResult:
    """Super-resolve with an SR3 conditional model ``model(x, t, low_res)`` (:class:`~diffsteps.nets.sr3.SR3UNet`):
    ``sample(model, noise, cond={"low_res": low_res})``."""
    check_factor(size, low_res)
    if noise is None:
        noise = randn((*low_res.shape[:2], size, size), generator=generator, dtype=low_res.dtype,
                      device=low_res.device)
    return sample(model, noise, schedule=schedule, sampler=sampler, steps=steps, spacing=spacing,
                  cond={"low_res": low_res}, generator=generator, return_info=True, **sample_kwargs)


def train_sr3(net: torch.nn.Module, images: torch.Tensor, factor: int, *, schedule: Schedule, loss: DiffusionLoss,
              max_steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, ema_decay: float = 0.995,
              seed: int = 0, log: Callable[[int, float], object] | None = None) -> torch.nn.Module:
    """Train an SR3 net on (down(x_0), x_0) pairs (Saharia et al. 2022, eq. 4 with ``loss``'s weighting and
    prediction): x_t = q_sample(x_0, t), loss(net(x_t, t, low_res=down(x_0)), x_0, ε, t). AdamW with a short
    warm-up and cosine decay; returns the EMA copy of the weights (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / max_steps)).item()))
    ema = copy.deepcopy(net).eval()
    low = down(images, factor)
    net.train()
    for step in range(max_steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x0, y = images[idx], low[idx]
        t = sample_timesteps(batch_size, schedule, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        out = net(q_sample(schedule, x0, t, eps), t.float(), low_res=y)
        value = loss(out, x0, eps, t, schedule).mean()
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - ema_decay)
        if log is not None:
            log(step, float(value))
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema
