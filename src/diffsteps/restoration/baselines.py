"""Baselines a restoration must beat: a nearest-neighbour fill from the training set (inpainting). The others sit
with their task: bicubic upsampling in :mod:`.superres`, the pixel-intensity anomaly score in :mod:`.anomaly`."""

from __future__ import annotations

import torch

__all__ = ["nearest_neighbour_fill"]


def nearest_neighbour_fill(known: torch.Tensor, mask: torch.Tensor, train: torch.Tensor,
                           chunk: int = 256) -> torch.Tensor:
    """Fill the unknown entries (mask = 0) of each image from the training image closest to it on the known
    entries (squared distance over mask = 1; Hays & Efros 2007 in its simplest form)."""
    m = mask.double().expand_as(known).flatten(1)
    k, tr = known.double().flatten(1), train.double().flatten(1)
    best = []
    for i in range(0, len(k), chunk):
        mi, ki = m[i:i + chunk], k[i:i + chunk]
        # Σ_j m_j (k_j − t_j)² = Σ m k² − 2 (m k)·t + m·t²
        d = (mi * ki * ki).sum(1, keepdim=True) - 2 * (mi * ki) @ tr.T + mi @ (tr * tr).T
        best.append(d.argmin(1))
    nn = tr[torch.cat(best)]
    return (m * k + (1 - m) * nn).reshape(known.shape).to(known.dtype)
