"""The multistep solvers ``unipc``, ``ipndm``, ``plms`` and the ``lower_order_final`` / ``final`` options of the
data-prediction solvers: convergence orders against the closed-form Gaussian flow, agreement with diffusers'
UniPCMultistepScheduler / PNDMScheduler (skip_prk_steps) / DPMSolverMultistepScheduler(3M) to float precision, and
iPNDM against a textbook Adams–Bashforth loop (numpy polynomial integration of the Lagrange basis).

diffusers' model is the exact ε of a 3-component Gaussian mixture in D = 16 (as in test_diffusers_agreement.py);
both sides get the same float32 noise and timesteps; errors are max |Δ| / max |reference|."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from helpers import agreement_mixture, noise

import diffsteps as ds

T = 1000
RTOL32 = 2e-4  # diffusers' float32 tables and coefficients vs our float64 ones (test_diffusers_agreement.py)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


# -- the diffusers side ----------------------------------------------------------------------------------------------
MIXTURE = agreement_mixture()  # the mixture diffusers is compared on (helpers)
LINEAR = ds.make_schedule("linear", T)


class EpsModel:
    """The exact ε (or v = α ε − σ x̂_0), computed in float64, returned in x's dtype."""

    def __init__(self, schedule: ds.Schedule, prediction: str = "epsilon"):
        self.eps, self.schedule, self.prediction = ds.ExactEpsilon(MIXTURE, schedule), schedule, prediction

    def __call__(self, x, t):
        x64 = x.reshape(len(x), -1).to(torch.float64)
        eps = self.eps(x64, t)
        if self.prediction == "v":
            a = self.schedule.alpha_bar_at(t.to(torch.float64))[:, None]
            x0 = (x64 - (1 - a).sqrt() * eps) / a.sqrt()
            eps = a.sqrt() * eps - (1 - a).sqrt() * x0
        return eps.reshape(x.shape).to(x.dtype)


def z32(seed=1):
    return torch.randn(64, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def run_diffusers(scheduler, model, x, steps):
    scheduler.set_timesteps(steps)
    x = x.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(x, torch.full((len(x),), int(t), dtype=torch.int64))
            x = scheduler.step(out, t, x).prev_sample
    return x, scheduler.timesteps.clone()


def rel(ours, ref):
    return (ours.double() - ref.double()).abs().max().item() / ref.double().abs().max().item()


def assert_agree(ours, ref, what, rtol=RTOL32):
    assert ours.dtype == ref.dtype and torch.isfinite(ref).all()
    r = rel(ours, ref)
    print(f"{what}: relative max|Δ| {r:.2e}")
    assert r <= rtol, (what, r)


# -- UniPC ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("steps", [8, 20])
def test_unipc_matches_diffusers(variant, order, steps, prediction):
    """diffusers' defaults (lower_order_final=True, final σ = 0, corrector on every step); its ``linspace``
    timesteps are passed to us explicitly. ε- and v-prediction: the corrector's x̂_0 are the converted ones.
    bh1 into σ = 0 is NaN in diffusers 0.42.1 (its first-order step computes B(h)·0 = −∞·0 with h = ∞), so bh1 is
    compared with ``final_sigmas_type="sigma_min"``: diffusers' last step ends at t = 0's σ, ours at the level t = 0
    appended to the timesteps, without the final denoising step; bh1 into σ = 0 is checked separately below."""
    model = EpsModel(LINEAR, prediction)
    final_sigma = "sigma_min" if variant == "bh1" else "zero"
    sch = UniPCMultistepScheduler(num_train_timesteps=T, beta_schedule="linear", solver_order=order,
                                  solver_type=variant, predict_x0=True, lower_order_final=True,
                                  final_sigmas_type=final_sigma,
                                  prediction_type={"epsilon": "epsilon", "v": "v_prediction"}[prediction])
    ref, ts = run_diffusers(sch, model, z32(), steps)
    spacing = ts.tolist() + ([0] if variant == "bh1" else [])
    kw = dict(schedule=LINEAR, sampler="unipc", spacing=spacing, steps=None, order=order, variant=variant,
              prediction=prediction, denoise_final=variant == "bh2")
    res = ds.sample(model, z32(), return_info=True, **kw)
    assert res.nfe == steps == len(ts)
    assert_agree(res.sample, ref, f"unipc {variant} order {order} {steps} {prediction}")
    plain = ds.sample(model, z32(), corrector=False, **kw)  # the corrector was active: measured ≥ 3.9e-3
    assert rel(plain, ref) > 5 * RTOL32


def test_unipc_bh1_into_the_data_is_x0_of_the_last_level():
    """Where diffusers' bh1 gives NaN (above), our first-order step to σ = 0 (lower_order_final) is x̂_0 of the
    last level, finite."""
    model, x = EpsModel(LINEAR), z32().double()
    seen = []
    out = ds.sample(model, x, schedule=LINEAR, sampler="unipc", steps=10, spacing="karras", variant="bh1", order=3,
                    callback=seen.append)
    assert torch.isfinite(out).all() and torch.equal(out, seen[-1].x0)



# -- PLMS ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon"])
@pytest.mark.parametrize("spacing,steps", [("leading", 10), ("leading", 25), ("trailing", 10), ("trailing", 40)])
def test_plms_matches_diffusers(spacing, steps, prediction):
    """PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=True): Heun's first step (model at the second timestep
    twice), then AB2, AB3, AB4 with DDIM transfers, the last one into ᾱ = 1. diffusers steps from t to t − T//N,
    which is the next listed timestep only when N divides T (here 10, 25, 40 do) — with trailing spacing and N not
    dividing T it mixes levels, as its DDIM does (test_diffusers_agreement.test_ddim_linspace). ε-prediction only:
    with v-prediction diffusers combines the raw v outputs of different levels and converts the combination with
    the current level's α, σ (a different method, 2e-1 apart at 10 steps); we combine the ε̂'s."""
    model = EpsModel(LINEAR, prediction)
    sch = PNDMScheduler(num_train_timesteps=T, beta_schedule="linear", skip_prk_steps=True, set_alpha_to_one=True,
                        timestep_spacing=spacing,
                        prediction_type={"epsilon": "epsilon", "v": "v_prediction"}[prediction])
    ref, ts = run_diffusers(sch, model, z32(), steps)
    assert len(ts) == steps + 1 and ts[1] == ts[2]  # the repeated timestep of the Heun step
    res = ds.sample(model, z32(), schedule=LINEAR, sampler="plms", steps=steps, spacing=spacing,
                    prediction=prediction, return_info=True)
    assert res.nfe == steps + 1 and torch.equal(res.timesteps, torch.unique_consecutive(ts).double())
    assert_agree(res.sample, ref, f"plms {spacing} {steps} {prediction}")


# -- DPM-Solver++(3M) with diffusers' lower_order_final -----------------------------------------------------------------
@pytest.mark.parametrize("steps", [8, 14, 20])
def test_dpmpp_3m_lower_order_final_matches_diffusers(steps):
    """diffusers' 3M with lower_order_final=True: orders 1, 2, 3, …, 3, 2, 1 below 15 steps, …, 3, 1 from 15 on
    (its last step into σ = 0 is always first order). Turning the option off changes the result below 15 steps."""
    model = EpsModel(LINEAR)
    sch = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="linear", algorithm_type="dpmsolver++",
                                      solver_order=3, final_sigmas_type="zero", lower_order_final=True)
    ref, ts = run_diffusers(sch, model, z32(), steps)
    kw = dict(schedule=LINEAR, sampler="dpmpp_3m", spacing=ts.tolist(), steps=None)
    assert_agree(ds.sample(model, z32(), **kw), ref, f"dpmpp_3m {steps}")
    other = ds.sample(model, z32(), lower_order_final=False, **kw)
    assert (rel(other, ref) > 5 * RTOL32) == (steps < 15)


# -- iPNDM against a textbook Adams–Bashforth loop ------------------------------------------------------------------------
def ref_ipndm(model, x, schedule, ts, order=4):
    """Variable-step AB in x̃ = x/α over σ̃, weights by numpy's exact polynomial integration of the Lagrange basis;
    orders warm up 1, 2, 3, 4; the last step into σ̃ = 0 is first order (x̂_0); lower orders on the last steps
    below 15 steps."""
    abar = schedule.alpha_bar_at(torch.tensor(ts, dtype=torch.float64)).tolist() + [1.0]
    sv = [math.sqrt((1 - a) / a) for a in abar]
    n, hist = len(ts), []
    for i in range(n):
        eps = model(x, torch.full((len(x),), float(ts[i]), dtype=torch.float64))
        hist = ([eps] + hist)[:order]
        k = min(order, i + 1, n - i if n < 15 else order, 1 if i == n - 1 else order)
        nodes = sv[i:i - k:-1] if i - k >= 0 else sv[i::-1][:k]
        xt = x / math.sqrt(abar[i])
        for j in range(k):
            basis = np.poly1d([1.0])
            for m in range(k):
                if m != j:
                    basis = basis * np.poly1d([1.0, -nodes[m]]) / (nodes[j] - nodes[m])
            anti = np.polyint(basis)
            xt = xt + (anti(sv[i + 1]) - anti(sv[i])) * hist[j]
        x = math.sqrt(abar[i + 1]) * xt
    return x


@pytest.mark.parametrize("steps", [6, 12, 30])
def test_ipndm_matches_textbook_adams_bashforth(steps):
    model = EpsModel(LINEAR)
    x = z32().double()
    ts = ds.make_timesteps("karras", steps, LINEAR).tolist()
    ours = ds.sample(model, x, schedule=LINEAR, sampler="ipndm", steps=steps, spacing="karras")
    torch.testing.assert_close(ours, ref_ipndm(model, x, LINEAR, ts), rtol=1e-10, atol=1e-10)


# -- convergence orders on Gaussian data against the closed-form flow --------------------------------------------------
@pytest.fixture(scope="module")
def gauss3():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    mu = torch.tensor([[0.5, -0.3, 0.2]], dtype=torch.float64)
    return ds.GaussianMixture(mu, (A @ A.T / 3 + 0.1 * torch.eye(3, dtype=torch.float64))[None])


def flow_to(gauss, schedule, x_T, s_end):
    """The closed-form probability-flow state at σ̃ = s_end, in x̃ (helpers.exact_flow at any end level)."""
    mu, cov = gauss.means[0], gauss.covs[0]
    e, U = torch.linalg.eigh(cov)
    s2 = schedule.sigmas[-1].item() ** 2
    xt = x_T / math.sqrt(schedule.alphas_cumprod[-1].item())
    return mu + ((xt - mu) @ U) * torch.sqrt((e + s_end**2) / (e + s2)) @ U.T


def rms(a, b):
    return (a - b).square().mean().sqrt().item()


# measured on karras spacing, steps 40 → 80 → 160 (error at the last level, no final jump): ipndm 3.6, 3.8;
# unipc order 3 (UniC: + 1) 3.9, 3.7; unipc order 2: 2.9; plms 2.1, 2.0 — PLMS's fixed coefficients are those of a
# uniform grid, on a non-uniform one the AB combination is only first-order consistent in its step-size variation
ORDERS = {("ipndm", ()): (3.4, 4.6), ("unipc", (("order", 3),)): (3.4, 4.6), ("unipc", (("order", 2),)): (2.5, 3.5),
          ("plms", ()): (1.8, 2.6)}


@pytest.mark.parametrize("sampler,opts", list(ORDERS))
def test_convergence_order(gauss3, sampler, opts):
    x_T = noise(256, 3, seed=2)
    model = ds.ExactEpsilon(gauss3, LINEAR)
    a0 = LINEAR.alphas_cumprod[0].item()
    truth = flow_to(gauss3, LINEAR, x_T, math.sqrt((1 - a0) / a0)) * math.sqrt(a0)
    ns = [40, 80, 160]
    errs = [rms(ds.sample(model, x_T, schedule=LINEAR, sampler=sampler, steps=n, spacing="karras",
                          denoise_final=False, **dict(opts)), truth) for n in ns]
    slopes = -np.diff(np.log(errs)) / np.log(2)
    lo, hi = ORDERS[sampler, opts]
    print(sampler, opts, errs, slopes)
    assert lo < slopes[-1] < hi, (errs, slopes)


@pytest.mark.parametrize("sampler,opts", [("unipc", {"order": 3}), ("ipndm", {})])
def test_final_ode_reaches_sigma_zero(gauss3, sampler, opts):
    """final="ode" continues the ODE to σ = 0 with the solver's order; "tweedie" returns x̂_0 at the last level,
    an O(σ̃_min²) endpoint error (σ̃ = 0.01 at t = 0 on the linear schedule) that no step count removes. Measured at
    80 / 200 / 400 karras steps: unipc tweedie 1.4e-4, 8.9e-5, 8.8e-5 vs ode 6.0e-5, 1.5e-6, 9e-8; ipndm 3.3e-4,
    9.4e-5, 8.8e-5 vs 2.7e-4, 8.1e-6, 5.4e-7. With lower_order_final below 15 steps the last step is first order
    and the two coincide."""
    x_T = noise(256, 3, seed=3)
    model = ds.ExactEpsilon(gauss3, LINEAR)
    truth = flow_to(gauss3, LINEAR, x_T, 0.0)
    kw = dict(schedule=LINEAR, sampler=sampler, spacing="karras", lower_order_final=False, **opts)
    err = {f: rms(ds.sample(model, x_T, steps=200, final=f, **kw), truth) for f in ("tweedie", "ode")}
    print(sampler, err)
    assert err["tweedie"] > 5e-5 and err["ode"] < 0.2 * err["tweedie"]
    kw["lower_order_final"] = True
    a, b = (ds.sample(model, x_T, steps=10, final=f, **kw) for f in ("tweedie", "ode"))
    assert torch.equal(a, b)


def test_bad_options_fail_before_any_model_call():
    calls = []
    model = lambda x, t: calls.append(1) or x
    for sampler, opts, match in [("unipc", {"order": 4}, "1, 2, 3"), ("unipc", {"variant": "bh3"}, "bh1, bh2"),
                                 ("ipndm", {"order": 5}, "1, 2, 3, 4"), ("dpmpp_2m", {"final": "x0"}, "tweedie, ode"),
                                 ("plms", {"order": 2}, "no option")]:
        with pytest.raises(ValueError, match=match):
            ds.sample(model, noise(2, 2), schedule=LINEAR, sampler=sampler, **opts)
    assert not calls
