"""Natural-image patches: 32×32 crops of the two photographs scikit-learn ships inside its package
(``sklearn.datasets.load_sample_images``: china.jpg and flower.jpg, 427×640 RGB; no download)."""

from __future__ import annotations

import numpy as np
import torch

from .base import (
    DataSpec,
    _check_fraction,
    _check_positive_int,
    _fmt,
    _InMemoryData,
    _uint8_to_unit,
)


class PhotoPatches(_InMemoryData):
    """Crops of ``patch_size`` pixels on a grid of ``stride`` from both photographs, each first resized by
    ``scale`` (0.5: 214×320, so that a 32×32 crop holds texture, not one flat region). ``channels`` 3 (RGB) or 1
    (grey, ITU-R 601 luma). Pixels map 0…255 → [−1, 1], stored as uint8. FID defaults to raw pixels (``identity``):
    Inception features need torch-fidelity and 299×299 inputs this data does not have.

    The split is deterministic and leak-free: the right-most ``val_fraction`` of each photograph's columns gives
    the held-out crops, and no training crop reaches into that band, so overlapping crops never straddle the split.
    ``seed`` is accepted for the runner's interface; nothing here is random.
    """

    def __init__(self, patch_size: int = 32, stride: int = 8, scale: float = 0.5, channels: int = 3,
                 val_fraction: float = 0.2, batch_size: int = 128, num_workers: int = 0, seed: int = 0,
                 conditional: bool = False):
        super().__init__(batch_size, num_workers, seed, conditional)
        self.patch_size = _check_positive_int("patch_size", patch_size)
        self.stride = _check_positive_int("stride", stride)
        if channels not in (1, 3):
            raise ValueError(f"photo_patches channels must be one of: 1 (grey), 3 (RGB); got {channels!r}")
        if not 0.05 <= float(scale) <= 1.0:
            raise ValueError(f"photo_patches scale must lie in [0.05, 1] (a resize before cropping), got {scale!r}")
        self.channels, self.scale = int(channels), float(scale)
        self.val_fraction = _check_fraction(val_fraction)
        self._decode = _uint8_to_unit
        self._check_conditional()  # unlabelled: conditional=true is refused, naming the labelled sets
        self.save_hyperparameters()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.channels, self.patch_size, self.patch_size)

    @property
    def spec(self) -> DataSpec:
        return DataSpec("image", self.sample_shape, levels=256, features="identity")

    @property
    def name(self) -> str:
        return (f"photo_patches-p{self.patch_size}-s{self.stride}-x{_fmt(self.scale)}-c{self.channels}"
                f"-val{_fmt(self.val_fraction)}")

    def _load(self):
        from PIL import Image
        from sklearn.datasets import load_sample_images

        p, s = self.patch_size, self.stride
        parts = {"train": [], "val": []}
        for img in load_sample_images().images:
            im = Image.fromarray(img)
            if self.scale != 1.0:
                im = im.resize((round(im.width * self.scale), round(im.height * self.scale)), Image.BICUBIC)
            if self.channels == 1:
                im = im.convert("L")
            a = np.asarray(im)
            a = a[:, :, None] if a.ndim == 2 else a
            H, W = a.shape[:2]
            cut = round(W * (1 - self.val_fraction))
            if cut < p or W - cut < p:
                raise ValueError(f"val_fraction={self.val_fraction} leaves no room for a {p}-pixel crop on both "
                                 f"sides of a {W}-pixel-wide photograph")
            for split, (lo, hi) in (("train", (0, cut)), ("val", (cut, W))):
                crops = [a[i:i + p, j:j + p] for i in range(0, H - p + 1, s) for j in range(lo, hi - p + 1, s)]
                parts[split].append(np.stack(crops))
        data = {k: torch.from_numpy(np.concatenate(v)).permute(0, 3, 1, 2).contiguous() for k, v in parts.items()}
        return data, None
