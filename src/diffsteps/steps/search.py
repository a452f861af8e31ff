"""The fewest sampling steps whose quality meets a target: galloping, then bisection, over step counts.

A pure search over a callable N → metric (lower is better), so it runs on any evaluation — the runner's FID loop,
an exact-mixture error, a test's closed form. With common random numbers (the same noise at every N) the metric is
a near-monotone function of N, which is what bisection needs; where it is not, the search says so (below).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["SearchResult", "Target", "TargetUnreachable", "find_min_steps"]


@dataclass(frozen=True)
class Target:
    """What "good enough" means for a lower-is-better metric: ``value ≤ absolute``, or
    ``value ≤ reference + within·|reference|`` (no worse than the converged value — the metric at a large step count
    — by more than the fraction ``within``; a value below the converged one, as a finite-sample FID or NLL can be
    at moderate N, meets it)."""

    absolute: float | None = None
    within: float | None = None
    reference: float | None = None

    def __post_init__(self):
        if (self.absolute is None) == (self.within is None):
            raise ValueError("give exactly one of: an absolute target, or within (a fraction of the converged value)")
        if self.absolute is not None and not math.isfinite(self.absolute):
            raise ValueError(f"the target must be a finite number, got {self.absolute!r}")
        if self.within is not None:
            if not (math.isfinite(self.within) and self.within > 0):
                raise ValueError(f"within must be a positive fraction (0.05 = 5 %), got {self.within!r}")
            if self.reference is None or not math.isfinite(self.reference):
                raise ValueError(f"within needs a finite converged reference value, got {self.reference!r}")

    def met(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.absolute is not None:
            return value <= self.absolute
        return value <= self.reference + self.within * abs(self.reference)

    def __str__(self) -> str:
        if self.absolute is not None:
            return f"≤ {self.absolute:.6g}"
        return f"≤ {self.reference + self.within * abs(self.reference):.6g} (within {100 * self.within:g} % of {self.reference:.6g})"


@dataclass
class SearchResult:
    """``steps``: the step count found; ``value`` its metric; ``curve`` every evaluated N → metric, in evaluation
    order; ``evaluations`` how many N were evaluated; ``bracket`` (last N that fails, first N that meets) the
    bisection closed on; ``violations`` pairs (n₁ < n₂) where n₁ meets the target and n₂ does not — the curve is
    not monotone there, so ``steps`` is the smallest N meeting it only among those evaluated."""

    steps: int
    value: float
    target: Target
    curve: dict[int, float]
    evaluations: int
    bracket: tuple[int | None, int]
    violations: list[tuple[int, int]] = field(default_factory=list)


class TargetUnreachable(ValueError):
    """No allowed step count meets the target; ``curve`` holds everything evaluated, ``best`` (N, value)."""

    def __init__(self, message: str, curve: dict[int, float], best: tuple[int, float]):
        super().__init__(message)
        self.curve, self.best = curve, best


def find_min_steps(metric: Callable[[int], float], target: Target, *, candidates: Sequence[int] | None = None,
                   min_steps: int = 1, max_steps: int = 1000, local_scan: int = 0) -> SearchResult:
    """The fewest step counts N (from ``candidates``, default ``min_steps … max_steps``) with ``target.met(metric(N))``.

    Galloping (exponential search, Bentley & Yao 1976) over the candidate index: 0, 1, 3, 7, … (N = 1, 2, 4, 8, …
    for the default range), capped at the last candidate, until one meets the target; then bisection between the
    last failing and the first meeting index. That is ⌈log₂ N*⌉ + 1 evaluations to bracket and ≈ log₂ N*
    more to close, against N* for a scan. Each N is evaluated once (cached).

    The result is exact if the metric meets the target on an upward-closed set of N. When it is not monotone:
    every evaluated pair n₁ < n₂ with n₁ meeting and n₂ failing is reported in ``violations``; the bracket is still
    checked (its lower end evaluated and failing, its upper end meeting), so the answer is always a boundary N with
    N's predecessor failing; ``local_scan=w`` then evaluates the w candidates below it and returns the smallest of
    them that meets the target (a non-monotone dip just below is found, one further away is not).
    Raises :class:`TargetUnreachable` (with the best value reached and the whole curve) if no candidate meets it.
    """
    grid = sorted({int(n) for n in candidates}) if candidates is not None else list(range(min_steps, max_steps + 1))
    if not grid or grid[0] < 1:
        raise ValueError(f"the step counts to search must be positive integers, got {grid[:5]}…")
    if local_scan < 0:
        raise ValueError(f"local_scan must be ≥ 0, got {local_scan}")
    curve: dict[int, float] = {}

    def at(i: int) -> float:
        n = grid[i]
        if n not in curve:
            curve[n] = float(metric(n))
        return curve[n]

    lo, i = -1, 0  # lo: the largest index known to fail (−1: none)
    while not target.met(at(i)):
        lo = i
        if i == len(grid) - 1:
            best = min(curve.items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else math.inf)
            raise TargetUnreachable(
                f"no step count up to {grid[-1]} meets the target {target}: the best value reached is "
                f"{best[1]:.6g} at {best[0]} steps (evaluated: {', '.join(f'{n}: {v:.4g}' for n, v in curve.items())})",
                dict(curve), best)
        i = min(2 * i + 1, len(grid) - 1)
    hi = i
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if target.met(at(mid)):
            hi = mid
        else:
            lo = mid
    for j in range(max(hi - local_scan, 0), hi):
        if target.met(at(j)):
            hi = j
            break
    met = {n: target.met(v) for n, v in curve.items()}
    order = sorted(curve)
    violations = [(a, b) for k, a in enumerate(order) for b in order[k + 1:] if met[a] and not met[b]]
    return SearchResult(steps=grid[hi], value=curve[grid[hi]], target=target, curve=curve, evaluations=len(curve),
                        bracket=(grid[lo] if lo >= 0 else None, grid[hi]), violations=violations)
