"""Quality versus steps: every step count sampled from the same noise, in chunks, split across DDP ranks, measured.

An evaluation is one sampler at a list of step counts, taken one step count at a time: all chunks at that count,
then its row (so a run writes each row as soon as it is measured, and a run stopped part-way keeps the step counts
it finished). Samples are generated chunk by chunk (``batch_size`` each, so peak memory does not grow with
``num_samples``). Chunk c's noise, and the noise a stochastic sampler draws inside it, come from generators seeded
by (seed, c) alone, so every step count, every number of processes and every chunk-to-rank assignment sees the same
random numbers (common random numbers: differences between step counts are the sampler's, not the noise's). Chunk
c runs on rank c mod world size; every measurement is a torchmetrics state synced when its row is computed —
FID/KID features put back in global sample order — so a DDP evaluation reproduces the single-process numbers.

The evaluator itself times the sampling (NFE — the mean over samples, which for an adaptive sampler is the
realised mean, its ``steps`` ignored —, sampling seconds and the part spent in the network, peak
accelerator memory); everything else is a :class:`~diffsteps.evaluation.measures.Measure` in the list it is given
(:mod:`diffsteps.evaluation.measures`: FID/KID, classifier confidence, exact NLL, trajectory error, ELBO).
"""


from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from ..core.schedules import Schedule
from ..sampling.api import sample
from ..sampling.registry import get_sampler
from .measures.base import Chunk, Measure, Totals
from .plan import EvalPlan, _sampler_generator, chunk_cond, chunk_noise

__all__ = ["EvaluationModule", "Evaluator", "Totals"]


class _TimedNet(nn.Module):
    """The network with a stopwatch: seconds spent in ``forward`` (synchronised on CUDA, so it is device time).
    Passes conditioning through and shows the net's ``num_classes``, so the sampler sees a conditional net."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.seconds = net, 0.0
        self.num_classes = int(getattr(net, "num_classes", 0) or 0)

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        _sync(x.device)
        t0 = time.perf_counter()
        out = self.net(x, t, **cond) if cond else self.net(x, t)
        _sync(x.device)
        self.seconds += time.perf_counter() - t0
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(net: nn.Module) -> torch.device:
    return next((p.device for p in net.parameters()), torch.device("cpu"))


def _rank_world() -> tuple[int, int]:
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


class Evaluator:
    """Measures one :class:`EvalPlan` with ``measures``, one step count at a time: for step count n, on every
    process, ``run_chunk(net, c, steps=[n])`` for each chunk it owns (:meth:`my_chunks`; any order), then
    ``run_steps(net, steps=[n])`` (the measures' work without samples, e.g. the ELBO, on the process that owns n),
    then ``row(n)`` (the metrics sync) → n's row: the sampling cost, then each measure's entries in list order.
    Without ``steps`` the calls cover every step count (chunk-major order, as before); ``compute`` is every row.
    Either order gives the same numbers: per step count the chunks are added in the same order, and per-chunk work
    that does not depend on the step count is done once per chunk (:meth:`Measure.begin_chunk`)."""

    def __init__(self, plan: EvalPlan, schedule: Schedule, prediction: str, measures: Sequence[Measure] = ()):
        not_measures = [type(m).__name__ for m in measures if not isinstance(m, Measure)]
        if not_measures:
            raise TypeError(f"measures must be Measure instances (diffsteps.evaluation.measures), got "
                            f"{', '.join(not_measures)}")
        self.plan, self.schedule, self.prediction = plan, schedule, prediction
        self.measures = list(measures)
        # the cost of sampling is the evaluator's own bookkeeping: it alone sees the sampler's clock and NFE
        sums = {"n": (), "sample_seconds": (), "model_seconds": (), "nfe_sum": ()}
        self.totals = {n: Totals(sums, maxima=("peak_memory",)) for n in plan.steps}
        self.kept: dict[int, list[Tensor]] = {n: [] for n in plan.steps}

    def metrics(self) -> list:
        """Every torchmetrics state: the cost totals' and the measures'."""
        return [*self.totals.values(), *(s for m in self.measures for s in m.metrics())]

    def to(self, device) -> Evaluator:
        for m in self.metrics():
            m.to(device)
        return self

    def my_chunks(self) -> range:
        """The chunks this process generates: c ≡ rank (mod world size)."""
        rank, world = _rank_world()
        return range(rank, self.plan.num_chunks, world)

    def _steps(self, steps: Sequence[int] | None) -> tuple[int, ...]:
        if steps is None:
            return self.plan.steps
        unknown = [n for n in steps if n not in self.totals]
        if unknown:
            raise ValueError(f"step counts {unknown} are not in the plan's {list(self.plan.steps)}")
        return tuple(steps)

    @torch.no_grad()
    def run_chunk(self, net: nn.Module, c: int, device=None, steps: Sequence[int] | None = None) -> None:
        """Generate chunk ``c`` at each of ``steps`` (default: every step count) and add it to the metrics."""
        plan = self.plan
        device = device or _device_of(net)
        start, size = plan.chunk(c)
        timed = _TimedNet(net)
        chunk = Chunk(c, torch.arange(start, start + size), chunk_noise(plan, c, device), timed, device,
                      chunk_cond(plan, c, device))
        for m in self.measures:
            m.begin_chunk(chunk)
        for n in self._steps(steps):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timed.seconds = 0.0
            _sync(device)
            t0 = time.perf_counter()
            res = sample(timed, chunk.noise, schedule=self.schedule, prediction=self.prediction,
                         sampler=plan.sampler, steps=None if get_sampler(plan.sampler).adaptive else n,
                         spacing=plan.spacing, generator=_sampler_generator(plan, c, device), return_info=True,
                         cond=chunk.cond or None, **plan.options)
            _sync(device)
            seconds = time.perf_counter() - t0
            x = res.sample
            tot = self.totals[n]
            tot.update(n=size, sample_seconds=seconds, model_seconds=timed.seconds,
                       nfe_sum=int(res.nfe_per_sample.sum()))
            if device.type == "cuda":
                tot.update(peak_memory=torch.cuda.max_memory_allocated(device) / 2**20)
            for m in self.measures:
                m.update(n, x, chunk)
            kept = self.kept[n]
            room = plan.keep_samples - sum(len(k) for k in kept)
            if room > 0:
                kept.append(x[:room].float().cpu())

    @torch.no_grad()
    def run_steps(self, net: nn.Module, device=None, steps: Sequence[int] | None = None) -> None:
        """The measures' per-step-count work that needs no samples (:meth:`Measure.run_steps`), for those of
        ``steps`` (default: all) this process owns: the i-th of ``plan.steps`` on rank i mod world size."""
        device = device or _device_of(net)
        rank, world = _rank_world()
        for n in self._steps(steps):
            if self.plan.steps.index(n) % world == rank:
                for m in self.measures:
                    m.run_steps(n, net, device)

    def row(self, n: int) -> dict:
        """The row of ``n`` steps (plain floats), identical on every rank; every rank must call it (it syncs the
        metrics). Seconds are summed over ranks (device time, not wall time, under DDP)."""
        t = self.totals[self._steps([n])[0]].compute()
        count = float(t["n"])
        row = {"sampler": self.plan.sampler, "spacing": self.plan.spacing, "steps": n,
               "nfe": round(float(t["nfe_sum"]) / count), "num_samples": int(count),
               "sample_seconds": float(t["sample_seconds"]), "model_seconds": float(t["model_seconds"]),
               "seconds_per_sample": float(t["sample_seconds"]) / count}
        if self.plan.options.get("model_timesteps") is not None:  # a decoupled optimised schedule's model times
            row["model_timesteps"] = list(self.plan.options["model_timesteps"])
        if self.plan.options.get("guidance_scale") is not None:  # a guided conditional evaluation: say how guided
            row["guidance_scale"] = float(self.plan.options["guidance_scale"])
        if math.isfinite(float(t["peak_memory"])):
            row["peak_memory_mb"] = float(t["peak_memory"])
        for m in self.measures:
            entries = m.compute(n)
            if entries.keys() & row.keys():
                raise ValueError(f"{type(m).__name__} reports {sorted(entries.keys() & row.keys())}, which "
                                 "another measure already reported")
            row.update(entries)
        return row

    def compute(self) -> list[dict]:
        """Every step count's :meth:`row`, in plan order."""
        return [self.row(n) for n in self.plan.steps]

    def samples(self, n: int) -> Tensor:
        """The first ``keep_samples`` samples this rank generated at ``n`` steps, in its chunk order: on rank 0 they
        start with chunk 0, i.e. global samples 0, 1, … — the same noise at every step count."""
        return torch.cat(self.kept[n]) if self.kept[n] else torch.empty(0, *self.plan.shape)


class _StepCounts(torch.utils.data.IterableDataset):
    """Every step count of the plan, on every rank (each rank then generates its own chunks at it). Iterable, so
    Lightning adds no DistributedSampler, which would split the step counts among the ranks."""

    def __init__(self, steps: Sequence[int]):
        self.steps = tuple(steps)

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


class EvaluationModule(L.LightningModule):
    """Runs an :class:`Evaluator` under ``trainer.test``, so Lightning places the network and, with DDP, starts
    the processes (or reuses those training started). One test step per step count: this rank's chunks at that
    count, the measures' sample-free work, then the row (synced across ranks), handed to ``on_row`` on global rank
    zero as soon as it is known — before the next step count starts. The evaluator — metrics and feature network —
    stays off the module tree: it must not be moved, cast or wrapped with the model. ``rows`` holds every row
    measured so far."""

    def __init__(self, net: nn.Module, evaluator: Evaluator, on_row: Callable[[dict], None] | None = None):
        super().__init__()
        self.net = net
        self.__dict__["evaluator"] = evaluator
        self.__dict__["on_row"] = on_row
        self.rows: list[dict] = []

    def test_dataloader(self):
        return torch.utils.data.DataLoader(_StepCounts(self.evaluator.plan.steps), batch_size=None)

    def on_test_start(self) -> None:
        self.evaluator.to(self.device)

    def test_step(self, steps, batch_idx: int) -> None:
        n, ev = int(steps), self.evaluator
        for c in ev.my_chunks():
            ev.run_chunk(self.net, c, self.device, steps=(n,))
        ev.run_steps(self.net, self.device, steps=(n,))
        row = ev.row(n)
        self.rows.append(row)
        if self.on_row is not None and self.trainer.is_global_zero:
            self.on_row(row)
