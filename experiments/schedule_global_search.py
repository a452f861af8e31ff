"""How far is LD3-style refinement from the best timesteps there are? A derivative-free global search on the exact
64-D mixture, against ``optimize_schedule(method="refine")``.

Setting: the 10-component 64-D mixture of ``sampler_accuracy.py`` with its exact ε, linear schedule (T = 1000),
``--noises`` noises (seed 0) split as ``optimize_steps.py`` splits them (first 2/3 train, last 1/3 held out), target
the exact ODE solution from each noise (1000 log-SNR dpmpp_3m steps). Search space: the K − 1 free levels of a
K-step schedule (the first at T − 1), parameterised as refine parameterises them (softmax increments of the
log-SNR), so every point is a valid decreasing schedule. Search: ``--starts`` random points (standard normal logits),
then Nelder–Mead from the best ``--polish`` of them, all on the training noises; the best training point is
reported with its held-out error. This is a second method for the refine's optimum: it uses no gradients, no teacher
grid and no early stopping. Rows: the best fixed spacing (trailing, karras, logsnr, linspace; chosen on held-out
error), the refine result (timesteps only, ``optimize_schedule``'s defaults: 64 candidates, ``init="best"`` — from
the DP path and the best fixed spacing), the global search's best, with held-out error / the best fixed spacing's.
Then each on ``--fresh`` new noises (seed 7): RMS, median per-sample error and flips (the sample ends in another
mixture component than the exact solution), because 256 held-out noises may hold none of the few noises near a
boundary between components that carry the RMS of a larger set.

Run: ``OMP_NUM_THREADS=1 python experiments/schedule_global_search.py [--samplers dpmpp_2m unipc] [--nfe 5 10]
[--out docs/benchmarks/schedule_global_search.txt]``.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

import diffsteps as ds
from diffsteps.core.spacings import make_timesteps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler_accuracy import make_mixture  # noqa: E402

FIXED = ("trailing", "karras", "logsnr", "linspace")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samplers", nargs="+", default=["dpmpp_2m", "unipc"])
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    p.add_argument("--noises", type=int, default=768)
    p.add_argument("--starts", type=int, default=3000)
    p.add_argument("--polish", type=int, default=15)
    p.add_argument("--fresh", type=int, default=2000, help="new noises (seed 7) every schedule is checked on")
    p.add_argument("--out", default="docs/benchmarks/schedule_global_search.txt")
    a = p.parse_args()
    torch.set_num_threads(1)
    sch = ds.make_schedule("linear", 1000)
    mixture = make_mixture()
    model = ds.ExactEpsilon(mixture, sch)
    noise = torch.randn(a.noises, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = ds.sample(model, noise, schedule=sch, sampler="dpmpp_3m", steps=1000, spacing="logsnr")
    fresh = torch.randn(a.fresh, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fresh_exact = ds.sample(model, fresh, schedule=sch, sampler="dpmpp_3m", steps=1000, spacing="logsnr")
    fresh_label = mixture.responsibilities(fresh_exact).argmax(1)
    n_train = a.noises - round(a.noises / 3)
    train, held = slice(0, n_train), slice(n_train, None)
    lo, hi = sch.log_snr[-1].item(), sch.log_snr[0].item()

    def timesteps(z: np.ndarray) -> torch.Tensor:
        # K − 1 logits and a fixed 0: K increments of λ from λ(T − 1) to λ(0), the free levels their partial sums
        w = np.exp(np.append(z, 0.0) - max(z.max(), 0.0))
        lams = lo + np.cumsum(w / w.sum())[:-1] * (hi - lo)
        return torch.cat([torch.tensor([sch.num_timesteps - 1.0], dtype=torch.float64),
                          sch.t_from_log_snr(torch.tensor(lams, dtype=torch.float64))])

    lines = [f"{'sampler':<9} {'NFE':>3} {'schedule':<26} {'train':>7} {'held-out':>8} {'ratio':>6} {'seconds':>7}  "
             f"{'fresh RMS':>9} {'median':>8} {'flips':>5}  timesteps"]
    print(lines[0], flush=True)
    for smp in a.samplers:
        for nfe in a.nfe:
            def error(ts, rows):
                out = ds.sample(model, noise[rows], schedule=sch, sampler=smp, spacing=ts)
                return (out - exact[rows]).square().mean().sqrt().item()

            fixed = {name: make_timesteps(name, nfe, sch) for name in FIXED}
            fixed_held = {name: error(ts, held) for name, ts in fixed.items()}
            best = min(fixed_held, key=fixed_held.get)
            base = fixed_held[best]
            t0 = time.perf_counter()
            [(ref_ts, rep)] = ds.optimize_schedule(model, sch, sampler=smp, nfe=[nfe], method="refine", noise=noise,
                                                   holdout=1 / 3, iterations=300, patience=6)
            ref_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            rng = np.random.default_rng(0)
            starts = sorted(((error(timesteps(z), train), tuple(z)) for z in rng.normal(size=(a.starts, nfe - 1))),
                            key=lambda c: c[0])
            polished = [minimize(lambda z: error(timesteps(z), train), np.array(z), method="Nelder-Mead",
                                 options={"maxiter": 200 * nfe, "xatol": 1e-4, "fatol": 1e-7})
                        for _, z in starts[:a.polish]]
            top = min(polished, key=lambda r: r.fun)
            glob_s = time.perf_counter() - t0
            g_ts = timesteps(top.x)
            rows = [(f"fixed: {best}", fixed[best], 0.0), ("refine (init=best)", ref_ts, ref_s),
                    (f"global search ({a.starts}+NM×{a.polish})", g_ts, glob_s)]
            for name, ts, secs in rows:
                h = error(ts, held)
                out = ds.sample(model, fresh, schedule=sch, sampler=smp, spacing=ts)
                per = (out - fresh_exact).square().mean(1).sqrt()
                flips = int((mixture.responsibilities(out).argmax(1) != fresh_label).sum())
                line = (f"{smp:<9} {nfe:>3} {name:<26} {error(ts, train):7.4f} {h:8.4f} {h / base:6.3f} {secs:7.0f}  "
                        f"{per.square().mean().sqrt().item():9.4f} {per.median().item():8.2e} {flips:5d}  "
                        f"[{', '.join(f'{t:.1f}' for t in ts.tolist())}]")
                lines.append(line)
                print(line, flush=True)
    header = [f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, 1 thread",
              f"# python {shlex.join(['experiments/schedule_global_search.py', *sys.argv[1:]])}",
              (f"# 64-D exact mixture, linear T=1000; {a.noises} noises, {n_train} train / {a.noises - n_train} "
               "held out; errors: RMS vs the exact ODE solution; ratio: held-out / the best fixed spacing's"),
              (f"# fresh: {a.fresh} new noises (seed 7): RMS and median per-sample error vs the exact solution, flips "
               "(another mixture component than the exact solution's)"), ""]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write("\n".join(header + lines) + "\n\n")


if __name__ == "__main__":
    main()
