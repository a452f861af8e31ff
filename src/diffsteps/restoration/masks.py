"""Inpainting masks (1 where the pixel is known, 0 where it is to be filled) and their validation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["MASKS", "box_mask", "check_mask", "half_mask", "load_mask", "make_mask", "stroke_mask"]


def check_mask(mask: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Validate an inpainting mask against the known image batch (B, C, H, W) or vectors (B, D): binary (0/1 or
    bool), shaped like one sample, like the batch, or broadcastable over channels ((H, W), (1, H, W), (B, 1, H, W)).
    Returns it as a float tensor broadcastable to ``known``; raises before any model call otherwise."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor of 0/1 (1 = known), got {type(mask).__name__}")
    m = mask.to(torch.float64)
    if not bool(((m == 0) | (m == 1)).all()):
        bad = m[(m != 0) & (m != 1)]
        raise ValueError(f"mask must be binary (1 = known, 0 = to fill); found value {bad.flatten()[0].item():g} "
                         f"({bad.numel()} non-binary entries)")
    shape, sample = tuple(m.shape), tuple(known.shape[1:])
    ok = False
    if m.ndim <= known.ndim:
        padded = (1,) * (known.ndim - m.ndim) + shape
        ok = all(p in (1, k) for p, k in zip(padded, known.shape)) and padded[-1] == known.shape[-1]
        if len(sample) >= 2:  # images: the mask must cover the spatial dimensions exactly
            ok = ok and padded[-2:] == tuple(known.shape[-2:])
    if not ok:
        raise ValueError(f"mask of shape {shape} does not fit the data of shape {tuple(known.shape)}: give one "
                         f"sample's shape {sample}, the batch's, or (H, W) / (1, H, W) / (B, 1, H, W) for images")
    if not bool((m == 0).any()):
        raise ValueError("mask has no unknown entry (0): nothing to inpaint")
    m = m.reshape((1,) * (known.ndim - m.ndim) + shape)
    return m.to(known.dtype if known.is_floating_point() else torch.float32).to(known.device)


def box_mask(size: int, box: float = 0.5) -> torch.Tensor:
    """A centred square hole covering ``box`` of each side."""
    k = max(1, round(size * box))
    lo = (size - k) // 2
    m = torch.ones(size, size)
    m[lo:lo + k, lo:lo + k] = 0
    return m


def half_mask(size: int, side: str = "right") -> torch.Tensor:
    """One half unknown (``right``, ``left``, ``top``, ``bottom``)."""
    sides = ("right", "left", "top", "bottom")
    if side not in sides:
        raise ValueError(f"half mask side must be one of: {', '.join(sides)}; got {side!r}")
    m = torch.ones(size, size)
    h = size // 2
    {"right": lambda: m[:, h:], "left": lambda: m[:, :size - h],
     "top": lambda: m[:size - h], "bottom": lambda: m[h:]}[side]().zero_()
    return m


def stroke_mask(size: int, n: int = 1, strokes: int = 3, width: float = 0.12, seed: int = 0) -> torch.Tensor:
    """``n`` masks of random brush strokes (the free-form masks of Yu et al. 2019, simplified): each stroke a random
    walk of 4 segments drawn with a disc of radius ``width`` × size. Returns (n, size, size)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.ones((n, size, size), dtype=np.float32)
    r = max(0.5, width * size)
    for b in range(n):
        for _ in range(strokes):
            p = rng.uniform(0, size - 1, 2)
            for _ in range(4):
                ang, ln = rng.uniform(0, 2 * math.pi), rng.uniform(0.2, 0.5) * size
                q = np.clip(p + ln * np.array([math.cos(ang), math.sin(ang)]), 0, size - 1)
                for s in np.linspace(0, 1, 12):
                    c = p + s * (q - p)
                    out[b][(yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r * r] = 0
                p = q
    return torch.from_numpy(out)


def load_mask(path: str | Path, size: int) -> torch.Tensor:
    """A user mask file: ``.pt``/``.npy`` (0/1 array) or an image (white = known), resized to size × size by
    nearest neighbour and thresholded at 0.5."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"mask file {path} does not exist")
    if path.suffix == ".pt":
        m = torch.as_tensor(torch.load(path, weights_only=True), dtype=torch.float32)
    elif path.suffix == ".npy":
        m = torch.from_numpy(np.load(path).astype(np.float32))
    else:
        from PIL import Image

        m = torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"mask file {path} holds shape {tuple(m.shape)}; expected (H, W)")
    if m.shape != (size, size):
        m = torch.nn.functional.interpolate(m[None, None], size=(size, size), mode="nearest")[0, 0]
    return (m > 0.5).float()


MASKS = ("box", "half", "strokes", "file")


def make_mask(kind: str, size: int, n: int = 1, *, box: float = 0.5, side: str = "right", strokes: int = 3,
              width: float = 0.12, path: str | None = None, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) masks of one ``kind`` in ``MASKS``; only strokes differ between samples."""
    if kind not in MASKS:
        raise ValueError(f"unknown mask {kind!r}; valid choices: {', '.join(MASKS)}")
    if kind == "strokes":
        m = stroke_mask(size, n, strokes, width, seed)
    elif kind == "file":
        if not path:
            raise ValueError("mask 'file' needs restore.mask_path (a .pt, .npy or image file; 1/white = known)")
        m = load_mask(path, size).expand(n, size, size)
    else:
        m = (box_mask(size, box) if kind == "box" else half_mask(size, side)).expand(n, size, size)
    return m[:, None].clone()
