"""The UNet denoiser for 1-D signals (C, L), optionally class-conditional."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ClassEmbedding, TimeEmbedding, _check_dropout, _check_num_classes, _divisors, _embed, _int_tuple


class ResBlock1D(nn.Module):
    """:class:`~diffsteps.nets.unet.ResBlock` over one axis: GN → SiLU → conv3 → GN·(1 + scale) + shift → SiLU →
    Dropout → conv3, plus a skip (1-wide conv when the width changes); ``emb`` (already SiLU'd) gives scale and
    shift (ADM's AdaGN, Dhariwal & Nichol 2021 §3.1)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch)
        self.conv1 = nn.Conv1d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv1d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock1D(nn.Module):
    """Multi-head self-attention over the L positions, with a residual connection (GN → qkv → attention → proj)."""

    def __init__(self, channels: int, num_heads: int, num_groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, n = x.shape
        qkv = self.qkv(self.norm(x).transpose(1, 2)).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                                   # each (B, heads, L, d)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return x + self.proj(a).transpose(1, 2)


class _Downsample1D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class _Upsample1D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        # nearest + conv, not a transposed conv: no checkerboard artefacts (Odena et al. 2016)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.ModuleList):
    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            h = layer(h, emb)
        return h


class UNet1D(nn.Module):
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

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, base_channels: int = 16,
                 channel_mult=(1, 2, 2), num_res_blocks: int = 1, attention_lengths=(10,), dropout: float = 0.0,
                 length: int = 40, num_groups: int = 8, num_heads: int = 1, num_classes: int = 0):
        super().__init__()
        channel_mult = _int_tuple("channel_mult", channel_mult)
        attention_lengths = _int_tuple("attention_lengths", attention_lengths)
        out_channels = in_channels if out_channels is None else out_channels
        self._validate(in_channels, out_channels, base_channels, channel_mult, num_res_blocks, attention_lengths,
                       length, num_groups, num_heads, num_classes)
        dropout = _check_dropout(dropout)
        self.in_channels, self.out_channels, self.length = int(in_channels), int(out_channels), int(length)
        self.channel_mult, self.attention_lengths = channel_mult, attention_lengths
        self.num_classes = _check_num_classes(num_classes)
        attn = set(attention_lengths)

        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(base_channels, emb_dim)
        self.class_embed = ClassEmbedding(self.num_classes, emb_dim) if self.num_classes else None

        def res(ci, co):
            return ResBlock1D(ci, co, emb_dim, dropout, num_groups)

        ch = base_channels * channel_mult[0]
        self.conv_in = nn.Conv1d(in_channels, ch, 3, padding=1)
        skip_chs, size = [ch], length
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, base_channels * mult)]
                ch = base_channels * mult
                if size in attn:
                    layers.append(AttentionBlock1D(ch, num_heads, num_groups))
                self.down.append(_Stage(layers))
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(_Stage([_Downsample1D(ch)]))
                skip_chs.append(ch)
                size //= 2

        mid = [res(ch, ch)]
        if size in attn:
            mid.append(AttentionBlock1D(ch, num_heads, num_groups))
        mid.append(res(ch, ch))
        self.mid = _Stage(mid)

        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chs.pop(), base_channels * channel_mult[level])]
                ch = base_channels * channel_mult[level]
                if size in attn:
                    layers.append(AttentionBlock1D(ch, num_heads, num_groups))
                if level != 0 and i == num_res_blocks:
                    layers.append(_Upsample1D(ch))
                    size *= 2
                self.up.append(_Stage(layers))
        assert not skip_chs and size == length  # construction invariant: every skip consumed exactly once

        self.out = nn.Sequential(nn.GroupNorm(num_groups, ch), nn.SiLU(), nn.Conv1d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @staticmethod
    def _validate(in_channels, out_channels, base_channels, channel_mult, num_res_blocks, attention_lengths,
                  length, num_groups, num_heads, num_classes):
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("length", length),
                        ("num_groups", num_groups), ("num_heads", num_heads)):
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(base_channels, bool) or int(base_channels) != base_channels or base_channels < 2 \
                or base_channels % 2:
            raise ValueError(f"base_channels must be an even int >= 2 (it is also the time-sinusoid width), "
                             f"got {base_channels!r}")
        if isinstance(num_res_blocks, bool) or int(num_res_blocks) != num_res_blocks or num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be an int >= 1, got {num_res_blocks!r}")
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult!r}")
        levels = len(channel_mult)
        factor = 2 ** (levels - 1)
        if length % factor:
            max_levels = (length & -length).bit_length()  # 1 + the number of times 2 divides length
            raise ValueError(f"length={length} is not divisible by 2**(len(channel_mult)-1)={factor}, so {levels} "
                             f"levels cannot halve it exactly; use at most {max_levels} level(s) for length={length}")
        widths = sorted({base_channels * m for m in channel_mult})
        g = math.gcd(*widths)
        if g % num_groups:
            raise ValueError(f"num_groups={num_groups} does not divide every level's channel count {widths}; "
                             f"valid num_groups: {', '.join(map(str, _divisors(g)))}")
        lengths = [length // 2**i for i in range(levels)]
        bad = [n for n in attention_lengths if n not in lengths]
        if bad:
            raise ValueError(f"attention_lengths {bad} never occur in this UNet1D (length={length}, {levels} "
                             f"levels); valid values: {', '.join(map(str, lengths))}")
        attn_widths = [base_channels * m for m, n in zip(channel_mult, lengths) if n in attention_lengths]
        if attn_widths and math.gcd(*attn_widths) % num_heads:
            ga = math.gcd(*attn_widths)
            raise ValueError(f"num_heads={num_heads} does not divide the channel count at every attention level "
                             f"{sorted(set(attn_widths))}; valid num_heads: {', '.join(map(str, _divisors(ga)))}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.in_channels or x.shape[2] != self.length:
            raise ValueError(f"UNet1D expects x of shape (B, {self.in_channels}, {self.length}), got {tuple(x.shape)}")
        emb = _embed(self.time_embed, self.class_embed, t, x, y)
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        hs = [h]
        for stage in self.down:
            h = stage(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
