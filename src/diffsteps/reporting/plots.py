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
           "plot_sweep_metric", "quality_vs_nfe_figure", "metric_label", "plain_log_axis", "image_figure",
           "save_spectra", "spectra_figure"]

# metrics drawn against NFE when present, lower is better for all
CURVE_METRICS = ("fid", "kid_mean", "nll", "mse", "mse_median", "elbo_bpd", "spectral_distance",
                 "classifier_agreement")
# what each metric is, for axis labels; the distribution distances also name the feature space they are measured in
METRIC_NAMES = {"fid": "FID", "kid_mean": "KID", "kid_std": "KID standard deviation", "nll": "NLL (exact density)",
                "mse": "trajectory MSE", "mse_median": "trajectory MSE (median)",
                "elbo_bpd": "negative ELBO (bits/dim)", "spectral_distance": "log-spectral distance (dB)",
                "classifier_agreement": "agreement with the requested class"}
FEATURE_METRICS = ("fid", "kid_mean", "kid_std")
# diffsteps.data.FEATURE_SPACES, as a reader would name them
FEATURE_NAMES = {"digits": "digits-classifier features", "inception": "Inception-v3 features",
                 "identity": "raw coordinates", "mnist1d": "MNIST-1D-classifier features"}


def metric_label(metric: str, features: str | None = None) -> str:
    """An axis label that says what the number is: ``FID, digits-classifier features`` (FID and KID depend on the
    feature space, :data:`~diffsteps.data.base.FEATURE_SPACES`; without ``features`` none is named)."""
    name = METRIC_NAMES.get(metric, metric)
    if metric in FEATURE_METRICS and features:
        name += f", {FEATURE_NAMES.get(features, features + ' features')}"
    return name


def plain_log_axis(ax, values, axis: str = "x", min_ratio: float = 1.25, decades: bool = False) -> None:
    """A log axis ticked at the given ``values`` (step counts, NFE) labelled as plain numbers — 5, 10, 20, 50, not
    2×10¹: a FixedLocator on the values (thinned so neighbours closer than ``min_ratio`` do not print over each
    other) with a ScalarFormatter, and no minor labels. ``decades``: continuous values (seconds) instead, ticked
    at 1, 2, 5 × 10^k and labelled plainly (0.5, 1, 2)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator, ScalarFormatter

    ticks: list[float] = []
    for v in sorted({float(v) for v in values if v is not None and v > 0 and math.isfinite(v)}):
        if not ticks or v >= min_ratio * ticks[-1]:
            ticks.append(v)
    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    if decades:
        target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        target.set_minor_formatter(NullFormatter())
        return
    if not ticks:
        return
    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(formatter)
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())


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


def _check_labels(labels, n: int, modality: str) -> list[str] | None:
    """Per-sample captions (a conditional run's requested classes): line-plot panels have room for them, image
    strips and scatters do not."""
    if labels is None:
        return None
    if modality != "signal":
        raise ValueError(f"per-sample labels are drawn for signal data only, not {modality!r}")
    labels = [str(label) for label in labels]
    if len(labels) < n:
        raise ValueError(f"{len(labels)} labels for {n} samples")
    return labels


def grid_figure(samples: torch.Tensor, *, modality: str, title: str | None = None, labels=None):
    """The figure :func:`save_grid` writes (the caller closes it)."""
    samples = _check_samples(samples, modality)
    labels = _check_labels(labels, len(samples), modality)
    if modality == "image":
        b, c, h, w = samples.shape
        cols = math.ceil(math.sqrt(b))
        rows = math.ceil(b / cols)
        grid = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
        for i, img in enumerate(samples.clamp(-1, 1) * 0.5 + 0.5):
            r, k = divmod(i, cols)
            grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + k * (w + 1): 1 + k * (w + 1) + w] = img
        fig = image_figure(grid.permute(1, 2, 0).numpy(), title=title or "")
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
                if labels:
                    ax.set_title(labels[i], fontsize=7, pad=1.5)
            else:
                fig.delaxes(ax)  # one axes per sample, no empty frames
        if title:
            fig.suptitle(title, fontsize=9)
        # tight_layout over dozens of panels costs seconds; the panels have no tick labels to make room for
        # captions take ~0.15 in above each panel, the first row's included
        top = (0.9 if title else 0.98) - (0.15 / fig.get_figheight() if labels else 0)
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=top, wspace=0.08, hspace=0.35 if labels else 0.1)
    else:
        flat = samples
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(flat[:, 0], flat[:, 1] if flat.shape[1] > 1 else torch.zeros(len(flat)), s=2, alpha=0.5)
        ax.set_aspect("equal")
        ax.set_title(title or "", fontsize=9)
        fig.tight_layout()
    return fig


def image_figure(img, *, title: str | None = None, row_labels: dict[float, str] | None = None,
                 col_labels: dict[float, str] | None = None, target_px: int = 480, scale: int | None = None,
                 dpi: int = 120):
    """An image array (H, W) or (H, W, C) in [0, 1] drawn pixel-exact: each array pixel becomes an integer s × s block
    of screen pixels (s = round(target_px / the longer side), at least 1), the axes sized and placed on whole pixels.
    At a fractional zoom, nearest-neighbour resampling draws 1-pixel separators as 0, 1 or 2 screen pixels: stray
    bars and missing ones. ``scale`` fixes s instead. ``row_labels`` / ``col_labels``: {array row or column (its
    centre): text} beside and below the image. The caller closes the figure."""
    import numpy as np

    img = np.asarray(img)
    h, w = img.shape[:2]
    s = scale or max(1, round(target_px / max(h, w)))
    left = 60 if row_labels else 2
    bottom = 28 if col_labels else 2
    top = 26 if title else 2
    # wide enough for the title (at most about 9 pixels a character at 9 pt and 120 dpi)
    W, H = max(w * s + left + 2, left + 9 * len(title or "") + 10), h * s + top + bottom
    fig = plt.figure(figsize=(W / dpi, H / dpi), dpi=dpi)
    ax = fig.add_axes((left / W, bottom / H, w * s / W, h * s / H))
    grey = img.ndim == 2 or img.shape[-1] == 1
    ax.imshow(img.reshape(h, w) if grey else img, cmap="gray" if grey else None, vmin=0, vmax=1,
              interpolation="nearest", aspect="auto")
    ax.set_xticks(list(col_labels or ()), list((col_labels or {}).values()), fontsize=7)
    ax.set_yticks(list(row_labels or ()), list((row_labels or {}).values()), fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title or "", fontsize=9, loc="left" if W > w * s + left + 2 else "center")
    return fig


def save_grid(samples: torch.Tensor, path: Path, title: str | None = None, *, modality: str, labels=None) -> None:
    """Samples of a data ``modality`` (``DataSpec.modality``) as one figure: images (B, C, H, W) in [−1, 1] as a
    square grid; signals (B, C, L) as one line plot per sample, its channels stacked, captioned with ``labels``
    (one string per sample, e.g. its requested class) if given; vectors (B, D) as a scatter of the first two
    coordinates."""
    fig = grid_figure(samples, modality=modality, title=title, labels=labels)
    _save(fig, path)


def quality_vs_nfe_figure(rows: list[dict], metric: str, features: str | None = None):
    """``metric`` against NFE (log axis ticked at the NFE values, plain numbers) and against sampling seconds, a
    line per sampler; the y label names the metric and, for FID/KID, its feature space. The caller closes it."""
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name in samplers:
        pts = sorted((r["nfe"], r["sample_seconds"], r[metric], r.get("kid_std") if metric == "kid_mean" else None)
                     for r in rows if r["sampler"] == name and metric in r)
        for ax, x in zip(axes, (0, 1)):
            line = ax.plot([p[x] for p in pts], [p[2] for p in pts], "o-", label=name)[0]
            _band(ax, [p[x] for p in pts], [p[2] for p in pts], [p[3] for p in pts], line.get_color())
    axes[0].set_xlabel("NFE (model evaluations)")
    axes[1].set_xlabel("sampling wall time (s)")
    plain_log_axis(axes[0], [r["nfe"] for r in rows if metric in r])
    plain_log_axis(axes[1], [], decades=True)
    for ax in axes:
        _log_y_if_wide(ax, [r[metric] for r in rows if metric in r])
        kid_spread = metric == "kid_mean" and any("kid_std" in r for r in rows)
        ax.set_ylabel(metric_label(metric, features) + ("\n± std over KID subsets" if kid_spread else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_quality_vs_nfe(rows: list[dict], out_dir: Path, features: str | None = None) -> list[Path]:
    """One figure per metric (:func:`quality_vs_nfe_figure`). Returns the files written (``<metric>_vs_nfe.png``)."""
    out = []
    for metric in CURVE_METRICS:
        if not any(metric in r for r in rows):
            continue
        path = out_dir / f"{metric}_vs_nfe.png"
        _save(quality_vs_nfe_figure(rows, metric, features), path)
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
                      group_key: str = "group", errors: str | None = None) -> Path:
    """A sweep's quality against cost: one panel per cost in ``fronts`` (e.g. ``nfe``, ``sample_seconds``, both on
    log axes), one line per ``row[group_key]``, and that cost's Pareto front (the rows given in ``fronts[cost]``)
    as a step line through ringed markers: the best ``metric`` reachable at each budget. ``errors``: the key of
    each row's ± half-width (a 95 % interval over seeds, KID's standard deviation), drawn as error bars.
    Returns ``path``."""
    path = Path(path)
    groups = list(dict.fromkeys(r[group_key] for r in rows))
    fig, axes = plt.subplots(1, len(fronts), figsize=(5 * len(fronts) + 1, 4), squeeze=False)
    labels = {"nfe": "NFE (model evaluations)", "sample_seconds": "sampling wall time (s)"}
    for ax, (cost, front) in zip(axes[0], fronts.items()):
        for g in groups:
            pts = sorted((r[cost], r[metric], r.get(errors) if errors else None) for r in rows if r[group_key] == g)
            err = [p[2] if isinstance(p[2], (int, float)) and math.isfinite(p[2]) else 0.0 for p in pts]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err if any(err) else None, fmt="o-", ms=4,
                        capsize=3, label=g)
        pts = sorted((r[cost], r[metric]) for r in front)
        if pts:
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="black", lw=1.2, ls="--",
                    label="Pareto front")
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=90, facecolors="none", edgecolors="black",
                       zorder=3)
        if cost == "nfe" and len({r[cost] for r in rows}) <= 12:  # NFE values read better than powers of ten
            plain_log_axis(ax, [r[cost] for r in rows])
        else:  # many NFE values, or seconds: 1-2-5 ticks, plain numbers (0.5, 1, 2), not 3×10⁰
            plain_log_axis(ax, [], decades=True)
        ax.set_xlabel(labels.get(cost, cost))
        _log_y_if_wide(ax, [r[metric] for r in rows])
        spread = {"kid_std": "std over KID subsets"}.get(errors, "95 % interval over seeds")
        ax.set_ylabel(f"{metric} (lower is better)" + (f"\n± {spread}" if errors else ""))
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)
    return path


def steps_grid_figure(samples_by_steps: dict[str, torch.Tensor], *, modality: str, title: str | None = None,
                      column_labels=None):
    """The figure :func:`save_steps_grid` writes (the caller closes it)."""
    items = [(label, _check_samples(x, modality)) for label, x in samples_by_steps.items() if len(x)]
    if not items:
        raise ValueError("no samples to draw")
    column_labels = _check_labels(column_labels, max(len(x) for _, x in items), modality)
    if modality == "image":
        _, c, h, w = items[0][1].shape
        cols = max(len(x) for _, x in items)
        # pixel-exact as image_figure: an integer zoom s, every row's axes on whole screen pixels, so the 1-pixel
        # separators all come out s pixels wide
        dpi, s = 120, max(1, min(round(48 / h), 1800 // (cols * (w + 1))))
        left, top, gap = 90, 26 if title else 4, 6
        W, H = cols * (w + 1) * s - s + left + 4, len(items) * (h * s + gap) + top
        fig = plt.figure(figsize=(W / dpi, H / dpi), dpi=dpi)
        for r, (label, x) in enumerate(items):
            row = torch.ones(c, h, cols * (w + 1) - 1)
            for k, img in enumerate(x.clamp(-1, 1) * 0.5 + 0.5):
                row[:, :, k * (w + 1): k * (w + 1) + w] = img
            img = row.permute(1, 2, 0).numpy()
            y = H - top - (r + 1) * (h * s + gap) + gap
            ax = fig.add_axes((left / W, y / H, (cols * (w + 1) - 1) * s / W, h * s / H))
            ax.imshow(img.squeeze(-1) if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
                      interpolation="nearest", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        if title:
            fig.suptitle(title, fontsize=9, y=1 - 4 / H, va="top")
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
        for k, text in enumerate(column_labels or ()):
            if k < cols:
                axes[-1, k].set_xlabel(text, fontsize=7, labelpad=2)
        if title:
            fig.suptitle(title, fontsize=9)
        height = fig.get_figheight()
        fig.subplots_adjust(left=0.16, right=0.99, bottom=0.03 + (0.2 / height if column_labels else 0),
                            top=0.88 if title else 0.97, wspace=0.08, hspace=0.12)
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
                    modality: str, column_labels=None) -> Path:
    """The same noise carried to the data at several step counts, one row per step count (labelled with the dict's
    keys): images (B, C, H, W) in [−1, 1] as a strip of images, signals (B, C, L) as a strip of line plots (channels
    stacked; ``column_labels``, one string per column, e.g. its requested class, go under the bottom row); vector
    data as one scatter panel per step count. Returns ``path``."""
    fig = steps_grid_figure(samples_by_steps, modality=modality, title=title, column_labels=column_labels)
    _save(fig, path)
    return Path(path)


def _band(ax, xs, ys, errs, color) -> None:
    """A shaded ± ``errs`` band around a curve; skipped where no point has a finite spread."""
    if any(isinstance(e, (int, float)) and math.isfinite(e) for e in errs):
        e = [v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0 for v in errs]
        ax.fill_between(xs, [y - d for y, d in zip(ys, e)], [y + d for y, d in zip(ys, e)], color=color, alpha=0.2,
                        lw=0)


def spectra_figure(real: torch.Tensor, generated: dict[str, torch.Tensor], *, title: str | None = None):
    """The figure :func:`save_spectra` writes (the caller closes it)."""
    from ..evaluation.distances import log_spectral_distance, mean_power_spectrum

    real = _check_samples(real, "signal")
    p_real = mean_power_spectrum(real)
    freqs = torch.arange(len(p_real)).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(freqs, p_real.numpy(), "k-", lw=2, label=f"real ({len(real)})")
    for label, x in generated.items():
        x = _check_samples(x, "signal")
        if len(x):
            p = mean_power_spectrum(x)
            ax.plot(freqs, p.numpy(), "-", lw=1, label=f"{label}: {log_spectral_distance(p_real, p):.2f} dB")
    ax.set_yscale("log")
    ax.set_xlabel("frequency (cycles per signal)")
    ax.set_ylabel("mean power |rfft|²")
    ax.legend(fontsize=7)
    ax.set_title(title or "", fontsize=9)
    fig.tight_layout()
    return fig


def save_spectra(real: torch.Tensor, generated: dict[str, torch.Tensor], path: Path, title: str | None = None) -> Path:
    """Mean power spectra (:func:`~diffsteps.evaluation.distances.mean_power_spectrum`, log scale) of real signals
    (B, C, L) and of generated ones per label (e.g. step count), each labelled with its log-spectral distance to
    the real spectrum. Returns ``path``."""
    fig = spectra_figure(real, generated, title=title)
    _save(fig, path)
    return Path(path)


def _log_y_if_wide(ax, values) -> None:
    """Log y axis when the positive values span more than two decades (trajectory errors fall as NFE^−2p)."""
    pos = [v for v in values if isinstance(v, (int, float)) and v > 0 and math.isfinite(v)]
    if len(pos) == len(values) and pos and max(pos) > 100 * min(pos):
        ax.set_yscale("log")
