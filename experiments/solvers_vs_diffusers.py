"""The project's deterministic samplers against diffusers' schedulers: RMS error to the exact probability-flow ODE
solution from the same noise, at NFE 5, 10, 20, 50, 100.

Data: the 10-component Gaussian mixture in D = 64 of ``sampler_accuracy.py`` (linear schedule, T = 1000); the
model is the closed-form ε-predictor, evaluated in float64 at exactly the noise level each side's step formula
assumes (diffusers' σ-based schedulers — DPM-Solver, UniPC, Euler, Heun, LMS — get ε at their own σ, not at a
rounded timestep), so every error is the solver's own. Every setting starts from the same x at t = 999.

Reference (a converged solve, checked by a second one): UniPC order 3 and iPNDM, both ``final="ode"`` without
``lower_order_final``, at 1000 karras steps — they must agree to far below the errors measured. Two endpoints:
"σ = 0" (the ODE solution at the data) and "t = 0" (the state at the first training level, ᾱ_0, where diffusers'
PNDM/PLMS end by default, ``set_alpha_to_one=False``). Each setting is compared with the truth at its own endpoint:
samplers ending in x̂_0 of the last level (DDIM, DPM-Solver, UniPC, Euler, ``final="tweedie"``) claim σ = 0 and
are measured there, so their O(σ̃_min²) endpoint error counts.

NFE accounting: Heun (both sides) 2·steps − 1; PLMS steps + 1; PNDM steps + 9 (3 Runge–Kutta steps of 4 calls);
a setting whose NFE cannot hit the target exactly takes the largest NFE ≤ the target (shown in parentheses).

Run: ``python experiments/solvers_vs_diffusers.py [--n 2000] [--out docs/benchmarks/solvers_vs_diffusers.txt]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch

import diffsteps as ds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler_accuracy import make_mixture

NFES = (5, 10, 20, 50, 100)
T = 1000
warnings.filterwarnings("ignore")


# -- ours -----------------------------------------------------------------------------------------------------------
def ours_settings():
    """(label, sampler, spacing, options, steps_for(nfe) -> steps or None)."""
    one = lambda n: n
    out = []
    for spacing in ("trailing", "karras", "logsnr"):
        out.append((f"ddim {spacing}", "ddim", spacing, {}, one))
        out.append((f"heun {spacing}", "heun", spacing, {}, lambda n: (n + 1) // 2))
        out.append((f"plms {spacing}", "plms", spacing, {}, lambda n: n - 1 if n > 1 else None))
        for name, opts in (("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"order": 2}), ("unipc", {"order": 3}),
                           ("unipc", {"order": 3, "variant": "bh1"}), ("ipndm", {})):
            tag = name + "".join(f" {k}={v}" for k, v in opts.items())
            out.append((f"{tag} {spacing}", name, spacing, opts, one))
            out.append((f"{tag} {spacing} lof=F ode", name, spacing,
                        {**opts, "lower_order_final": False, "final": "ode"}, one))
    return out


def run_ours(model, schedule, noise, sampler, spacing, opts, steps):
    r = ds.sample(model, noise, schedule=schedule, sampler=sampler, steps=steps, spacing=spacing, return_info=True,
                  **opts)
    return r.sample, r.nfe, "σ = 0"


# -- diffusers ------------------------------------------------------------------------------------------------------
def diffusers_settings():
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        LMSDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )
    # β range explicit: HeunDiscreteScheduler defaults to Stable Diffusion's 0.00085 … 0.012
    base = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    one = lambda n: n
    out = []
    for sp in ("trailing", "linspace"):
        out.append((f"DDIM {sp}", lambda sp=sp: DDIMScheduler(**base, timestep_spacing=sp, clip_sample=False), one))
        out.append((f"PLMS {sp}", lambda sp=sp: PNDMScheduler(**base, timestep_spacing=sp, skip_prk_steps=True),
                    lambda n: n - 1))
        out.append((f"PLMS {sp} alpha_to_one", lambda sp=sp: PNDMScheduler(
            **base, timestep_spacing=sp, skip_prk_steps=True, set_alpha_to_one=True), lambda n: n - 1))
        out.append((f"PNDM {sp}", lambda sp=sp: PNDMScheduler(**base, timestep_spacing=sp),
                    lambda n: n - 9 if n - 9 >= 4 else None))
    for sp, kar in (("trailing", False), ("linspace", False), ("linspace", True)):
        tag = f"{sp}{' karras' if kar else ''}"
        out.append((f"DPM++2M {tag}", lambda sp=sp, kar=kar: DPMSolverMultistepScheduler(
            **base, timestep_spacing=sp, use_karras_sigmas=kar, algorithm_type="dpmsolver++", solver_order=2), one))
        for order in (2, 3):
            out.append((f"UniPC bh2 order {order} {tag}", lambda sp=sp, kar=kar, order=order: UniPCMultistepScheduler(
                **base, timestep_spacing=sp, use_karras_sigmas=kar, solver_order=order), one))
        out.append((f"LMS {tag}", lambda sp=sp, kar=kar: LMSDiscreteScheduler(
            **base, timestep_spacing=sp, use_karras_sigmas=kar), one))
        out.append((f"Euler {tag}", lambda sp=sp, kar=kar: EulerDiscreteScheduler(
            **base, timestep_spacing=sp, use_karras_sigmas=kar), one))
        out.append((f"Heun {tag}", lambda sp=sp, kar=kar: HeunDiscreteScheduler(
            **base, timestep_spacing=sp, use_karras_sigmas=kar), lambda n: (n + 1) // 2))
    return out


def run_diffusers(mixture, schedule, noise, make, steps):
    """The standard diffusers loop. The model gets ε at the ᾱ the scheduler's step assumes: from its σ where it
    steps in σ (σ-based schedulers), from the (float64) ᾱ table at its integer t otherwise."""
    sch = make()
    sch.set_timesteps(steps)
    sigma_based = hasattr(sch, "sigmas") and not (sch is None) and type(sch).__name__ not in (
        "DDIMScheduler", "PNDMScheduler")
    abar_table = schedule.alphas_cumprod
    x = noise * float(getattr(sch, "init_noise_sigma", 1.0))
    if sigma_based and type(sch).__name__ in ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler"):
        x = noise * math.sqrt(float(sch.sigmas[0]) ** 2 + 1)  # x̃ = x/α at the first σ
    nfe = 0
    for i, t in enumerate(sch.timesteps):
        if sigma_based:
            idx = i if getattr(sch, "step_index", None) is None else sch.step_index
            s = float(sch.sigmas[idx].double())
            abar = torch.tensor([1.0 / (1.0 + s * s)], dtype=torch.float64)
        else:
            abar = abar_table[int(t)].reshape(1)
        inp = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
        eps = mixture.eps(inp.to(torch.float64), abar)
        nfe += 1
        x = sch.step(eps.to(x.dtype), t, x).prev_sample
    end = "t = 0" if type(sch).__name__ == "PNDMScheduler" and not sch.config.set_alpha_to_one else "σ = 0"
    return x, nfe, end


# -- the table ------------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--ref-steps", type=int, default=1000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    lines: list[str] = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    schedule = ds.make_schedule("linear", T)
    mixture = make_mixture()
    model = ds.ExactEpsilon(mixture, schedule)
    noise = torch.randn(args.n, mixture.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t0 = time.perf_counter()
    kw = dict(schedule=schedule, spacing="karras", steps=args.ref_steps, lower_order_final=False)
    ref0 = ds.sample(model, noise, sampler="unipc", order=3, final="ode", **kw)
    chk0 = ds.sample(model, noise, sampler="ipndm", final="ode", **kw)
    ref_t0 = ds.sample(model, noise, sampler="unipc", order=3, denoise_final=False, **kw)
    chk_t0 = ds.sample(model, noise, sampler="ipndm", denoise_final=False, **kw)
    a0 = schedule.alphas_cumprod[0].item()  # x̂_0 of the exact t = 0 state: what a perfect 'tweedie' run returns
    tweedie_ref = (ref_t0 - math.sqrt(1 - a0) * model(ref_t0, torch.zeros(args.n, dtype=torch.float64))) / math.sqrt(a0)
    refs = {"σ = 0": ref0, "t = 0": ref_t0}

    def rms(a, b):
        return (a - b).square().mean().sqrt().item()

    say(f"# Solvers vs diffusers: RMS error to the exact ODE solution (mixture D = 64, K = 10, linear, N = {args.n})")
    say()
    say(f"reference: unipc-3 vs ipndm, final='ode', {args.ref_steps} karras steps: RMS {rms(ref0, chk0):.1e} at σ = 0,"
        f" {rms(ref_t0, chk_t0):.1e} at t = 0 (data RMS {ref0.square().mean().sqrt():.2f}); x̂_0 at t = 0 vs the "
        f"σ = 0 solution (the 'tweedie' endpoint error): {rms(tweedie_ref, ref0):.1e}  [{time.perf_counter() - t0:.0f} s]")
    say()
    results: dict[tuple[str, str], list] = {}
    for side, settings in (("ours", ours_settings()), ("diffusers", diffusers_settings())):
        for setting in settings:
            label, cells = setting[0], []
            for nfe in NFES:
                steps = setting[-1](nfe)
                if steps is None or steps < 1:
                    cells.append(None)
                    continue
                try:
                    if side == "ours":
                        x, used, end = run_ours(model, schedule, noise, setting[1], setting[2], setting[3], steps)
                    else:
                        x, used, end = run_diffusers(mixture, schedule, noise, setting[1], steps)
                except Exception as e:  # a scheduler that cannot run this many steps
                    cells.append(("err", type(e).__name__))
                    continue
                err = rms(x, refs[end]) if torch.isfinite(x).all() else math.inf
                cells.append((err, used, end))
            results[side, label] = cells
            print(side, label, [c if c is None or c[0] == "err" else f"{c[0]:.2e}" for c in cells], flush=True)
    best = {}
    for side in ("ours", "diffusers"):
        for j in range(len(NFES)):
            vals = [(c[j][0], k) for (s, k), c in results.items() if s == side and c[j] and c[j][0] != "err"]
            best[side, j] = min(vals)
    say("| setting | endpoint | " + " | ".join(f"NFE {k}" for k in NFES) + " |")
    say("|---|---|" + "---|" * len(NFES))
    for side in ("ours", "diffusers"):
        for (s, label), cells in results.items():
            if s != side:
                continue
            end = next((c[2] for c in cells if c and c[0] != "err"), "")
            txt = []
            for j, c in enumerate(cells):
                if c is None:
                    txt.append("–")
                elif c[0] == "err":
                    txt.append(c[1])
                else:
                    mark = " **best**" if best[side, j][1] == label else ""
                    txt.append(f"{c[0]:.2e}" + ("" if c[1] == NFES[j] else f" ({c[1]})") + mark)
            say(f"| {side}: {label} | {end} | " + " | ".join(txt) + " |")
    say()
    say("| NFE | " + " | ".join(str(k) for k in NFES) + " |")
    say("|---|" + "---|" * len(NFES))
    for side in ("ours", "diffusers"):
        say(f"| best of {side} | " + " | ".join(f"{best[side, j][0]:.2e} ({best[side, j][1]})"
                                               for j in range(len(NFES))) + " |")
    say("| ours / diffusers | " + " | ".join(f"{best['ours', j][0] / best['diffusers', j][0]:.2f}"
                                             for j in range(len(NFES))) + " |")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
