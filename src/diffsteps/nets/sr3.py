"""The SR3 conditional denoiser (Saharia et al. 2022, "Image Super-Resolution via Iterative Refinement", §2.2): the
low-resolution image, upsampled to the target size, is concatenated to x_t as extra input channels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .unet import UNet


class SR3UNet(nn.Module):
    """``net(x, t, low_res)``: a :class:`UNet` with ``2 × channels`` input channels (x_t and the bicubic upsampling
    of ``low_res`` (B, C, h, w), h dividing the image size) and ``channels`` output channels. The other arguments
    are the UNet's."""

    def __init__(self, channels: int, image_size: int, base_channels: int = 16, channel_mult: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, attention_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 num_groups: int = 8, num_heads: int = 1):
        super().__init__()
        self.channels, self.image_size = int(channels), int(image_size)
        self.unet = UNet(in_channels=2 * self.channels, out_channels=self.channels, image_size=image_size,
                         base_channels=base_channels, channel_mult=tuple(channel_mult),
                         num_res_blocks=num_res_blocks, attention_resolutions=tuple(attention_resolutions),
                         dropout=dropout, num_groups=num_groups, num_heads=num_heads)

    def forward(self, x: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
        if low_res.ndim != 4 or low_res.shape[:2] != x.shape[:2] or self.image_size % low_res.shape[-1] \
                or low_res.shape[-1] != low_res.shape[-2]:
            raise ValueError(f"low_res must be (B, {self.channels}, h, h) with h dividing {self.image_size}, got "
                             f"{tuple(low_res.shape)} for x of shape {tuple(x.shape)}")
        up = F.interpolate(low_res.to(x.dtype), size=x.shape[-2:], mode="bicubic", align_corners=False)
        return self.unet(torch.cat([x, up], dim=1), t)
