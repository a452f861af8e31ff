"""Shortest K-edge paths through a cost matrix on an ordered grid: the dynamic programme behind GITS (Chen et al.
2024, §4) and the ELBO-optimal chains of Watson et al. (2021, §3)."""

from __future__ import annotations

import numpy as np

__all__ = ["dp_paths"]


def dp_paths(cost, k_max: int) -> dict[int, tuple[list[int], float]]:
    """Minimum-cost paths 0 → N−1 with exactly K edges, for every K = 1 … ``k_max``, on a DAG over nodes
    0 … N−1 whose edges go forward (i < j) with weight ``cost[i, j]`` (non-finite = no edge).

    Bellman's recursion over the number of edges, V_k(j) = min_{i<j} V_{k−1}(i) + c(i, j), V_0 = [0, ∞, …]: one
    O(N²) pass per k, so all budgets cost O(k_max N²) together, and every V_k is exact (no heuristics). Returns
    {K: (nodes, total)} for the K that admit a path; ties break towards the smaller predecessor index."""
    c = np.asarray(cost, dtype=np.float64)
    n = c.shape[0]
    if c.ndim != 2 or c.shape[1] != n or n < 2:
        raise ValueError(f"cost must be a square (N, N) matrix with N ≥ 2, got shape {c.shape}")
    if not isinstance(k_max, (int, np.integer)) or k_max < 1:
        raise ValueError(f"k_max must be a positive integer, got {k_max!r}")
    c = np.where(np.triu(np.ones((n, n), dtype=bool), 1) & np.isfinite(c), c, np.inf)
    value = np.full(n, np.inf)
    value[0] = 0.0
    back = []
    out: dict[int, tuple[list[int], float]] = {}
    for k in range(1, min(k_max, n - 1) + 1):
        total = value[:, None] + c  # total[i, j]: reach i in k−1 edges, then i → j
        arg = np.argmin(total, axis=0)
        value = total[arg, np.arange(n)]
        back.append(arg)
        if np.isfinite(value[-1]):
            path = [n - 1]
            for b in reversed(back):
                path.append(int(b[path[-1]]))
            out[k] = (path[::-1], float(value[-1]))
    return out


def dp_paths_history(first, cost3, k_max: int) -> dict[int, tuple[list[int], float]]:
    """As :func:`dp_paths` for a solver whose step cost depends on the previous node too (a two-step multistep
    solver): the first edge 0 → j costs ``first[0, j]``, every later edge i → j after k costs ``cost3[k, i, j]``.
    The DP runs over (previous, current) node pairs, V_m(i, j) = min_k V_{m−1}(k, i) + c(k, i, j): O(k_max N³),
    exact for this cost."""
    c1 = np.asarray(first, dtype=np.float64)
    c3 = np.asarray(cost3, dtype=np.float64)
    n = c1.shape[0]
    idx = np.arange(n)
    ordered = (idx[:, None, None] < idx[None, :, None]) & (idx[None, :, None] < idx[None, None, :])
    c3 = np.where(ordered & np.isfinite(c3), c3, np.inf)  # only forward triples k < i < j
    value = np.full((n, n), np.inf)  # value[k, i]: reach i, previous node k
    value[0, 1:] = np.where(np.isfinite(c1[0, 1:]), c1[0, 1:], np.inf)
    out: dict[int, tuple[list[int], float]] = {}
    back: list[np.ndarray] = []
    for m in range(1, min(k_max, n - 1) + 1):
        k = int(np.argmin(value[:, n - 1]))
        if np.isfinite(value[k, n - 1]):
            path, prev = [n - 1, k], k
            cur = n - 1
            for b in reversed(back):
                prev, cur = int(b[prev, cur]), prev
                path.append(prev)
            out[m] = (path[::-1], float(value[k, n - 1]))
        if m == k_max:
            break
        total = value[:, :, None] + c3  # [k, i, j]
        arg = np.argmin(total, axis=0)  # (i, j): the best k
        value = np.take_along_axis(total, arg[None], 0)[0]
        back.append(arg)
    return out
