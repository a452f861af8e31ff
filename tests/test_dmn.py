"""DMN (method="dmn"): the quadrature weights against numerical integration and DPM-Solver's closed form, the bound's
aggregation against its definition, the optimised levels as a schedule, and optimize_schedule spending no model call
on them."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CountingModel, noise
from scipy.integrate import quad

import diffsteps as ds
from diffsteps.steps.dmn import dmn_objective, dmn_timesteps, lagrange_weights

LAM = torch.tensor([-4.1, -2.9, -2.2, -0.6, 0.4, 1.9], dtype=torch.float64)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("i", [2, 4])
def test_lagrange_weights_are_the_integrals_of_the_basis(order, i):
    nodes = [LAM[i - j].item() for j in range(order)]

    def basis(k):
        return lambda x: math.prod((x - nodes[j]) / (nodes[k] - nodes[j]) for j in range(order) if j != k)

    w = lagrange_weights(LAM, i, order)
    a, b = LAM[i].item(), LAM[i + 1].item()
    for k in range(order):
        ref = quad(lambda x, f=basis(k): math.exp(x) * f(x), a, b, epsabs=0, epsrel=1e-13)[0]
        assert w[k].item() == pytest.approx(ref, rel=1e-12)
    # exact for every polynomial of degree < order: here λ^(order−1)
    p = order - 1
    exact = quad(lambda x: math.exp(x) * x**p, a, b, epsabs=0, epsrel=1e-13)[0]
    assert sum(w[k].item() * nodes[k] ** p for k in range(order)) == pytest.approx(exact, rel=1e-11)


def test_second_order_weight_is_dpm_solvers_closed_form():
    # Lu et al. 2022b / Xue et al. 2024: the previous level's weight is −e^{λ_i} H₁(h)/h_prev, H₁(h) = h e^h − (e^h − 1)
    i = 3
    h, h_prev = (LAM[i + 1] - LAM[i]).item(), (LAM[i] - LAM[i - 1]).item()
    h1 = h * math.exp(h) - math.expm1(h)
    w = lagrange_weights(LAM, i, 2)
    assert w[1].item() == pytest.approx(-math.exp(LAM[i].item()) * h1 / h_prev, rel=1e-13)
    assert w.sum().item() == pytest.approx(math.exp(LAM[i + 1].item()) - math.exp(LAM[i].item()), rel=1e-13)


def test_bound_adds_warm_up_in_quadrature_and_later_steps_per_level():
    lam = LAM
    err = torch.sigmoid(-2 * lam) / torch.sigmoid(2 * lam).sqrt()  # σ²/α
    orders = [1, 2, 3, 3, 1]
    w = [lagrange_weights(lam, i, q) for i, q in enumerate(orders)]
    want = abs(w[0][0] * err[0])  # first order: |·|
    want += math.hypot(w[1][0] * err[1], w[1][1] * err[0])  # warm-up (steps 0–2): in quadrature
    want += math.sqrt((w[2][0] * err[2]) ** 2 + (w[2][1] * err[1]) ** 2 + (w[2][2] * err[0]) ** 2)
    # step 3 (third order, after the warm-up): signed per level, |·| of each level's sum; step 4 first order
    want += abs(w[3][0] * err[3]) + abs(w[3][1] * err[2]) + abs(w[3][2] * err[1]) + abs(w[4][0] * err[4])
    assert dmn_objective(lam, orders).item() == pytest.approx(float(want), rel=1e-13)
    # a level two later steps reuse: their signed terms add before the absolute value
    both = [1, 2, 2, 2, 2]
    w = [lagrange_weights(lam, i, q) for i, q in enumerate(both)]
    head = abs(w[0][0] * err[0]) + math.hypot(w[1][0] * err[1], w[1][1] * err[0]) \
        + math.hypot(w[2][0] * err[2], w[2][1] * err[1])
    tail = abs(w[3][1] * err[2]) + abs(w[3][0] * err[3] + w[4][1] * err[3]) + abs(w[4][0] * err[4])
    assert dmn_objective(lam, both).item() == pytest.approx(float(head + tail), rel=1e-13)


@pytest.mark.parametrize("steps,order", [(5, 2), (8, 3)])
def test_dmn_timesteps_lower_the_bound_and_form_a_schedule(linear, steps, order):
    from diffsteps.sampling.samplers import _multistep_orders

    ts, info = dmn_timesteps(linear, steps, order=order)
    assert ts.dtype == torch.float64 and len(ts) == steps and ts[0] == 999 and ts[-1] == 0
    assert torch.all(ts[1:] < ts[:-1])
    # the reported bound is the schedule's own (through t → ᾱ → λ), below the best start's
    ab = linear.alpha_bar_at(ts)
    lam = 0.5 * torch.log(ab / (1 - ab))
    orders = _multistep_orders(steps, order, True)[:steps - 1]
    assert dmn_objective(lam, orders).item() == pytest.approx(info["objective"], rel=1e-7)
    assert info["objective"] < 0.9 * min(info["start_objectives"].values())
    assert info["objective"] == min(info["objectives"].values())
    assert ds.sample(lambda x, t: torch.zeros_like(x), noise(4, 2), schedule=linear, sampler="dpmpp_2m",
                     spacing=ts).shape == (4, 2)  # a valid explicit spacing


def test_optimize_schedule_dmn_spends_no_model_call_on_the_schedule(mixture, linear):
    model = CountingModel(ds.ExactEpsilon(mixture, linear))
    with pytest.raises(ValueError, match="valid samplers: dpmpp_2m, dpmpp_3m, unipc, got 'ddim'"):
        ds.optimize_schedule(model, linear, sampler="ddim", nfe=5, noise=noise(48, 2), method="dmn")
    assert model.calls == 0  # before any model call
    ts, rep = ds.optimize_schedule(model, linear, sampler="unipc", nfe=6, noise=noise(48, 2), method="dmn",
                                   sampler_options={"order": 3}, candidates=24)
    direct, bound = dmn_timesteps(linear, 6, order=3)
    assert torch.equal(ts, direct) and rep["dmn"] == bound and rep["timesteps"] == direct.tolist()
    assert rep["cost"]["model_calls"] == 0 and rep["method"] == "dmn"
    # every call was the teacher's or the evaluation's: the teacher, then this schedule and the 4 fixed spacings
    # on all 48 noises at 6 calls each
    assert model.calls == rep["teacher"]["calls"] + 5 * 6
    assert rep["best_fixed"] in rep["fixed"] and rep["ratio"] == pytest.approx(
        rep["heldout_error"] / rep["fixed"][rep["best_fixed"]]["heldout"])


def test_spacing_optimized_prefers_refine_then_the_lower_heldout_error():
    # sampler.spacing=optimized with several artefacts for one budget: refine's (it starts from the DP path and the
    # best fixed spacing), else whichever of dp and dmn recorded the lower held-out error
    from pathlib import Path

    from diffsteps.runner.optimize import _choose

    dp, dmn = (Path("dp.yaml"), {"method": "dp", "heldout_error": 0.2}), (Path("dmn.yaml"), {"method": "dmn",
                                                                                             "heldout_error": 0.1})
    refine = (Path("refine.yaml"), {"method": "refine", "heldout_error": 0.3})
    assert _choose([dp, dmn]) is dmn and _choose([dmn, dp]) is dmn and _choose([dp, dmn, refine]) is refine


def test_refine_from_dmn_keeps_or_improves_its_heldout_error(mixture, linear):
    # init="dmn": refine starts from DMN's levels, and its early stop on the held-out noises never returns a schedule
    # worse there than the start it was given
    model = ds.ExactEpsilon(mixture, linear)
    kw = dict(sampler="dpmpp_2m", nfe=5, noise=noise(48, 2), candidates=24)
    start, rep0 = ds.optimize_schedule(model, linear, method="dmn", **kw)
    ts, rep = ds.optimize_schedule(model, linear, method="refine", init="dmn", iterations=15, **kw)
    assert rep["init"] == "dmn" and rep["heldout_error"] <= rep0["heldout_error"] * (1 + 1e-9)
    assert not torch.equal(ts, start)  # it moved
    with pytest.raises(ValueError, match="valid samplers: dpmpp_2m, dpmpp_3m, unipc, got 'ddim'"):
        ds.optimize_schedule(model, linear, method="refine", init="dmn", **{**kw, "sampler": "ddim"})
