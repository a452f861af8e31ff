"""Building blocks shared by the nets: argument checks, sinusoidal and learned time embeddings, the class-label
embedding."""

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


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: unconditional), got {num_classes!r}")
    return int(num_classes)


class ClassEmbedding(nn.Module):
    """A learned embedding of class labels, added to the time embedding (ADM's ``label_emb``, Dhariwal & Nichol
    2021; EDM's ``map_label``, Karras et al. 2022).

    The table has ``num_classes + 1`` rows: row ``num_classes`` is the null label, the "no condition" input that
    label dropout trains (Ho & Salimans 2022, §3.2) and that classifier-free guidance's unconditional branch uses.
    ``y=None`` means the null label for the whole batch. Labels are (B,) integers in [0, num_classes]; range checks
    live in the sampling API (before any model call), not here, so the forward pass stays free of data-dependent
    control flow."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = _check_num_classes(num_classes)
        if self.num_classes < 1:
            raise ValueError("ClassEmbedding needs num_classes >= 1")
        self.table = nn.Embedding(self.num_classes + 1, dim)

    @property
    def null(self) -> int:
        return self.num_classes

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return self.table(torch.as_tensor(y, device=device).reshape(-1).long().expand(batch))


def _embed(time_embed: nn.Module, class_embed: ClassEmbedding | None, t, x: torch.Tensor,
           y: torch.Tensor | None) -> torch.Tensor:
    """SiLU(time embedding + class embedding): the conditioning every block reads. A net built without classes
    (``class_embed`` None) ignores ``y`` only when it is None, and says so otherwise."""
    emb = time_embed(_as_batch_t(t, x))
    if class_embed is not None:
        emb = emb + class_embed(y, x.shape[0], x.device).to(emb.dtype)
    elif y is not None:
        raise ValueError("this net was built without classes (num_classes=0) and cannot take labels y; build it "
                         "with num_classes > 0, or pass y=None")
    return F.silu(emb)
