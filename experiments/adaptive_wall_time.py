"""Where the adaptive sampler's wall time goes, per-sample against batch control: the model, and everything else.

The issue-12 claim is that with per-sample control samples that have arrived leave the batch, so wall time follows
the mean NFE (the rows evaluated), not the maximum. This times both controllers on the 64-D mixture of
``sampler_accuracy.py`` at one rtol, splitting each run into the model's own seconds (timed inside its forward) and
the rest (the sampler: the embedded pair, the error norm, the controller, compaction), for two models:

- ``exact``: the closed-form ε (:class:`~diffsteps.ExactEpsilon`). Its cost per row grows with per-sample t: with
  one t for the batch the log-determinants of the K noised components are computed once, with a t per row once per
  row (B·K·D logarithms).
- ``exact + MLP``: the same ε plus 0 × a 64 → ``--width`` → ``--width`` → 64 SiLU MLP of the input, so the steps
  and results are the exact model's and the cost per row is a network's, the same whatever t is.

Three controls: batch, per-sample, and per-sample with the spike re-solve (whose re-solved samples make the maximum
NFE twice the mean: without compaction the batch would cost that). The clock is the thread's CPU time (on a shared
2-core machine wall time also counts waiting for a core); each number is the median of ``--repeats`` runs, the
controls interleaved, after one warm-up each; one thread. Run:
``python experiments/adaptive_wall_time.py [--batches 256 4096] [--rtol 0.01] [--width 512]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from adaptive_sampler import ATOL_PER_RTOL
from sampler_accuracy import make_mixture

import diffsteps as ds


class Timed(torch.nn.Module):
    """A model that adds up the seconds spent in it, its calls and the rows it was given."""

    def __init__(self, inner: torch.nn.Module, width: int = 0):
        super().__init__()
        self.inner = inner
        self.mlp = None
        if width:
            g = torch.Generator().manual_seed(0)
            dims = (64, width, width, 64)
            self.mlp = [(torch.randn(a, b, generator=g, dtype=torch.float64) / a**0.5) for a, b in zip(dims, dims[1:])]
        self.seconds, self.net_seconds, self.rows, self.calls = 0.0, 0.0, 0, 0

    def forward(self, x, t, **kw):
        t0 = time.thread_time()
        out = self.inner(x, t, **kw)
        if self.mlp is not None:
            t1 = time.thread_time()
            h = x
            for i, w in enumerate(self.mlp):
                h = h @ w
                if i < len(self.mlp) - 1:
                    h = torch.nn.functional.silu(h)
            out = out + 0.0 * h
            self.net_seconds += time.thread_time() - t1
        self.seconds += time.thread_time() - t0
        self.rows += len(x)
        self.calls += 1
        return out


CONTROLS = {"batch": {"control": "batch"}, "sample": {}, "sample, spike re-solve 8": {"resolve_spike": 8.0}}


def once(model: Timed, noise, schedule, rtol, options) -> tuple:
    """One run: (CPU seconds in all, in the model, in its MLP, rows, calls, mean NFE, max NFE)."""
    model.seconds, model.net_seconds, model.rows, model.calls = 0.0, 0.0, 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t0 = time.thread_time()
        r = ds.sample(model, noise, schedule=schedule, sampler="adaptive", rtol=rtol, atol=ATOL_PER_RTOL * rtol,
                      return_info=True, **options)
        total = time.thread_time() - t0
    return (total, model.seconds, model.net_seconds, model.rows, model.calls, r.nfe_per_sample.double().mean().item(),
            r.nfe_per_sample.max().item())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--rtol", type=float, default=0.01)
    p.add_argument("--width", type=int, default=512, help="hidden width of the MLP that gives the model its cost")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    schedule = ds.make_schedule("linear", 1000)
    exact = ds.ExactEpsilon(make_mixture(), schedule)
    print(f"adaptive sampler, rtol {args.rtol:g}, atol {ATOL_PER_RTOL * args.rtol:.2g}; CPU seconds of the thread "
          f"(time.thread_time), median of {args.repeats} runs with the controls interleaved, after one warm-up each; "
          f"one thread; torch {torch.__version__}\n")
    print("| model | batch | control | mean NFE | max NFE | rows evaluated | CPU s | model s | rest s | model µs / row "
          "| MLP µs / row | rest ms / call | CPU s / batch control's | mean NFE / batch's | max NFE / batch's |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, width in (("exact", 0), (f"exact + MLP {args.width}", args.width)):
        model = Timed(exact, width)
        for B in args.batches:
            noise = torch.randn(B, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            for options in CONTROLS.values():
                once(model, noise, schedule, args.rtol, options)
            runs = {c: [] for c in CONTROLS}
            for _ in range(args.repeats):
                for c, options in CONTROLS.items():
                    runs[c].append(once(model, noise, schedule, args.rtol, options))
            med = {c: [statistics.median(v) for v in zip(*r)] for c, r in runs.items()}
            base = med["batch"]
            for c, (total, secs, net, rows, calls, mean_nfe, max_nfe) in med.items():
                mlp = f"{1e6 * net / rows:.1f}" if width else "–"
                print(f"| {name} | {B} | {c} | {mean_nfe:.1f} | {max_nfe:.0f} | {rows:.0f} | {total:.2f} | "
                      f"{secs:.2f} | {total - secs:.2f} | {1e6 * secs / rows:.1f} | {mlp} | "
                      f"{1e3 * (total - secs) / calls:.2f} | {total / base[0]:.2f} | {mean_nfe / base[5]:.2f} | "
                      f"{max_nfe / base[6]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
