"""Gaussian noise drawn where its generator lives.

torch draws only on a generator's own device type: ``torch.randn(..., generator=cpu_generator, device="cuda")``
raises. A seeded CPU generator is what users pass for reproducible noise whatever device the model runs on (as
diffusers' ``randn_tensor`` allows), so the numbers are drawn on the generator's device and moved.
"""

from __future__ import annotations

import torch

__all__ = ["randn"]


def randn(shape, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
          device: torch.device | str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """z ~ N(0, I) of ``shape`` on ``device`` (or into ``out``), drawn by ``generator`` on the generator's device:
    the same numbers as ``torch.randn(shape, generator=generator)`` there, moved to ``device`` (a copy per draw: a
    generator on the model's device draws in place and is faster)."""
    device = torch.device(out.device if out is not None else device if device is not None else "cpu")
    if generator is None or generator.device.type == device.type:
        return torch.randn(shape, generator=generator, dtype=dtype, device=device, out=out)
    z = torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)
    return out.copy_(z) if out is not None else z.to(device)
