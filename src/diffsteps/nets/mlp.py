"""The MLP denoiser for vector data."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ClassEmbedding, TimeEmbedding, _check_dropout, _check_num_classes, _embed


class _MLPBlock(nn.Module):
    def __init__(self, hidden: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Time enters after the first non-linearity, as a bias on the hidden units (the DDPM ResBlock pattern moved
        # to a pre-LayerNorm MLP block), so every block can re-read t rather than relying on the input projection.
        r = F.silu(self.fc1(self.norm(h))) + self.emb(emb)
        return h + self.fc2(self.drop(r))


class MLP(nn.Module):
    """Residual MLP denoiser for vector data, ``net(x: (B, dim), t: (B,), y: (B,) | None) -> (B, dim)``.

    Architecture: the residual MLP block of Gorishniy et al. 2021 ("Revisiting Deep Learning Models for Tabular
    Data", ResNet: x + Linear(Dropout(act(Linear(Norm(x)))))) with LayerNorm, i.e. a pre-norm residual stack as in
    Xiong et al. 2020, and DDPM-style time conditioning (Ho et al. 2020, App. B): t → sinusoidal(time_dim) →
    Linear → SiLU → Linear (width ``hidden``); input Linear(dim → hidden); ``depth`` blocks
    h ← h + Linear(Dropout(SiLU(Linear(LN(h))) + Linear(SiLU(emb)))); output LayerNorm → SiLU → Linear(hidden → dim),
    zero-initialised (see the module docstring for why). No batch statistics anywhere, so samples never interact.
    ``num_classes`` > 0 adds a :class:`ClassEmbedding` (class labels ``y``, row ``num_classes`` the null label)
    to the time embedding; 0 builds an unconditional net.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, time_dim: int = 128, dropout: float = 0.0,
                 num_classes: int = 0):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if int(depth) != depth or depth < 1:
            # t only enters through the blocks, so depth 0 would be a t-independent net.
            raise ValueError(f"depth must be an int >= 1 (time enters through the blocks), got {depth!r}")
        dim, hidden, depth = int(dim), int(hidden), int(depth)
        dropout = _check_dropout(dropout)
        self.dim = dim
        self.time_embed = TimeEmbedding(time_dim, hidden)
        self.num_classes = _check_num_classes(num_classes)
        self.class_embed = ClassEmbedding(self.num_classes, hidden) if self.num_classes else None
        self.proj_in = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_MLPBlock(hidden, hidden, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP(dim={self.dim}) expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        h = self.proj_in(x.to(self.proj_in.weight.dtype))
        emb = _embed(self.time_embed, self.class_embed, t, x, y)
        for block in self.blocks:
            h = block(h, emb)
        return self.proj_out(F.silu(self.norm_out(h)))
