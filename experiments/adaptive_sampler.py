"""The adaptive sampler against its anchor, k-diffusion's ``sample_dpm_adaptive``, on the exact 64-D mixture.

Data and model: the 10-component, 64-D Gaussian mixture of ``sampler_accuracy.py`` with its closed-form ε, linear
schedule (T = 1000), N noises (default 2,000). Error: RMS distance to the converged probability-flow ODE solution
from the same noise (DPM-Solver++(3M), 1000 log-SNR steps, checked against 500), all ending with x̂_0 at t = 0.

Over a sweep of rtol (atol = 0.156 rtol, the ratio of the defaults 0.0078/0.05, so the tolerance stays relative
across the sweep), for diffsteps ``adaptive`` in both forms (``form="data"``, the default, and ``"noise"``), each with
per-sample control and with ``control="batch"``, and the anchor
(k-diffusion 0.1.1.post1 ``sample_dpm_adaptive``, order 3, same PID defaults, driven in σ̃ coordinates: denoiser(x̃, σ̃)
= x̂_0 of the VP model at the t with σ̃(t) = σ̃, x = α x̃; it stops at σ̃(t = 0), and one more call gives x̂_0 there):
mean / p95 / max NFE, RMS error, the median sample's error (RMS over its features: the typical sample, which the
few mode-flipping samples that dominate the RMS do not move), wall seconds. Then: the log-log slope and Spearman
correlation of error vs rtol ("calibrated tolerance"), the error ratio to the anchor at the same mean NFE (anchor's
log-error interpolated in log-NFE), and the NFE ratio of per-sample to batch control at the same error.

k-diffusion's package __init__ imports torchvision (absent here), so only its ``sampling.py`` is loaded, by file
path, with a stand-in for the one helper it takes from ``utils`` (append_dims).

First, a step-for-step check that the controller is the anchor's (``reproduce_anchor``, 200 noises).

Run: ``pip install --no-deps k-diffusion==0.1.1.post1 torchsde torchdiffeq``, then
``python experiments/adaptive_sampler.py [--n 2000]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
import types

import numpy as np
import torch
from scipy.stats import spearmanr
from sampler_accuracy import make_mixture

import diffsteps as ds

RTOLS = (0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005)
ATOL_PER_RTOL = 0.0078 / 0.05


def load_kdiffusion_sampling():
    """k_diffusion/sampling.py alone, its package and ``utils`` replaced by stand-ins (utils imports torchvision)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise SystemExit("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1 torchsde "
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
                      control="batch", coords="ve", return_info=True)
        print(f"| {rtol:g} | {info['n_accept']} / {info['n_reject']} | {r.accepted[0].item()} / "
              f"{r.rejected[0].item()} | {(r.sample - x).abs().max().item():.1e} |")
    print()


def rms(a, b):
    return (a - b).square().mean().sqrt().item()


def fit(rtols, errs):
    slope = np.polyfit(np.log(rtols), np.log(errs), 1)[0]
    return slope, spearmanr(rtols, errs).statistic


def interp_loglog(x, xs, ys):
    """log y at log x, linear between the neighbouring points of (xs, ys) sorted by xs; nan outside their range."""
    order = np.argsort(xs)
    lx, ly = np.log(np.asarray(xs)[order]), np.log(np.asarray(ys)[order])
    if not lx[0] <= math.log(x) <= lx[-1]:
        return math.nan
    return float(np.exp(np.interp(math.log(x), lx, ly)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reproduce-only", action="store_true", help="only the step-for-step check against the anchor")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kd = load_kdiffusion_sampling()
    schedule = ds.make_schedule("linear", 1000)
    model = ds.ExactEpsilon(make_mixture(), schedule)
    noise = torch.randn(args.n, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reproduce_anchor(kd, model, schedule, noise[:200])
    if args.reproduce_only:
        return
    t0 = time.perf_counter()
    ref = ds.sample(model, noise, schedule=schedule, sampler="dpmpp_3m", steps=1000, spacing="logsnr")
    half = ds.sample(model, noise, schedule=schedule, sampler="dpmpp_3m", steps=500, spacing="logsnr")
    print(f"reference: DPM-Solver++(3M) at 1000 vs 500 log-SNR steps differ by RMS {rms(ref, half):.1e} "
          f"(data RMS {ref.square().mean().sqrt():.2f}); {args.n} samples  [{time.perf_counter() - t0:.0f} s]\n")
    methods = {f"{form}, {control}": dict(form=form, control=control)
               for form in ("data", "noise") for control in ("sample", "batch")}
    methods["noise, sample, growth ≤ 1.5"] = dict(form="noise", control="sample", max_growth=1.5)
    curves: dict[str, list[tuple]] = {name: [] for name in [*methods, "k-diffusion anchor"]}
    print("| method | rtol | mean NFE | p95 NFE | max NFE | rejected/sample | RMS error | median sample error | "
          "seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rtol in RTOLS:
        atol = ATOL_PER_RTOL * rtol
        for name in curves:
            t0 = time.perf_counter()
            if name.startswith("k-diffusion"):
                x, calls = run_anchor(kd, model, schedule, noise, rtol, atol)
                nfe = torch.full((args.n,), calls, dtype=torch.long)
                rej = math.nan
            else:
                r = ds.sample(model, noise, schedule=schedule, sampler="adaptive", rtol=rtol, atol=atol,
                              return_info=True, **methods[name])
                x, nfe, rej = r.sample, r.nfe_per_sample, r.rejected.double().mean().item()
            secs = time.perf_counter() - t0
            err = rms(x, ref)
            med = (x - ref).square().mean(1).sqrt().median().item()  # the typical sample, not the mode flips
            mean = nfe.double().mean().item()
            curves[name].append((rtol, mean, err, med))
            print(f"| {name} | {rtol:g} | {mean:.1f} | {nfe.double().quantile(0.95).item():.0f} | "
                  f"{nfe.max().item()} | {rej:.2f} | {err:.2e} | {med:.2e} | {secs:.1f} |")
    print("\n### calibrated tolerance: RMS error against rtol\n")
    print("| method | log-log slope | Spearman ρ | largest error jump between neighbouring rtol | "
          "median-sample error: slope | ρ |")
    print("|---|---|---|---|---|---|")
    for name, pts in curves.items():
        rt, _, er, md = map(np.array, zip(*pts))
        slope, rho = fit(rt, er)
        jump = max(max(a / b, b / a) for a, b in zip(er[:-1], er[1:]))
        print(f"| {name} | {slope:.2f} | {rho:.3f} | {jump:.1f}× | {fit(rt, md)[0]:.2f} | {fit(rt, md)[1]:.3f} |")
    print("\n### at the same mean NFE (per-sample control against the anchor and against batch control)\n")
    print("| method | rtol | per-sample NFE | RMS error | anchor's at that NFE | ratio (≤ 1: no worse) | "
          "batch NFE at that RMS error | per-sample / batch | median error: ratio to anchor | per-sample / batch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    anchor = curves["k-diffusion anchor"]
    for form, name in (("data", "data, sample"), ("noise", "noise, sample"), ("noise", "noise, sample, growth ≤ 1.5")):
        batch = curves[f"{form}, batch"]
        for rtol, n_ps, e_ps, m_ps in curves[name]:
            e_anchor = interp_loglog(n_ps, [c[1] for c in anchor], [c[2] for c in anchor])
            n_batch = interp_loglog(e_ps, [c[2] for c in batch], [c[1] for c in batch])
            m_anchor = interp_loglog(n_ps, [c[1] for c in anchor], [c[3] for c in anchor])
            nm_batch = interp_loglog(m_ps, [c[3] for c in batch], [c[1] for c in batch])
            print(f"| {name} | {rtol:g} | {n_ps:.1f} | {e_ps:.2e} | {e_anchor:.2e} | {e_ps / e_anchor:.2f} | "
                  f"{n_batch:.1f} | {n_ps / n_batch:.2f} | {m_ps / m_anchor:.2f} | {n_ps / nm_batch:.2f} |")
    print("\n(nan: outside the other curve's range; the anchor's error is interpolated log-log in its mean NFE, "
          "batch control's NFE log-log in its error)")


if __name__ == "__main__":
    main()
