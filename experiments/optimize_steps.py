"""Optimised step schedules on the exact Gaussian mixture: GITS's DP and LD3-style refinement against the best fixed
spacing, per sampler and budget.

Model: :class:`~diffsteps.ExactEpsilon` for the 2-D three-mode mixture of tests/conftest.py (``--dim 16`` for a
16-D eight-mode one, ``--dim 64`` for the 10-component 64-D one of ``sampler_accuracy.py``), linear schedule,
T = 1000 — no training error, so every error is the sampler's own. For each
sampler and NFE, :func:`diffsteps.optimize_schedule` fits on the first 2/3 of ``--noises`` noises and reports the
RMS distance of the final sample from the teacher's endpoint (``--teacher-substeps`` dpmpp_3m steps between 48
log-SNR candidates) on the training noises and on the last 1/3, held out, and from the exact ODE solution (1000
log-SNR dpmpp_3m steps) on the held-out noises. Rows: the best of trailing/karras/logsnr/linspace on the held-out
noises (its name), DP, refine (LD3-style, from the DP path and the best fixed spacing; samplers with a differentiable
form), refine with decoupled model times (LD3's ``timesteps2``; dpmpp_2m, dpmpp_3m, unipc) and, with ``--methods
… dmn``, DMN's analytic bound (no model call; dpmpp_2m, dpmpp_3m, unipc), with ratios to the
best fixed spacing and the cost of each method in model calls and seconds (the teacher and DP costs are shared by all budgets
of a sampler and counted in each row; refine's include the DP it starts from).

Run: ``nice -n 10 python experiments/optimize_steps.py [--nfe 5 10 20] [--samplers dpmpp_2m unipc] [--noises 768]
[--dim 64] [--out docs/benchmarks/optimize_steps.txt]``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import diffsteps as ds
from diffsteps.core.spacings import make_timesteps
from diffsteps.sampling.api import ONE_CALL_PER_LEVEL
from diffsteps.steps.differentiable import DIFFERENTIABLE
from diffsteps.steps.dmn import DMN_SAMPLERS
from diffsteps.steps.teacher import candidate_timesteps, teacher_solve

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
    p.add_argument("--samplers", nargs="+", default=["dpmpp_2m", "ddim", "unipc"])
    p.add_argument("--noises", type=int, default=768)
    p.add_argument("--dim", type=int, default=2)
    p.add_argument("--candidates", type=int, default=48)
    p.add_argument("--teacher-substeps", type=int, default=8)
    p.add_argument("--ref-steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["dp", "refine", "refine, decoupled"],
                   choices=["dp", "refine", "refine, decoupled", "dmn"],
                   help="rows per sampler (refine and its decoupled form only where the sampler allows them; dmn: "
                        "dpmpp_2m, dpmpp_3m, unipc)")
    p.add_argument("--refine-init", default="best", help="refine's start: best (default), dp, dmn or a spacing")
    p.add_argument("--out", default="docs/benchmarks/optimize_steps.txt")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sch = ds.make_schedule("linear", 1000)
    model = ds.ExactEpsilon(mixture(a.dim), sch)
    noise = torch.randn(a.noises, a.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n_held = round(a.noises / 3)
    held = noise[-n_held:]
    t0 = time.perf_counter()
    # the exact ODE solution from the held-out noises, independent of the teacher's grid
    exact = ds.sample(model, held, schedule=sch, sampler="dpmpp_3m", steps=a.ref_steps, spacing="logsnr")
    ref_s = time.perf_counter() - t0
    common = {"noise": noise, "candidates": a.candidates, "holdout": 1 / 3, "iterations": 300, "patience": 6,
              "teacher_substeps": a.teacher_substeps}

    def vs_exact(smp, ts, rep=None):
        extra = {"model_timesteps": rep["model_timesteps"]} if rep and "model_timesteps" in rep else {}
        out = ds.sample(model, held, schedule=sch, sampler=smp, spacing=ts, **extra)
        return (out - exact).square().mean().sqrt().item()

    head = (f"{'sampler':<9} {'NFE':>3} {'schedule':<22} {'train':>7} {'held-out':>8} {'ratio':>6} "
            f"{'train ratio':>11} {'median ratio':>12} {'vs exact':>8} {'ratio':>6} {'calls':>7} {'s':>6}")
    lines = [head, "-" * len(head)]
    print(head, flush=True)
    teacher_vs_exact = []
    for smp in a.samplers:
        runs = {}
        if "dp" in a.methods:
            runs["dp"] = ds.optimize_schedule(model, sch, sampler=smp, nfe=a.nfe, method="dp", **common)
        if "refine" in a.methods and smp in DIFFERENTIABLE:
            runs["refine"] = ds.optimize_schedule(model, sch, sampler=smp, nfe=a.nfe, method="refine",
                                                  init=a.refine_init, **common)
        if "refine, decoupled" in a.methods and smp in ONE_CALL_PER_LEVEL:
            runs["refine, decoupled"] = ds.optimize_schedule(model, sch, sampler=smp, nfe=a.nfe, method="refine",
                                                             decoupled=True, init=a.refine_init, **common)
        if "dmn" in a.methods and smp in DMN_SAMPLERS:
            runs["dmn"] = ds.optimize_schedule(model, sch, sampler=smp, nfe=a.nfe, method="dmn", **common)
        if not runs:
            continue
        if not teacher_vs_exact:
            # the teacher's own endpoint against the exact solution, from the same held-out noises
            cand = candidate_timesteps(sch, a.candidates)
            te = teacher_solve(model, held, sch, cand, substeps=a.teacher_substeps)
            teacher_vs_exact.append((te.states[-1] - exact).square().mean().sqrt().item())
        for b, nfe in enumerate(a.nfe):
            d = next(iter(runs.values()))[b][1]  # every method reports the same fixed spacings
            best = d["best_fixed"]
            fx = d["fixed"][best]
            fx_exact = vs_exact(smp, make_timesteps(best, d["steps"], sch))
            line = (f"{smp:<9} {nfe:>3} {'fixed: ' + best:<22} {fx['train']:7.4f} {fx['heldout']:8.4f} {1:6.3f} "
                    f"{1:11.3f} {1:12.3f} {fx_exact:8.4f} {1:6.3f} {0:7d} {0:6.1f}")
            lines.append(line)
            print(line, flush=True)
            for name, res in runs.items():
                ts, r = res[b]
                e = vs_exact(smp, ts, r)
                line = (f"{smp:<9} {nfe:>3} {name:<22} {r['train_error']:7.4f} {r['heldout_error']:8.4f} "
                        f"{r['ratio']:6.3f} {r['train_error'] / fx['train']:11.3f} {r['median_ratio']:12.3f} "
                        f"{e:8.4f} {e / fx_exact:6.3f} {r['cost']['model_calls']:7d} {r['cost']['seconds']:6.1f}")
                lines.append(line)
                print(line, flush=True)
    header = [(f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'cpu'}, "
               f"torch {torch.__version__}, {a.threads} thread(s)"),
              f"# python {shlex.join(['experiments/optimize_steps.py', *sys.argv[1:]])}",
              (f"# {a.dim}-D exact mixture, linear T=1000; {a.noises} noises, 2/3 train, 1/3 held out; "
               f"{a.candidates} log-SNR candidates, teacher dpmpp_3m × {a.teacher_substeps} substeps; train, "
               "held-out: RMS vs the teacher's endpoint"),
              (f"# vs exact: held-out RMS vs the exact ODE solution ({a.ref_steps} log-SNR dpmpp_3m steps, "
               f"{ref_s:.0f} s); the teacher's endpoint is {teacher_vs_exact[0]:.1e} RMS from it"),
              ("# ratios: / the best fixed spacing of trailing, karras, logsnr, linspace (chosen on held-out RMS) at "
               "the same NFE; median ratio: median per-sample held-out error / the best fixed spacing's median; "
               "calls, s: the method's cost, the teacher and DP it starts from included"),
              ""]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write("\n".join(header + lines) + "\n\n")


if __name__ == "__main__":
    main()
