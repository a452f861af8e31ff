"""Building blocks shared by the nets: argument checks, sinusoidal and learned time embeddings."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def _int_tuple(name: str, value) -> tuple[int, ...]:
    # Hydra hands over ListConfig / list where the signature defaults to a tuple; normalise both. A bare string is
    # iterable too, and would silently become a tuple of characters, so reject it explicitly.
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a sequence of ints, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or int(v) != v:
            raise ValueError(f"{name} must contain ints, got {value!r}")
        out.append(int(v))
    return tuple(out)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_dropout(dropout: float) -> float:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


def _as_batch_t(t, x: torch.Tensor) -> torch.Tensor:
    # expand() both broadcasts a 0-d / single t over the batch and raises on a genuinely mismatched length, without
    # a Python branch on the size.
    t = torch.as_tensor(t, device=x.device)
    return t.reshape(-1).expand(x.shape[0])


class SinusoidalEmbedding(nn.Module):
    """Sinusoidal features of a real-valued t (Vaswani et al. 2017, §3.5; Ho et al. 2020, App. B; the frequency
    spacing of Dhariwal & Nichol 2021's ``timestep_embedding``).

    With half = dim/2 and freq_i = exp(−log(max_period)·i/half) for i = 0 … half−1, the output is
    ``[cos(t·freq_0), …, cos(t·freq_{half−1}), sin(t·freq_0), …, sin(t·freq_{half−1})]`` — cosines first, as in
    ADM and diffusers' ``flip_sin_to_cos=True``. Parameter-free; computed in t's dtype promoted to at least float32
    (float64 stays float64). ``dim`` must be even so that every frequency gets both a cos and a sin.
    """

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if int(dim) != dim or dim < 2 or dim % 2:
            raise ValueError(f"SinusoidalEmbedding dim must be an even int >= 2, got {dim!r}")
        if not max_period > 1:
            raise ValueError(f"max_period must be > 1, got {max_period!r}")
        self.dim, self.max_period = int(dim), float(max_period)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(t.dtype, torch.float32)
        half = self.dim // 2
        # Built per call rather than stored as a buffer: a buffer would be cast along with the net by .to(bf16),
        # which is exactly the precision loss the promotion above avoids. It is a constant to torch.compile.
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=dtype) * (-math.log(self.max_period) / half))
        args = t.to(dtype)[:, None] * freqs
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_period={self.max_period:g}"


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t followed by Linear → SiLU → Linear (Ho et al. 2020, App. B; ADM's ``time_embed``).
    The output is left without a final non-linearity: consumers apply SiLU before their own projection, as in ADM."""

    def __init__(self, sinusoid_dim: int, out_dim: int, max_period: float = 10000.0):
        super().__init__()
        self.sinusoid = SinusoidalEmbedding(sinusoid_dim, max_period)
        self.fc1 = nn.Linear(sinusoid_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoid(t).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(emb)))
