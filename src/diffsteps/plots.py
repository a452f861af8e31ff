"""Figures: sample grids, quality versus NFE / wall time, noise schedules. Matplotlib, headless (Agg)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["save_grid", "plot_quality_vs_nfe"]

# metrics drawn against NFE when present, lower is better for all
CURVE_METRICS = ("fid", "kid_mean", "nll", "mse")


def save_grid(samples: torch.Tensor, path: Path, title: str | None = None) -> None:
    """Images (B, C, H, W) in [−1, 1] as a square grid; vector data as a scatter of the first two coordinates."""
    samples = samples.detach().float().cpu()
    if samples.ndim == 4:
        b, c, h, w = samples.shape
        cols = math.ceil(math.sqrt(b))
        rows = math.ceil(b / cols)
        grid = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
        for i, img in enumerate(samples.clamp(-1, 1) * 0.5 + 0.5):
            r, k = divmod(i, cols)
            grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + k * (w + 1): 1 + k * (w + 1) + w] = img
        img = grid.permute(1, 2, 0).numpy()
        fig, ax = plt.subplots(figsize=(4, 4 * grid.shape[1] / grid.shape[2] + 0.3))
        ax.imshow(img.squeeze(-1) if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.axis("off")
    else:
        flat = samples.reshape(len(samples), -1)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(flat[:, 0], flat[:, 1] if flat.shape[1] > 1 else torch.zeros(len(flat)), s=2, alpha=0.5)
        ax.set_aspect("equal")
    ax.set_title(title or "", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality_vs_nfe(rows: list[dict], out_dir: Path) -> list[Path]:
    """One figure per metric: the metric against NFE (log axis) and against sampling seconds, a line per
    sampler. Returns the files written (``<metric>_vs_nfe.png``)."""
    out = []
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    for metric in CURVE_METRICS:
        if not any(metric in r for r in rows):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for name in samplers:
            pts = sorted((r["nfe"], r["sample_seconds"], r[metric]) for r in rows if r["sampler"] == name and metric in r)
            axes[0].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=name)
            axes[1].plot([p[1] for p in pts], [p[2] for p in pts], "o-", label=name)
        axes[0].set_xlabel("NFE (model evaluations)")
        axes[1].set_xlabel("sampling wall time (s)")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{metric}_vs_nfe.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    return out
