"""The adaptive sampler against its anchor, k-diffusion's ``sample_dpm_adaptive``, on the exact 64-D mixture.

Data and model: the 10-component, 64-D Gaussian mixture of ``sampler_accuracy.py`` with its closed-form ε, linear
schedule (T = 1000), N noises (default 10,000). Error of a sample: RMS over its features of the distance to the
converged probability-flow ODE solution from the same noise (DPM-Solver++(3M), 1000 log-SNR steps, checked against
500 on the first 1000 noises; cached in ``--out``), all ending with x̂_0 at t = 0. A flip: the sample's mixture
component (argmax of the posterior responsibilities at t = 0) is not the reference endpoint's.

Over a sweep of rtol (atol = 0.156 rtol, the ratio of the defaults 0.0078/0.05, so the tolerance stays relative
across the sweep), for the methods in ``METHODS`` (the default, per-sample and batch control; the pre-change default;
one-change ablations) and the anchor (k-diffusion 0.1.1.post1 ``sample_dpm_adaptive``, order 3, its PID defaults,
driven in σ̃ coordinates: denoiser(x̃, σ̃) = x̂_0 of the VP model at the t with σ̃(t) = σ̃, x = α x̃; it stops at
σ̃(t = 0), and one more call gives x̂_0 there): mean / p95 / max NFE, RMS error over all samples and over the
non-flipped ones, the median / p90 / p99 sample error, flips, wall seconds. Then: the log-log slope and Spearman
correlation of error vs rtol ("calibrated tolerance"); each method's error / the anchor's at the same mean NFE (the
anchor's log-error interpolated in log-NFE); per-sample control's mean NFE / batch control's at the same error (the
batch curve's first crossing, log-log) — each with a 95 % paired bootstrap interval (the noises resampled, one draw
shared by every method) and a tally of rtols whose interval lies below, around or above 1. A figure
(``--figure``, by default next to the results) draws the error curves against mean NFE and the per-sample/batch
NFE ratios with their intervals.

k-diffusion's package __init__ imports torchvision (absent here), so only its ``sampling.py`` is loaded, by file
path, with a stand-in for the one helper it takes from ``utils`` (append_dims).

First, a step-for-step check that the controller is the anchor's (``reproduce_anchor``, 200 noises).

Run: ``pip install --no-deps k-diffusion==0.1.1.post1 torchsde torchdiffeq trampoline``, then
``python experiments/adaptive_sampler.py [--n 10000] [--analyse-only]``. ``--seed`` draws another set of noises;
``--methods`` runs a subset of ``METHODS`` by name and ``--no-anchor`` leaves k-diffusion out (its comparison and
the step-for-step check are then skipped), e.g. the per-sample-against-batch comparison alone on fresh noises:
``--seed 1 --methods default "default, batch" --no-anchor``. ``--with-results`` adds the saved results of other runs
on the same noises (their ``.npz``) to the analysis, e.g. batch-controlled methods run separately.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
import types
import warnings

import numpy as np
import torch
from scipy.stats import spearmanr
from sampler_accuracy import make_mixture

import diffsteps as ds

RTOLS = (0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005)
ATOL_PER_RTOL = 0.0078 / 0.05
# the default (per-sample) and its batch-wide controller; the pre-issue default for comparison. A name "X, batch"
# pairs with "X" in the per-sample-against-batch table.
METHODS = {
    "default": {},
    "default, batch": {"control": "batch"},
    # probe the flow's growth at λ = −0.5 and re-solve the samples it is about to amplify (sample_adaptive's
    # resolve_lambda); the same policy under batch control, for the per-sample-against-batch table
    "re-solve": {"resolve_lambda": -0.5},
    "re-solve, batch": {"resolve_lambda": -0.5, "control": "batch"},
    # go back 4 accepted steps and re-solve at rtol/10 the samples whose own error estimate spikes above 8
    # tolerances on a try (sample_adaptive's resolve_spike); under batch control the sample's own estimate too
    "spike re-solve": {"resolve_spike": 8.0},
    "spike re-solve, batch": {"resolve_spike": 8.0, "control": "batch"},
    # the threshold's trade: lower marks more samples (tails and RMS cheaper, the median dearer), higher fewer
    "spike re-solve at 4": {"resolve_spike": 4.0},
    "spike re-solve at 5.5": {"resolve_spike": 5.5},
    "spike re-solve at 12": {"resolve_spike": 12.0},
    # a PI controller (Söderlind's proportional term on the error ratio): each sample's estimate grows step after
    # step at the λ-cap before its mode decision, which the pure I controller only sees when a try fails
    "PI 0.3": {"pcoeff": 0.3},
    "PI 0.3, spike re-solve": {"pcoeff": 0.3, "resolve_spike": 8.0},
    "PI 0.3, batch": {"pcoeff": 0.3, "control": "batch"},
    "PI 0.3, spike re-solve, batch": {"pcoeff": 0.3, "resolve_spike": 8.0, "control": "batch"},
    "old default (vp norm, h_init 0.05, no cap)": {"coords": "vp", "h_init": 0.05, "h_max_noisy": math.inf},
    "x0 norm, no cap": {"h_max_noisy": math.inf},
    "vp norm, cap": {"coords": "vp"},
}


def load_kdiffusion_sampling():
    """k_diffusion/sampling.py alone, its package and ``utils`` replaced by stand-ins (utils imports torchvision)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise SystemExit("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1 torchsde trampoline "
                         "torchdiffeq")
    root = spec.submodule_search_locations[0]
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = []
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.update({"k_diffusion": pkg, "k_diffusion.utils": utils})
    pkg.utils = utils
    s = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{root}/sampling.py")
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


class SigmaDenoiser(torch.nn.Module):
    """k-diffusion's model contract for a VP ε-model: D(x̃, σ̃) = x̂_0 = x̃ − σ̃ ε̂(α x̃, t(σ̃)), counting calls."""

    def __init__(self, model, schedule):
        super().__init__()
        self.model, self.schedule, self.calls = model, schedule, 0

    def forward(self, x, sigma):
        self.calls += 1
        t = self.schedule.t_from_sigma(sigma.double())
        alpha = self.schedule.alpha_bar_at(t).sqrt().to(x.dtype)[:, None]
        return x - sigma.to(x.dtype)[:, None] * self.model(alpha * x, t)


def run_anchor(kd, model, schedule, noise, rtol, atol):
    den = SigmaDenoiser(model, schedule)
    sig = schedule.sigmas
    x = noise / math.sqrt(schedule.alphas_cumprod[-1].item())
    x, info = kd.sample_dpm_adaptive(den, x, sig[0].item(), sig[-1].item(), rtol=rtol, atol=atol, disable=True,
                                     return_info=True)
    x0 = den(x, sig[0].expand(len(x)).to(x.dtype))  # σ̃(t = 0) → the data: x̂_0 there, as every diffsteps sampler
    return x0, den.calls


def reproduce_anchor(kd, model, schedule, noise, rtols=(0.05, 0.01, 0.001)) -> None:
    """diffsteps' controller is k-diffusion's: ``form="noise", control="batch", coords="ve"``, atol = 0, against the
    anchor with its λ in float64 (k-diffusion builds them with torch.tensor(float), float32 by default), step for
    step: the same accepted/rejected counts and the same samples to round-off."""
    print("### reproducing the anchor (noise form, batch control, x̃ norm, atol = 0; anchor's λ in float64)\n")
    print("| rtol | anchor accepted / rejected | diffsteps accepted / rejected | max abs difference |")
    print("|---|---|---|---|")
    sig = schedule.sigmas
    for rtol in rtols:
        den = SigmaDenoiser(model, schedule)
        x = noise / math.sqrt(schedule.alphas_cumprod[-1].item())
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            x, info = kd.sample_dpm_adaptive(den, x, sig[0].item(), sig[-1].item(), rtol=rtol, atol=0.0, disable=True,
                                             return_info=True)
        finally:
            torch.set_default_dtype(default)
        x = den(x, sig[0].expand(len(x)).to(x.dtype))
        r = ds.sample(model, noise, schedule=schedule, sampler="adaptive", rtol=rtol, atol=0.0, form="noise",
                      control="batch", coords="ve", h_init=0.05, h_max_noisy=math.inf, return_info=True)
        print(f"| {rtol:g} | {info['n_accept']} / {info['n_reject']} | {r.accepted[0].item()} / "
              f"{r.rejected[0].item()} | {(r.sample - x).abs().max().item():.1e} |")
    print()


def fit(rtols, errs):
    slope = np.polyfit(np.log(rtols), np.log(errs), 1)[0]
    return slope, spearmanr(rtols, errs).statistic


def interp_loglog(x, xs, ys):
    """y at x, linear in log–log between the neighbouring points of (xs, ys) sorted by xs; nan outside their range."""
    order = np.argsort(xs)
    lx, ly = np.log(np.asarray(xs, dtype=float)[order]), np.log(np.asarray(ys, dtype=float)[order])
    if not lx[0] <= math.log(x) <= lx[-1]:
        return math.nan
    return float(np.exp(np.interp(math.log(x), lx, ly)))


def nfe_at_error(e, nfes, errs):
    """The mean NFE at which a curve (points (nfe, err) in rtol order) first reaches err ≤ e, log–log between the
    two points where it crosses; nan where it never does or is already below e at its cheapest point."""
    order = np.argsort(nfes)
    n, v = np.asarray(nfes, dtype=float)[order], np.asarray(errs, dtype=float)[order]
    if v[0] <= e:
        return math.nan
    for (n0, e0), (n1, e1) in zip(zip(n[:-1], v[:-1]), zip(n[1:], v[1:])):
        if e0 > e >= e1:
            w = math.log(e0 / e) / math.log(e0 / e1)
            return float(math.exp((1 - w) * math.log(n0) + w * math.log(n1)))
    return math.nan


METRICS = ("RMS", "median", "p90", "p99")


def metric_table(err: np.ndarray, idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The error measures of one run over the noises ``idx`` ((B, N) bootstrap rows; None: all noises once)."""
    e = err[None] if idx is None else err[idx]
    q = np.quantile(e, [0.5, 0.9, 0.99], axis=1)
    return {"RMS": np.sqrt(np.mean(e**2, axis=1)), "median": q[0], "p90": q[1], "p99": q[2]}


def interval(values) -> tuple[float, float]:
    """The 95 % bootstrap interval; nan when more than a tenth of the resamples have no value."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 0.9 * len(values):
        return math.nan, math.nan
    lo, hi = np.quantile(v, [0.025, 0.975])
    return float(lo), float(hi)


def ci(lo: float, hi: float) -> str:
    return "[–]" if math.isnan(lo) else f"[{lo:.2f}, {hi:.2f}]"


def verdict(point: float, lo: float, hi: float) -> str:
    """Where a ratio's interval lies against 1 (– where the point or the interval is not defined)."""
    if not math.isfinite(point) or math.isnan(lo):
        return "–"
    return "better" if hi < 1 else "worse" if lo > 1 else "tie"


def run_all(args, kd, model, schedule, mixture, noise, ref, methods) -> dict:
    """Every method at every rtol: per-sample NFE, error (RMS over the sample's features) and component flip."""
    label = mixture.responsibilities(ref).argmax(1)
    runs: dict[str, dict] = {}
    print("| method | rtol | mean NFE | p95 NFE | max NFE | rejected/sample | RMS error | RMS, no flips | median | "
          "p90 | p99 | flips | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in [*methods, *([] if kd is None else ["k-diffusion anchor"])]:
        out = {k: [] for k in ("nfe", "err", "flip", "rej", "secs")}
        for rtol in RTOLS:
            atol = ATOL_PER_RTOL * rtol
            t0 = time.perf_counter()
            if name.startswith("k-diffusion"):
                x, calls = run_anchor(kd, model, schedule, noise, rtol, atol)
                nfe = torch.full((len(noise),), calls, dtype=torch.long)
                rej = math.nan
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    r = ds.sample(model, noise, schedule=schedule, sampler="adaptive", rtol=rtol, atol=atol,
                                  return_info=True, **methods[name])
                x, nfe, rej = r.sample, r.nfe_per_sample, r.rejected.double().mean().item()
            secs = time.perf_counter() - t0
            err = (x - ref).square().mean(1).sqrt()
            flip = mixture.responsibilities(x).argmax(1) != label
            for k, v in (("nfe", nfe.numpy()), ("err", err.numpy()), ("flip", flip.numpy()), ("rej", rej),
                         ("secs", secs)):
                out[k].append(v)
            e = err.numpy()
            m = metric_table(e)
            print(f"| {name} | {rtol:g} | {nfe.double().mean():.1f} | {nfe.double().quantile(0.95):.0f} | "
                  f"{nfe.max().item()} | {rej:.2f} | {m['RMS'][0]:.2e} | {np.sqrt(np.mean(e[~flip.numpy()]**2)):.2e} | "
                  f"{m['median'][0]:.2e} | {m['p90'][0]:.2e} | {m['p99'][0]:.2e} | {int(flip.sum())} | {secs:.1f} |",
                  flush=True)
        runs[name] = {k: np.array(v) for k, v in out.items()}
    return runs


def analyse(runs: dict, n_boot: int, seed: int = 0, figure: str | None = None) -> None:
    """Calibration, and the two issue-12 comparisons with paired bootstrap intervals: every resample draws the noises
    once and every method's curve is recomputed on that draw (the anchor's mean NFE is its batch's, fixed); then the
    curves as a figure at ``figure``."""
    names = list(runs)
    n = runs[names[0]]["err"].shape[1]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    full = {k: {mt: np.array([metric_table(e)[mt][0] for e in r["err"]]) for mt in METRICS} for k, r in runs.items()}
    mean_nfe = {k: r["nfe"].mean(1) for k, r in runs.items()}
    flips = {k: r["flip"].sum(1) for k, r in runs.items()}
    boot, boot_nfe = {}, {}
    for k, r in runs.items():  # (n_boot, rtols) per metric
        tabs = [metric_table(e, idx) for e in r["err"]]
        boot[k] = {mt: np.stack([t[mt] for t in tabs], 1) for mt in METRICS}
        boot_nfe[k] = np.stack([nf[idx].mean(1) for nf in r["nfe"]], 1)

    print("\n### calibrated tolerance: error against rtol (9 rtols)\n")
    print("| method | RMS: log-log slope | Spearman ρ | largest jump between neighbouring rtol | median: slope | ρ | "
          "p99: slope | ρ |")
    print("|---|---|---|---|---|---|---|---|")
    rt = np.array(RTOLS)
    for k in names:
        er = full[k]["RMS"]
        jump = max(max(a / b, b / a) for a, b in zip(er[:-1], er[1:]))
        print(f"| {k} | {fit(rt, er)[0]:.2f} | {fit(rt, er)[1]:.3f} | {jump:.1f}× | {fit(rt, full[k]['median'])[0]:.2f} "
              f"| {fit(rt, full[k]['median'])[1]:.3f} | {fit(rt, full[k]['p99'])[0]:.2f} | "
              f"{fit(rt, full[k]['p99'])[1]:.3f} |")

    anchor = "k-diffusion anchor"
    if anchor in runs:
        _against_anchor(runs, names, n_boot, n, full, mean_nfe, flips, boot, boot_nfe)
    ratios = _per_sample_against_batch(runs, names, n_boot, full, mean_nfe, boot, boot_nfe)
    if figure:
        plot_curves(names, full, mean_nfe, boot, ratios, n, figure)


def plot_curves(names, full, mean_nfe, boot, ratios, n, path) -> None:
    """Top: error against mean NFE, one panel per error measure, each method a curve over rtol with its 95 %
    bootstrap interval (batch-wide controllers dashed, in the colour of their per-sample form). Bottom: per-sample
    control's mean NFE over the batch controller's at the same error, with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, len(METRICS), figsize=(4.2 * len(METRICS), 8), sharex="row")
    colour: dict[str, str] = {}
    for k in names:
        colour.setdefault(k.removesuffix(", batch"), f"C{len(colour)}")
    lo_n, hi_n = min(v.min() for v in mean_nfe.values()), max(v.max() for v in mean_nfe.values())
    ticks = [v for v in (10, 15, 20, 30, 45, 60, 80, 100, 140, 200, 300, 500) if lo_n <= v <= hi_n * 1.05]
    for ax, mt in zip(axes[0], METRICS):
        for k in names:
            lo, hi = np.quantile(boot[k][mt], [0.025, 0.975], axis=0)
            y = full[k][mt]
            ax.errorbar(mean_nfe[k], y, yerr=[y - lo, hi - y], color=colour[k.removesuffix(", batch")],
                        ls="--" if k.endswith(", batch") else "-", marker="o", ms=3, capsize=2, lw=1.2, label=k)
        ax.set(xscale="log", yscale="log", title=f"{mt} error", xlabel="mean NFE")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(ticks)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].set_ylabel("per-sample error to the converged ODE")
    axes[0, 0].legend(fontsize=7)
    for ax, mt in zip(axes[1], METRICS):
        for i, ((k, batch), by_metric) in enumerate(ratios.items()):
            point, lo, hi = by_metric[mt]
            ok = np.isfinite(point) & np.isfinite(lo) & np.isfinite(hi)
            x = full[k][mt][ok] * (1 + 0.03 * i)  # a small offset so the intervals of the pairs do not hide
            ax.errorbar(x, point[ok], yerr=[point[ok] - lo[ok], hi[ok] - point[ok]], color=colour[k],
                        ls="-" if batch == f"{k}, batch" else ":", marker="o", ms=3, capsize=2, lw=1.2,
                        label=f"{k} / {batch}")
        ax.axhline(1, color="k", lw=0.8)
        ax.set(xscale="log", xlabel=f"{mt} error of the per-sample run")
        ax.grid(True, which="both", alpha=0.3)
    axes[1, 0].set_ylabel("mean NFE / batch control's at the same error")
    if ratios:  # no per-sample/batch pair among the methods: the lower row stays empty
        axes[1, 0].legend(fontsize=7)
    fig.suptitle(f"Adaptive sampler on the exact 64-D mixture, {n} noises, rtol 0.2 to 0.0005 (95 % paired "
                 "bootstrap intervals)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nfigure: {path}")


def _against_anchor(runs, names, n_boot, n, full, mean_nfe, flips, boot, boot_nfe) -> None:
    anchor = "k-diffusion anchor"
    print(f"\n### against the anchor at the same mean NFE (error / the anchor's, log-log interpolated in its mean NFE; "
          f"[95 % paired bootstrap interval, {n_boot} resamples of the {n} noises]; ≤ 1: no worse)\n")
    print("| method | rtol | mean NFE | " + " | ".join(f"{mt} ratio | {mt} interval" for mt in METRICS) +
          " | flips | anchor's flips at that NFE |")
    print("|---|---|---|" + "---|---|" * len(METRICS) + "---|---|")
    tally: dict[tuple, list] = {}
    for k in names:
        if k == anchor:
            continue
        for j, rtol in enumerate(RTOLS):
            cells = []
            for mt in METRICS:
                point = full[k][mt][j] / interp_loglog(mean_nfe[k][j], mean_nfe[anchor], full[anchor][mt])
                bs = [boot[k][mt][b, j] / interp_loglog(boot_nfe[k][b, j], mean_nfe[anchor], boot[anchor][mt][b])
                      for b in range(n_boot)]
                lo, hi = interval(bs)
                cells.append(f"{point:.2f} | {ci(lo, hi)}")
                tally.setdefault((k, mt), []).append(verdict(point, lo, hi))
            fl = np.interp(np.log(mean_nfe[k][j]), np.log(mean_nfe[anchor]), flips[anchor], left=np.nan,
                           right=np.nan)
            print(f"| {k} | {rtol:g} | {mean_nfe[k][j]:.1f} | " + " | ".join(cells) +
                  f" | {flips[k][j]} | {fl:.1f} |")
    print("\nSummary (rtols whose interval lies below 1 / contains 1 / lies above 1; – outside the anchor's NFE range):\n")
    for (k, mt), v in tally.items():
        print(f"- {k}, {mt}: better {v.count('better')}, tie {v.count('tie')}, worse {v.count('worse')}, "
              f"out of range {v.count('–')}")


def _per_sample_against_batch(runs, names, n_boot, full, mean_nfe, boot, boot_nfe) -> dict:
    """The table, and its ratios per (per-sample method, batch method) and measure: (point, 2.5 %, 97.5 %) over
    rtol, nan where an interval is not defined."""
    print("\n### per-sample against batch control at the same error (mean NFE / the batch controller's mean NFE "
          "where its curve first reaches that error; [95 % paired bootstrap interval]; < 1: per-sample is cheaper)\n")
    print("| per-sample method | batch method | rtol | mean NFE | " +
          " | ".join(f"{mt}: NFE ratio | interval" for mt in METRICS) + " |")
    print("|---|---|---|---|" + "---|---|" * len(METRICS))
    tally, ratios = {}, {}
    # each per-sample method against its own batch form, and against the batch-wide controller itself
    # (k-diffusion's: "default, batch")
    pairs = [(k, b) for k in names if not k.endswith(", batch")
             for b in dict.fromkeys([f"{k}, batch", "default, batch"]) if b in runs]
    for k, batch in pairs:
        for j, rtol in enumerate(RTOLS):
            cells = []
            for mt in METRICS:
                point = mean_nfe[k][j] / nfe_at_error(full[k][mt][j], mean_nfe[batch], full[batch][mt])
                bs = [boot_nfe[k][b, j] / nfe_at_error(boot[k][mt][b, j], boot_nfe[batch][b], boot[batch][mt][b])
                      for b in range(n_boot)]
                lo, hi = interval(bs)
                cells.append(f"{point:.2f} | {ci(lo, hi)}")
                tally.setdefault((k, batch, mt), []).append(verdict(point, lo, hi))
                ratios.setdefault((k, batch), {}).setdefault(mt, []).append((point, lo, hi))
            print(f"| {k} | {batch} | {rtol:g} | {mean_nfe[k][j]:.1f} | " + " | ".join(cells) + " |")
    print("\nSummary (rtols whose interval lies below 1 / contains 1 / lies above 1; – outside the batch curve's range):\n")
    for (k, batch, mt), v in tally.items():
        print(f"- {k} vs {batch}, {mt}: cheaper {v.count('better')}, tie {v.count('tie')}, dearer {v.count('worse')}, "
              f"out of range {v.count('–')}")
    return {pair: {mt: tuple(np.array(c) for c in zip(*rows)) for mt, rows in by.items()}
            for pair, by in ratios.items()}


def reference(model, schedule, noise, path) -> torch.Tensor:
    """The converged ODE solution from each noise (cached: 10,000 noises cost ~3.5 min on one core)."""
    if os.path.exists(path):
        d = torch.load(path)
        if torch.equal(d["noise"], noise):
            return d["ref"]
    ref = ds.sample(model, noise, schedule=schedule, sampler="dpmpp_3m", steps=1000, spacing="logsnr")
    torch.save({"noise": noise, "ref": ref}, path)
    return ref


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of the noises")
    p.add_argument("--out", default="outputs", help="folder for the cached reference and the per-sample results")
    p.add_argument("--analyse-only", action="store_true", help="reuse the saved per-sample results")
    p.add_argument("--reproduce-only", action="store_true", help="only the step-for-step check against the anchor")
    p.add_argument("--seed", type=int, default=0, help="the noises' seed")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="NAME",
                   help=f"a subset of: {'; '.join(METHODS)}")
    p.add_argument("--no-anchor", action="store_true", help="leave k-diffusion's sample_dpm_adaptive out")
    p.add_argument("--figure", help="where the error-against-NFE figure goes (default: the results' folder)")
    p.add_argument("--with-results", nargs="+", default=[], metavar="NPZ",
                   help="result files of other runs on the same noises (same --n, --seed), analysed with this one's")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    schedule = ds.make_schedule("linear", 1000)
    mixture = make_mixture()
    model = ds.ExactEpsilon(mixture, schedule)
    tag = f"n{args.n}" + (f"_seed{args.seed}" if args.seed else "")
    results = f"{args.out}/adaptive_sampler_{tag}.npz"
    figure = args.figure or f"{args.out}/adaptive_sampler_{tag}.png"
    if args.analyse_only:
        analyse(load_runs([results, *args.with_results]), args.boot, figure=figure)
        return
    kd = None if args.no_anchor else load_kdiffusion_sampling()
    noise = torch.randn(args.n, 64, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    if kd is not None:
        reproduce_anchor(kd, model, schedule, noise[:200])
    if args.reproduce_only:
        return
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    ref = reference(model, schedule, noise, f"{args.out}/adaptive_sampler_ref_{tag}.pt")
    m = min(args.n, 1000)
    half = ds.sample(model, noise[:m], schedule=schedule, sampler="dpmpp_3m", steps=500, spacing="logsnr")
    print(f"reference: DPM-Solver++(3M) at 1000 log-SNR steps; on the first {m} noises 500 steps differ from it by "
          f"RMS {rms(ref[:m], half):.1e} (data RMS {ref.square().mean().sqrt():.2f}); {args.n} noises  "
          f"[{time.perf_counter() - t0:.0f} s]\n")
    runs = run_all(args, kd, model, schedule, mixture, noise, ref, {k: METHODS[k] for k in args.methods})
    np.savez_compressed(results, **{f"{k}/{f}": v for k, r in runs.items() for f, v in r.items()})
    analyse({**runs, **load_runs(args.with_results)}, args.boot, figure=figure)


def load_runs(paths) -> dict[str, dict]:
    """The per-sample results saved by runs (``name/field`` arrays), merged in the order given."""
    runs: dict[str, dict] = {}
    for path in paths:
        z = np.load(path)
        for key in z.files:
            name, field = key.rsplit("/", 1)
            runs.setdefault(name, {})[field] = z[key]
        if len({r["err"].shape for r in runs.values()}) > 1:
            raise SystemExit(f"{path}: its runs are on another number of noises or rtols than the results before it")
    return runs


def rms(a, b):
    return (a - b).square().mean().sqrt().item()


if __name__ == "__main__":
    main()
