"""What every measure implements, what it is shown of a chunk, and the synced accumulators most of them keep."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchmetrics import Metric


@dataclass(frozen=True)
class Chunk:
    """One chunk of an evaluation as the measures see it: chunk ``c``, the global indices of its samples
    (``indices``, int64 on the CPU), its initial noise x_T (the same at every step count), the network wrapped in
    the evaluator's stopwatch (``net``: its forwards count as model time) and the device it runs on; ``cond``: what
    the samples were conditioned on (``{"y": requested classes}`` in a conditional evaluation, else empty)."""

    c: int
    indices: Tensor
    noise: Tensor
    net: nn.Module
    device: torch.device
    cond: dict = field(default_factory=dict)

    @property
    def start(self) -> int:
        return int(self.indices[0]) if len(self.indices) else 0

    @property
    def size(self) -> int:
        return len(self.indices)


class Measure(abc.ABC):
    """One measurement of an evaluation: a few entries of every step count's row.

    The :class:`~diffsteps.evaluation.evaluator.Evaluator` takes one step count n at a time and calls, on each
    process, for each chunk it owns, ``begin_chunk`` and then ``update`` with the chunk's samples at n; on the one
    process that owns n, ``run_steps`` (work that needs the network but no samples); then ``compute(n)`` on every
    process, before the next step count starts. Whatever ``compute`` reads must be held in torchmetrics ``Metric``
    states — attributes that are a ``Metric`` or a dict of them, found by :meth:`metrics` — so that it is synced
    across DDP processes and every process returns the numbers one process would. A state that ``compute`` reads
    for several step counts while others still update it needs ``compute_with_cache=False`` (torchmetrics would
    otherwise return a cached, stale result on the ranks that did not update it, and skip the sync). All hooks but
    ``compute`` are optional."""

    def begin_chunk(self, chunk: Chunk) -> None:
        """Before chunk ``chunk`` is sampled — once per step count, so work that depends on the chunk alone (a
        reference solution from its noise, say) is done the first time and kept by ``chunk.c``."""

    def update(self, steps: int, x: Tensor, chunk: Chunk) -> None:
        """The chunk's samples ``x`` (its size, ...) at ``steps`` steps, in the network's dtype."""

    def run_steps(self, steps: int, net: nn.Module, device: torch.device) -> None:
        """For ``steps`` steps without samples: called once per step count, on one process (the bare network),
        after that step count's chunks."""

    @abc.abstractmethod
    def compute(self, steps: int) -> dict:
        """The row entries (plain floats) at ``steps`` steps; identical on every process. Called as soon as that
        step count is done, on every process."""

    def metrics(self) -> list[Metric]:
        """The states to move to the device and sync: every ``Metric`` attribute, and those in dict attributes."""
        found = []
        for v in vars(self).values():
            if isinstance(v, Metric):
                found.append(v)
            elif isinstance(v, dict):
                found += [m for m in v.values() if isinstance(m, Metric)]
        return found


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
