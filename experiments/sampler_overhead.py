"""Sampler overhead per model call, before and after a change to the samplers (today: the lean loops — coefficients
precomputed in float64, one scaling and fused multiply-adds per step, the Denoiser forming only x̂_0 or ε̂).

What is timed is everything ``diffsteps.sample`` does outside the network: a zero-cost model returns a fixed tensor,
so the time per model call is the sampler's arithmetic, the Denoiser's conversion and the bookkeeping. Two batches:
256 × 1×8×8 float32 (the digits images, as ``sampler_accuracy.py``'s overhead table) and 10,000 × 64 float32 (large
enough that the tensor arithmetic, not Python, dominates); one thread; 50 karras steps.

BEFORE is the code at ``--before`` (default 4f189ed, the commit before the lean loops; 5d2f75f is the one before the
sampling API), extracted with ``git archive``;
AFTER is this worktree. Each side runs in its own subprocess with PYTHONPATH pointing at its ``src``, the two sides
interleaved (rotating which goes first) ``--repeats`` times; the table reports the median over repeats of each
run's best-of-``inner`` time. A third process times AFTER with per-sample levels (a (B, K) ``spacing`` whose rows are
all the same karras sequence; the state is then float64). Both shared sides also log the ATen operators each run
dispatches (a TorchDispatchMode) and hash each sampler's output: the operator count per call measures the tensor work
free of timing noise (on a loaded 2-core machine the 10,000 × 64 timings, memory-bound, move by ±15% from run to run
and more under load), the same operator sequence says it is unchanged, and the same hash says the output is
bit-identical. A sampler only one side has gets "–" on the other.

    python experiments/sampler_overhead.py [--repeats 6] [--out docs/benchmarks/sampler_overhead.txt]

``--vs-diffusers``: in one process, back to back (interleaved, median over ``--repeats`` of best-of-3), every sampler
— eager, and with ``fuse=True`` (:mod:`diffsteps.sampling.arith`; compiled before timing, the compile time reported
once) — next to diffusers' scheduler for the same method (the standard ``set_timesteps`` / ``scale_model_input`` /
``step`` loop with the same zero-cost model), one fused elementwise pass over the state (``torch.add(x, y, alpha=a,
out=buf)``) and one noise draw (``torch.randn`` of the state's size, what ddpm and sde_euler add per step), at
10,000 × 64 float32, 50 steps, one thread; the table is appended to ``--out``. The clock is the thread's CPU time
(``time.thread_time``; page faults included): on a shared 2-core machine wall time also counts the time the
process waits for a core, which best-of-3 does not remove (``--clock wall`` for wall time).

    python experiments/sampler_overhead.py --vs-diffusers [--repeats 5] [--clock cpu] [--outputs 6]

``--outputs k``: the zero-cost model returns k preallocated tensors in turn (default 1: the same tensor every call).
With one, a multistep ε-solver's history is k copies of one buffer, which flatters it; k = 6 is what a network gives
(a new output per call), without the allocation. The table is appended under its own title (one per k).

``--fresh`` (with ``--outputs k``): the model writes its output before returning it, as a network does — a copy of
a fixed tensor into the next of k buffers — and the time it spends on that (the same clock, taken inside the model) is
subtracted from every run, ours and diffusers'. Without it, the k outputs were last written k calls earlier, so the
sampler reads the newest one from further out in memory than a network's fresh output; with it, that output is in
cache, but the copy also moves 5 MB through the cache. The history a multistep ε-solver reads is old either way.
Measured here (docs/solvers.md) the two settings give the same ratios to within the run-to-run spread.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"256 × 1×8×8": (256, 1, 8, 8), "10,000 × 64": (10_000, 64)}
STEPS = 50


def worker(inner: int, per_sample: bool) -> dict:
    """Runs inside the subprocess: per config and sampler, seconds per model call (best of ``inner``) and a hash of
    the output; with ``per_sample``, the same timesteps as a (B, K) table instead (a process of its own, so that its
    float64 buffers do not change the allocator's state — glibc's mmap threshold — under the shared timings)."""
    import torch

    import diffsteps as ds

    torch.set_num_threads(1)
    schedule = ds.make_schedule("linear", 1000)
    out: dict = {"file": ds.__file__, "torch": torch.__version__, "results": {}}
    for cname, shape in CONFIGS.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g)
        fixed = torch.randn(shape, generator=g)

        def model(x, t):  # zero cost: only the sampler is timed
            return fixed

        res = {}
        for name in ds.SAMPLERS:
            spacing, steps = "karras", STEPS
            if per_sample:
                planned = ds.plan_sampling(schedule, name, STEPS, "karras")[2]
                spacing, steps = planned[None].expand(shape[0], -1).clone(), None

            def run():
                return ds.sample(model, x, schedule=schedule, sampler=name, steps=steps, spacing=spacing,
                                 generator=torch.Generator().manual_seed(1), return_info=True)

            with _OpLog() as ops:
                first = run()
            res[name] = {"digest": hashlib.sha256(first.sample.numpy().tobytes()).hexdigest()[:16],
                         "ops": len(ops.names) / first.nfe,
                         "op_digest": hashlib.sha256("\n".join(ops.names).encode()).hexdigest()[:16],
                         "seconds": _best(run, inner) / first.nfe}
        out["results"][cname] = res
    return out


class _OpLog:
    """Records every ATen operator a run dispatches: the tensor work, free of timing noise."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        names = self.names = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                names.append(str(func))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _best(fn, inner: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(inner):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _run_side(src: Path, per_sample: bool, inner: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    flags = ["--per-sample"] if per_sample else []
    p = subprocess.run([sys.executable, __file__, "--worker", "--inner", str(inner), *flags], env=env,
                       cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if not Path(out["file"]).is_relative_to(src):  # an installed diffsteps must not shadow the side under test
        raise RuntimeError(f"the worker imported {out['file']}, not the code under {src}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--per-sample", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inner", type=int, default=3, help="timed runs per subprocess (best is kept)")
    ap.add_argument("--repeats", type=int, default=6, help="interleaved before/after subprocess runs (median)")
    ap.add_argument("--before", default="4f189ed", help="git commit of the BEFORE code")
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks/sampler_overhead.txt"))
    ap.add_argument("--vs-diffusers", action="store_true", help="ours next to diffusers' schedulers (module doc)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="--vs-diffusers: thread CPU or wall time")
    ap.add_argument("--outputs", type=int, default=1, help="--vs-diffusers: the model returns this many tensors in turn")
    ap.add_argument("--fresh", action="store_true", help="--vs-diffusers: the model writes each output (module doc)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.inner, args.per_sample)))
        return
    if args.vs_diffusers:
        text = vs_diffusers(args.repeats, time.thread_time if args.clock == "cpu" else time.perf_counter,
                            args.outputs, args.fresh)
        print(text)
        old = Path(args.out).read_text() if Path(args.out).exists() else ""
        Path(args.out).write_text((old.rstrip("\n") + "\n\n" if old else "") + text)
        return
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp)
        archive = subprocess.run(["git", "archive", args.before, "src"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        sides = {"before": (before / "src", False), "after": (ROOT / "src", False),
                 "per-sample": (ROOT / "src", True)}
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(args.repeats):
            order = list(sides)[r % 3:] + list(sides)[:r % 3]  # rotate who goes first
            for side in order:
                # per-sample timings are for information: one timed run each keeps the benchmark short
                runs[side].append(_run_side(*sides[side], 1 if side == "per-sample" else args.inner))
            print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    text = _table(runs, args)
    print(text)
    Path(args.out).write_text(text)


def _table(runs: dict[str, list[dict]], args) -> str:
    lines = [f"### sampler overhead per model call (ms), zero-cost model, {STEPS} karras steps, 1 thread",
             "",
             f"before = {args.before}, after = this branch; median over {args.repeats} interleaved subprocess runs of "
             f"the best of {args.inner}; torch {runs['after'][0]['torch']}. ratio = after / before (shared levels). "
             "per-sample = after with a (B, K) spacing (same rows; float64 state, tensor level coefficients), timed "
             "in a process of its own, one timed run per repeat. ATen ops = tensor operators dispatched per model "
             "call, whole sample() included (before → after); same ops: the two dispatch the identical operator "
             "sequence; bit-identical: their outputs hash the same.", ""]
    for cname in CONFIGS:
        lines += [f"#### batch {cname} float32", "",
                  "| sampler | before (ms) | after (ms) | ratio | after, per-sample (ms) | ATen ops / call | "
                  "same ops | bit-identical |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in runs["after"][0]["results"][cname]:
            if name not in runs["before"][0]["results"][cname]:  # new on this side
                r = runs["after"][0]["results"][cname][name]
                med = {s: statistics.median(r["results"][cname][name]["seconds"] for r in runs[s])
                       for s in ("after", "per-sample")}
                lines.append(f"| {name} | – | {med['after'] * 1e3:.3f} | – | {med['per-sample'] * 1e3:.3f} | "
                             f"– → {r['ops']:.1f} | – | – |")
                continue
            med = {s: statistics.median(r["results"][cname][name]["seconds"] for r in runs[s]) for s in runs}
            shared = [r["results"][cname][name] for side in ("before", "after") for r in runs[side]]
            same = {key: all(e[key] == shared[0][key] for e in shared) for key in ("digest", "op_digest")}
            ops = " → ".join(f"{runs[s][0]['results'][cname][name]['ops']:.1f}" for s in ("before", "after"))
            lines.append(f"| {name} | {med['before'] * 1e3:.3f} | {med['after'] * 1e3:.3f} | "
                         f"{med['after'] / med['before']:.2f} | {med['per-sample'] * 1e3:.3f} | {ops} | "
                         f"{'yes' if same['op_digest'] else 'NO'} | {'yes' if same['digest'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


VS_TITLE = "### ours vs diffusers"


def _diffusers_pairs():
    """sampler → (its options, a factory for diffusers' scheduler of the same method, or None where there is none)."""
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           HeunDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)
    base = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                timestep_spacing="trailing")
    return {
        "ddpm": ({}, lambda: DDPMScheduler(**base, clip_sample=False)),
        "ddim": ({}, lambda: DDIMScheduler(**base, clip_sample=False)),
        "euler": ({}, lambda: EulerDiscreteScheduler(**base)),
        "heun": ({}, lambda: HeunDiscreteScheduler(**base)),
        "sde_euler": ({}, None),
        "dpmpp_2m": ({}, lambda: DPMSolverMultistepScheduler(**base, solver_order=2)),
        "dpmpp_3m": ({}, lambda: DPMSolverMultistepScheduler(**base, solver_order=3)),
        "unipc": ({"order": 2}, lambda: UniPCMultistepScheduler(**base, solver_order=2)),
        "ipndm": ({}, lambda: LMSDiscreteScheduler(**base)),  # variable-step AB4 in σ̃: LMS is the same method
        "plms": ({}, lambda: PNDMScheduler(**base, skip_prk_steps=True)),
        "pndm": ({}, lambda: PNDMScheduler(**base, skip_prk_steps=False)),
    }


def vs_diffusers(repeats: int, clock=time.thread_time, outputs: int = 1, fresh: bool = False) -> str:
    import torch

    import diffsteps as ds
    from diffsteps.sampling.arith import fused_available

    torch.set_num_threads(1)
    shape = (10_000, 64)
    g = torch.Generator().manual_seed(0)
    x, fixed = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    turn = [fixed] + [torch.randn(shape, generator=g) for _ in range(outputs - 1)]
    if fresh:  # k buffers of their own, each overwritten with ``fixed`` when the model returns it
        turn = [torch.empty_like(fixed) for _ in range(outputs)]
    schedule = ds.make_schedule("linear", 1000)
    pairs = _diffusers_pairs()
    calls = [0]

    in_model = [0.0]  # --fresh: the clock time spent writing outputs, subtracted from each timed run

    def model(x, t):  # zero cost: one of ``outputs`` fixed tensors, in turn
        calls[0] += 1
        out = turn[calls[0] % outputs]
        if fresh:  # written now, as a network writes its output just before returning it
            t0 = clock()
            out.copy_(fixed)
            in_model[0] += clock() - t0
        return out

    def ours(name, opts, fuse=False):
        def run():
            r = ds.sample(model, x, schedule=schedule, sampler=name, steps=STEPS, spacing="trailing",
                          generator=torch.Generator().manual_seed(1), return_info=True, fuse=fuse, **opts)
            return r.nfe
        return run

    def theirs(make):
        def run():
            sch = make()
            sch.set_timesteps(STEPS)
            y, gen, n = x * float(getattr(sch, "init_noise_sigma", 1.0)), torch.Generator().manual_seed(1), 0
            for t in sch.timesteps:
                sch.scale_model_input(y, t)
                n += 1
                out = model(y, t)
                y = sch.step(out, t, y, generator=gen).prev_sample if "generator" in \
                    sch.step.__code__.co_varnames else sch.step(out, t, y).prev_sample
            return n
        return run

    buf = torch.empty_like(x)

    def fused():  # timed over as many passes as a sampler run takes steps: the same window for load to hit
        for _ in range(STEPS):
            torch.add(x, fixed, alpha=0.5, out=buf)
        return STEPS

    noise_g = torch.Generator().manual_seed(2)

    def noise():  # what ddpm and sde_euler draw per step, into a buffer: the generator alone
        for _ in range(STEPS):
            torch.randn(x.shape, generator=noise_g, out=buf)
        return STEPS

    def per_call(fn):
        n = fn()
        best = float("inf")
        for _ in range(3):
            in_model[0] = 0.0
            t0 = clock()
            fn()
            best = min(best, clock() - t0 - in_model[0])
        return best / n

    can_fuse, why = fused_available()
    t0 = time.perf_counter()
    for name, (opts, _) in pairs.items():  # compile every kernel the runs will use, outside the timings
        if can_fuse:
            ours(name, opts, fuse=True)()
    compile_s = time.perf_counter() - t0
    times: dict[str, list] = {name: [] for name in pairs}
    fused_t, noise_t = [], []
    for r in range(repeats):
        for name, (opts, make) in pairs.items():
            a = per_call(ours(name, opts))
            c = per_call(ours(name, opts, fuse=True)) if can_fuse else float("nan")
            b = per_call(theirs(make)) if make else float("nan")
            times[name].append((a, b, c))
        fused_t.append(per_call(fused))
        noise_t.append(per_call(noise))
        print(f"repeat {r + 1}/{repeats} done", file=sys.stderr)
    f, z = statistics.median(fused_t), statistics.median(noise_t)
    clock_name = "thread CPU time" if clock is time.thread_time else "wall time"
    returns = "the same tensor every call" if outputs == 1 else f"{outputs} tensors in turn"
    if fresh:
        returns += ", each written by the model just before it returns it (that copy's time subtracted)"
    lines = [VS_TITLE + f" (ms per model call, zero-cost model returning {returns}, 10,000 × 64 float32, {STEPS} "
             "trailing steps, 1 thread)",
             "", f"{clock_name}, median over {repeats} interleaved repeats of the best of 3; torch {torch.__version__}. "
             f"One fused elementwise pass over the state (torch.add(x, y, alpha=a, out=buf), {STEPS} in a row as a "
             f"sampler run has {STEPS} steps): {f * 1e3:.3f} ms. One noise draw (torch.randn of the state's size "
             f"into a buffer): {z * 1e3:.3f} ms = {z / f:.1f} passes. fused: the same sampler with fuse=True "
             + (f"(compiling every kernel of the 11 samplers first took {compile_s:.1f} s in this process). "
                if can_fuse else f"(not available here: {why}). ")
             + "diffusers: the same method's scheduler "
             "(ipndm ↔ LMSDiscrete, plms ↔ PNDM skip_prk_steps, pndm ↔ PNDM, unipc order 2 ↔ UniPC order 2), its "
             "standard loop with scale_model_input. Targets: ours ≤ 0.5 × diffusers, ours ≤ 3 × the fused pass. "
             f"Without the draw (stochastic samplers): the time less {STEPS - 1} draws per {STEPS} calls (none into "
             "the data, in both libraries), the sampler's own arithmetic — best of eager and fused, in passes, and "
             "against diffusers' time less the same draws.", "",
             "| sampler | ours (ms) | fused (ms) | diffusers (ms) | ours / diffusers | ours / pass | fused / pass | "
             "≤ 3 × pass | without the draw: / pass, / diffusers |", "|---|---|---|---|---|---|---|---|---|"]
    draw = z * (STEPS - 1) / STEPS
    for name, ts in times.items():
        a, b, c = (statistics.median(t[k] for t in ts) for k in range(3))
        none = math.isnan(b)
        met = " and ".join(w for w, v in (("eager", a), ("fused", c)) if v / f <= 3) or "no"
        own = "–"
        if ds.SAMPLERS[name].stochastic:
            best = min(a, c) if not math.isnan(c) else a
            own = f"{(best - draw) / f:.1f}" + ("" if none else f", {(best - draw) / (b - draw):.2f}")
        lines.append(f"| {name} | {a * 1e3:.3f} | {c * 1e3:.3f} | {'–' if none else f'{b * 1e3:.3f}'} | "
                     f"{'–' if none else f'{a / b:.2f}'} | {a / f:.1f} | {c / f:.1f} | {met} | {own} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
