"""The UNet denoiser for 1-D signals (C, L), optionally class-conditional: :class:`~diffsteps.nets.UNet`'s
skeleton and blocks with Conv1d."""

from __future__ import annotations

import torch

from .unet import AttentionBlock, ResBlock, _UNetBase


class ResBlock1D(ResBlock):
    """:class:`~diffsteps.nets.unet.ResBlock` over one axis: GN → SiLU → conv3 → GN·(1 + scale) + shift → SiLU →
    Dropout → conv3, plus a skip (1-wide conv when the width changes); ``emb`` (already SiLU'd) gives scale and
    shift (ADM's AdaGN, Dhariwal & Nichol 2021 §3.1)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, num_groups: int):
        super().__init__(in_ch, out_ch, emb_dim, dropout, num_groups, dims=1)


class AttentionBlock1D(AttentionBlock):
    """Multi-head self-attention over the L positions, with a residual connection (GN → qkv → attention → proj)."""


class UNet1D(_UNetBase):
    """DDPM/ADM-style UNet over one axis, ``net(x: (B, C, L), t: (B,), y: (B,) | None) -> (B, out_channels, L)``:
    :class:`~diffsteps.nets.UNet`'s architecture with Conv1d (conv3 in; per level ``num_res_blocks``
    :class:`ResBlock1D`, attention at the lengths in ``attention_lengths``, strided-conv downsampling; middle
    ResBlock → [attention] → ResBlock; mirrored decoder with ``num_res_blocks + 1`` blocks per level consuming the
    skips; nearest + conv upsampling; zero-initialised output conv, so the untrained net predicts 0).

    Class conditioning (``num_classes > 0``): an embedding table of ``num_classes + 1`` rows, the last one the null
    label that ``y=None`` selects (the unconditional branch of classifier-free guidance, Ho & Salimans 2022), added
    to the time embedding before the SiLU (as ADM's ``label_emb``). ``num_classes=0`` builds no table and refuses a
    ``y``.

    Defaults fit MNIST-1D (1×40) on a CPU: base_channels 16, channel_mult (1, 2, 2) (lengths 40, 20, 10), attention
    at 10, ≈0.15 M parameters (~0.1 s per training step of 128 signals on one core; base_channels 32, ≈0.59 M,
    costs twice that). ``length`` must be divisible by 2**(len(channel_mult) − 1).
    """

    _net_name, _dims, _size_name, _attention_name = "UNet1D", 1, "length", "attention_lengths"
    _res_block, _attention = ResBlock1D, AttentionBlock1D

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, base_channels: int = 16,
                 channel_mult=(1, 2, 2), num_res_blocks: int = 1, attention_lengths=(10,), dropout: float = 0.0,
                 length: int = 40, num_groups: int = 8, num_heads: int = 1, num_classes: int = 0):
        super().__init__(in_channels, out_channels, base_channels, channel_mult, num_res_blocks, attention_lengths,
                         dropout, length, num_groups, num_heads, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.in_channels or x.shape[2] != self.length:
            raise ValueError(f"UNet1D expects x of shape (B, {self.in_channels}, {self.length}), got {tuple(x.shape)}")
        return self._unet(x, t, y)
