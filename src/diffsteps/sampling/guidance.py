"""Class labels and classifier-free guidance for the one model wrapper (:class:`~diffsteps.sampling.denoiser.Denoiser`).

Classifier-free guidance (Ho & Salimans 2022, eq. 6): with a net trained with label dropout, so that it predicts both
ε(x, t, y) and ε(x, t, ∅) (∅ the null label, row ``num_classes`` of its label embedding),

    ε̃ = ε(x, t, ∅) + w · (ε(x, t, y) − ε(x, t, ∅)),

w = 1 is plain conditional sampling, w = 0 unconditional sampling, w > 1 guidance. Since ε = −σ ∇log p_t, ε̃ is the
noise prediction of the tilted density p_t(x | y)^w p_t(x)^{1−w} (exactly so for the exact ε; tests check the
sampler's output against that density in closed form for Gaussian classes). We combine the net's own prediction
(ε, x̂_0 or v) rather than ε: each is an affine function of ε with coefficients that depend only on (x_t, t), which
both branches share, and the weights (1 − w, w) sum to 1, so the combination is the same.

Both branches run as ONE forward pass of the doubled batch [(x, y); (x, ∅)] (as guided-diffusion and diffusers do):
one kernel launch per layer instead of two, at the price of twice the activations. ``guidance_interval=(t_lo, t_hi)``
applies guidance only at training-time indices t_lo ≤ t ≤ t_hi and samples conditionally (w = 1, one branch)
elsewhere (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample and distribution
quality", who find guidance at high noise harms diversity and at low noise is unnecessary).

NFE: a guided step costs two network evaluations per sample (the convention of the CFG literature), so the wrapper
counts 2 where both branches run and 1 where only one does (w = 1 or w = 0, or outside the interval).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable

import torch

LABEL_KEY = "y"


def num_classes_of(model: Callable) -> int:
    """The number of classes a model conditions on (its ``num_classes`` attribute; 0 when it has none)."""
    k = getattr(model, "num_classes", 0)
    return int(k or 0)


def check_guidance(model: Callable, cond: Mapping, guidance_scale: float | None,
                   guidance_interval=None, num_timesteps: int | None = None) -> tuple[float | None, tuple | None]:
    """Validate labels and guidance for ``model`` without calling it; return (scale, interval) as plain floats.

    A model with ``num_classes`` = K > 0 must be given labels ``cond["y"]``: integers in 0 … K−1 (the null label K
    is not a class; unconditional samples are ``guidance_scale=0``). Guidance needs such a model. ``guidance_scale``
    None means no guidance (plain conditional sampling, identical to w = 1). ``guidance_interval`` is a pair
    t_lo ≤ t_hi of training-time indices, in [0, T−1] when ``num_timesteps`` T is given."""
    k = num_classes_of(model)
    name = type(model).__name__
    y = cond.get(LABEL_KEY)
    if k > 0:
        if y is None:
            raise ValueError(f"{name} is class-conditional ({k} classes) and was sampled without its condition: "
                             f"pass cond={{'y': labels}} with labels in 0 … {k - 1} (one per sample); for "
                             "unconditional samples add guidance_scale=0")
        if y.is_floating_point() or y.is_complex() or y.dtype is torch.bool:
            raise ValueError(f"class labels cond['y'] must be an integer tensor, got {y.dtype}")
        if y.ndim != 1:
            raise ValueError(f"class labels cond['y'] must be one label per sample, shape (B,); got {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            bad = sorted({int(v) for v in y[(y < 0) | (y >= k)].tolist()})[:5]
            raise ValueError(f"unknown class label(s) {bad}: {name} has {k} classes, valid labels 0 … {k - 1}")
    scale, interval = check_guidance_options(guidance_scale, guidance_interval, num_timesteps)
    if scale is not None and k == 0:
        raise ValueError(f"guidance_scale={scale:g} needs a class-conditional model (num_classes > 0) trained with "
                         f"label dropout; {name} is unconditional. Train on conditional data (data.conditional=true) "
                         "or leave guidance_scale unset")
    return scale, interval


def check_guidance_options(guidance_scale: float | None, guidance_interval=None,
                           num_timesteps: int | None = None) -> tuple[float | None, tuple | None]:
    """The model-free part of :func:`check_guidance`: a finite scale (or None), an interval t_lo ≤ t_hi of
    training-time indices (in [0, T−1] given ``num_timesteps``) only together with a scale."""
    if guidance_scale is None:
        if guidance_interval is not None:
            raise ValueError("guidance_interval without guidance_scale: set guidance_scale too")
        return None, None
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (1: conditional, 0: unconditional, > 1: guided), "
                         f"got {guidance_scale!r}")
    interval = None
    if guidance_interval is not None:
        try:
            lo, hi = (float(v) for v in guidance_interval)
        except (TypeError, ValueError):
            raise ValueError(f"guidance_interval must be a pair (t_lo, t_hi) of training-time indices, got "
                             f"{guidance_interval!r}") from None
        top = math.inf if num_timesteps is None else num_timesteps - 1
        if not (0 <= lo <= hi <= top):
            raise ValueError(f"guidance_interval must satisfy 0 <= t_lo <= t_hi <= {top:g} (training-time indices), "
                             f"got ({lo:g}, {hi:g})")
        interval = (lo, hi)
    return float(guidance_scale), interval


def guided_call(model: Callable, x: torch.Tensor, t: torch.Tensor, cond: dict, scale: float,
                interval: tuple[float, float] | None) -> tuple[torch.Tensor, int]:
    """The guided prediction (module docstring) and the network evaluations per sample it took (1 or 2).

    ``t`` is (B,); ``cond`` holds the labels under ``"y"`` and anything else the model takes (duplicated for the
    unconditional half). w = 1 (or t outside the interval for every sample) calls the conditional branch alone,
    w = 0 the unconditional one alone, so those cases are exactly plain sampling."""
    null = num_classes_of(model)
    w = torch.full_like(t, scale)
    if interval is not None:
        inside = (t >= interval[0]) & (t <= interval[1])
        w = torch.where(inside, w, torch.ones_like(w))
    if bool(torch.all(w == 1)):
        return model(x, t, **cond), 1
    if bool(torch.all(w == 0)):
        return model(x, t, **{**cond, LABEL_KEY: torch.full_like(cond[LABEL_KEY], null)}), 1
    both = {k: torch.cat([v, v]) for k, v in cond.items()}
    both[LABEL_KEY] = torch.cat([cond[LABEL_KEY], torch.full_like(cond[LABEL_KEY], null)])
    out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
    w = w.to(out_c.dtype).reshape((-1,) + (1,) * (out_c.ndim - 1))
    return out_u + w * (out_c - out_u), 2
