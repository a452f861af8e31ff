"""What a sampler does step by step: the states x_t and the model's x̂_0 at every step, captured through
``sample(..., callback=)`` (:class:`~diffsteps.sampling.StepInfo`), drawn as a strip per sampler, an animated GIF,
and one grid of several samplers' results from the same noise (a multirun's, gathered by the report)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch

from ..sampling.api import StepInfo, sample
from .files import atomic_open, save_torch
from .plots import _check_samples, _save, image_figure, plt, steps_grid_figure

__all__ = ["Trajectory", "capture", "strip_figure", "save_strip", "save_gif", "gather_samplers_grid",
           "save_trajectory"]


@dataclass
class Trajectory:
    """One sampling run, step by step: ``t`` (K,) the level each step went to (−1: the data), ``x`` (K, B, …) the
    state after each step, ``x0`` (K, B, …) the model's x̂_0 during it, ``sample`` the result; ``label`` names it."""

    label: str
    t: torch.Tensor
    x: torch.Tensor
    x0: torch.Tensor
    sample: torch.Tensor

    def __len__(self) -> int:
        return len(self.t)

    def state_dict(self) -> dict:
        return {"label": self.label, "t": self.t, "x": self.x, "x0": self.x0, "sample": self.sample}


def capture(model, noise: torch.Tensor, *, label: str | None = None, **kwargs) -> Trajectory:
    """Run :func:`~diffsteps.sampling.sample` (``kwargs`` as there: schedule, sampler, steps, spacing, prediction,
    ...) with a callback that keeps every step's state and x̂_0 (on the CPU, float32)."""
    infos: list[StepInfo] = []
    out = sample(model, noise, callback=infos.append, **kwargs)
    if not infos:
        raise ValueError("the sampler made no step: nothing to draw")
    ts = torch.tensor([float(i.t_next) if not isinstance(i.t_next, torch.Tensor) else float(i.t_next.flatten()[0])
                       for i in infos], dtype=torch.float64)
    keep = [(i.x.detach().float().cpu(), i.x0.detach().float().cpu()) for i in infos]
    name = label or f"{kwargs.get('sampler', 'ddim')} {len(infos)} steps"
    return Trajectory(name, ts, torch.stack([k[0] for k in keep]), torch.stack([k[1] for k in keep]),
                      out.detach().float().cpu())


def _tiles(frames: torch.Tensor) -> torch.Tensor:
    """(R, K, C, H, W) images in [−1, 1] → one (C, R·(H+1)−1, K·(W+1)−1) array in [0, 1], 1-pixel white gaps
    between tiles only (no outer frame, nothing left over)."""
    r, k, c, h, w = frames.shape
    out = torch.ones(c, r * (h + 1) - 1, k * (w + 1) - 1)
    for i in range(r):
        for j in range(k):
            out[:, i * (h + 1): i * (h + 1) + h, j * (w + 1): j * (w + 1) + w] = frames[i, j].clamp(-1, 1) * 0.5 + 0.5
    return out


def _level(t: float) -> str:
    return "x₀" if t < 0 else f"t={t:g}"


def strip_figure(traj: Trajectory, n: int = 4, *, modality: str = "image"):
    """Image data: for each of the first ``n`` samples two rows, x_t after each step and x̂_0 during it, one column
    per step (labelled with the level reached). Vector data: one scatter panel per step, x_t and x̂_0 overlaid."""
    _check_samples(traj.sample, modality)
    if modality == "image":
        n = min(n, traj.x.shape[1])
        rows = torch.stack([torch.stack([traj.x[:, b], traj.x0[:, b]]) for b in range(n)]).flatten(0, 1)
        grid = _tiles(rows)
        h, w = traj.x.shape[-2:]
        row_labels = {i * (h + 1) + (h - 1) / 2: ("x_t" if i % 2 == 0 else "x̂₀") + f" #{i // 2}"
                      for i in range(len(rows))}
        col_labels = {j * (w + 1) + (w - 1) / 2: _level(float(t)) for j, t in enumerate(traj.t)}
        return image_figure(grid.permute(1, 2, 0).numpy(), title=f"{traj.label}: x_t and x̂₀ at each step",
                            row_labels=row_labels, col_labels=col_labels, scale=max(1, round(40 / h)))
    if modality == "vector":
        k = len(traj)
        fig, axes = plt.subplots(1, k, figsize=(2.2 * k, 2.5), squeeze=False, sharex=True, sharey=True)
        xs, x0s = _xy(traj.x), _xy(traj.x0)
        for j, ax in enumerate(axes[0]):
            ax.scatter(xs[j, :, 0], xs[j, :, 1], s=2, label="x_t")
            ax.scatter(x0s[j, :, 0], x0s[j, :, 1], s=2, label="x̂₀")
            ax.set_title(_level(float(traj.t[j])), fontsize=8)
        axes[0, 0].legend(fontsize=6)
        fig.suptitle(traj.label, fontsize=9)
        # tight_layout would cost about a second per figure; the panels share their axes, fixed margins suffice
        fig.subplots_adjust(left=0.05, right=0.99, bottom=0.1, top=0.8, wspace=0.1)
        return fig
    raise ValueError(f"trajectory pictures draw image or vector data; got {modality!r}")


def save_strip(traj: Trajectory, path: Path, n: int = 4, *, modality: str = "image") -> Path:
    _save(strip_figure(traj, n, modality=modality), Path(path))
    return Path(path)


def _png(fig):
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _frames(traj: Trajectory, n: int, modality: str) -> list:
    """One picture per step: images, the first ``n`` samples' x_t (top row) and x̂_0 (bottom row) after it; vector
    data, one scatter of x_t and x̂_0 (all samples) on fixed axes, its points moved from frame to frame."""
    _check_samples(traj.sample, modality)
    if modality == "image":
        n = min(n, traj.x.shape[1])
        h = traj.x.shape[-2]
        out = []
        for j in range(len(traj)):
            grid = _tiles(torch.stack([traj.x[j, :n], traj.x0[j, :n]]))
            title = f"{traj.label} · step {j + 1}/{len(traj)} · {_level(float(traj.t[j]))}"
            fig = image_figure(grid.permute(1, 2, 0).numpy(), title=title, scale=max(1, round(40 / h)),
                               row_labels={(h - 1) / 2: "x_t", h + 1 + (h - 1) / 2: "x̂₀"})
            try:
                out.append(_png(fig))
            finally:
                plt.close(fig)
        return out
    if modality != "vector":
        raise ValueError(f"trajectory pictures draw image or vector data; got {modality!r}")
    xs, x0s = _xy(traj.x), _xy(traj.x0)
    both = torch.cat([xs.flatten(0, 1), x0s.flatten(0, 1)])
    lo, hi = both.min(0).values - 0.1, both.max(0).values + 0.1
    fig, ax = plt.subplots(figsize=(3.2, 3.2), dpi=100)
    try:
        a = ax.scatter(xs[0, :, 0], xs[0, :, 1], s=4, label="x_t")
        b = ax.scatter(x0s[0, :, 0], x0s[0, :, 1], s=4, label="x̂₀")
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.legend(fontsize=7, loc="upper right")
        out = []
        for j in range(len(traj)):  # one figure, its points moved: a new figure per frame costs far more
            a.set_offsets(xs[j].numpy())
            b.set_offsets(x0s[j].numpy())
            ax.set_title(f"{traj.label} · step {j + 1}/{len(traj)} · {_level(float(traj.t[j]))}", fontsize=8)
            out.append(_png(fig))
        return out
    finally:
        plt.close(fig)


def _xy(v: torch.Tensor) -> torch.Tensor:
    """The first two coordinates of vector samples (…, D); one-dimensional data get 0 as the second."""
    return v[..., :2] if v.shape[-1] > 1 else torch.stack([v[..., 0], torch.zeros_like(v[..., 0])], -1)


def save_gif(traj: Trajectory, path: Path, n: int = 8, *, modality: str = "image", ms_per_frame: int = 250) -> Path:
    """An animated GIF, one frame per step (:func:`_frames`), the last frame held three times as long; written
    with Pillow (matplotlib's own dependency), atomically."""
    frames = _frames(traj, n, modality)
    size = frames[0].size
    frames = [f if f.size == size else f.resize(size) for f in frames]
    durations = [ms_per_frame] * (len(frames) - 1) + [3 * ms_per_frame]
    path = Path(path)
    with atomic_open(path, "wb") as f:
        frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


def save_trajectory(traj: Trajectory, out_dir: Path, stem: str, *, modality: str = "image") -> list[Path]:
    """``<stem>.png`` (the strip), ``<stem>.gif`` (the animation) and ``<stem>.pt`` (the tensors, which the report
    gathers across a multirun) in ``out_dir``."""
    out_dir = Path(out_dir)
    pt = save_torch(traj.state_dict(), out_dir / f"{stem}.pt")
    return [save_strip(traj, out_dir / f"{stem}.png", modality=modality),
            save_gif(traj, out_dir / f"{stem}.gif", modality=modality), pt]


def gather_samplers_grid(sweep_dir: str | Path, n: int = 8, name: str = "trajectory_samplers.png") -> Path | None:
    """The results of every run of a multirun from the same noise, one row per run (``trajectory/*.pt`` under
    ``sweep_dir``, labelled with the run's sampler and steps), in ``sweep_dir/name``. None when no run saved one.
    Rows whose sample shapes differ (other data) are left out with the first shape kept."""
    sweep_dir = Path(sweep_dir)
    rows: dict[str, torch.Tensor] = {}
    for pt in sorted(sweep_dir.glob("**/trajectory/*.pt")):
        saved = torch.load(pt, map_location="cpu", weights_only=True)
        x = saved["sample"][:n]
        if rows and x.shape[1:] != next(iter(rows.values())).shape[1:]:
            continue
        rows[f"{saved['label']} ({pt.parent.parent.name})" if saved["label"] in rows else saved["label"]] = x
    if not rows:
        return None
    modality = "image" if next(iter(rows.values())).ndim == 4 else "vector"
    fig = steps_grid_figure(rows, modality=modality, title="every sampler from the same noise")
    path = sweep_dir / name
    _save(fig, path)
    return path
