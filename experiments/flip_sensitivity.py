"""Can a per-sample controller see the mode flips coming? The flow's sensitivity along the reference trajectories of
the exact 64-D mixture, and what re-solving the sensitive samples would cost.

Issue 12 asks per-sample control to need fewer model calls than batch control at the same error. On the RMS error it
does not (docs/solvers.md): the RMS over 10,000 noises is a count of the 1–3 samples that end in another mixture
component than the reference ("flips"), and those samples are decided late, where a local error estimate does not
see an error's growth. A perturbation δ of x̃ = x/α grows along the probability flow as dδ/dλ = (J − I) δ with
J = ∂x̂₀/∂x̃ = Cov[x₀ | x̃]/σ̃² (Tweedie), so by e^{(μ−1)Δλ} in the direction of J's largest eigenvalue μ.

This script measures, on the noises of ``adaptive_sampler.py`` (seed 0, 10,000; the same reference: DPM-Solver++(3M)
at 1000 log-SNR steps):

1. μ exactly (the Jacobian of the closed-form x̂₀ by autograd) along the reference trajectories at λ checkpoints, and
   the rank of the flipping samples' μ among all 10,000 — is a flipping sample sensitive before it flips?
2. what a model-agnostic probe sees: the Rayleigh quotient vᵀJv of a finite-difference Jacobian-vector product (one
   model call) along v = the change of x̂₀ since the previous checkpoint (the direction the posterior moves), and
   after three steps of power iteration from a random v (three calls) — the ranks of the flipping samples by each;
3. what "probe, then re-solve the sensitive ones" would buy: the default controller at rtol r (per-sample, and batch),
   plus the probe's calls for every sample, plus a re-solve at rtol r/f of the samples it flags — flagged by the
   *exact* μ at λ = −0.5 (the top fraction: an oracle no controller has), or by the three-call power-iteration
   probe above μ̂ ≥ 4 (per sample, so no batch dependence). The probe is taken on the reference trajectory's state
   at λ = −0.5 (the controllers' own states there lie within their errors, ≤ 1e-3, of it) — an estimate of a policy
   that is not built, to decide whether to build it. Mean NFE, RMS, p90 and flips.

    PYTHONPATH=experiments python experiments/flip_sensitivity.py   # ≈ 6 min on one thread

Prints the tables recorded in docs/benchmarks/flip_sensitivity.txt.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from sampler_accuracy import make_mixture
from scipy.stats import spearmanr

import diffsteps as ds

CHECKPOINTS = (-2.0, -1.5, -1.2, -1.0, -0.8, -0.5, 0.0)


def trajectory_states(model, schedule, noise) -> tuple[dict[float, tuple[torch.Tensor, int]], torch.Tensor]:
    """The reference solve (adaptive_sampler.py's): its state at the first of its 1000 log-SNR levels past each
    checkpoint λ (and that level), and its endpoint."""
    abar = schedule.alphas_cumprod.double()
    states: dict[float, tuple[torch.Tensor, int]] = {}

    def keep(info):
        if info.t_next < 0:
            return
        a = abar[int(round(float(info.t_next)))]
        lam = 0.5 * math.log(a / (1 - a))
        for c in CHECKPOINTS:
            if c not in states and lam >= c:
                states[c] = (info.x.clone(), int(round(float(info.t_next))))

    ref = ds.sample(model, noise, schedule=schedule, sampler="dpmpp_3m", steps=1000, spacing="logsnr", callback=keep)
    return states, ref


def denoised(model, schedule, x: torch.Tensor, t: int) -> torch.Tensor:
    a = schedule.alphas_cumprod.double()[t]
    eps = model(x, torch.full((x.shape[0],), float(t), dtype=torch.float64))
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def top_eigenvalue(model, schedule, x: torch.Tensor, t: int, chunk: int = 1000) -> torch.Tensor:
    """μ: the largest eigenvalue of ∂x̂₀/∂x̃ (symmetrised; x = √ᾱ x̃) per sample, by autograd."""
    root = schedule.alphas_cumprod.double()[t].sqrt()
    out = []
    for rows in torch.split(torch.arange(len(x)), chunk):
        xc = x[rows].clone().requires_grad_(True)
        y = denoised(model, schedule, xc, t)
        jac = torch.stack([torch.autograd.grad(y[:, k].sum(), xc, retain_graph=True)[0]
                           for k in range(y.shape[1])], 1) * root
        out.append(torch.linalg.eigvalsh(0.5 * (jac + jac.transpose(1, 2)))[:, -1])
    return torch.cat(out)


def jvp(model, schedule, x: torch.Tensor, t: int, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """J v for a unit v, from one extra model call: (x̂₀(x̃ + εv) − m)/ε, m = x̂₀(x̃), ε = 1e-6 |x̃|."""
    root = schedule.alphas_cumprod.double()[t].sqrt()
    eps = 1e-6 * (x / root).norm(dim=1, keepdim=True)
    return (denoised(model, schedule, x + root * eps * v, t) - m) / eps


def rayleigh(model, schedule, x: torch.Tensor, t: int, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """vᵀ J v / |v|² from one extra model call (m = x̂₀ at x)."""
    v = v / v.norm(dim=1, keepdim=True)
    return (jvp(model, schedule, x, t, m, v) * v).sum(1)


def power_probe(model, schedule, x: torch.Tensor, t: int, m: torch.Tensor, v: torch.Tensor,
                calls: int = 3) -> torch.Tensor:
    """vᵀJv after ``calls`` steps of power iteration v ← Jv from v (one model call each; m = x̂₀ at x): an estimate
    of μ from below that a controller could afford."""
    q = None
    for _ in range(calls):
        v = v / v.norm(dim=1, keepdim=True)
        jv = jvp(model, schedule, x, t, m, v)
        q, v = (jv * v).sum(1), jv
    return q


def rank(values: torch.Tensor, rows: list[int]) -> list[int]:
    """0 = the largest of all samples."""
    return [int((values > values[i]).sum()) for i in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10000)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    schedule = ds.make_schedule("linear", 1000)
    mixture = make_mixture()
    model = ds.ExactEpsilon(mixture, schedule)
    noise = torch.randn(args.n, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    states, ref = trajectory_states(model, schedule, noise)
    ref_mode = mixture.responsibilities(ref).argmax(1)

    def adaptive(x, rtol, control="sample"):
        r = ds.sample(model, x, schedule=schedule, sampler="adaptive", rtol=rtol, atol=0.156 * rtol, control=control,
                      return_info=True)
        return r.sample, r.nfe_per_sample.double()

    def summary(x, nfe) -> str:
        err = (x - ref).square().mean(1)
        flips = int((mixture.responsibilities(x).argmax(1) != ref_mode).sum())
        return (f"{nfe.mean():.2f} | {err.mean().sqrt():.2e} | {err.sqrt().quantile(0.9):.2e} | {flips}")

    x_flip, _ = adaptive(noise, 0.01)
    flips = (mixture.responsibilities(x_flip).argmax(1) != ref_mode).nonzero().flatten().tolist()
    print(f"# {args.n} noises (seed 0), exact 64-D mixture, linear T = 1000; the noises the default per-sample "
          f"controller flips at rtol 0.01: {flips}\n")
    mus = {}
    print("| λ | t | μ median | μ p99 | μ max | samples with μ > 2 | flipping samples' μ | their rank by μ (0 = "
          "largest) | rank by the probe along Δx̂₀ (Spearman with μ) | rank by 3 power-iteration calls (Spearman) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    previous = None
    gen = torch.Generator().manual_seed(1)
    for c in CHECKPOINTS:
        x, t = states[c]
        mu = mus[c] = top_eigenvalue(model, schedule, x, t)
        cells = [f"{c:+.1f}", str(t), f"{mu.median():.2f}", f"{mu.quantile(0.99):.2f}", f"{mu.max():.2f}",
                 str(int((mu > 2).sum())), ", ".join(f"{mu[i]:.2f}" for i in flips), str(rank(mu, flips))]
        if previous is None:
            cells += ["–", "–"]
        else:
            m = denoised(model, schedule, x, t)
            q = rayleigh(model, schedule, x, t, m, m - denoised(model, schedule, *previous))
            q_pow = power_probe(model, schedule, x, t, m, torch.randn(x.shape, generator=gen, dtype=x.dtype))
            if c == -0.5:
                probe = q_pow
            cells += [f"{rank(q, flips)} ({spearmanr(q, mu).statistic:.2f})",
                      f"{rank(q_pow, flips)} ({spearmanr(q_pow, mu).statistic:.2f})"]
        previous = (x, t)
        print("| " + " | ".join(cells) + " |", flush=True)

    flagged = (probe >= 4).nonzero().flatten()
    print(f"\nthe power-iteration probe at λ = −0.5 flags {len(flagged)} samples with μ̂ ≥ 4 "
          f"({len(flagged) / args.n:.1%}), the flipping ones {'all' if set(flips) <= set(flagged.tolist()) else 'not all'}")
    print("\n### probe, then re-solve: the top fraction by the exact μ at λ = −0.5 (oracle; one call counted for its "
          "probe), or the power-iteration probe's μ̂ ≥ 4 (three calls), re-solved at rtol / f by the same controller\n")
    print("| rtol | policy | mean NFE | RMS | p90 | flips |")
    print("|---|---|---|---|---|---|")
    order = mus[-0.5].argsort(descending=True)
    for rtol in (0.02, 0.01, 0.005):
        for control in ("sample", "batch"):
            x, nfe = adaptive(noise, rtol, control)
            print(f"| {rtol} | {control} | {summary(x, nfe)} |")
            rows = [(f"top {frac:.0%} by μ", order[:int(frac * args.n)], 1) for frac in (0.01, 0.03)]
            for label, top, calls in rows + [("μ̂ ≥ 4", flagged, 3)]:
                for f in (5, 10):
                    x2, n2 = x.clone(), nfe + calls
                    x2[top], extra = adaptive(noise[top], rtol / f, control)
                    n2[top] += extra
                    print(f"| {rtol} | {control} + {label} re-solved at rtol/{f} | {summary(x2, n2)} |", flush=True)
    print(f"\n[{time.perf_counter() - t0:.0f} s]")


if __name__ == "__main__":
    main()
