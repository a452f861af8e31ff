"""The one model wrapper every sampler calls: network output → (x̂_0, ε̂), conditioning, classifier-free guidance,
clipping, thresholding, NFE count."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.parameterizations import check_prediction
from .arith import Arith
from .guidance import check_guidance, guided_call
from .levels import Level, every


class Denoiser:
    """Calls ``model(x, t, **cond)`` and returns (x̂_0, ε̂) in the state's dtype.

    The input is cast to the model's own dtype (its first floating parameter's; the state's dtype for a
    parameter-free callable), so a float32 network can be driven by a float64 sampler; ``t`` is passed as a 1-D
    tensor (one entry per sample) in that dtype, but at least float32. ``t`` may be a float (shared levels) or a
    tensor with one value per sample (per-sample levels, any shape with B entries). ``cond`` (see
    :func:`check_cond`) is passed as keyword arguments on every call, its floating tensors cast like x, its integer
    ones as they are. ``clip_denoised=c`` clamps x̂_0 to [−c, c]; ``dynamic_threshold=p`` applies Imagen's dynamic
    thresholding (Saharia et al. 2022, §2.3): s = max(quantile_p |x̂_0|, 1) per sample, optionally capped at
    ``threshold_max``, x̂_0 ← clamp(x̂_0, −s, s)/s. After either, ε̂ is re-derived from the new x̂_0 so the pair stays
    consistent with x_t (as diffusers does).

    ``arith``: where the conversions run and are stored (:class:`~.arith.Arith`; default eager, new tensors).

    A class-conditional model (``num_classes`` > 0) must get its labels as ``cond={"y": labels}``;
    ``guidance_scale=w`` applies classifier-free guidance, optionally only inside ``guidance_interval`` (both in
    :mod:`diffsteps.sampling.guidance`, which validates them here, before any model call). ``nfe`` counts network
    evaluations per sample: 2 for a step where both guidance branches run.
    """

    def __init__(self, model: Callable, prediction: str = "epsilon", *, cond: Mapping | None = None,
                 clip_denoised: float | None = None, dynamic_threshold: float | None = None,
                 threshold_max: float | None = None, guidance_scale: float | None = None,
                 guidance_interval=None, num_timesteps: int | None = None, arith: Arith | None = None):
        self.model = model
        self.arith = Arith() if arith is None else arith
        self.prediction = check_prediction(prediction)
        if clip_denoised is not None and not clip_denoised > 0:
            raise ValueError(f"clip_denoised must be positive or None, got {clip_denoised!r}")
        if dynamic_threshold is not None and not 0 < dynamic_threshold <= 1:
            raise ValueError(f"dynamic_threshold is a quantile in (0, 1], got {dynamic_threshold!r}")
        self.clip_denoised, self.dynamic_threshold, self.threshold_max = clip_denoised, dynamic_threshold, threshold_max
        params = model.parameters() if isinstance(model, torch.nn.Module) else ()
        self.model_dtype = next((p.dtype for p in params if p.is_floating_point()), None)
        self.cond = check_cond(cond, model)
        self.guidance_scale, self.guidance_interval = check_guidance(model, self.cond, guidance_scale,
                                                                     guidance_interval, num_timesteps)
        self._cond_cast: tuple[torch.dtype | None, dict] = (None, {})
        self.nfe = 0

    @property
    def transforms_x0(self) -> bool:
        """Whether x̂_0 is clipped or thresholded after the network (so ε̂ is re-derived from it)."""
        return self.clip_denoised is not None or self.dynamic_threshold is not None

    def _x0_map(self, alpha, sigma) -> X0Map | None:
        """x̂_0 = (p x + q·out)·s for this prediction at level (α, σ) (:func:`_convert`'s formulas; guidance combines the
        network outputs before this, so it stays linear), or None where x̂_0 is no linear function of them."""
        if self.transforms_x0:
            return None
        if self.prediction == "epsilon":  # x̂_0 = (x − σ ε̂) · (1/α), as the fused sub_div computes it
            if not (bool((alpha > 0).all()) if isinstance(alpha, torch.Tensor) else alpha > 0):
                return None
            return X0Map(1.0, -sigma, 1 / alpha, alpha, sigma, self.prediction)
        if self.prediction == "x0":
            return X0Map(0.0, 1.0, 1.0, alpha, sigma, self.prediction)
        # v: x̂_0 = α x − σ v̂ (times s = 1, exact: one fused kernel for both parameterisations)
        return X0Map(alpha, -sigma, 1.0, alpha, sigma, self.prediction)

    def _cond_as(self, dtype: torch.dtype) -> dict:
        if self._cond_cast[0] is not dtype:
            self._cond_cast = (dtype, {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.cond.items()})
        return self._cond_cast[1]

    def __call__(self, x: torch.Tensor, t: float | torch.Tensor, alpha, sigma, want: str = "both",
                 rows: torch.Tensor | None = None):
        """(x̂_0, ε̂) at x, level (t, α, σ). ``want``: ``"both"``, or ``"x0"`` / ``"eps"`` to form only that one — the
        other is returned as None — so a data-prediction solver does not pay for ε̂ nor an ε-solver for x̂_0 (with
        ε-prediction ε̂ is the network output itself, no pass over the state at all). Clipping and thresholding act on
        x̂_0, so with either the pair is formed whatever ``want`` says, and ε̂ re-derived from the clipped x̂_0.
        ``want="linear"``: (network output, :class:`X0Map`) where x̂_0 is a linear function (p x + q·out)·s of the two,
        so a sampler can fold the conversion into its own update (one loop instead of two); where it is not — clipping,
        thresholding, or ε-prediction at α = 0 — (x̂_0, None), exactly as ``"x0"`` gives it.
        ``rows``: which samples of the batch x holds (a sampler that evaluates only some), so ``cond`` follows."""
        if want not in WANTS:
            raise ValueError(f"want must be one of: {', '.join(WANTS)}; got {want!r}")
        dtype = self.model_dtype or x.dtype
        # t in at least float32: a bf16 t would round timesteps near 1000 to multiples of 4
        t_dtype = torch.promote_types(dtype, torch.float32)
        if isinstance(t, torch.Tensor):
            tt = t.reshape(-1).to(device=x.device, dtype=t_dtype)
        else:
            tt = _t_column(t, x.shape[0], t_dtype, x.device)
        xm = x if x.dtype == dtype else x.to(dtype)
        cond = self._cond_as(dtype) if self.cond else {}
        if rows is not None:  # only these samples are in x: their conditions follow them
            cond = {k: v[rows.to(v.device)] for k, v in cond.items()}
        if self.guidance_scale is not None:
            out, cost = guided_call(self.model, xm, tt, cond, self.guidance_scale, self.guidance_interval)
        else:
            out, cost = (self.model(xm, tt, **cond) if cond else self.model(xm, tt)), 1
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        self.arith.disown_if_aliased(x, out)
        self.nfe += cost
        if want == "linear":
            m = self._x0_map(alpha, sigma)
            if m is not None:
                return out, m
            want = "x0"
        if self.clip_denoised is None and self.dynamic_threshold is None:
            return _convert(self.arith, out, x, alpha, sigma, self.prediction, want)
        x0 = _convert(self.arith, out, x, alpha, sigma, self.prediction, "x0")[0]
        if self.dynamic_threshold is not None:
            flat = x0.reshape(len(x0), -1).abs()
            s = torch.quantile(flat.float(), self.dynamic_threshold, dim=1).to(x0.dtype).clamp(min=1.0)
            if self.threshold_max is not None:
                s = s.clamp(max=self.threshold_max)
            s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
            x0 = torch.maximum(torch.minimum(x0, s), -s) / s
        if self.clip_denoised is not None:
            x0 = x0.clamp(-self.clip_denoised, self.clip_denoised)
        eps = None
        if want != "x0":  # consistent with the new x̂_0 (at σ = 0 there is nothing to re-derive from)
            eps = (self.arith.sub_div(x, alpha, x0, sigma) if every(sigma > 0)
                   else _convert(self.arith, out, x, alpha, sigma, self.prediction, "eps")[1])
        return (None if want == "eps" else x0), eps


WANTS = ("both", "x0", "eps", "linear")

# (t, B, dtype, device) → (the model's t input, its version counter when made): the same level is
# visited by every sample() call with the same schedule and steps, and torch.full costs about 3 µs a call — 3 % of
# a pass over a 10,000 × 64 state. A tensor the model changed in place (its version moved) is made anew; at most
# T_CACHE_BYTES are held (all dropped when full).
T_CACHE_BYTES = 4 * 2**20
_T_CACHE: dict[tuple, tuple[torch.Tensor, int]] = {}
_T_BYTES = [0]


def _t_column(t: float, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.full((n,), t, dtype=dtype, device=device), reused from earlier calls where unchanged (not under
    ``torch.inference_mode``: an inference tensor has no version counter to tell)."""
    if torch.is_inference_mode_enabled():
        return torch.full((n,), t, dtype=dtype, device=device)
    key = (t, n, dtype, device)
    hit = _T_CACHE.get(key)
    if hit is not None and hit[0]._version == hit[1]:
        return hit[0]
    tt = torch.full((n,), t, dtype=dtype, device=device)
    if _T_BYTES[0] + tt.nbytes > T_CACHE_BYTES:
        _T_CACHE.clear()
        _T_BYTES[0] = 0
    if tt.nbytes <= T_CACHE_BYTES:
        _T_CACHE[key] = (tt, tt._version)
        _T_BYTES[0] += tt.nbytes
    return tt


@dataclass(frozen=True)
class X0Map:
    """x̂_0 = (p x + q·out) · s, the network output's conversion at one level
    (``Denoiser(..., want="linear")``); float64 floats, or per-sample tensors. ``alpha``, ``sigma``,
    ``prediction``: that level and parameterisation, so :meth:`x0` can form x̂_0 with the operators the Denoiser
    itself uses."""

    p: Level
    q: Level
    s: Level
    alpha: Level
    sigma: Level
    prediction: str

    @property
    def is_output(self) -> bool:
        """x̂_0 is the network output itself (x0-prediction): nothing to form."""
        return self.prediction == "x0"

    def x0(self, ar: Arith, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x̂_0 exactly as ``Denoiser(..., want="x0")`` forms it (its operators, its rounding)."""
        return _convert(ar, out, x, self.alpha, self.sigma, self.prediction, "x0")[0]


def _convert(ar: Arith, out: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction: str, want: str):
    """:func:`~diffsteps.core.parameterizations.to_x0_eps`, forming only what ``want`` asks for, each conversion one
    linear combination of x and the network output (:class:`~.arith.Arith`) into a tensor of its own (the network
    output is never written to: the model may hold it)."""
    if prediction == "epsilon":
        return (None if want == "eps" else ar.sub_div(x, sigma, out, alpha)), (None if want == "x0" else out)
    if prediction == "x0":
        return (None if want == "eps" else out), (None if want == "x0" else ar.sub_div(x, alpha, out, sigma))
    check_prediction(prediction)  # v: x̂_0 = α x_t − σ v̂, ε̂ = σ x_t + α v̂
    return (None if want == "eps" else ar.lincomb(alpha, x, [(-sigma, out)]),
            None if want == "x0" else ar.lincomb(sigma, x, [(alpha, out)]))


def check_cond(cond: Mapping | None, model: Callable | None = None,
               batch: int | None = None) -> dict[str, torch.Tensor]:
    """Validate the conditioning for ``model(x, t, **cond)`` without calling the model; return it as a dict.

    ``cond`` is None or a mapping of str → tensor whose leading dimension is the batch (``batch``, when given). Given
    a ``model`` whose signature is known (its ``forward`` for a module), every argument it requires beyond (x, t)
    must be in ``cond``, and every key of ``cond`` must be an argument it accepts.
    """
    if cond is None:
        cond = {}
    if not isinstance(cond, Mapping):
        raise ValueError(f"cond must be a mapping of argument name → tensor, e.g. {{'y': labels}}; "
                         f"got {type(cond).__name__}")
    for k, v in cond.items():
        if not isinstance(k, str):
            raise ValueError(f"cond keys are the model's argument names (str); got {k!r}")
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"cond[{k!r}] must be a tensor with one entry per sample, got {type(v).__name__}")
        if batch is not None and (v.ndim == 0 or v.shape[0] != batch):
            raise ValueError(f"cond[{k!r}] has shape {tuple(v.shape)}; its first dimension must be the batch size "
                             f"{batch}")
    sig = None if model is None else _signature(model)
    if sig is None:
        return dict(cond)
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        return dict(cond)  # not a (x, t) signature we can read; the call itself will tell
    taken = {p.name for p in positional[:2]}
    if taken & set(cond):
        raise ValueError(f"cond may not hold {', '.join(sorted(taken & set(cond)))}: the sampler passes (x, t) itself")
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in taken]
    missing = [p.name for p in named if p.default is p.empty and p.name not in cond]
    if missing:
        raise ValueError(f"the model needs argument(s) {', '.join(missing)} beyond (x, t); pass them as "
                         f"cond={{{', '.join(repr(m) + ': ...' for m in missing)}}}")
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        unknown = [k for k in cond if k not in {p.name for p in named}]
        if unknown:
            raise ValueError(f"the model takes no argument(s) {', '.join(map(repr, unknown))}; its arguments beyond "
                             f"(x, t): {', '.join(p.name for p in named) or 'none'}")
    return dict(cond)


def _signature(model: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward if isinstance(model, torch.nn.Module) else model)
    except (TypeError, ValueError):
        return None
