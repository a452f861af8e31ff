"""Timesteps from an analytic error bound, without a single model call: DMN (Xue et al., "Accelerating Diffusion
Sampling with Optimized Time Steps", CVPR 2024).

A multistep data-prediction solver (DPM-Solver++(2M/3M), UniPC) integrates, between levels i and i + 1,

    x_{i+1}/σ_{i+1} = x_i/σ_i + ∫_{λ_i}^{λ_{i+1}} e^{λ} x̂_0(λ) dλ,     λ = log(α/σ)

(Lu et al. 2022b, eq. 9) with x̂_0 replaced by its polynomial interpolant through the last q evaluations. The
state's error is then a weighted sum of the model's errors at the levels, the weights being the integrals of e^{λ}
times the Lagrange basis (:func:`lagrange_weights`). DMN takes the model's error at a level to scale as σ²/α and
minimises the resulting bound over the levels' λ with the ends fixed: steps of the warm-up (the first three) add
their terms in quadrature, later steps add signed terms per level (a level's error enters every step that reuses
it), first-order steps their absolute value. Here the orders are the sampler's own (``_multistep_orders``: warm-up,
and diffusers' lower-order final steps below 15 steps), the interior increments are a softmax of free parameters
(ordering and ends hold by construction), and L-BFGS-B runs from the log-SNR, Karras and trailing spacings, keeping
the lowest bound. The bound covers the steps between evaluated levels; the final step into the data (x̂_0 at t = 0
with ``final="tweedie"``) does not depend on the interior levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core.schedules import Schedule
from ..core.spacings import make_timesteps
from ..sampling.samplers import _multistep_orders

__all__ = ["DMN_SAMPLERS", "dmn_objective", "dmn_order", "dmn_timesteps", "lagrange_weights"]

_F64 = torch.float64
WARMUP = 3  # DMN: the first three steps' terms add in quadrature
DMN_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "unipc")  # the multistep data-prediction samplers the bound describes


def dmn_order(sampler: str, options: dict) -> int:
    """The order ``sampler`` with ``options`` interpolates x̂_0 with; an error naming the valid samplers for any other."""
    if sampler not in DMN_SAMPLERS:
        raise ValueError(f"method 'dmn' bounds a multistep data-prediction solver's error; valid samplers: "
                         f"{', '.join(DMN_SAMPLERS)}, got {sampler!r}")
    return {"dpmpp_2m": 2, "dpmpp_3m": 3}.get(sampler) or int(options.get("order", 2))


def lagrange_weights(lam: torch.Tensor, i: int, order: int) -> torch.Tensor:
    """w_k = ∫_{λ_i}^{λ_{i+1}} e^{λ} ℓ_k(λ) dλ, k = 0 … order − 1, for the Lagrange basis ℓ_k through λ_i, λ_{i−1},
    …, λ_{i−order+1} (order ≤ 3): the weight of the x̂_0 at level i − k in the step from i to i + 1. In u = λ − λ_i
    with ℓ_k(u) = a + b u + c u², w_k = e^{λ_i} ∫_0^h e^u ℓ_k du and integration by parts gives ∫_0^h e^u ℓ_k du
    = e^h (a − b + 2c + (b − 2c) h + c h²) − (a − b + 2c), h = λ_{i+1} − λ_i."""
    if not 1 <= order <= 3 or i - order + 1 < 0:
        raise ValueError(f"order must be 1 … 3 with {order - 1} levels before level {i}")
    h = lam[i + 1] - lam[i]
    d = [lam[i - j] - lam[i] for j in range(order)]
    out = []
    for k in range(order):
        o = [d[j] for j in range(order) if j != k]
        if not o:
            a, b, c = 1.0, 0.0, 0.0
        else:
            den = math.prod(d[k] - v for v in o)
            a, b, c = ((-o[0] / den, 1 / den, 0.0) if len(o) == 1 else
                       (o[0] * o[1] / den, -(o[0] + o[1]) / den, 1 / den))
        f0 = a - b + 2 * c
        out.append(torch.exp(lam[i]) * (torch.exp(h) * (f0 + (b - 2 * c) * h + c * h * h) - f0))
    return torch.stack(out)


def dmn_objective(lam: torch.Tensor, orders: Sequence[int]) -> torch.Tensor:
    """DMN's bound on the final error of the steps λ_0 → λ_1 → … (``orders[i]``: step i's order), from model errors
    of scale σ²/α at each level (VP: α² = sigmoid(2λ), σ² = sigmoid(−2λ))."""
    err = torch.sigmoid(-2 * lam) / torch.sigmoid(2 * lam).sqrt()
    total = lam.new_zeros(())
    carried = torch.zeros_like(lam)
    for i, q in enumerate(orders):
        levels = torch.arange(i, i - q, -1)
        terms = lagrange_weights(lam, i, q) * err[levels]
        if q == 1:
            total = total + terms.abs().sum()
        elif i < WARMUP:
            total = total + terms.square().sum().sqrt()
        else:
            carried = carried.index_add(0, levels, terms)
    return total + carried.abs().sum()


def dmn_timesteps(schedule: Schedule, steps: int, *, order: int, lower_order_final: bool = True,
                  inits: Sequence[str] = ("logsnr", "karras", "trailing"), max_iterations: int = 500):
    """``steps`` timesteps (float64, decreasing, T − 1 … 0) minimising :func:`dmn_objective` for a multistep solver
    of ``order`` with the sampler's warm-up and ``lower_order_final`` rule. Returns (timesteps, {"objective": the
    bound, "init": the start it came from, "objectives": every start's optimum, "start_objectives": their starting
    values}). No model call."""
    from scipy.optimize import minimize

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    T = schedule.num_timesteps
    half = schedule.log_snr.to(_F64) / 2
    if not torch.isfinite(half[-1]):
        raise ValueError("method 'dmn' needs a finite log-SNR at t = T−1; this schedule has zero terminal SNR")
    ends = torch.stack([half[-1], half[0]])
    orders = _multistep_orders(steps, order, lower_order_final)[:steps - 1]
    if steps <= 2:  # no interior level to move
        ts = make_timesteps("logsnr", steps, schedule)
        return ts, {"objective": float(dmn_objective(half[[-1, 0]][:steps], orders)), "init": "logsnr",
                    "objectives": {}, "start_objectives": {}}

    def lams(z: torch.Tensor) -> torch.Tensor:
        inc = torch.softmax(z, 0) * (ends[1] - ends[0])
        return torch.cat([ends[:1], ends[0] + torch.cumsum(inc, 0)[:-1], ends[1:]])

    def fun(z):
        zt = torch.tensor(z, dtype=_F64, requires_grad=True)
        value = dmn_objective(lams(zt), orders)
        value.backward()
        return value.item(), zt.grad.numpy()

    found, starts = {}, {}
    for name in inits:
        ab = schedule.alpha_bar_at(make_timesteps(name, steps, schedule))
        lam0 = torch.cat([ends[:1], 0.5 * torch.log(ab / (1 - ab))[1:-1], ends[1:]])
        z0 = torch.log((lam0[1:] - lam0[:-1]).clamp(min=1e-6))
        starts[name] = float(dmn_objective(lams(z0), orders))
        res = minimize(fun, z0.numpy(), jac=True, method="L-BFGS-B", options={"maxiter": max_iterations})
        found[name] = (float(res.fun), torch.from_numpy(res.x))
    best = min(found, key=lambda n: found[n][0])
    lam = lams(found[best][1]).detach()
    ts = schedule.t_from_log_snr(2 * lam).clamp(0, T - 1)
    ts[0], ts[-1] = T - 1, 0
    return ts, {"objective": found[best][0], "init": best, "objectives": {n: v[0] for n, v in found.items()},
                "start_objectives": starts}
