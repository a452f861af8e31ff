"""The one model wrapper every sampler calls: network output → (x̂_0, ε̂), clipping, thresholding, NFE count."""

from __future__ import annotations

from typing import Callable

import torch

from ..core.parameterizations import check_prediction, to_x0_eps


class Denoiser:
    """Calls ``model(x, t)`` and returns (x̂_0, ε̂) in the state's dtype.

    The input is cast to the model's own dtype (its first floating parameter's; the state's dtype for a
    parameter-free callable), so a float32 network can be driven by a float64 sampler; ``t`` is passed as a 1-D
    tensor (one entry per sample) in that dtype, but at least float32. ``clip_denoised=c`` clamps x̂_0 to [−c, c]; ``dynamic_threshold=p`` applies
    Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): s = max(quantile_p |x̂_0|, 1) per sample, optionally
    capped at ``threshold_max``, x̂_0 ← clamp(x̂_0, −s, s)/s. After either, ε̂ is re-derived from the new x̂_0 so the
    pair stays consistent with x_t (as diffusers does).
    """

    def __init__(self, model: Callable, prediction: str = "epsilon", *, clip_denoised: float | None = None,
                 dynamic_threshold: float | None = None, threshold_max: float | None = None):
        self.model = model
        self.prediction = check_prediction(prediction)
        if clip_denoised is not None and not clip_denoised > 0:
            raise ValueError(f"clip_denoised must be positive or None, got {clip_denoised!r}")
        if dynamic_threshold is not None and not 0 < dynamic_threshold <= 1:
            raise ValueError(f"dynamic_threshold is a quantile in (0, 1], got {dynamic_threshold!r}")
        self.clip_denoised, self.dynamic_threshold, self.threshold_max = clip_denoised, dynamic_threshold, threshold_max
        params = model.parameters() if isinstance(model, torch.nn.Module) else ()
        self.model_dtype = next((p.dtype for p in params if p.is_floating_point()), None)
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: float, alpha: float, sigma: float):
        dtype = self.model_dtype or x.dtype
        # t in at least float32: a bf16 t would round timesteps near 1000 to multiples of 4
        tt = torch.full((x.shape[0],), t, dtype=torch.promote_types(dtype, torch.float32), device=x.device)
        out = self.model(x.to(dtype), tt).to(x.dtype)
        self.nfe += 1
        x0, eps = to_x0_eps(out, x, alpha, sigma, self.prediction)
        if self.clip_denoised is None and self.dynamic_threshold is None:
            return x0, eps
        if self.dynamic_threshold is not None:
            flat = x0.reshape(len(x0), -1).abs()
            s = torch.quantile(flat.float(), self.dynamic_threshold, dim=1).to(x0.dtype).clamp(min=1.0)
            if self.threshold_max is not None:
                s = s.clamp(max=self.threshold_max)
            s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
            x0 = torch.maximum(torch.minimum(x0, s), -s) / s
        if self.clip_denoised is not None:
            x0 = x0.clamp(-self.clip_denoised, self.clip_denoised)
        if sigma > 0:
            eps = (x - alpha * x0) / sigma
        return x0, eps
