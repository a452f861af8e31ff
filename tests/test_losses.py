"""Tests of diffsteps.training.losses.

Reference values are computed here in plain Python floats from the betas (math.prod for ᾱ), in the textbook form of
each formula (ε-space weight divided by c_p), independently of the own-space forms the module uses.
"""

from __future__ import annotations

import math

import pytest
import torch

import diffsteps as ds
from diffsteps.training.losses import (
    LOSSES,
    DiffusionLoss,
    loss_weights,
    sample_timesteps,
)

F64 = torch.float64
T = 1000
STEPS = [0, 1, 500, T - 1]


@pytest.fixture(scope="module", params=["linear", "cosine"])
def schedule(request):
    return ds.make_schedule(request.param, T)


# -- independent reference ---------------------------------------------------------------------------------------
def ref_terms(betas: list[float], t: int):
    """β_t, ᾱ_t, ᾱ_{t−1} in plain floats."""
    abar = math.prod(1.0 - b for b in betas[: t + 1])
    abar_prev = math.prod(1.0 - b for b in betas[:t])  # empty product: 1 at t = 0
    return betas[t], abar, abar_prev


def ref_c(prediction: str, abar: float) -> float:
    """Own-space error = c_p × ε-space error: c_ε = 1, c_x0 = 1/SNR, c_v = (1 + SNR)/SNR."""
    snr = abar / (1.0 - abar)
    return {"epsilon": 1.0, "x0": 1.0 / snr, "v": (1.0 + snr) / snr}[prediction]


def ref_vlb_eps(betas, t, variance):
    """Ho et al. 2020 eq. 12: β²/(2σ²(1 − β)(1 − ᾱ_t)); σ² = β̃_t or β_t; the t = 0 decoder term with σ_0² = β_0."""
    b, a, ap = ref_terms(betas, t)
    if t == 0 or variance == "large":
        var = b
    else:
        var = (1.0 - ap) / (1.0 - a) * b
    return b * b / (2.0 * var * (1.0 - b) * (1.0 - a))


def ref_own_weight(kind, prediction, betas, t, gamma=None, k=1.0, denoise_weight=1.0, variance="small"):
    b, a, ap = ref_terms(betas, t)
    snr = a / (1.0 - a)
    c = ref_c(prediction, a)
    if kind == "simple":
        w_eps = c
    elif kind == "vlb":
        w_eps = ref_vlb_eps(betas, t, variance)
    elif kind == "sgm":
        w_eps = b / (1.0 - a)
    elif kind == "snr":
        w_eps = 1.0 / (k + snr) ** (1.0 if gamma is None else gamma)
    elif kind == "min_snr":
        g = 5.0 if gamma is None else gamma
        w_eps = min(snr, g) / snr
    elif kind == "hybrid":
        w_eps = denoise_weight * c + (1.0 - denoise_weight) * ref_vlb_eps(betas, t, variance)
    else:
        raise AssertionError(kind)
    return w_eps / c


CONFIGS = [
    dict(kind="simple"),
    dict(kind="vlb", variance="small"),
    dict(kind="vlb", variance="large"),
    dict(kind="sgm"),
    dict(kind="snr"),
    dict(kind="snr", gamma=0.5, k=2.0),
    dict(kind="min_snr"),
    dict(kind="min_snr", gamma=1.0),
    dict(kind="hybrid", denoise_weight=0.3, variance="small"),
    dict(kind="hybrid", denoise_weight=0.7, variance="large"),
]
CONFIG_IDS = [",".join(f"{k}={v}" for k, v in c.items()) for c in CONFIGS]


def test_every_loss_has_a_config_and_every_config_a_loss():
    # conf/loss/<kind>.yaml selects LOSSES[kind]: a loss added without its config (or a config naming no loss) is
    # unreachable from run.py, or fails only when chosen
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).parents[1] / "conf" / "loss"
    kinds = {p.stem: instantiate(OmegaConf.load(p)).kind for p in conf.glob("*.yaml")}
    assert all(name == kind for name, kind in kinds.items()), kinds
    assert set(kinds) == set(LOSSES)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("prediction", ds.PREDICTIONS)
def test_weights_match_textbook_formulas(schedule, config, prediction):
    betas = schedule.betas.tolist()
    w = DiffusionLoss(prediction=prediction, **config).weights(schedule, torch.tensor(STEPS))
    assert w.dtype == F64 and w.shape == (len(STEPS),)
    for i, t in enumerate(STEPS):
        expected = ref_own_weight(config["kind"], prediction, betas, t, **{k: v for k, v in config.items()
                                                                         if k != "kind"})
        assert math.isclose(w[i].item(), expected, rel_tol=1e-9), (t, w[i].item(), expected)


def test_one_loss_object_serves_several_schedules():
    # nothing derived from a schedule may be cached on the object
    loss = DiffusionLoss("sgm", "x0")
    for name in ("linear", "cosine", "linear"):
        s = ds.make_schedule(name, T)
        betas = s.betas.tolist()
        assert math.isclose(loss.weights(s, [500]).item(), ref_own_weight("sgm", "x0", betas, 500), rel_tol=1e-9)


def test_min_snr_published_forms(schedule):
    """Hang et al. 2023: the own-space weight is min(SNR, γ) for x0, min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1)
    for v."""
    betas = schedule.betas.tolist()
    for gamma in (5.0, 1.0, 20.0):
        ts = [0, 1, 50, 200, 500, T - 1]
        got = {p: loss_weights("min_snr", schedule, ts, p, gamma=gamma) for p in ds.PREDICTIONS}
        for i, t in enumerate(ts):
            _, a, _ = ref_terms(betas, t)
            snr = a / (1 - a)
            assert math.isclose(got["x0"][i].item(), min(snr, gamma), rel_tol=1e-9)
            assert math.isclose(got["epsilon"][i].item(), min(snr, gamma) / snr, rel_tol=1e-9)
            assert math.isclose(got["v"][i].item(), min(snr, gamma) / (snr + 1), rel_tol=1e-9)


def test_defaults():
    assert DiffusionLoss("snr").gamma == 1.0 and DiffusionLoss("min_snr").gamma == 5.0
    assert DiffusionLoss("snr").k == 1.0
    loss = DiffusionLoss()
    assert (loss.kind, loss.prediction, loss.denoise_weight, loss.variance) == ("simple", "epsilon", 1.0, "small")
    assert "min_snr" in repr(DiffusionLoss("min_snr", "v")) and "gamma=5.0" in repr(DiffusionLoss("min_snr", "v"))


def test_p2_gamma_one_in_x0_space_is_alpha_bar(schedule):
    # P2 with k = 1, γ = 1 in x0-space is SNR/(1 + SNR) = ᾱ_t: a known closed form
    ts = list(range(0, T, 37))
    w = loss_weights("snr", schedule, ts, "x0")
    torch.testing.assert_close(w, schedule.alphas_cumprod[ts], rtol=1e-12, atol=0)


def test_vlb_equals_vdm_snr_difference(schedule):
    """With the posterior variance, Ho et al.'s ε-weight equals ½(SNR(t−1) − SNR(t))/SNR(t) (Kingma et al. 2021)."""
    betas = schedule.betas.tolist()
    ts = [1, 2, 10, 250, 500, 900, T - 1]
    w = loss_weights("vlb", schedule, ts, "epsilon", variance="small")
    w_x0 = loss_weights("vlb", schedule, ts, "x0", variance="small")
    for i, t in enumerate(ts):
        _, a, ap = ref_terms(betas, t)
        snr, snr_prev = a / (1 - a), ap / (1 - ap)
        assert math.isclose(w[i].item(), 0.5 * (snr_prev - snr) / snr, rel_tol=1e-8)
        # ... which in x0-space is the bare SNR difference ½(SNR(t−1) − SNR(t))
        assert math.isclose(w_x0[i].item(), 0.5 * (snr_prev - snr), rel_tol=1e-8)


def test_vlb_tends_to_half_the_likelihood_weighting():
    """As β_t → 0 the discrete ELBO term approaches the continuous one, ½ g² = ½ β on the score error (Song et al.
    2021, Thm. 1), i.e. vlb/sgm → ½."""
    s = ds.make_schedule("linear", 10_000)
    ts = [1000, 5000, 9000]
    ratio = loss_weights("vlb", s, ts) / loss_weights("sgm", s, ts)
    torch.testing.assert_close(ratio, torch.full((3,), 0.5, dtype=F64), rtol=5e-3, atol=0)


def test_decoder_term_is_gaussian_nll_without_constant(schedule):
    # t = 0: ‖x̂0 − x0‖²/(2β_0) per dimension in x0-space, the same for both variance choices
    b0 = schedule.betas[0].item()
    for variance in ("small", "large"):
        assert math.isclose(loss_weights("vlb", schedule, [0], "x0", variance=variance).item(), 1 / (2 * b0),
                            rel_tol=1e-9)
        assert math.isclose(loss_weights("vlb", schedule, [0], "epsilon", variance=variance).item(),
                            1 / (2 * (1 - b0)), rel_tol=1e-9)


def test_hybrid_endpoints(schedule):
    ts = list(range(0, T, 11))
    for p in ds.PREDICTIONS:
        torch.testing.assert_close(loss_weights("hybrid", schedule, ts, p, denoise_weight=1.0),
                                   loss_weights("simple", schedule, ts, p), rtol=0, atol=0)
        torch.testing.assert_close(loss_weights("hybrid", schedule, ts, p, denoise_weight=0.0, variance="large"),
                                   loss_weights("vlb", schedule, ts, p, variance="large"), rtol=0, atol=0)


def test_denoise_weight_mixes_any_kind_with_the_bound(schedule):
    ts = list(range(1, T, 7))
    for p in ds.PREDICTIONS:
        vlb = loss_weights("vlb", schedule, ts, p)
        for kind in ("simple", "snr", "min_snr", "sgm"):
            pure = loss_weights(kind, schedule, ts, p)
            torch.testing.assert_close(loss_weights(kind, schedule, ts, p, denoise_weight=0.3),
                                       0.3 * pure + 0.7 * vlb, rtol=1e-12, atol=0)
        torch.testing.assert_close(loss_weights("simple", schedule, ts, p, denoise_weight=0.6),
                                   loss_weights("hybrid", schedule, ts, p, denoise_weight=0.6), rtol=0, atol=0)
    # the per-sample loss uses the same mixed weight
    out, x0, noise, t = _batch(schedule)
    mixed = DiffusionLoss("snr", "v", denoise_weight=0.25)
    w = 0.25 * loss_weights("snr", schedule, t, "v") + 0.75 * loss_weights("vlb", schedule, t, "v")
    torch.testing.assert_close(mixed(out, x0, noise, t, schedule),
                               w * DiffusionLoss("simple", "v")(out, x0, noise, t, schedule), rtol=1e-12, atol=0)


# -- __call__ ----------------------------------------------------------------------------------------------------
def _batch(schedule, n=64, d=4, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, d // 2, generator=g, dtype=dtype)
    noise = torch.randn(n, 2, d // 2, generator=g, dtype=dtype)
    t = torch.randint(0, schedule.num_timesteps, (n,), generator=g)
    out = torch.randn(n, 2, d // 2, generator=g, dtype=dtype)
    return out, x0, noise, t


@pytest.mark.parametrize("prediction", ds.PREDICTIONS)
def test_simple_is_plain_mse_on_own_target(schedule, prediction):
    out, x0, noise, t = _batch(schedule)
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1)
    target = {"epsilon": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]
    expected = (out - target).square().mean(dim=(1, 2))
    got = DiffusionLoss("simple", prediction)(out, x0, noise, t, schedule)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


def test_loss_is_weight_times_own_mse(schedule):
    out, x0, noise, t = _batch(schedule, seed=3)
    for config in CONFIGS:
        for p in ds.PREDICTIONS:
            loss = DiffusionLoss(prediction=p, **config)
            simple = DiffusionLoss("simple", p)(out, x0, noise, t, schedule)
            torch.testing.assert_close(loss(out, x0, noise, t, schedule), loss.weights(schedule, t) * simple,
                                       rtol=1e-14, atol=0)


def test_dtype_and_gradient():
    s = ds.make_schedule("cosine", T)
    out, x0, noise, t = _batch(s, dtype=torch.float32, seed=1)
    out.requires_grad_(True)
    loss = DiffusionLoss("min_snr", "v")
    val = loss(out, x0, noise, t, s)
    assert val.dtype == torch.float32 and val.shape == (len(t),)
    val.sum().backward()
    a = s.alphas_cumprod[t].to(torch.float32).reshape(-1, 1, 1)
    target = a.sqrt() * noise - (1 - a).sqrt() * x0
    w = loss.weights(s, t).to(torch.float32).reshape(-1, 1, 1)
    torch.testing.assert_close(out.grad, 2 * w * (out.detach() - target) / 4, rtol=1e-5, atol=1e-7)
    half = DiffusionLoss("sgm", "x0")(out.detach().half(), x0.half(), noise.half(), t, s)
    assert half.dtype == torch.float16 and torch.all(torch.isfinite(half))


def test_batch_of_one_dimensional_samples_and_empty_batch(schedule):
    loss = DiffusionLoss("vlb", "x0")
    x0, noise = torch.tensor([0.3, -1.0], dtype=F64), torch.tensor([1.0, 0.5], dtype=F64)
    out = torch.tensor([0.0, 0.0], dtype=F64)
    got = loss(out, x0, noise, torch.tensor([3, 700]), schedule)
    torch.testing.assert_close(got, loss.weights(schedule, [3, 700]) * x0.square(), rtol=1e-14, atol=0)
    empty = torch.zeros(0, 3, dtype=F64)
    assert loss(empty, empty, empty, torch.zeros(0, dtype=torch.long), schedule).shape == (0,)


# -- an exact model: the same loss from ε-, x0- and v-parameterised outputs --------------------------------------
def _exact_outputs(schedule, mixture, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = mixture.sample(len(t), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    x_t = ds.q_sample(schedule, x0, t.to(F64), noise)
    eps_hat = ds.ExactEpsilon(mixture, schedule)(x_t, t.to(F64))
    a = schedule.alphas_cumprod[t].reshape(-1, 1)
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    x0_hat = (x_t - sigma * eps_hat) / alpha
    v_hat = alpha * eps_hat - sigma * x0_hat
    return {"epsilon": eps_hat, "x0": x0_hat, "v": v_hat}, x0, noise


def test_losses_agree_across_predictions_for_exact_model(schedule):
    mixture = ds.GaussianMixture(means=[[-1.5, 0.5, 0.0, 1.0], [1.0, -1.0, 0.5, 0.0]], covs=0.3, weights=[0.3, 0.7])
    t = torch.tensor([0, 1, 2, 10, 100, 500, 900, T - 1]).repeat(16)
    outs, x0, noise = _exact_outputs(schedule, mixture, t)
    a = schedule.alphas_cumprod[t]
    snr = a / (1 - a)
    eps_err = (outs["epsilon"] - noise).square().mean(1)
    assert torch.all(eps_err > 0)  # the exact model is optimal, not error-free: the check is not vacuous
    for config in CONFIGS:
        L = {p: DiffusionLoss(prediction=p, **config)(outs[p], x0, noise, t, schedule) for p in ds.PREDICTIONS}
        kind = config["kind"]
        if kind == "simple":
            # plain own-space MSE: ‖x̂0 − x0‖² = E/SNR, ‖v̂ − v‖² = E(1 + SNR)/SNR
            torch.testing.assert_close(L["epsilon"], eps_err, rtol=1e-12, atol=0)
            torch.testing.assert_close(L["x0"] * snr, L["epsilon"], rtol=1e-10, atol=0)
            torch.testing.assert_close(L["v"] * snr / (1 + snr), L["epsilon"], rtol=1e-10, atol=0)
        elif kind == "hybrid":
            lam = config["denoise_weight"]
            vlb = DiffusionLoss("vlb", "epsilon", variance=config["variance"])(outs["epsilon"], x0, noise, t, schedule)
            for p in ds.PREDICTIONS:
                simple = DiffusionLoss("simple", p)(outs[p], x0, noise, t, schedule)
                torch.testing.assert_close(L[p], lam * simple + (1 - lam) * vlb, rtol=1e-10, atol=0)
        else:
            # a weighting of the ε-space error that does not depend on the parameterisation
            torch.testing.assert_close(L["x0"], L["epsilon"], rtol=1e-10, atol=0)
            torch.testing.assert_close(L["v"], L["epsilon"], rtol=1e-10, atol=0)


# -- the vlb of the exact model for Gaussian data, against the closed-form KL -------------------------------------
def _gaussian_kl(m_sq: float, v1: float, v2: float) -> float:
    """E KL(N(m1, v1) ‖ N(m2, v2)) per dimension, given E(m1 − m2)² = m_sq."""
    return 0.5 * (math.log(v2 / v1) + (v1 + m_sq) / v2 - 1.0)


def test_vlb_of_exact_gaussian_model_matches_closed_form_kl(schedule):
    """Data N(0, s²I): E[x0 | x_t] = α s² x_t/(α² s² + σ²) with Var(x0 | x_t) = s² σ²/(α² s² + σ²). Then
    q(x_{t−1}|x_t, x0) = N(c0 x0 + ct x_t, β̃) and p(x_{t−1}|x_t) = N(c0 x̂0 + ct x_t, σ_rev²), so
    E KL = ½[log(σ_rev²/β̃) + (β̃ + c0² Var(x0|x_t))/σ_rev² − 1]; the loss drops the θ-free variance part of it.
    At t = 0 the loss is E‖x̂0 − x0‖²/(2β_0) (decoder NLL without its constant). The Monte-Carlo mean of the
    per-sample loss must agree within 5 standard errors."""
    D, s2, n = 16, 0.49, 4000
    mixture = ds.GaussianMixture(means=torch.zeros(1, D), covs=s2)
    betas = schedule.betas.tolist()
    for step in [0, 1, 10, 500, T - 1]:
        t = torch.full((n,), step)
        outs, x0, noise = _exact_outputs(schedule, mixture, t, seed=step + 7)
        b, a, ap = ref_terms(betas, step)
        post_var_x0 = s2 * (1 - a) / (a * s2 + (1 - a))  # Var(x0 | x_t)
        for variance in ("small", "large"):
            if step == 0:
                expected = post_var_x0 / (2 * b)
            else:
                c0 = math.sqrt(ap) * b / (1 - a)
                beta_tilde = (1 - ap) * b / (1 - a)
                rev_var = beta_tilde if variance == "small" else b
                kl = _gaussian_kl(c0 * c0 * post_var_x0, beta_tilde, rev_var)
                const = _gaussian_kl(0.0, beta_tilde, rev_var)  # the θ-independent part Ho et al. drop
                if variance == "small":
                    assert const == 0.0
                expected = kl - const
            for prediction in ("epsilon", "v"):
                per_sample = DiffusionLoss("vlb", prediction, variance=variance)(outs[prediction], x0, noise, t,
                                                                                 schedule)
                mc, se = per_sample.mean().item(), per_sample.std().item() / math.sqrt(n)
                assert abs(mc - expected) < 5 * se, (step, variance, prediction, mc, expected, se)


# -- zero terminal SNR -----------------------------------------------------------------------------------------------
def test_zero_terminal_snr_weights_are_finite_for_v_and_x0():
    s = ds.make_schedule("linear", T, zero_terminal_snr=True)
    assert s.alphas_cumprod[-1].item() == 0.0 and s.betas[-1].item() == 1.0
    ts = torch.arange(T)
    for config in CONFIGS:
        for p in ("x0", "v"):
            w = DiffusionLoss(prediction=p, **config).weights(s, ts)
            assert torch.all(torch.isfinite(w)) and torch.all(w >= 0), (config, p)
        w = DiffusionLoss(prediction="epsilon", **config).weights(s, ts)
        assert not torch.any(torch.isnan(w))
        assert torch.all(torch.isfinite(w[:-1]))
        # only the ELBO of an ε-network is infinite at ᾱ = 0 (x̂0 = (x_t − σ ε̂)/α is undetermined there)
        assert math.isfinite(w[-1].item()) == (config["kind"] not in ("vlb", "hybrid")), config


def test_zero_terminal_snr_limits():
    """The finite limits at ᾱ_{T−1} = 0 (β = 1), from the formulas by hand."""
    s = ds.make_schedule("linear", T, zero_terminal_snr=True)
    ap = math.prod(1 - b for b in s.betas.tolist()[:-1])  # ᾱ_{T−2}
    last = [T - 1]
    # vlb in x0/v space: c0²/(2σ²) with c0 = √ᾱ_{T−2}; β̃ = 1 − ᾱ_{T−2}, β = 1
    for p in ("x0", "v"):
        assert math.isclose(loss_weights("vlb", s, last, p).item(), ap / (2 * (1 - ap)), rel_tol=1e-9)
        assert math.isclose(loss_weights("vlb", s, last, p, variance="large").item(), ap / 2, rel_tol=1e-9)
        for kind in ("sgm", "snr", "min_snr"):  # all these weights vanish with SNR in x0/v space
            assert loss_weights(kind, s, last, p).item() == 0.0
    assert loss_weights("sgm", s, last).item() == 1.0         # β/(1 − ᾱ) = 1
    assert loss_weights("snr", s, last).item() == 1.0         # 1/(k + 0)
    assert loss_weights("min_snr", s, last).item() == 1.0     # lim min(SNR, γ)/SNR = 1
    assert loss_weights("snr", s, last, "x0", gamma=0.5).item() == 0.0


def test_zero_terminal_snr_losses():
    s = ds.make_schedule("linear", T, zero_terminal_snr=True)
    mixture = ds.GaussianMixture(means=[[-1.0, 2.0], [1.0, 0.0]], covs=0.2)
    g = torch.Generator().manual_seed(5)
    n = 32
    t = torch.full((n,), T - 1)
    x0 = mixture.sample(n, generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    # at ᾱ = 0 x_t = ε carries no information: the optimal x̂0 is the data mean and v = −x0, so v̂ = −x̂0
    x0_hat = mixture.mean().expand(n, 2)
    for config in CONFIGS:
        lx = DiffusionLoss(prediction="x0", **config)(x0_hat, x0, noise, t, s)
        lv = DiffusionLoss(prediction="v", **config)(-x0_hat, x0, noise, t, s)
        assert torch.all(torch.isfinite(lx))
        torch.testing.assert_close(lx, lv, rtol=1e-12, atol=0)
    # an ε-network's ELBO there is infinite: refuse loudly rather than return ∞ (and NaN gradients)
    with pytest.raises(ValueError, match="infinite.*'v'"):
        DiffusionLoss("vlb", "epsilon")(noise, x0, noise, t, s)
    assert torch.all(DiffusionLoss("min_snr", "epsilon")(noise, x0, noise, t, s) == 0)


# -- validation and helpers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, names", [
    (dict(kind="l2"), list(LOSSES)),
    (dict(prediction="score"), list(ds.PREDICTIONS)),
    (dict(kind="vlb", variance="learned"), ["small", "large"]),
])
def test_unknown_choices_name_the_valid_ones(kwargs, names):
    with pytest.raises(ValueError) as err:
        DiffusionLoss(**kwargs)
    assert all(n in str(err.value) for n in names)


@pytest.mark.parametrize("kwargs", [
    dict(kind="snr", gamma=0.0), dict(kind="min_snr", gamma=-5), dict(kind="snr", gamma=float("nan")),
    dict(kind="min_snr", gamma=float("inf")), dict(kind="snr", gamma="big"),
    dict(kind="hybrid", denoise_weight=-0.1), dict(kind="hybrid", denoise_weight=1.5),
    dict(kind="hybrid", denoise_weight=float("nan")),
    dict(kind="snr", k=0.0), dict(kind="snr", k=-1.0),
])
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        DiffusionLoss(**kwargs)


def test_bad_timesteps_and_shapes_raise():
    s = ds.make_schedule("linear", 100)
    loss = DiffusionLoss("vlb")
    for t in ([-1], [100], [1.5], [float("nan")]):
        with pytest.raises(ValueError):
            loss.weights(s, t)
    assert loss.weights(s, torch.tensor([3.0, 7.0])).shape == (2,)  # whole-number floats are accepted
    x = torch.zeros(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="one shape"):
        loss(x, torch.zeros(4, 2, dtype=F64), x, torch.zeros(4, dtype=torch.long), s)
    with pytest.raises(ValueError, match="one timestep per sample"):
        loss(x, x, x, torch.zeros(3, dtype=torch.long), s)


def test_sample_timesteps():
    s = ds.make_schedule("cosine", 10)
    t = sample_timesteps(20_000, s, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (20_000,)
    assert int(t.min()) == 0 and int(t.max()) == 9
    counts = torch.bincount(t, minlength=10).to(F64)
    assert torch.all((counts - 2000).abs() < 5 * math.sqrt(2000 * 0.9))  # uniform, within 5 standard errors
    again = sample_timesteps(20_000, s, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    assert sample_timesteps(0, s).shape == (0,)
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ValueError):
            sample_timesteps(bad, s)
