"""Optimised step schedules on the exact Gaussian mixture: GITS's DP and LD3-style refinement against the best fixed
spacing, per sampler and budget.

Model: :class:`~diffsteps.ExactEpsilon` for the 2-D three-mode mixture of tests/conftest.py (``--dim 16`` for a
16-D eight-mode one, ``--dim 64`` for the 10-component 64-D one of ``sampler_accuracy.py``), linear schedule,
T = 1000 — no training error, so every error is the sampler's own. For each
sampler and NFE, :func:`diffsteps.optimize_schedule` fits on the first 2/3 of ``--noises`` noises and reports the
RMS distance of the final sample from the teacher's endpoint (``teacher_substeps`` dpmpp_3m steps between 48
log-SNR candidates) on the last 1/3, held out. Columns: the best of trailing/karras/logsnr/linspace on the held-out
noises (its name), DP, refine (started from the DP path; samplers without a differentiable form show "—"), the ratios
to the best fixed spacing, and the cost of each method in model calls and seconds (the teacher and DP costs are
shared by all budgets of a sampler and counted in each row; refine's include the DP it starts from).

Run: ``python experiments/optimize_steps.py [--nfe 5 10 20] [--samplers dpmpp_2m ddim] [--noises 768] [--dim 2]
[--out docs/benchmarks/optimize_steps.txt]``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
from pathlib import Path

import torch

import diffsteps as ds
from diffsteps.steps.differentiable import DIFFERENTIABLE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler_accuracy import make_mixture  # noqa: E402


def mixture(dim: int) -> ds.GaussianMixture:
    if dim == 2:  # tests/conftest.py's fixture
        means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
        covs = torch.tensor([[[0.30, 0.10], [0.10, 0.20]], [[0.15, -0.05], [-0.05, 0.25]],
                             [[0.20, 0.0], [0.0, 0.10]]])
        return ds.GaussianMixture(means, covs, weights=[0.5, 0.3, 0.2])
    if dim == 64:  # the 10-component mixture of sampler_accuracy.py and solvers_vs_diffusers.py
        return make_mixture()
    g = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(8, dim, generator=g, dtype=torch.float64)
    return ds.GaussianMixture(means, 0.05 + 0.2 * torch.rand(8, dim, generator=g, dtype=torch.float64))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--samplers", nargs="+", default=["dpmpp_2m", "ddim"] + (["unipc"] if "unipc" in ds.SAMPLERS
                                                                             else []))
    p.add_argument("--noises", type=int, default=768)
    p.add_argument("--dim", type=int, default=2)
    p.add_argument("--candidates", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/benchmarks/optimize_steps.txt")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sch = ds.make_schedule("linear", 1000)
    model = ds.ExactEpsilon(mixture(a.dim), sch)
    noise = torch.randn(a.noises, a.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    common = {"noise": noise, "candidates": a.candidates, "holdout": 1 / 3, "iterations": 150, "patience": 6}
    head = (f"{'sampler':<9} {'NFE':>3}  {'best fixed (held-out RMS)':<26} {'DP':>7} {'refine':>7} {'DP/fix':>6} "
            f"{'ref/fix':>7} {'train ref/fix':>13} {'median ref/fix':>14}  {'DP calls':>8} {'DP s':>5} {'ref calls':>9} {'ref s':>6}")
    lines = [head, "-" * len(head)]
    print(head, flush=True)
    for smp in a.samplers:
        dp = ds.optimize_schedule(model, sch, sampler=smp, nfe=a.nfe, method="dp", **common)
        ref = (ds.optimize_schedule(model, sch, sampler=smp, nfe=a.nfe, method="refine", **common)
               if smp in DIFFERENTIABLE else [None] * len(dp))
        for (_, d), r in zip(dp, ref):
            best = d["best_fixed"]
            fixed = d["fixed"][best]
            best_col = f"{best} {fixed['heldout']:.4f}"
            line = f"{smp:<9} {d['nfe']:>3}  {best_col:<26} {d['heldout_error']:7.4f} "
            dc = d["cost"]
            if r is None:
                line += (f"{'—':>7} {d['ratio']:6.3f} {'—':>7} {'—':>13} {'—':>14}  {dc['model_calls']:8d} "
                         f"{dc['seconds']:5.1f} {'—':>9} {'—':>6}")
            else:
                r = r[1]
                line += (f"{r['heldout_error']:7.4f} {d['ratio']:6.3f} {r['ratio']:7.3f} "
                         f"{r['train_error'] / fixed['train']:13.3f} {r['median_ratio']:14.3f}  "
                         f"{dc['model_calls']:8d} {dc['seconds']:5.1f} "
                         f"{r['cost']['model_calls']:9d} {r['cost']['seconds']:6.1f}")
            lines.append(line)
            print(line, flush=True)
    header = [(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'cpu'}, "
               f"torch {torch.__version__}, {a.threads} thread(s)"),
              f"# python {shlex.join(['experiments/optimize_steps.py', *sys.argv[1:]])}",
              (f"# {a.dim}-D exact mixture, linear T=1000; {a.noises} noises, 2/3 train, 1/3 held out; "
               f"{a.candidates} log-SNR candidates, teacher dpmpp_3m × 8 substeps; errors: RMS vs the teacher's "
               "endpoint"),
              ("# ratios: held-out RMS error / best fixed spacing's held-out RMS (train ref/fix: the same on the "
               "training noises; median ref/fix: median per-sample held-out error / the best fixed spacing's median)"),
              ""]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write("\n".join(header + lines) + "\n\n")


if __name__ == "__main__":
    main()
