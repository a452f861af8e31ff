"""Denoiser networks: ``net(x, t)`` → a tensor of x's shape (ε, x_0 or v — the network does not care which).

``x`` is (B, D) for vector data (:class:`MLP`) or (B, C, H, W) for images (:class:`UNet`); ``t`` is a 1-D float
tensor (B,) of training-time indices in [0, T − 1], not necessarily integers (a 0-d ``t`` is broadcast over the
batch). A net computes in its own parameter dtype: the input is cast to it and the output is returned in it. The
sinusoidal time features are formed in at least float32 whatever the net's dtype, because t·freq reaches ~10³ and a
half-precision argument would make sin/cos of it meaningless; they are cast to the net's dtype afterwards.

Both nets zero-initialise their output layer, so an untrained net predicts exactly 0. That is the best constant guess
for ε (and for x_0 or v of centred data), so training starts from the target's variance instead of from the much
larger error of a random function, and the residual trunk starts as an unperturbed identity path. The price is that
at the very first step only the output layer receives a gradient; from the second step on every parameter does.

Forward passes contain no data-dependent Python control flow (only shape checks, which ``torch.compile`` turns into
guards), so the nets compile with ``fullgraph=True``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SinusoidalEmbedding", "TimeEmbedding", "MLP", "UNet", "ResBlock", "AttentionBlock"]


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


# -- vector data ------------------------------------------------------------------------------------------------------
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
    """Residual MLP denoiser for vector data, ``net(x: (B, dim), t: (B,)) -> (B, dim)``.

    Architecture: the residual MLP block of Gorishniy et al. 2021 ("Revisiting Deep Learning Models for Tabular
    Data", ResNet: x + Linear(Dropout(act(Linear(Norm(x)))))) with LayerNorm, i.e. a pre-norm residual stack as in
    Xiong et al. 2020, and DDPM-style time conditioning (Ho et al. 2020, App. B): t → sinusoidal(time_dim) →
    Linear → SiLU → Linear (width ``hidden``); input Linear(dim → hidden); ``depth`` blocks
    h ← h + Linear(Dropout(SiLU(Linear(LN(h))) + Linear(SiLU(emb)))); output LayerNorm → SiLU → Linear(hidden → dim),
    zero-initialised (see the module docstring for why). No batch statistics anywhere, so samples never interact.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 4, time_dim: int = 128, dropout: float = 0.0):
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
        self.proj_in = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_MLPBlock(hidden, hidden, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLP(dim={self.dim}) expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        h = self.proj_in(x.to(self.proj_in.weight.dtype))
        emb = F.silu(self.time_embed(_as_batch_t(t, x)))
        for block in self.blocks:
            h = block(h, emb)
        return self.proj_out(F.silu(self.norm_out(h)))


# -- images -----------------------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """ADM residual block (Dhariwal & Nichol 2021, App. A; Ho et al. 2020's block with adaptive GroupNorm):
    GN → SiLU → conv3×3 → GN·(1 + scale) + shift → SiLU → Dropout → conv3×3, plus a skip (1×1 conv when the
    channel count changes). Time enters by scale-shift ("AdaGN", ADM §3.1, whose ablation found it improves FID
    over DDPM's additive per-channel bias). ``emb`` is the already-SiLU'd time embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention with a residual connection (Ho et al. 2020 / ADM's ``AttentionBlock``):
    GN → qkv projection → ``scaled_dot_product_attention`` over the H·W positions → output projection."""

    def __init__(self, channels: int, num_heads: int, num_groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x).reshape(b, c, hh * ww).transpose(1, 2)                          # (B, HW, C)
        qkv = self.qkv(h).reshape(b, hh * ww, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                                   # each (B, heads, HW, d)
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(b, hh * ww, c)
        return x + self.proj(a).transpose(1, 2).reshape(b, c, hh, ww)


class _Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        # Nearest + conv rather than a transposed conv: no checkerboard artefacts (Odena et al. 2016), as in DDPM.
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.ModuleList):
    # Every layer takes (h, emb) so a stage is a plain loop, with no isinstance dispatch in forward.
    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            h = layer(h, emb)
        return h


class UNet(nn.Module):
    """DDPM/ADM-style UNet denoiser, ``net(x: (B, C, H, W), t: (B,)) -> (B, out_channels, H, W)``.

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
    """

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, base_channels: int = 16,
                 channel_mult=(1, 2), num_res_blocks: int = 1, attention_resolutions=(4,), dropout: float = 0.0,
                 image_size: int = 8, num_groups: int = 8, num_heads: int = 1):
        super().__init__()
        channel_mult = _int_tuple("channel_mult", channel_mult)
        attention_resolutions = _int_tuple("attention_resolutions", attention_resolutions)
        out_channels = in_channels if out_channels is None else out_channels
        self._validate(in_channels, out_channels, base_channels, channel_mult, num_res_blocks,
                       attention_resolutions, image_size, num_groups, num_heads)
        dropout = _check_dropout(dropout)
        self.in_channels, self.out_channels, self.image_size = int(in_channels), int(out_channels), int(image_size)
        self.channel_mult, self.attention_resolutions = channel_mult, attention_resolutions
        attn = set(attention_resolutions)

        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(base_channels, emb_dim)

        def res(ci, co):
            return ResBlock(ci, co, emb_dim, dropout, num_groups)

        ch = base_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_chs, size = [ch], image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, base_channels * mult)]
                ch = base_channels * mult
                if size in attn:
                    layers.append(AttentionBlock(ch, num_heads, num_groups))
                self.down.append(_Stage(layers))
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(_Stage([_Downsample(ch)]))
                skip_chs.append(ch)
                size //= 2

        mid = [res(ch, ch)]
        if size in attn:
            mid.append(AttentionBlock(ch, num_heads, num_groups))
        mid.append(res(ch, ch))
        self.mid = _Stage(mid)

        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chs.pop(), base_channels * channel_mult[level])]
                ch = base_channels * channel_mult[level]
                if size in attn:
                    layers.append(AttentionBlock(ch, num_heads, num_groups))
                if level != 0 and i == num_res_blocks:
                    layers.append(_Upsample(ch))
                    size *= 2
                self.up.append(_Stage(layers))
        assert not skip_chs and size == image_size  # construction invariant: every skip consumed exactly once

        self.out = nn.Sequential(nn.GroupNorm(num_groups, ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @staticmethod
    def _validate(in_channels, out_channels, base_channels, channel_mult, num_res_blocks, attention_resolutions,
                  image_size, num_groups, num_heads):
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("image_size", image_size),
                        ("num_groups", num_groups), ("num_heads", num_heads)):
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(base_channels, bool) or int(base_channels) != base_channels or base_channels < 2 \
                or base_channels % 2:
            # base_channels is also the sinusoid width, which needs a (cos, sin) pair per frequency.
            raise ValueError(f"base_channels must be an even int >= 2 (it is also the time-sinusoid width), "
                             f"got {base_channels!r}")
        if isinstance(num_res_blocks, bool) or int(num_res_blocks) != num_res_blocks or num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be an int >= 1, got {num_res_blocks!r}")
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult!r}")

        levels = len(channel_mult)
        factor = 2 ** (levels - 1)
        if image_size % factor:
            max_levels = 1 + (image_size & -image_size).bit_length() - 1  # 1 + number of times 2 divides image_size
            raise ValueError(
                f"image_size={image_size} is not divisible by 2**(len(channel_mult)-1)={factor}, so "
                f"{levels} levels cannot halve it exactly; valid image sizes for {levels} levels are multiples of "
                f"{factor} ({factor}, {2 * factor}, {4 * factor}, ...), or use at most {max_levels} level(s) "
                f"(len(channel_mult) <= {max_levels}) for image_size={image_size}")

        widths = sorted({base_channels * m for m in channel_mult})
        g = math.gcd(*widths)
        if g % num_groups:
            raise ValueError(
                f"num_groups={num_groups} does not divide every level's channel count {widths} "
                f"(base_channels * channel_mult); valid num_groups: {', '.join(map(str, _divisors(g)))}")

        resolutions = [image_size // 2**i for i in range(levels)]
        bad = [r for r in attention_resolutions if r not in resolutions]
        if bad:
            raise ValueError(
                f"attention_resolutions {bad} never occur in this UNet (image_size={image_size}, {levels} levels); "
                f"valid values: {', '.join(map(str, resolutions))}")
        attn_widths = [base_channels * m for m, r in zip(channel_mult, resolutions) if r in attention_resolutions]
        if attn_widths and math.gcd(*attn_widths) % num_heads:
            ga = math.gcd(*attn_widths)
            raise ValueError(
                f"num_heads={num_heads} does not divide the channel count at every attention level "
                f"{sorted(set(attn_widths))}; valid num_heads: {', '.join(map(str, _divisors(ga)))}")

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] != self.image_size \
                or x.shape[3] != self.image_size:
            # The attention placement is tied to image_size, so a different size would silently move it.
            raise ValueError(f"UNet expects x of shape (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        # SiLU once here instead of inside each block's projection (ADM's emb_layers = SiLU → Linear): same function.
        emb = F.silu(self.time_embed(_as_batch_t(t, x)))
        hs = [h]
        for stage in self.down:
            h = stage(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
