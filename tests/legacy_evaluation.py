"""The evaluator and the runner's ELBO as they were at commit 5d2f75f, before measures became modules: the
oracle for tests/test_measures.py (rows must stay identical). Copied verbatim from
``git show 5d2f75f:src/diffsteps/evaluation/evaluator.py`` (up to the Lightning glue) and
``git show 5d2f75f:src/diffsteps/runner/evaluate.py`` (``_elbo``); only relative imports made absolute."""

from __future__ import annotations

import math
import time
from typing import Callable

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import CatMetric, Metric

from diffsteps.core.schedules import Schedule
from diffsteps.reference.digits_classifier import load_digits_classifier
from diffsteps.sampling.api import sample
from diffsteps.sampling.registry import get_sampler
from diffsteps.evaluation.classifier import confidence_counts, confidence_from_counts
from diffsteps.evaluation.plan import EvalPlan, _sampler_generator, chunk_noise
from diffsteps.evaluation.quality import SampleQuality
from diffsteps.evaluation.trajectory import trajectory_reference


class Totals(Metric):
    """Named float64 accumulators synced across processes: ``sums`` (name → shape) add, ``maxima`` take the max."""

    full_state_update = False

    def __init__(self, sums: dict[str, tuple[int, ...]], maxima: tuple[str, ...] = (), **kwargs):
        super().__init__(**kwargs)
        self.sum_names, self.max_names = tuple(sums), tuple(maxima)
        for name, shape in sums.items():
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        for name in maxima:
            self.add_state(name, torch.tensor(-math.inf, dtype=torch.float64), dist_reduce_fx="max")

    def update(self, **values) -> None:
        for name, v in values.items():
            v = torch.as_tensor(v, dtype=torch.float64, device=self.device)
            if name in self.sum_names:
                setattr(self, name, getattr(self, name) + v)
            elif name in self.max_names:
                setattr(self, name, torch.maximum(getattr(self, name), v))
            else:
                raise KeyError(f"unknown total {name!r}; known: {', '.join(self.sum_names + self.max_names)}")

    def compute(self) -> dict[str, Tensor]:
        return {n: getattr(self, n).clone() for n in self.sum_names + self.max_names}


class _TimedNet(nn.Module):
    """The network with a stopwatch: seconds spent in ``forward`` (synchronised on CUDA, so it is device time)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.seconds = net, 0.0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        _sync(x.device)
        t0 = time.perf_counter()
        out = self.net(x, t)
        _sync(x.device)
        self.seconds += time.perf_counter() - t0
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



class Evaluator:
    """Measures one :class:`EvalPlan`. Call ``run_chunk`` for each chunk this process owns (any order, any split
    across DDP ranks), then ``compute`` on every rank (the metrics sync) → one row per step count.

    ``quality``: a factory returning a :class:`SampleQuality` with its reference already set (one per step count),
    or None to skip FID/KID; ``mixture``: a known data density (``log_prob``) for the exact NLL of the samples;
    ``classifier``: also report the digits classifier's confidence."""

    def __init__(self, plan: EvalPlan, schedule: Schedule, prediction: str, *,
                 quality: Callable[[], SampleQuality] | None = None, mixture=None, classifier: bool = False):
        self.plan, self.schedule, self.prediction = plan, schedule, prediction
        self.mixture = mixture
        # loaded once: it is read, checksummed and built from its file on every load
        self.classifier = load_digits_classifier() if classifier else None
        self.deterministic = get_sampler(plan.sampler).is_deterministic(**plan.sampler_options)
        self.measure_mse = plan.mse_samples > 0 and self.deterministic
        sums = {"n": (), "sample_seconds": (), "model_seconds": (), "nfe_sum": ()}
        if mixture is not None:
            sums["nll_sum"] = ()
        if self.classifier is not None:
            sums.update({"cls_n": (), "cls_pmax_sum": (), "cls_confident": (), "cls_counts": (10,)})
        if self.measure_mse:
            sums.update({"mse_sum": (), "mse_n": ()})
        self.quality = {n: quality() for n in plan.steps} if quality is not None else {}
        self.totals = {n: Totals(sums, maxima=("peak_memory",)) for n in plan.steps}
        # per-sample trajectory errors, for the median: on a nonlinear flow one trajectory near a basin boundary can
        # dominate the mean
        self.errors = {n: CatMetric(nan_strategy="disable") for n in plan.steps} if self.measure_mse else {}
        self.reference = Totals({"gap_sum": (), "n": (), "seconds": ()})
        self.kept: dict[int, list[Tensor]] = {n: [] for n in plan.steps}

    def to(self, device) -> "Evaluator":
        for m in [*self.quality.values(), *self.totals.values(), *self.errors.values(), self.reference]:
            m.to(device)
        return self

    @torch.no_grad()
    def run_chunk(self, net: nn.Module, c: int, device=None) -> None:
        """Generate chunk ``c`` at every step count and add it to the metrics."""
        plan = self.plan
        device = device or next((p.device for p in net.parameters()), torch.device("cpu"))
        start, size = plan.chunk(c)
        noise = chunk_noise(plan, c, device)
        index = torch.arange(start, start + size)
        timed = _TimedNet(net)
        ref = None
        n_ref = min(size, plan.mse_samples - start) if self.measure_mse else 0
        if n_ref > 0:
            t0 = time.perf_counter()
            ref, gap = trajectory_reference(timed, noise[:n_ref], schedule=self.schedule, prediction=self.prediction,
                                            sampler=plan.reference_sampler, steps=plan.reference_steps,
                                            spacing=plan.reference_spacing,
                                            **plan.denoiser_options)
            self.reference.update(gap_sum=gap.sum(), n=n_ref, seconds=time.perf_counter() - t0)
        for n in plan.steps:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timed.seconds = 0.0
            _sync(device)
            t0 = time.perf_counter()
            res = sample(timed, noise, schedule=self.schedule, prediction=self.prediction, sampler=plan.sampler,
                         steps=n, spacing=plan.spacing, generator=_sampler_generator(plan, c, device),
                         return_info=True, **plan.options)
            _sync(device)
            seconds = time.perf_counter() - t0
            x = res.sample
            tot = self.totals[n]
            tot.update(n=size, sample_seconds=seconds, model_seconds=timed.seconds, nfe_sum=res.nfe * size)
            if device.type == "cuda":
                tot.update(peak_memory=torch.cuda.max_memory_allocated(device) / 2**20)
            if n in self.quality:
                self.quality[n].update(x.float(), index)
            if self.mixture is not None:
                flat = x.reshape(size, -1).double().cpu()
                tot.update(nll_sum=-(self.mixture.log_prob(flat) / flat.shape[1]).sum())
            if self.classifier is not None:
                cc = confidence_counts(x.float(), classifier=self.classifier.to(device))
                tot.update(cls_n=cc["n"], cls_pmax_sum=cc["pmax_sum"], cls_confident=cc["confident"],
                           cls_counts=cc["class_counts"])
            if ref is not None:
                err = (x[:n_ref].double() - ref).pow(2).flatten(1).mean(1)
                tot.update(mse_sum=err.sum(), mse_n=n_ref)
                self.errors[n].update(err)
            kept = self.kept[n]
            room = plan.keep_samples - sum(len(k) for k in kept)
            if room > 0:
                kept.append(x[:room].float().cpu())

    def compute(self) -> list[dict]:
        """One row per step count (plain floats), identical on every rank. Seconds are summed over ranks (device
        time, not wall time, under DDP); ``mse_reference_seconds`` is the reference solver's, shared by all rows."""
        gap = self.reference.compute() if self.measure_mse else None  # same on every rank: they all sync or none
        rows = []
        for n in self.plan.steps:
            t = self.totals[n].compute()
            count = float(t["n"])
            row = {"sampler": self.plan.sampler, "spacing": self.plan.spacing, "steps": n,
                   "nfe": round(float(t["nfe_sum"]) / count), "num_samples": int(count),
                   "sample_seconds": float(t["sample_seconds"]), "model_seconds": float(t["model_seconds"]),
                   "seconds_per_sample": float(t["sample_seconds"]) / count}
            if math.isfinite(float(t["peak_memory"])):
                row["peak_memory_mb"] = float(t["peak_memory"])
            if n in self.quality:
                row.update(self.quality[n].compute())
            if "nll_sum" in t:
                row["nll"] = float(t["nll_sum"]) / count  # nats per dimension
            if "cls_n" in t:
                summary = confidence_from_counts({"n": t["cls_n"], "pmax_sum": t["cls_pmax_sum"],
                                                  "confident": t["cls_confident"], "class_counts": t["cls_counts"]})
                row.update({f"classifier_{k}": v for k, v in summary.items() if isinstance(v, float)})
            if "mse_sum" in t:
                row["mse"] = float(t["mse_sum"]) / float(t["mse_n"])
                row["mse_median"] = float(self.errors[n].compute().median())
                row["mse_reference_gap"] = float(gap["gap_sum"]) / float(gap["n"])
                row["mse_reference_seconds"] = float(gap["seconds"])
            rows.append(row)
        return rows

    def samples(self, n: int) -> Tensor:
        """The first ``keep_samples`` samples this rank generated at ``n`` steps, in its chunk order: on rank 0 they
        start with chunk 0, i.e. global samples 0, 1, … — the same noise at every step count."""
        return torch.cat(self.kept[n]) if self.kept[n] else torch.empty(0, *self.plan.shape)



import logging

log = logging.getLogger("diffsteps")


def _elbo(cfg: DictConfig, module, datamodule, schedule):
    """A function of the step count n: the negative ELBO (bits/dim) of held-out data over the integer timesteps the
    sampler's spacing visits at n steps (a K-step chain), and with ``eval.elbo.full`` over all T."""
    from diffsteps.core.spacings import make_timesteps, to_integer_timesteps
    from diffsteps.evaluation.likelihood import elbo_bpd

    e = cfg.eval.elbo
    data = datamodule.real_samples(e.num_samples, split=e.split)
    device = next(module.net.parameters()).device
    # discrete data (images: 256 levels, digits: 17) get the discretised decoder (Ho et al. §3.3): a probability,
    # so the bound is one on the discrete NLL; a density on discrete data would be unbounded below
    levels = getattr(datamodule, "levels", None)
    if levels is not None:
        k = (data.double() + 1) * (levels - 1) / 2
        if not torch.allclose(k, k.round(), atol=1e-3):  # e.g. images resized with interpolation
            log.warning("the ELBO data are not on %d levels: using a continuous decoder (a density, not a "
                        "probability: it can be negative)", levels)
            levels = None
    kw = dict(prediction=module.prediction, variance=e.variance, batch_size=cfg.eval.batch_size, device=device,
              discrete=levels is not None, levels=levels or 256)

    def bound(timesteps, **extra) -> dict:
        # reseeded for each step count: a row's ELBO does not depend on which step counts came before it
        g = torch.Generator(device=device).manual_seed(cfg.eval.noise_seed)
        with torch.no_grad():
            return elbo_bpd(module.net, data, schedule, timesteps=timesteps, generator=g, **extra, **kw)

    full = bound(None, progress=True)["elbo_bpd"] if e.full else None

    def at(n_steps: int) -> dict:
        ts = torch.unique(to_integer_timesteps(make_timesteps(cfg.sampler.spacing, n_steps, schedule)))
        out = {k: v for k, v in bound(ts).items() if k != "elbo_num_samples"}
        if full is not None:
            out["elbo_full_bpd"] = full
        return out

    return at
