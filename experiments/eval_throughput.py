"""Evaluation throughput: the full :class:`~diffsteps.evaluation.evaluator.Evaluator` against the bare network forwards it makes,
and the saving from cached reference statistics.

1. Overhead. The default evaluation (digits, the default UNet of ``conf/model/unet.yaml``, untrained, eval mode;
   DDIM at ``--steps`` from the trailing spacing, v-prediction, x̂_0 clipped to [−1, 1] as the runner does for
   images; FID/KID in the digits features, classifier confidence) is timed over all chunks plus ``compute()``
   — the one-time reference setup (``set_reference``, in the quality factory) excluded — once with trajectory MSE
   off and once with it on (``--mse-samples``: the reference Heun solver adds model calls of its own). The bare cost
   replays exactly the forwards that evaluation made — recorded in an untimed warm-up run: the same batch sizes,
   the same t tensors, in the same order — in a tight loop under ``torch.inference_mode``. Overhead = eval / bare
   − 1. Per step count, evaluation time = the Evaluator's own ``sample_seconds`` at that step count + an equal
   share of everything else (metric updates and ``compute``: the same work at every step count). Also the
   Evaluator's own ``model_seconds`` (network time inside sampling) against its ``sample_seconds``. Medians over
   ``--repeats`` interleaved repetitions; then one instrumented run breaks the evaluation time down by function.
2. Reference statistics. ``SampleQuality.set_reference(real, key)`` without a cache, with a cold cache (a fresh
   temporary ``cache_dir``: features computed and the file written) and with a warm one (a second metric loads the
   file), on the data's train split and on ``--synthetic`` random samples of the data's shape.

``--model mlp`` runs the vector case instead: the MLP on toy2d (8gaussians), identity features, the mixture NLL.

Run: ``python experiments/eval_throughput.py [--samples 1000] [--batch-size 500] [--steps 10 20 50] [--repeats 3]
[--mse-samples 128] [--threads 2] [--device cpu] [--out docs/benchmarks/eval_throughput.txt]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

import diffsteps as ds
from diffsteps.data import DigitsData, Toy2DData
from diffsteps.evaluation import evaluator, quality
from diffsteps.evaluation.evaluator import Evaluator
from diffsteps.evaluation.measures import (
    ClassifierConfidence,
    MixtureNLL,
    Quality,
    Totals,
    TrajectoryError,
)
from diffsteps.evaluation.measures import classifier as classifier_measure
from diffsteps.evaluation.measures import trajectory as trajectory_measure
from diffsteps.evaluation.plan import EvalPlan
from diffsteps.evaluation.quality import SampleQuality
from diffsteps.runner.build import build_net

warnings.filterwarnings("ignore", message=".*compute.*method of metric.*called before the.*update")

ROOT = Path(__file__).resolve().parents[1]
OUT: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    OUT.append(line)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs):
    return statistics.median(xs)


# -- setting -----------------------------------------------------------------------------------------------------------
class Setting:
    """What the runner would build for ``--model``: data, net, schedule, features, plan options."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        if args.model == "unet":
            self.data = DigitsData()
            self.features, self.classifier, self.options = "digits", True, {"eta": 0.0, "clip_denoised": 1.0}
        else:
            self.data = Toy2DData()
            self.features, self.classifier, self.options = "identity", False, {"eta": 0.0, "clip_denoised": None}
        self.mixture = getattr(self.data, "mixture", None)
        self.shape = tuple(self.data.sample_shape)
        cfg = OmegaConf.create({"model": OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml")})
        self.net = build_net(cfg, self.data.spec, self.data.name).to(self.device).eval()
        self.schedule = ds.make_schedule("linear", 1000)
        self.prediction = "v"  # conf/config.yaml: loss.prediction
        self.real = self.data.real_samples(split="train")
        self.key = f"{self.data.name}-train-{len(self.real)}"
        self.cache_dir = tempfile.mkdtemp(prefix="eval_throughput-")
        self.args = args

    def plan(self, mse: bool) -> EvalPlan:
        a = self.args
        return EvalPlan(sampler="ddim", steps=tuple(a.steps), shape=self.shape, num_samples=a.samples,
                        batch_size=a.batch_size, spacing="trailing", options=self.options,
                        mse_samples=a.mse_samples if mse else 0, reference_sampler="heun",
                        reference_steps=a.reference_steps, reference_spacing="logsnr")

    def quality(self) -> SampleQuality:
        q = SampleQuality(features=self.features, kid_subset_size=100, cache_dir=self.cache_dir, device=self.device)
        q.set_reference(self.real, key=self.key)
        return q

    def evaluator(self, mse: bool) -> Evaluator:
        plan = self.plan(mse)
        measures = [m for m in (  # as runner/evaluate.py builds them (no ELBO: it needs no samples)
            Quality(plan, self.quality),
            MixtureNLL(plan, self.mixture) if self.mixture is not None else None,
            ClassifierConfidence(plan) if self.classifier else None,
            TrajectoryError(plan, self.schedule, self.prediction) if plan.mse_samples > 0 else None,
        ) if m is not None]
        return Evaluator(plan, self.schedule, self.prediction, measures).to(self.device)


def run_evaluation(s: Setting, ev: Evaluator, net: nn.Module | None = None) -> dict:
    """Seconds for all chunks + compute (reference setup already done in the Evaluator's constructor)."""
    net = net or s.net
    sync(s.device)
    t0 = time.perf_counter()
    for c in range(ev.plan.num_chunks):
        ev.run_chunk(net, c, s.device)
    rows = ev.compute()
    sync(s.device)
    total = time.perf_counter() - t0
    return {"total": total, "rows": {r["steps"]: r for r in rows},
            "reference_seconds": rows[0].get("mse_reference_seconds", 0.0)}


# -- recording and replaying the forwards ------------------------------------------------------------------------------
class Instrumented(nn.Module):
    """The network, recording each call's (phase, batch size, t) and timing it by phase. The phase is the step
    count being sampled, or "reference" inside the trajectory reference solver."""

    def __init__(self, net: nn.Module, device: torch.device):
        super().__init__()
        self.net, self.device = net, device
        self.phase = None
        self.calls: list[tuple[object, int, torch.Tensor]] = []
        self.seconds: dict[object, float] = defaultdict(float)

    def forward(self, x, t):
        self.calls.append((self.phase, x.shape[0], t.detach().clone()))
        sync(self.device)
        t0 = time.perf_counter()
        out = self.net(x, t)
        sync(self.device)
        self.seconds[self.phase] += time.perf_counter() - t0
        return out


class Clock:
    """Inclusive seconds per name for wrapped functions."""

    def __init__(self, device):
        self.device, self.seconds, self.calls = device, defaultdict(float), defaultdict(int)

    def wrap(self, name, fn, key=None):
        def timed(*a, **kw):
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync(self.device)
                k = key() if key else name
                self.seconds[k] += time.perf_counter() - t0
                self.calls[k] += 1
        return timed


@contextlib.contextmanager
def patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def phases(inst: Instrumented, clock: Clock | None = None):
    """Label the network's calls with the step count / reference phase (and time those functions with ``clock``)."""
    orig_sample, orig_ref = evaluator.sample, trajectory_measure.trajectory_reference

    def sample(*a, steps=None, **kw):
        if inst.phase != "reference":
            inst.phase = steps
        return orig_sample(*a, steps=steps, **kw)

    def reference(*a, **kw):
        inst.phase = "reference"
        try:
            return orig_ref(*a, **kw)
        finally:
            inst.phase = None

    if clock is not None:
        sample = clock.wrap("sample", sample, key=lambda: "reference" if inst.phase == "reference" else "sample")
        reference = clock.wrap("reference", reference, key=lambda: "reference_total")
    with patched(evaluator, "sample", sample), patched(trajectory_measure, "trajectory_reference", reference):
        yield


@torch.inference_mode()
def bare(s: Setting, calls) -> dict:
    """Replay ``calls`` in a tight loop; seconds per phase (blocks of consecutive calls of one phase timed whole)."""
    dtype = next(p.dtype for p in s.net.parameters())
    x = torch.randn(max(b for _, b, _ in calls), *s.shape, device=s.device, dtype=dtype)
    prepared = [(phase, x[:b], t.to(s.device)) for phase, b, t in calls]
    seconds = defaultdict(float)
    i = 0
    while i < len(prepared):
        phase = prepared[i][0]
        j = i
        while j < len(prepared) and prepared[j][0] == phase:
            j += 1
        sync(s.device)
        t0 = time.perf_counter()
        for _, xb, tt in prepared[i:j]:
            s.net(xb, tt)
        sync(s.device)
        seconds[phase] += time.perf_counter() - t0
        i = j
    return dict(seconds)


# -- part 1 ------------------------------------------------------------------------------------------------------------
def overhead(s: Setting, args) -> None:
    steps = list(args.steps)
    # untimed warm-up runs that also record the forwards (mse on: a superset of the mse-off calls)
    inst = Instrumented(s.net, s.device)
    with phases(inst):
        run_evaluation(s, s.evaluator(mse=False), inst)
        inst.calls.clear()
        run_evaluation(s, s.evaluator(mse=True), inst)
    calls = inst.calls
    nfe = defaultdict(int)
    for phase, b, _ in calls:
        nfe[phase] += b
    bare(s, calls)  # warm-up of the replay

    res = {"bare": [], False: [], True: []}
    for r in range(args.repeats):
        order = ["bare", False, True] if r % 2 == 0 else [True, False, "bare"]
        for what in order:  # interleaved, alternating order: a slow spell of the machine hits all alike
            if what == "bare":
                res["bare"].append(bare(s, calls))
            else:
                ev = s.evaluator(mse=what)  # reference setup (warm cache) here, untimed
                res[what].append(run_evaluation(s, ev))

    def bare_med(phase):
        return median([b.get(phase, 0.0) for b in res["bare"]])

    def row_med(mse, n, key):
        return median([e["rows"][n][key] for e in res[mse]])

    k = len(steps)
    a = s.args
    say(f"### 1. evaluation vs bare forwards: {a.model} ({sum(p.numel() for p in s.net.parameters()) / 1e6:.2f} M "
        f"params, untrained, eval mode), ddim trailing, {a.samples} samples in chunks of {a.batch_size}, features "
        f"{s.features}{', classifier' if s.classifier else ''}{', mixture NLL' if s.mixture is not None else ''}; "
        f"median of {a.repeats} interleaved repeats, device {a.device}, {torch.get_num_threads()} threads\n")
    say("eval (s): Evaluator over all chunks + compute(), reference setup excluded; per step count its own "
        "sample_seconds + 1/k of the rest (metric updates, compute). bare (s): the same forwards (batch sizes, t) "
        "replayed under inference_mode. sample-evals = N·NFE.\n")
    say("| MSE | steps | sample-evals | bare (s) | eval (s) | overhead | Evaluator model_seconds | "
        "Evaluator sample_seconds | sampling / model |")
    say("|---|---|---|---|---|---|---|---|---|")
    for mse in (False, True):
        per_rep_over = []
        for rep in range(args.repeats):
            e, b = res[mse][rep], res["bare"][rep]
            bt = sum(b.get(n, 0.0) for n in steps) + (b.get("reference", 0.0) if mse else 0.0)
            per_rep_over.append(e["total"] / bt - 1)
        rest = median([e["total"] - sum(e["rows"][n]["sample_seconds"] for n in steps) - e["reference_seconds"]
                       for e in res[mse]])
        label = f"on ({a.mse_samples} samples)" if mse else "off"
        for n in steps:
            bt = bare_med(n)
            et = row_med(mse, n, "sample_seconds") + rest / k
            ms, ss = row_med(mse, n, "model_seconds"), row_med(mse, n, "sample_seconds")
            say(f"| {label} | {n} | {nfe[n]} | {bt:.3f} | {et:.3f} | {et / bt - 1:+.1%} | {ms:.3f} | {ss:.3f} | "
                f"{ss / ms - 1:+.1%} |")
        if mse:
            bt, et = bare_med("reference"), median([e["reference_seconds"] for e in res[mse]])
            say(f"| {label} | reference heun {a.reference_steps}+{a.reference_steps // 2} | {nfe['reference']} | "
                f"{bt:.3f} | {et:.3f} | {et / bt - 1:+.1%} | | | |")
        bt = median([sum(b.get(n, 0.0) for n in steps) + (b.get("reference", 0.0) if mse else 0.0)
                     for b in res["bare"]])
        et = median([e["total"] for e in res[mse]])
        evals = sum(nfe[n] for n in steps) + (nfe["reference"] if mse else 0)
        bmin = min(sum(b.get(n, 0.0) for n in steps) + (b.get("reference", 0.0) if mse else 0.0)
                   for b in res["bare"])
        emin = min(e["total"] for e in res[mse])
        say(f"| {label} | **total** | {evals} | {bt:.3f} | {et:.3f} | **{et / bt - 1:+.1%}** (median of per-repeat "
            f"ratios {median(per_rep_over):+.1%}, range {min(per_rep_over):+.1%} … {max(per_rep_over):+.1%}; "
            f"best-of: {bmin:.3f} vs {emin:.3f} s, {emin / bmin - 1:+.1%}) | | | |")
        say(f"| {label} | rest: metric updates + compute | | | {rest:.3f} | {rest / bt:.1%} of bare | | | |")
    say()
    breakdown(s, args)


def breakdown(s: Setting, args) -> None:
    """One instrumented run (MSE on): where the evaluation time goes, by function (inclusive seconds)."""
    ev = s.evaluator(mse=args.mse_samples > 0)
    inst = Instrumented(s.net, s.device)
    clock = Clock(s.device)
    for q in next(m for m in ev.measures if isinstance(m, Quality)).quality.values():
        q.update = clock.wrap("SampleQuality.update", q.update)
        q.compute = clock.wrap("SampleQuality.compute", q.compute)
        q.extractor.forward = clock.wrap("feature extractor forward", q.extractor.forward)
        q._extract = clock.wrap("SampleQuality._extract", q._extract)
    for t in [m for m in ev.metrics() if isinstance(m, Totals)]:
        t.update = clock.wrap("Totals.update", t.update)
        t.compute = clock.wrap("Totals.compute", t.compute)
    with contextlib.ExitStack() as stack:
        stack.enter_context(phases(inst, clock))
        for mod, name in [(classifier_measure, "confidence_counts"), (evaluator, "chunk_noise"),
                          (quality, "kernel_distance"), (quality, "frechet_distance"),
                          (classifier_measure, "load_digits_classifier")]:
            stack.enter_context(patched(mod, name, clock.wrap(f"{mod.__name__.split('.')[-1]}.{name}",
                                                              getattr(mod, name))))
        if s.mixture is not None:
            stack.enter_context(patched(s.mixture, "log_prob", clock.wrap("mixture.log_prob", s.mixture.log_prob)))
        out = run_evaluation(s, ev, inst)
    total = out["total"]
    sec = clock.seconds
    model_sampling = sum(v for k, v in inst.seconds.items() if k != "reference")
    model_ref = inst.seconds.get("reference", 0.0)
    bare_all = model_sampling + model_ref
    say(f"### where the evaluation time goes (one instrumented run, MSE {'on' if args.mse_samples else 'off'}; "
        f"inclusive seconds; overhead = share of the time beyond the network's own forwards, "
        f"{total - bare_all:.3f} s)\n")
    say("| part | calls | seconds | % of eval | % of overhead |")
    say("|---|---|---|---|---|")
    over = max(total - bare_all, 1e-12)

    def line(name, v, calls="", is_over=True):
        say(f"| {name} | {calls} | {v:.3f} | {v / total:.1%} | {v / over:.1%} |" if is_over else
            f"| {name} | {calls} | {v:.3f} | {v / total:.1%} | – |")

    line("network forward, sampling (inside sample())", model_sampling, is_over=False)
    line("network forward, reference solver", model_ref, is_over=False)
    line("sampler arithmetic + Denoiser (sample() − its forwards)", sec["sample"] - model_sampling,
         clock.calls["sample"])
    line("reference solver arithmetic (trajectory_reference − its forwards)", sec["reference_total"] - model_ref,
         clock.calls["reference_total"])
    named = ["SampleQuality.update", "SampleQuality._extract", "feature extractor forward",
             "classifier.confidence_counts", "classifier.load_digits_classifier", "Totals.update",
             "SampleQuality.compute", "quality.kernel_distance", "quality.frechet_distance", "Totals.compute",
             "evaluator.chunk_noise", "mixture.log_prob"]
    for name in named:
        if name in sec:
            line(("    " if name in ("SampleQuality._extract", "feature extractor forward",
                                     "classifier.load_digits_classifier", "quality.kernel_distance",
                                     "quality.frechet_distance") else "") + name, sec[name], clock.calls[name])
    top = (sec["sample"] + sec["reference_total"] + sec["SampleQuality.update"] + sec["classifier.confidence_counts"]
           + sec["Totals.update"] + sec["SampleQuality.compute"] + sec["Totals.compute"] + sec["evaluator.chunk_noise"]
           + sec.get("mixture.log_prob", 0.0))
    line("everything else (run_chunk/compute bookkeeping, measure hooks, MSE error, kept samples, wrappers)",
         total - top)
    line("**total**", total, is_over=False)
    say()


# -- part 2 ------------------------------------------------------------------------------------------------------------
def reference_cache(s: Setting, args) -> None:
    g = torch.Generator().manual_seed(0)
    sets = [(f"{s.data.name} train", s.real, s.key)]
    if args.synthetic:
        fake = (torch.rand((args.synthetic, *s.shape), generator=g) * 2 - 1)
        sets.append((f"synthetic uniform [−1, 1], {tuple(s.shape)}", fake, f"synthetic-{args.synthetic}"))
    say(f"### 2. reference statistics: SampleQuality.set_reference(real, key), features {s.features}, median of "
        f"{args.repeats}\n")
    say("no cache: cache_dir=None; cold: fresh cache_dir (features + mean/cov computed, file written); warm: a second "
        "SampleQuality on the same cache_dir (file loaded, checksums verified). hash: sha256 of the input, part of "
        "every call.\n")
    say("| reference | N | file (MB) | no cache (s) | cold (s) | warm (s) | speed-up cold/warm | "
        "speed-up no-cache/warm | of warm: input sha256 (s) |")
    say("|---|---|---|---|---|---|---|---|---|")
    construct = []
    for name, real, key in sets:
        t = defaultdict(list)
        size = 0.0
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                for what in ("none", "cold", "warm"):
                    t0 = time.perf_counter()
                    q = SampleQuality(s.features, kid_subset_size=100, cache_dir=None if what == "none" else d,
                                      device=s.device)
                    construct.append(time.perf_counter() - t0)
                    sync(s.device)
                    t0 = time.perf_counter()
                    q.set_reference(real, key)
                    sync(s.device)
                    t[what].append(time.perf_counter() - t0)
                    expected = {"none": "computed", "cold": "computed", "warm": "cache"}[what]
                    assert q.reference_source == expected, (what, q.reference_source)
                size = q.cache_path(key).stat().st_size / 2**20
            t0 = time.perf_counter()
            quality._input_sha256(real)
            t["sha"].append(time.perf_counter() - t0)
        none, cold, warm, sha = (median(t[k]) for k in ("none", "cold", "warm", "sha"))
        say(f"| {name} | {len(real)} | {size:.2f} | {none:.4f} | {cold:.4f} | {warm:.4f} | {cold / warm:.1f}× | "
            f"{none / warm:.1f}× | {sha:.4f} |")
    say(f"\n(not in the table: constructing a SampleQuality — loading the feature extractor — takes "
        f"{median(construct):.4f} s, median; the runner's quality factory builds one per step count)\n")


# -- main --------------------------------------------------------------------------------------------------------------
def machine(device: torch.device) -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    text = (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"python {platform.python_version()}")
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="unet", choices=["unet", "mlp"], help="unet: digits; mlp: toy2d 8gaussians")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--mse-samples", type=int, default=128, help="trajectory MSE samples of the MSE-on row (0: no row)")
    p.add_argument("--reference-steps", type=int, default=100)
    p.add_argument("--synthetic", type=int, default=50_000, help="size of the synthetic reference (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip", choices=["overhead", "cache"], default=None)
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Setting(args)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    say(f"$ {command}")
    say(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    say(f"machine: {machine(s.device)}\n")
    if args.skip != "overhead":
        overhead(s, args)
    if args.skip != "cache":
        reference_cache(s, args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(OUT) + "\n")


if __name__ == "__main__":
    main()
