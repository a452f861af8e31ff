"""Samplers against closed-form truth: exact Gaussian / Gaussian-mixture models, where p_t and the probability-flow
ODE are known, plus identities between samplers."""


import numpy as np
import pytest
import torch
from helpers import CountingModel, exact_flow, noise

import diffsteps as ds

FIXED = [n for n, s in ds.SAMPLERS.items() if not s.adaptive]  # adaptive picks its own steps: test_adaptive.py
DETERMINISTIC = [n for n in FIXED if not ds.SAMPLERS[n].stochastic]


def rms(a, b):
    return (a - b).square().mean().sqrt().item()


def slope(ns, errs):
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


# -- accuracy and convergence order ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_converges_to_closed_form_flow(gaussian, linear, sampler):
    x_T = noise(256, 3, seed=1)
    truth = exact_flow(gaussian, linear, x_T)
    model = ds.ExactEpsilon(gaussian, linear)
    err = rms(ds.sample(model, x_T, schedule=linear, sampler=sampler, steps=500, spacing="trailing"), truth)
    # every sampler ends with one first-order jump from σ̃(t=0) ≈ 0.01 to 0 (x̂_0 itself), an O(σ̃²) floor of ~1e-4
    assert err < (5e-3 if sampler in ("ddim", "euler") else 5e-4)


ORDERS = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp_2m": 2, "dpmpp_3m": 2.5}


@pytest.mark.parametrize("sampler", list(ORDERS))
def test_convergence_order_on_gaussian_against_closed_form(gaussian, linear, sampler):
    x_T = noise(256, 3, seed=2)
    truth = exact_flow(gaussian, linear, x_T)
    model = ds.ExactEpsilon(gaussian, linear)
    ns = [10, 20, 40, 80]
    errs = [rms(ds.sample(model, x_T, schedule=linear, sampler=sampler, steps=n, spacing="logsnr"), truth)
            for n in ns]
    order = slope(ns, errs)
    assert ORDERS[sampler] - 0.25 < order < ORDERS[sampler] + 1.0, (order, errs)


@pytest.fixture(scope="module")
def mixture_reference(mixture, linear):
    """A converged reference for the nonlinear mixture flow: two different high-order solvers at 1000 steps agree."""
    model = ds.ExactEpsilon(mixture, linear)
    x_T = noise(512, 2, seed=3)
    ref = ds.sample(model, x_T, schedule=linear, sampler="dpmpp_3m", steps=1000, spacing="karras")
    other = ds.sample(model, x_T, schedule=linear, sampler="heun", steps=1000, spacing="karras")
    assert rms(ref, other) < 5e-5
    return model, x_T, ref


@pytest.mark.parametrize("sampler", list(ORDERS))
def test_convergence_order_on_mixture(mixture_reference, linear, sampler):
    model, x_T, ref = mixture_reference
    ns = [10, 20, 40, 80]
    errs = [rms(ds.sample(model, x_T, schedule=linear, sampler=sampler, steps=n, spacing="karras"), ref) for n in ns]
    order = slope(ns, errs)
    assert ORDERS[sampler] - 0.25 < order < ORDERS[sampler] + 1.0, (order, errs)


# -- distributions ------------------------------------------------------------------------------------------------
def assert_moments(x, mean, cov, n_se=4.5):
    """Sample mean and covariance within n_se standard errors (Gaussian fourth moments for the covariance SE)."""
    n = len(x)
    se_mean = (cov.diag() / n).sqrt()
    assert torch.all((x.mean(0) - mean).abs() < n_se * se_mean), (x.mean(0), mean)
    d = cov.diag()
    se_cov = ((d[:, None] * d[None, :] + cov.square()) / n).sqrt()
    assert torch.all((torch.cov(x.T) - cov).abs() < n_se * se_cov), (torch.cov(x.T), cov)


@pytest.mark.parametrize("sampler", FIXED)
def test_every_sampler_reproduces_gaussian(gaussian, linear, sampler):
    model = ds.ExactEpsilon(gaussian, linear)
    x = ds.sample(model, noise(4000, 3, seed=4), schedule=linear, sampler=sampler, steps=250,
                  generator=torch.Generator().manual_seed(5))
    assert_moments(x, gaussian.mean(), gaussian.covariance())


@pytest.mark.parametrize("sampler", FIXED)
def test_every_sampler_reproduces_mixture_and_mode_weights(mixture, linear, sampler):
    model = ds.ExactEpsilon(mixture, linear)
    n = 4000
    x = ds.sample(model, noise(n, 2, seed=6), schedule=linear, sampler=sampler, steps=250,
                  generator=torch.Generator().manual_seed(7))
    assert_moments(x, mixture.mean(), mixture.covariance())
    modes = mixture.responsibilities(x).argmax(1)
    freq = torch.bincount(modes, minlength=3).double() / n
    se = (mixture.weights * (1 - mixture.weights) / n).sqrt()
    assert torch.all((freq - mixture.weights).abs() < 4.5 * se), freq


# -- identities between samplers ----------------------------------------------------------------------------------
def test_ddim_eta1_all_steps_equals_ddpm_posterior_variance(mixture):
    s = ds.make_schedule("cosine", 200)
    model = ds.ExactEpsilon(mixture, s)
    x_T = noise(256, 2, seed=8)
    kw = dict(schedule=s, steps=200, spacing="trailing")
    a = ds.sample(model, x_T, sampler="ddim", eta=1.0, generator=torch.Generator().manual_seed(9), **kw)
    b = ds.sample(model, x_T, sampler="ddpm", variance="small", generator=torch.Generator().manual_seed(9), **kw)
    assert torch.allclose(a, b, rtol=1e-11, atol=1e-12)
    c = ds.sample(model, x_T, sampler="ddpm", variance="large", generator=torch.Generator().manual_seed(9), **kw)
    assert rms(a, c) > 1e-3  # the large variance is a different sampler


def test_euler_is_ddim_eta0(mixture, linear):
    model = ds.ExactEpsilon(mixture, linear)
    x_T = noise(128, 2, seed=10)
    for spacing in ("trailing", "leading", [999, 640, 300, 77, 3]):
        steps = None if isinstance(spacing, list) else 17
        a = ds.sample(model, x_T, schedule=linear, sampler="euler", steps=steps, spacing=spacing)
        b = ds.sample(model, x_T, schedule=linear, sampler="ddim", steps=steps, spacing=spacing)
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sampler", FIXED)
def test_prediction_types_give_identical_samples(mixture, linear, sampler):
    base = ds.ExactEpsilon(mixture, linear)

    def as_prediction(kind):
        def model(x, t):
            eps = base(x, t)
            a = linear.alpha_bar_at(t)[:, None]
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            return ds.prediction_target(x0, eps, a.sqrt(), (1 - a).sqrt(), kind)
        return model

    x_T = noise(64, 2, seed=11)
    out = {k: ds.sample(as_prediction(k), x_T, schedule=linear, sampler=sampler, steps=12, prediction=k,
                        generator=torch.Generator().manual_seed(0)) for k in ds.PREDICTIONS}
    assert torch.allclose(out["x0"], out["epsilon"], rtol=1e-8, atol=1e-9)
    assert torch.allclose(out["v"], out["epsilon"], rtol=1e-8, atol=1e-9)


# -- bookkeeping --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,nfe", [("ddim", 10), ("ddpm", 10), ("euler", 10), ("heun", 19),
                                         ("sde_euler", 10), ("dpmpp_2m", 10), ("dpmpp_3m", 10), ("pndm", 19)])
def test_nfe_and_timesteps(mixture, linear, sampler, nfe):
    model = CountingModel(ds.ExactEpsilon(mixture, linear))
    r = ds.sample(model, noise(8, 2), schedule=linear, sampler=sampler, steps=10, spacing="karras", return_info=True)
    assert r.nfe == model.calls == nfe
    assert len(r.timesteps) == 10 and r.timesteps[0] == 999 and r.timesteps[-1] == 0
    assert all(t.ndim == 1 and len(t) == 8 for t in model.ts)
    if ds.SAMPLERS[sampler].integer_steps:
        assert all(torch.equal(t, t.round()) for t in model.ts)
    # without the final denoising step the last visited timestep is the output level: one call fewer per stage
    r2 = ds.sample(model, noise(8, 2), schedule=linear, sampler=sampler, steps=10, spacing="karras",
                   denoise_final=False, return_info=True)
    assert r2.nfe == {"heun": 18, "pndm": 18}.get(sampler, 9) and len(r2.timesteps) == 9


def test_float32_module_driven_by_float64_sampler(linear):
    net = torch.nn.Linear(3, 2)  # a toy network: t enters as an extra input feature

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.seen = net, []

        def forward(self, x, t):
            self.seen.append((x.dtype, t.dtype))
            return self.lin(torch.cat([x, t[:, None] / 1000], 1))

    m = Net()
    out = ds.sample(m, noise(4, 2), schedule=linear, sampler="heun", steps=5)
    assert out.dtype == torch.float64 and set(m.seen) == {(torch.float32, torch.float32)}


def test_generator_reproducibility(mixture, linear):
    model = ds.ExactEpsilon(mixture, linear)
    run = lambda seed: ds.sample(model, noise(16, 2), schedule=linear, sampler="sde_euler", steps=20,
                                 generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.allclose(run(1), run(2))


def test_clipping_and_dynamic_thresholding(linear):
    big = lambda x, t: torch.full_like(x, -5.0)  # ε̂ = −5 makes x̂_0 far outside [−1, 1]
    x_T = torch.zeros(3, 4, dtype=torch.float64)
    clipped = ds.sample(big, x_T, schedule=linear, sampler="ddim", steps=1, clip_denoised=1.0)
    assert torch.allclose(clipped, torch.ones_like(clipped))  # one step into the data returns clamp(x̂_0)
    # Imagen dynamic thresholding: s = max(quantile_p |x̂_0|, 1); x̂_0 ← clamp(x̂_0, −s, s)/s
    ramp = torch.linspace(-3, 3, 8, dtype=torch.float64)[None].repeat(2, 1)
    x0_model = lambda x, t: ramp
    out = ds.sample(x0_model, torch.zeros_like(ramp), schedule=linear, sampler="ddim", steps=1, prediction="x0",
                    dynamic_threshold=0.75)
    s = float(np.quantile(np.abs(ramp[0].numpy()), 0.75))
    assert torch.allclose(out, ramp.clamp(-s, s) / s)


def test_zero_terminal_snr_starts_from_pure_noise():
    s = ds.make_schedule("linear", 1000, zero_terminal_snr=True)
    gauss = ds.GaussianMixture(torch.zeros(1, 2), 0.25)
    eps_model = ds.ExactEpsilon(gauss, s)

    def v_model(x, t):  # v = α ε − σ x_0 is finite at ᾱ = 0 where x_0 cannot be recovered from ε
        a = s.alpha_bar_at(t)[:, None]
        x0 = 0.25 / (0.25 * a + 1 - a) * a.sqrt() * x  # E[x_0 | x_t] for N(0, 0.25 I) data
        return a.sqrt() * eps_model(x, t) - (1 - a).sqrt() * x0

    for sampler in ("ddim", "ddpm", "dpmpp_2m", "dpmpp_3m"):
        x = ds.sample(v_model, noise(4000, 2, seed=12), schedule=s, sampler=sampler, steps=500, prediction="v",
                      generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(x).all()
        assert_moments(x, torch.zeros(2, dtype=torch.float64), 0.25 * torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="zero terminal SNR.*ddpm, ddim"):
        ds.sample(v_model, noise(4, 2), schedule=s, sampler="heun", prediction="v")


# -- bad input: clear errors before any model call ------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="dpm"), "valid choices: ddpm, ddim, euler, heun, sde_euler, dpmpp_2m, dpmpp_3m"),
    (dict(steps=0), "positive integer"),
    (dict(steps=-5), "positive integer"),
    (dict(steps=1001), "exceeds the 1000"),
    (dict(sampler="ddim", eta=1.5), r"eta in \[0, 1\]"),
    (dict(sampler="ddim", eta=-0.1), r"eta in \[0, 1\]"),
    (dict(sampler="ddpm", variance="learned"), "small, large"),
    (dict(sampler="heun", eta=0.5), "no option"),
    (dict(spacing="cosine"), "valid choices: leading"),
    (dict(spacing=[10, 500], steps=None), "strictly decreasing"),
    (dict(spacing=[999, -1], steps=None), r"\[0, 999\]"),
    (dict(prediction="score"), "epsilon, x0, v"),
    (dict(dynamic_threshold=1.5), "quantile"),
])
def test_bad_input_fails_before_any_model_call(linear, kwargs, match):
    model = CountingModel(lambda x, t: x)
    with pytest.raises(ValueError, match=match):
        ds.sample(model, noise(2, 2), schedule=linear, **kwargs)
    assert model.calls == 0
