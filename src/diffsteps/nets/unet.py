"""The UNet denoiser for images, and the dimension-generic blocks and skeleton it shares with
:class:`~diffsteps.nets.unet1d.UNet1D`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    ClassEmbedding,
    TimeEmbedding,
    _check_dropout,
    _check_num_classes,
    _divisors,
    _embed,
    _int_tuple,
)

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}


class ResBlock(nn.Module):
    """ADM residual block (Dhariwal & Nichol 2021, App. A; Ho et al. 2020's block with adaptive GroupNorm):
    GN → SiLU → conv3×3 → GN·(1 + scale) + shift → SiLU → Dropout → conv3×3, plus a skip (1×1 conv when the
    channel count changes). Time enters by scale-shift ("AdaGN", ADM §3.1, whose ablation found it improves FID
    over DDPM's additive per-channel bias). ``emb`` is the already-SiLU'd time embedding. ``dims``: 2 for images,
    1 for signals (:class:`~diffsteps.nets.unet1d.ResBlock1D`)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, num_groups: int, dims: int = 2):
        super().__init__()
        conv = _CONV[dims]
        self.dims = dims
        self.norm1 = nn.GroupNorm(num_groups, in_ch)
        self.conv1 = conv(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Identity() if in_ch == out_ch else conv(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(emb)
        scale, shift = e.reshape(e.shape + (1,) * self.dims).chunk(2, dim=1)     # broadcast over the positions
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention with a residual connection (Ho et al. 2020 / ADM's ``AttentionBlock``):
    GN → qkv projection → ``scaled_dot_product_attention`` over the N = H·W (or L) positions → output projection.
    Works for any number of spatial axes."""

    def __init__(self, channels: int, num_heads: int, num_groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c = x.shape[:2]
        h = self.norm(x).reshape(b, c, -1).transpose(1, 2)                               # (B, N, C)
        n = h.shape[1]
        qkv = self.qkv(h).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                                   # each (B, heads, N, d)
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(b, n, c)
        return x + self.proj(a).transpose(1, 2).reshape(x.shape)


class _Downsample(nn.Module):
    def __init__(self, channels: int, dims: int = 2):
        super().__init__()
        self.conv = _CONV[dims](channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, channels: int, dims: int = 2):
        super().__init__()
        self.conv = _CONV[dims](channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        # Nearest + conv rather than a transposed conv: no checkerboard artefacts (Odena et al. 2016), as in DDPM.
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.ModuleList):
    # Every layer takes (h, emb) so a stage is a plain loop, with no isinstance dispatch in forward.
    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            h = layer(h, emb)
        return h


def _positive_int(v) -> bool:
    return not isinstance(v, bool) and int(v) == v and v >= 1


def _check_unet_args(net: str, size_name: str, attn_name: str, in_channels, out_channels, base_channels,
                     channel_mult, num_res_blocks, attention_sizes, size, num_groups, num_heads):
    """The UNets' argument checks, worded with the net's own names (``image_size``/``attention_resolutions`` or
    ``length``/``attention_lengths``), each error listing the valid choices."""
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels), (size_name, size),
                    ("num_groups", num_groups), ("num_heads", num_heads)):
        if not _positive_int(v):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not _positive_int(base_channels) or base_channels < 2 or base_channels % 2:
        # base_channels is also the sinusoid width, which needs a (cos, sin) pair per frequency.
        raise ValueError(f"base_channels must be an even int >= 2 (it is also the time-sinusoid width), "
                         f"got {base_channels!r}")
    if not _positive_int(num_res_blocks):
        raise ValueError(f"num_res_blocks must be an int >= 1, got {num_res_blocks!r}")
    if not channel_mult or min(channel_mult) < 1:
        raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult!r}")

    levels = len(channel_mult)
    factor = 2 ** (levels - 1)
    if size % factor:
        max_levels = (size & -size).bit_length()  # 1 + the number of times 2 divides size
        plural = "image sizes" if size_name == "image_size" else "lengths"
        raise ValueError(
            f"{size_name}={size} is not divisible by 2**(len(channel_mult)-1)={factor}, so "
            f"{levels} levels cannot halve it exactly; valid {plural} for {levels} levels are multiples of "
            f"{factor} ({factor}, {2 * factor}, {4 * factor}, ...), or use at most {max_levels} level(s) "
            f"(len(channel_mult) <= {max_levels}) for {size_name}={size}")

    widths = sorted({base_channels * m for m in channel_mult})
    g = math.gcd(*widths)
    if g % num_groups:
        raise ValueError(
            f"num_groups={num_groups} does not divide every level's channel count {widths} "
            f"(base_channels * channel_mult); valid num_groups: {', '.join(map(str, _divisors(g)))}")

    sizes = [size // 2**i for i in range(levels)]
    bad = [r for r in attention_sizes if r not in sizes]
    if bad:
        raise ValueError(
            f"{attn_name} {bad} never occur in this {net} ({size_name}={size}, {levels} levels); "
            f"valid values: {', '.join(map(str, sizes))}")
    attn_widths = [base_channels * m for m, r in zip(channel_mult, sizes) if r in attention_sizes]
    if attn_widths and math.gcd(*attn_widths) % num_heads:
        ga = math.gcd(*attn_widths)
        raise ValueError(
            f"num_heads={num_heads} does not divide the channel count at every attention level "
            f"{sorted(set(attn_widths))}; valid num_heads: {', '.join(map(str, _divisors(ga)))}")


class _UNetBase(nn.Module):
    """The skeleton :class:`UNet` and :class:`~diffsteps.nets.unet1d.UNet1D` share, over ``_dims`` spatial axes:
    argument checks, time (+ class) embedding, conv in, the encoder stages, the middle, the decoder stages that
    each consume one skip, the zero-initialised conv out, and the forward pass through them. A subclass names the
    net, its size and attention arguments and its blocks (class attributes) and checks the input shape. Modules
    are created in this fixed order, so a seeded initialisation and the state-dict keys are those of the nets
    before they shared it."""

    _net_name, _dims, _size_name, _attention_name = "UNet", 2, "image_size", "attention_resolutions"
    _res_block, _attention = ResBlock, AttentionBlock

    def __init__(self, in_channels, out_channels, base_channels, channel_mult, num_res_blocks, attention_sizes,
                 dropout, size, num_groups, num_heads, num_classes):
        super().__init__()
        channel_mult = _int_tuple("channel_mult", channel_mult)
        attention_sizes = _int_tuple(self._attention_name, attention_sizes)
        out_channels = in_channels if out_channels is None else out_channels
        _check_unet_args(self._net_name, self._size_name, self._attention_name, in_channels, out_channels,
                         base_channels, channel_mult, num_res_blocks, attention_sizes, size, num_groups, num_heads)
        dropout = _check_dropout(dropout)
        self.in_channels, self.out_channels, self.channel_mult = int(in_channels), int(out_channels), channel_mult
        # under the nets' public names: image_size / attention_resolutions, or length / attention_lengths
        setattr(self, self._size_name, int(size))
        setattr(self, self._attention_name, attention_sizes)
        in_channels, out_channels, size = self.in_channels, self.out_channels, int(size)

        attn = set(attention_sizes)
        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(base_channels, emb_dim)
        self.num_classes = _check_num_classes(num_classes)
        self.class_embed = ClassEmbedding(self.num_classes, emb_dim) if self.num_classes else None

        def res(ci, co):
            return self._res_block(ci, co, emb_dim, dropout, num_groups)

        def attention(ch):
            return self._attention(ch, num_heads, num_groups)

        conv, dims = _CONV[self._dims], self._dims
        ch = base_channels * channel_mult[0]
        self.conv_in = conv(in_channels, ch, 3, padding=1)
        skip_chs, full_size = [ch], size
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, base_channels * mult)]
                ch = base_channels * mult
                if size in attn:
                    layers.append(attention(ch))
                self.down.append(_Stage(layers))
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(_Stage([_Downsample(ch, dims)]))
                skip_chs.append(ch)
                size //= 2

        mid = [res(ch, ch)]
        if size in attn:
            mid.append(attention(ch))
        mid.append(res(ch, ch))
        self.mid = _Stage(mid)

        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chs.pop(), base_channels * channel_mult[level])]
                ch = base_channels * channel_mult[level]
                if size in attn:
                    layers.append(attention(ch))
                if level != 0 and i == num_res_blocks:
                    layers.append(_Upsample(ch, dims))
                    size *= 2
                self.up.append(_Stage(layers))
        assert not skip_chs and size == full_size  # construction invariant: every skip consumed exactly once

        self.out = nn.Sequential(nn.GroupNorm(num_groups, ch), nn.SiLU(), conv(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _unet(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        # SiLU once here instead of inside each block's projection (ADM's emb_layers = SiLU → Linear): same function.
        emb = _embed(self.time_embed, self.class_embed, t, x, y)
        hs = [h]
        for stage in self.down:
            h = stage(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class UNet(_UNetBase):
    """DDPM/ADM-style UNet denoiser, ``net(x: (B, C, H, W), t: (B,), y: (B,) | None) -> (B, out_channels, H, W)``.

    Follows Dhariwal & Nichol 2021 (ADM, "Diffusion Models Beat GANs", App. A), itself built on Ho et al. 2020:
    t → sinusoidal(base_channels) → Linear → SiLU → Linear (width 4·base_channels); conv3×3 in; per level
    ``num_res_blocks`` :class:`ResBlock`s of width base_channels·mult (scale-shift time conditioning), each followed
    by an :class:`AttentionBlock` when the level's resolution is in ``attention_resolutions``, and a strided-conv
    downsample between levels; a middle ResBlock → [attention] → ResBlock; a mirrored decoder with
    ``num_res_blocks + 1`` ResBlocks per level, each consuming one encoder skip activation by concatenation, and
    nearest + conv3×3 upsampling; out GroupNorm → SiLU → conv3×3, zero-initialised as in ADM (so the untrained net
    predicts 0 — see the module docstring).

    Two deliberate departures from ADM: the middle block has attention only when the lowest resolution is listed
    in ``attention_resolutions`` (ADM always attends there), so the list states exactly where attention runs and
    an attention-free UNet is possible; and only the output conv is zero-initialised (ADM also zeroes each
    ResBlock's second conv and each attention output projection), so one step after initialisation every parameter
    receives a gradient.

    Defaults fit sklearn digits (1×8×8): base_channels=16 (≈0.19 M parameters) because the convolution backward
    pass dominates on a 2-core CPU and width 32 (≈0.76 M) costs ~2.7× as much per step — well over a 100 ms budget
    at batch 128 — while 0.19 M parameters are already far more than 1 797 digit images can use. For CIFAR-10
    (3×32×32) use e.g. ``in_channels=3, image_size=32, base_channels=64 (or more), channel_mult=(1, 2, 2),
    attention_resolutions=(16,)``. ``channel_mult``/``attention_resolutions`` accept lists (Hydra/YAML).

    ``num_classes`` > 0 makes it class-conditional as ADM's class-conditional nets are: a :class:`ClassEmbedding`
    of the labels ``y`` (row ``num_classes``: the null label, also what ``y=None`` means) added to the time
    embedding; 0 builds an unconditional net.
    """

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, base_channels: int = 16,
                 channel_mult=(1, 2), num_res_blocks: int = 1, attention_resolutions=(4,), dropout: float = 0.0,
                 image_size: int = 8, num_groups: int = 8, num_heads: int = 1, num_classes: int = 0):
        super().__init__(in_channels, out_channels, base_channels, channel_mult, num_res_blocks,
                         attention_resolutions, dropout, image_size, num_groups, num_heads, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] != self.image_size \
                or x.shape[3] != self.image_size:
            # The attention placement is tied to image_size, so a different size would silently move it.
            raise ValueError(f"UNet expects x of shape (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        return self._unet(x, t, y)
