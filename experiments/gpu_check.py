"""The GPU checks, prepared as one script for a session that is lent a device machine (CI has no GPU).

Needs only what the library needs (torch, numpy, tqdm: what the device image holds), so it runs there without
carried wheels: ``PYTHONPATH=src python experiments/gpu_check.py --out $OUT/gpu_check.txt`` (about a minute on an
H200 after torch's start). ``--device cpu`` runs the same code here, against itself, to try the script.

1. **Agreement, device against CPU**: every sampler (20 steps; heun 10; adaptive at rtol 0.01) on the exact 64-D,
   10-component mixture (`ExactEpsilon`, float32), 4,096 noises drawn on the CPU, the same seeded *CPU* generator on
   both sides — so the stochastic samplers draw on the generator's device and move the noise (core.noise.randn) —
   and per-sample levels (a (B, K) spacing) for dpmpp_2m and ddpm: each side's float32 error against the CPU's
   float64 run (the two sides differ in rounding only; a wrong device path shows as O(1)).
2. **Fused against eager on the device** (``fuse=True``: torch.compile, Triton on a GPU): as accurate as eager
   float32 against the float64 run, and the compile time.
3. **Overhead on the device**: ms per model call outside the network (a zero-cost model returning one of six
   preallocated outputs in turn) for every fixed-step sampler, eager and fused, at 10,000 × 64 and at
   256 × 3 × 64 × 64 float32, next to one fused elementwise pass (``torch.add(x, y, alpha=a, out=buf)``) and one
   noise draw on the device's generator — synchronised wall time, median of 5 runs of 50 steps; and ddpm with the
   seeded CPU generator (the draw on the CPU and a copy per step) against a generator on the device.

Exits 1 if a check of 1 or 2 fails (tolerance printed with each row).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from sampler_accuracy import make_mixture

import diffsteps as ds

STEPS, SEED, NOISE_SEED = 20, 1, 0
TOL_NOISY = 1e-4  # relative RMS between two float32 runs of a noise-drawing sampler (rounding amplified by 20 steps)


def mixture_model() -> tuple[torch.nn.Module, ds.Schedule]:
    """The exact model of sampler_accuracy.py's 64-D, 10-component mixture (it runs on its input's device)."""
    schedule = ds.make_schedule("linear", 1000)
    return ds.ExactEpsilon(make_mixture(), schedule), schedule


def _cases() -> list[tuple[str, str, dict]]:
    """(label, sampler, options) for the agreement check."""
    out = []
    for name, spec in ds.SAMPLERS.items():
        if spec.adaptive:
            out.append((f"{name} rtol=0.01", name, {"rtol": 0.01}))
        else:
            out.append((name, name, {"steps": STEPS // 2 if name == "heun" else STEPS}))
    out.append(("ddim eta=1", "ddim", {"steps": STEPS, "eta": 1.0}))
    return out


def _draws(name: str, opts: dict) -> bool:
    return ds.SAMPLERS[name].stochastic or bool(opts.get("eta", 0.0))


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).square().mean().sqrt().item()


def _judge(err: float, base: float, scale: float, factor: float) -> bool:
    """As accurate as the float32 run it is compared with, up to ``factor`` (two float32 roundings of the same sums
    differ by up to about twice one's error; another processor's exp and log add their own last bits)."""
    return err <= factor * base + 1e-6 * scale


def agreement(device: torch.device, lines: list[str]) -> bool:
    model, schedule = mixture_model()
    noise = torch.randn(4096, 64, generator=torch.Generator().manual_seed(NOISE_SEED))
    ok = True
    lines += ["## 1. device against CPU (same noise, the same seeded CPU generator on both sides)", "",
              "RMS error of each side's float32 run against the CPU's float64 run; the device passes when its error is "
              "at most 3 × the CPU's + 1e-6 × the data's RMS. The samplers that draw noise (a float64 run draws other "
              f"numbers) pass when the two float32 runs differ by at most {TOL_NOISY:g} × the data's RMS.", "",
              "| case | device error | CPU error | device vs CPU | passes | NFE (device, CPU) | seconds (device, CPU) |",
              "|---|---|---|---|---|---|---|"]
    cases = [(label, name, opts, None) for label, name, opts in _cases()]
    for name in ("dpmpp_2m", "ddpm"):  # per-sample levels: every row its own (here: the same) timesteps
        rows = ds.make_timesteps("trailing", STEPS, schedule).expand(len(noise), STEPS).clone()
        cases.append((f"{name}, per-sample levels", name, {}, rows))
    for label, name, opts, rows in cases:
        runs = []
        for dev, dtype in ((device, torch.float32), (torch.device("cpu"), torch.float32),
                           (torch.device("cpu"), torch.float64)):
            kw = dict(opts)
            if rows is not None:
                kw["spacing"] = rows.to(dev)
            t0 = time.perf_counter()
            r = ds.sample(model, noise.to(dev, dtype), schedule=schedule, sampler=name, return_info=True,
                          generator=torch.Generator().manual_seed(SEED), **kw)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            runs.append((r, time.perf_counter() - t0))
        (rd, sd), (rc, sc), (ref, _) = runs
        scale = ref.sample.square().mean().sqrt().item()
        apart = _rms(rd.sample, rc.sample)
        if _draws(name, opts):  # a float64 run draws other numbers: the two float32 runs against each other
            e_dev = e_cpu = math.nan
            good = apart <= TOL_NOISY * scale
        else:
            e_dev, e_cpu = _rms(rd.sample, ref.sample), _rms(rc.sample, ref.sample)
            good = _judge(e_dev, e_cpu, scale, 3.0)
        good &= rd.sample.device.type == device.type
        ok &= good
        lines.append(f"| {label} | {e_dev:.2e} | {e_cpu:.2e} | {apart:.2e} | "
                     f"{'yes' if good else '**no**'} | {rd.nfe}, {rc.nfe} | {sd:.2f}, {sc:.2f} |")
        print(lines[-1], flush=True)
    return ok


def fused_vs_eager(device: torch.device, lines: list[str]) -> bool:
    from diffsteps.sampling.arith import fused_available

    model, schedule = mixture_model()
    noise = torch.randn(4096, 64, generator=torch.Generator().manual_seed(NOISE_SEED)).to(device)
    can, why = fused_available()
    lines += ["", "## 2. fused (torch.compile) against eager, on the device", ""]
    if not can:
        lines.append(f"not available: {why}")
        return True
    lines += ["RMS error against the eager float64 run on the device; fused passes when its error is at most 2 × "
              "eager float32's + 1e-6 × the data's RMS (tests/test_arith.py's criterion).", "",
              f"(ddpm draws noise: fused against eager float32, at most {TOL_NOISY:g} × the data's RMS apart.)", "",
              "| sampler | fused error | eager error | passes | first (compiling) run, s |", "|---|---|---|---|---|"]
    ok = True
    for name in ("ddim", "ddpm", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "heun"):
        steps = STEPS // 2 if name == "heun" else STEPS

        def run(x, fuse=False):
            return ds.sample(model, x, schedule=schedule, sampler=name, steps=steps, fuse=fuse,
                             generator=torch.Generator(device).manual_seed(SEED))
        ref, eager = run(noise.double()), run(noise)
        t0 = time.perf_counter()
        fused = run(noise, fuse=True)
        secs = time.perf_counter() - t0
        scale = ref.square().mean().sqrt().item()
        if _draws(name, {}):  # as in check 1: fused against eager float32, same noise
            e_f, e_e = _rms(fused, eager), math.nan
            good = e_f <= TOL_NOISY * scale
        else:
            e_f, e_e = _rms(fused, ref), _rms(eager, ref)
            good = _judge(e_f, e_e, scale, 2.0)
        ok &= good
        lines.append(f"| {name} | {e_f:.2e} | {e_e:.2e} | {'yes' if good else '**no**'} | {secs:.1f} |")
        print(lines[-1], flush=True)
    return ok


def overhead(device: torch.device, lines: list[str], repeats: int = 5) -> None:
    from diffsteps.sampling.arith import fused_available

    schedule = ds.make_schedule("linear", 1000)
    can, _ = fused_available()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    lines += ["", "## 3. overhead on the device (ms per model call outside the network; synchronised wall time, "
              f"median of {repeats} runs of 50 trailing steps)", ""]
    for shape in ((10_000, 64), (256, 3, 64, 64)):
        g = torch.Generator(device).manual_seed(0)
        x = torch.randn(shape, generator=g, device=device)
        outs = [torch.randn(shape, generator=g, device=device) for _ in range(6)]
        calls = [0]

        def model(x, t):
            calls[0] += 1
            return outs[calls[0] % 6]

        def timed(fn) -> float:
            fn()
            sync()
            ts = []
            for _ in range(repeats):
                calls[0] = 0
                t0 = time.perf_counter()
                n = fn()
                sync()
                ts.append((time.perf_counter() - t0) / n)
            return statistics.median(ts)

        buf = torch.empty_like(x)

        def one_pass():
            for _ in range(50):
                torch.add(x, outs[0], alpha=0.5, out=buf)
            return 50

        def one_draw():
            for _ in range(50):
                torch.randn(shape, generator=g, device=device, out=buf)
            return 50

        def ours(name, fuse, gen_device=device):
            def run():
                r = ds.sample(model, x, schedule=schedule, sampler=name, steps=50, fuse=fuse, return_info=True,
                              generator=torch.Generator(gen_device).manual_seed(1))
                return r.nfe
            return run

        p, z = timed(one_pass), timed(one_draw)
        lines += ["", f"### {' × '.join(map(str, shape))} float32: one fused pass {p * 1e3:.4f} ms, one noise draw "
                  f"{z * 1e3:.4f} ms", "", "| sampler | eager (ms) | fused (ms) | eager / pass | fused / pass |",
                  "|---|---|---|---|---|"]
        for name, spec in ds.SAMPLERS.items():
            if spec.adaptive:
                continue
            a = timed(ours(name, False))
            c = timed(ours(name, True)) if can else math.nan
            lines.append(f"| {name} | {a * 1e3:.4f} | {c * 1e3:.4f} | {a / p:.1f} | {c / p:.1f} |")
            print(lines[-1], flush=True)
        if device.type != "cpu":
            cpu_gen = timed(ours("ddpm", False, gen_device="cpu"))
            lines += ["", f"ddpm with a seeded CPU generator (drawn on the CPU, copied per step): "
                      f"{cpu_gen * 1e3:.4f} ms per call, against {timed(ours('ddpm', False)) * 1e3:.4f} ms with a "
                      "generator on the device", ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    p.add_argument("--skip", nargs="*", default=[], choices=["agreement", "fused", "overhead"])
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on the device machine, or --device cpu to try the script")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# gpu_check: {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             ""]
    ok = True
    if "agreement" not in args.skip:
        ok &= agreement(device, lines)
    if "fused" not in args.skip:
        ok &= fused_vs_eager(device, lines)
    if "overhead" not in args.skip:
        overhead(device, lines)
    lines += ["", f"checks: {'all passed' if ok else 'FAILED'}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
