"""Figures: sample grids, quality versus NFE / wall time, noise schedules. Matplotlib, headless (Agg)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .files import save_figure  # noqa: E402

__all__ = ["save_grid", "save_steps_grid", "grid_figure", "steps_grid_figure", "plot_quality_vs_nfe", "plot_schedules",
           "plot_sweep_metric"]

# metrics drawn against NFE when present, lower is better for all
CURVE_METRICS = ("fid", "kid_mean", "nll", "mse", "mse_median", "elbo_bpd", "classifier_agreement")


# how each modality of diffsteps.data.DataSpec is drawn, by the rank of a batch of it
_LAYOUTS = {"image": ("(B, C, H, W)", 4), "vector": ("(B, D)", 2), "signal": ("(B, C, L)", 3)}


def _save(fig, path: Path) -> None:
    # atomically (a killed run leaves no truncated PNG), and the figure closed even when writing fails
    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


def _check_samples(samples: torch.Tensor, modality: str) -> torch.Tensor:
    if modality not in _LAYOUTS:
        raise ValueError(f"unknown modality {modality!r}; valid choices: {', '.join(_LAYOUTS)}")
    layout, rank = _LAYOUTS[modality]
    if samples.ndim != rank:
        raise ValueError(f"{modality} samples are batches {layout}, got shape {tuple(samples.shape)}")
    return samples.detach().float().cpu()


def _signal_spacing(xs: list[torch.Tensor]) -> float:
    """The vertical distance between stacked channels: twice the largest |value|, so channels never overlap."""
    peak = max(float(x.abs().max()) for x in xs)
    return 2.0 * peak if peak > 0 else 2.0


def _draw_signal(ax, x: torch.Tensor, spacing: float) -> None:
    """One signal (C, L): channel c as a line over positions 0…L−1, shifted down by c·spacing (stacked), so a
    multi-channel sample reads like a multi-lead recording; axes share one scale across panels."""
    pos = torch.arange(x.shape[-1])
    for c, ch in enumerate(x):
        ax.plot(pos.numpy(), (ch - c * spacing).numpy(), lw=0.8, color=f"C{c}")
    ax.set_ylim(-(len(x) - 0.5) * spacing, 0.5 * spacing)
    ax.set_xlim(0, max(x.shape[-1] - 1, 1))
    ax.set_xticks([])
    ax.set_yticks([])


def grid_figure(samples: torch.Tensor, *, modality: str, title: str | None = None):
    """The figure :func:`save_grid` writes (the caller closes it)."""
    samples = _check_samples(samples, modality)
    if modality == "image":
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
        ax.set_title(title or "", fontsize=9)
        fig.tight_layout()
    elif modality == "signal":
        b = len(samples)
        cols = math.ceil(math.sqrt(b))
        rows = math.ceil(b / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(min(1.8 * cols, 16), min(0.9 * rows, 16) + 0.5),
                                 squeeze=False)
        spacing = _signal_spacing([samples])
        for i, ax in enumerate(axes.flat):
            if i < b:
                _draw_signal(ax, samples[i], spacing)
            else:
                fig.delaxes(ax)  # one axes per sample, no empty frames
        if title:
            fig.suptitle(title, fontsize=9)
        # tight_layout over dozens of panels costs seconds; the panels have no tick labels to make room for
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9 if title else 0.98, wspace=0.08, hspace=0.1)
    else:
        flat = samples
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(flat[:, 0], flat[:, 1] if flat.shape[1] > 1 else torch.zeros(len(flat)), s=2, alpha=0.5)
        ax.set_aspect("equal")
        ax.set_title(title or "", fontsize=9)
        fig.tight_layout()
    return fig


def save_grid(samples: torch.Tensor, path: Path, title: str | None = None, *, modality: str) -> None:
    """Samples of a data ``modality`` (``DataSpec.modality``) as one figure: images (B, C, H, W) in [−1, 1] as a
    square grid; signals (B, C, L) as one line plot per sample, its channels stacked; vectors (B, D) as a scatter
    of the first two coordinates."""
    fig = grid_figure(samples, modality=modality, title=title)
    _save(fig, path)


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
            _log_y_if_wide(ax, [r[metric] for r in rows if metric in r])
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{metric}_vs_nfe.png"
        _save(fig, path)
        out.append(path)
    return out


def plot_schedules(schedules: dict, path: Path) -> Path:
    """The noise-schedule comparison: β_t, ᾱ_t, noise level √(1 − ᾱ_t) and log-SNR λ_t against t/T, one line per
    schedule (``{label: Schedule}``). λ = −∞ where ᾱ = 0 (zero terminal SNR) is drawn at a floor below every finite
    value and the panel title says so. Returns ``path``."""
    path = Path(path)
    lams = [s.log_snr for s in schedules.values()]
    finite = torch.cat([lam[torch.isfinite(lam)] for lam in lams]) if lams else torch.zeros(1)
    floor = math.floor(finite.min().item()) - 2.0 if len(finite) else -20.0
    any_infinite = any(bool(torch.isinf(lam).any()) for lam in lams)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    (ax_beta, ax_abar), (ax_noise, ax_lam) = axes
    for label, s in schedules.items():
        x = (torch.arange(s.num_timesteps, dtype=torch.float64) / s.num_timesteps).numpy()
        a = s.alphas_cumprod
        style = {"label": label, "ls": "-"}
        if s.zero_terminal_snr:  # dashed: it coincides with its base schedule until the last steps
            style = {"label": f"{label} (λ_T−1 = −∞)", "ls": "--"}
        ax_beta.plot(x, s.betas.numpy(), **style)
        ax_abar.plot(x, a.numpy(), **style)
        ax_noise.plot(x, (1.0 - a).sqrt().numpy(), **style)
        ax_lam.plot(x, s.log_snr.clamp(min=floor).numpy(), **style)
    ax_beta.set_yscale("log")  # β spans 1e-4 … 1: on a linear axis every ramp looks flat until the end
    ax_beta.set_title("β_t", fontsize=10)
    ax_abar.set_title("ᾱ_t (signal variance)", fontsize=10)
    ax_noise.set_title("noise level √(1 − ᾱ_t)", fontsize=10)
    lam_title = "log-SNR λ_t = log(ᾱ_t / (1 − ᾱ_t))"
    if any_infinite:
        lam_title += f"\n−∞ drawn at {floor:g}"
        ax_lam.axhline(floor, color="grey", lw=0.8, ls=":")
    ax_lam.set_title(lam_title, fontsize=10)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("t / T")
    ax_abar.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_sweep_metric(rows: list[dict], metric: str, path: Path, fronts: dict[str, list[dict]],
                      group_key: str = "group") -> Path:
    """A sweep's quality against cost: one panel per cost in ``fronts`` (e.g. ``nfe``, ``sample_seconds``, both on
    log axes), one line per ``row[group_key]``, and that cost's Pareto front (the rows given in ``fronts[cost]``)
    as a step line through ringed markers: the best ``metric`` reachable at each budget. Returns ``path``."""
    from matplotlib.ticker import NullFormatter

    path = Path(path)
    groups = list(dict.fromkeys(r[group_key] for r in rows))
    fig, axes = plt.subplots(1, len(fronts), figsize=(5 * len(fronts) + 1, 4), squeeze=False)
    labels = {"nfe": "NFE (model evaluations)", "sample_seconds": "sampling wall time (s)"}
    for ax, (cost, front) in zip(axes[0], fronts.items()):
        for g in groups:
            pts = sorted((r[cost], r[metric]) for r in rows if r[group_key] == g)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, label=g)
        pts = sorted((r[cost], r[metric]) for r in front)
        if pts:
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="black", lw=1.2, ls="--",
                    label="Pareto front")
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=90, facecolors="none", edgecolors="black",
                       zorder=3)
        ax.set_xscale("log")
        ticks = []
        for t in sorted({r[cost] for r in rows}):
            if not ticks or t >= 1.25 * ticks[-1]:  # neighbours like 9 and 10 would print over each other
                ticks.append(t)
        if cost == "nfe" and len(ticks) <= 12:  # the NFE values themselves read better than powers of ten
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(labels.get(cost, cost))
        _log_y_if_wide(ax, [r[metric] for r in rows])
        ax.set_ylabel(f"{metric} (lower is better)")
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)
    return path


def steps_grid_figure(samples_by_steps: dict[str, torch.Tensor], *, modality: str, title: str | None = None):
    """The figure :func:`save_steps_grid` writes (the caller closes it)."""
    items = [(label, _check_samples(x, modality)) for label, x in samples_by_steps.items() if len(x)]
    if not items:
        raise ValueError("no samples to draw")
    if modality == "image":
        _, c, h, w = items[0][1].shape
        cols = max(len(x) for _, x in items)
        fig, axes = plt.subplots(len(items), 1, figsize=(min(0.6 * cols, 16) + 1.5, 0.6 * len(items) * h / 8 + 0.6),
                                 squeeze=False)
        for ax, (label, x) in zip(axes[:, 0], items):
            row = torch.ones(c, h, cols * (w + 1) - 1)
            for k, img in enumerate(x.clamp(-1, 1) * 0.5 + 0.5):
                row[:, :, k * (w + 1): k * (w + 1) + w] = img
            img = row.permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
    elif modality == "signal":
        cols = max(len(x) for _, x in items)
        fig, axes = plt.subplots(len(items), cols, figsize=(min(1.5 * cols, 16) + 1.5, 0.9 * len(items) + 0.6),
                                 squeeze=False)
        spacing = _signal_spacing([x for _, x in items])
        for r, (label, x) in enumerate(items):
            for k, ax in enumerate(axes[r]):
                if k < len(x):
                    _draw_signal(ax, x[k], spacing)
                else:
                    fig.delaxes(ax)
            axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.subplots_adjust(left=0.16, right=0.99, bottom=0.03, top=0.88 if title else 0.97, wspace=0.08,
                            hspace=0.12)
    else:
        fig, axes = plt.subplots(1, len(items), figsize=(2.6 * len(items), 2.9), squeeze=False, sharex=True,
                                 sharey=True)
        for ax, (label, x) in zip(axes[0], items):
            ax.scatter(x[:, 0], x[:, 1] if x.shape[1] > 1 else torch.zeros(len(x)), s=2, alpha=0.5)
            ax.set_title(label, fontsize=8)
            ax.set_aspect("equal")
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
    return fig


def save_steps_grid(samples_by_steps: dict[str, torch.Tensor], path: Path, title: str | None = None, *,
                    modality: str) -> Path:
    """The same noise carried to the data at several step counts, one row per step count (labelled with the dict's
    keys): images (B, C, H, W) in [−1, 1] as a strip of images, signals (B, C, L) as a strip of line plots (channels
    stacked); vector data as one scatter panel per step count. Returns ``path``."""
    fig = steps_grid_figure(samples_by_steps, modality=modality, title=title)
    _save(fig, path)
    return Path(path)


def _log_y_if_wide(ax, values) -> None:
    """Log y axis when the positive values span more than two decades (trajectory errors fall as NFE^−2p)."""
    pos = [v for v in values if isinstance(v, (int, float)) and v > 0 and math.isfinite(v)]
    if len(pos) == len(values) and pos and max(pos) > 100 * min(pos):
        ax.set_yscale("log")
