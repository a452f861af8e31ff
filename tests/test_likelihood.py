"""Tests of diffsteps.evaluation.likelihood (the variational bound in bits per dimension).

Ground truth is derived here, independently of the module, for Gaussian data x_0 ~ N(μ, s² I) in d dimensions.
With x_t = √a x_0 + √(1 − a) ε (a = ᾱ_t), the pair is jointly Gaussian, so per dimension
    E[x_0 | x_t] = μ + √a s² (x_t − √a μ)/(a s² + 1 − a),   V(a) = Var(x_0 | x_t) = s² (1 − a)/(a s² + 1 − a),
and the exact ε-predictor (ExactEpsilon) gives x̂_0 = E[x_0 | x_t] (Tweedie). For a transition t → s the model mean
differs from the posterior mean by c_0 (x_0 − x̂_0), c_0 = √ᾱ_s β_{t|s}/(1 − ᾱ_t), whose square averages to c_0² V(a_t),
so the expected KL term is ½ d (β̃/Σ + c_0² V/Σ − 1 − ln(β̃/Σ)); the prior term averages to
½ [d(1 − a_K − 1 − ln(1 − a_K)) + a_K (‖μ‖² + d s²)], the Gaussian decoder to ½ d (V(a_1)/σ² + ln(2π σ²)) with
σ² = 1 − a_1, and the true NLL is ½ d (1 + ln(2π s²)). All divided by d ln 2. Schedule quantities are recomputed
here from the betas in plain Python floats (math.prod for ᾱ).
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

import diffsteps as ds
from diffsteps.evaluation.likelihood import (
    ELBO,
    discretized_gaussian_log_likelihood,
    elbo,
    elbo_bpd,
)

F64 = torch.float64
T = 1000
N = 10_000
MU = [0.5, -1.0]
S2 = 0.25
K_STEPS = [0, 3, 10, 40, 100, 220, 400, 600, 800, 999]  # an uneven 10-step chain


@pytest.fixture(scope="module")
def schedule():
    return ds.make_schedule("linear", T)


@pytest.fixture(scope="module")
def gaussian():
    return ds.GaussianMixture(torch.tensor([MU]), S2)


# -- independent reference ---------------------------------------------------------------------------------------
def abar(betas, t):
    return math.prod(1.0 - b for b in betas[: t + 1])


def post_var(s2, a):
    return s2 * (1.0 - a) / (a * s2 + 1.0 - a)


def exact_x0(x_t, a, mu=MU, s2=S2):
    mu = torch.tensor(mu, dtype=F64)
    return mu + math.sqrt(a) * s2 * (x_t - math.sqrt(a) * mu) / (a * s2 + 1.0 - a)


def step(betas, t, s):
    """(c_0, c_t, β̃, β_{t|s}) of q(x_s | x_t, x_0), from Bayes' rule on the two Gaussians."""
    at, as_ = abar(betas, t), abar(betas, s)
    b = 1.0 - at / as_
    return math.sqrt(as_) * b / (1.0 - at), math.sqrt(at / as_) * (1.0 - as_) / (1.0 - at), \
        (1.0 - as_) * b / (1.0 - at), b


def closed_form(betas, ts, variance, mu=MU, s2=S2):
    """Expected terms in bits/dim: (prior, kl per transition τ_i → τ_{i−1} for i = 2 … K, decoder, total, nll)."""
    d = len(mu)
    per = d * math.log(2.0)
    aK = abar(betas, ts[-1])
    prior = 0.5 * (d * ((1.0 - aK) - 1.0 - math.log(1.0 - aK)) + aK * (sum(m * m for m in mu) + d * s2)) / per
    kl = []
    for i in range(1, len(ts)):
        c0, _, bt, b = step(betas, ts[i], ts[i - 1])
        S = bt if variance == "posterior" else b
        kl.append(0.5 * d * (bt / S + c0 * c0 * post_var(s2, abar(betas, ts[i])) / S - 1.0 - math.log(bt / S)) / per)
    a1 = abar(betas, ts[0])
    dec = 0.5 * d * (post_var(s2, a1) / (1.0 - a1) + math.log(2 * math.pi * (1.0 - a1))) / per
    nll = 0.5 * d * (1.0 + math.log(2 * math.pi * s2)) / per
    return prior, kl, dec, prior + sum(kl) + dec, nll


def se(x: torch.Tensor) -> float:
    return x.std().item() / math.sqrt(x.shape[0])


class Recorder(torch.nn.Module):
    """Records the (x, t) of each call, returns the inner model's output (optionally with constant v channels)."""

    def __init__(self, inner, v: float | None = None):
        super().__init__()
        self.inner, self.v, self.calls = inner, v, []

    def forward(self, x, t):
        self.calls.append((x.clone(), t[0].item()))
        out = self.inner(x, t)
        return out if self.v is None else torch.cat([out, torch.full_like(out, self.v)], 1)


_RUNS: dict = {}


def run(schedule, gaussian, ts, variance, seed=0):
    """One Monte-Carlo ELBO over N fresh samples, cached across tests (the full-T runs are the slow part)."""
    key = (None if ts is None else tuple(ts), variance, seed)
    if key not in _RUNS:
        g = torch.Generator().manual_seed(seed)
        x0 = gaussian.sample(N, generator=g)
        _RUNS[key] = (x0, elbo(ds.ExactEpsilon(gaussian, schedule), x0, schedule, timesteps=ts, variance=variance,
                               generator=g))
    return _RUNS[key]


# -- 1. Monte-Carlo ELBO vs closed form ----------------------------------------------------------------------------
@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize("ts", [None, K_STEPS, [5, 17, 333]], ids=["all", "K10", "K3-from5"])
def test_matches_closed_form(schedule, gaussian, variance, ts):
    _, r = run(schedule, gaussian, ts, variance)
    chain = list(range(T)) if ts is None else ts
    prior, kl, dec, total, _ = closed_form(schedule.betas.tolist(), chain, variance)
    assert isinstance(r, ELBO) and r.timesteps.tolist() == chain
    assert r.kl.shape == (N, len(chain) - 1) and r.total.shape == r.prior.shape == r.decoder.shape == (N,)
    assert all(v.dtype == F64 for v in (r.total, r.prior, r.decoder, r.kl))
    torch.testing.assert_close(r.total, r.prior + r.kl.sum(1) + r.decoder, rtol=1e-12, atol=1e-12)
    assert abs(r.total.mean().item() - total) < 4 * se(r.total)
    assert abs(r.prior.mean().item() - prior) < 4 * se(r.prior)
    assert abs(r.decoder.mean().item() - dec) < 4 * se(r.decoder)
    assert abs(r.kl.sum(1).mean().item() - sum(kl)) < 4 * se(r.kl.sum(1))
    # every transition on its own (5 SE: ~1000 columns at once)
    z = (r.kl.mean(0) - torch.tensor(kl, dtype=F64)) / (r.kl.std(0) / math.sqrt(N))
    assert z.abs().max().item() < 5


def test_exact_reverse_process_is_tight(schedule):
    """For x_0 ~ N(0, I) the process is stationary and q(x_s | x_t) = N(c_0 x̂_0 + c_t x_t, β_{t|s} I) exactly, so
    with variance='beta' the bound telescopes to the true NLL ½(1 + ln 2π)/ln 2 on any chain, term for term."""
    std = ds.GaussianMixture(torch.zeros(1, 3), 1.0)
    g = torch.Generator().manual_seed(1)
    x0 = std.sample(N, generator=g)
    nll = 0.5 * (1.0 + math.log(2 * math.pi)) / math.log(2.0)
    for ts in ([0, 50, 500, 999], [7, 8, 900]):
        r = elbo(ds.ExactEpsilon(std, schedule), x0, schedule, timesteps=ts, variance="beta", generator=g)
        assert abs(r.total.mean().item() - nll) < 4 * se(r.total)


# -- 2. an upper bound on the NLL, tighter with more steps ---------------------------------------------------------
def test_upper_bound_on_nll(schedule, gaussian):
    betas = schedule.betas.tolist()
    for variance in ("posterior", "beta"):
        gaps = {}
        for name, ts in (("all", None), ("K10", K_STEPS)):
            x0, r = run(schedule, gaussian, ts, variance)
            chain = list(range(T)) if ts is None else ts
            *_, total, nll = closed_form(betas, chain, variance)
            assert total >= nll
            # per-sample gap against the true density of each x_0 (removes part of the x_0 variance)
            gap = r.total - (-gaussian.log_prob(x0) / (len(MU) * math.log(2.0)))
            assert gap.mean().item() > -3 * se(gap)
            gaps[name] = (total - nll, gap.mean().item(), se(gap))
        assert gaps["K10"][0] > 5 * gaps["all"][0]
        assert gaps["K10"][1] - gaps["all"][1] > 5 * math.hypot(gaps["K10"][2], gaps["all"][2])
        if variance == "beta":  # the upper variance is near optimal here: with all T steps the gap is tiny
            assert gaps["all"][0] < 0.02 * nll and abs(gaps["all"][1]) < 0.02 * nll


# -- 3. one KL term and the decoder, pointwise ----------------------------------------------------------------------
@pytest.mark.parametrize("variance", ["posterior", "beta", "learned"])
def test_pointwise_terms(schedule, gaussian, variance):
    s, t = 300, 420
    v = 0.3 if variance == "learned" else None
    model = Recorder(ds.ExactEpsilon(gaussian, schedule), v=v)
    x0 = gaussian.sample(64, generator=torch.Generator().manual_seed(2))
    r = elbo(model, x0, schedule, timesteps=[s, t], variance=variance, generator=torch.Generator().manual_seed(3))
    (x_t, t_seen), (x_s, s_seen) = model.calls
    assert (t_seen, s_seen) == (t, s)
    betas, D = schedule.betas.tolist(), len(MU)
    c0, ct, bt, b = step(betas, t, s)
    var_p = {"posterior": bt, "beta": b, "learned": math.exp(0.3 * math.log(b) + 0.7 * math.log(bt))}[variance]
    q = torch.distributions.Normal(c0 * x0 + ct * x_t, math.sqrt(bt))
    p = torch.distributions.Normal(c0 * exact_x0(x_t, abar(betas, t)) + ct * x_t, math.sqrt(var_p))
    want = torch.distributions.kl_divergence(q, p).sum(1) / (D * math.log(2.0))
    torch.testing.assert_close(r.kl[:, 0], want, rtol=1e-9, atol=1e-12)
    # decoder at τ_1 = s: N(x̂_0, 1 − ᾱ_s), for 'learned' interpolated towards β̃ of the step t → s
    a1 = abar(betas, s)
    dvar = 1.0 - a1 if variance != "learned" else math.exp(0.3 * math.log(1.0 - a1) + 0.7 * math.log(bt))
    dec = -torch.distributions.Normal(exact_x0(x_s, a1), math.sqrt(dvar)).log_prob(x0).sum(1) / (D * math.log(2.0))
    torch.testing.assert_close(r.decoder, dec, rtol=1e-9, atol=1e-12)
    # the prior term needs no model: KL(N(√a x_0, 1 − a) ‖ N(0, 1))
    aK = abar(betas, t)
    prior = torch.distributions.kl_divergence(torch.distributions.Normal(math.sqrt(aK) * x0, math.sqrt(1 - aK)),
                                              torch.distributions.Normal(0.0, 1.0)).sum(1) / (D * math.log(2.0))
    torch.testing.assert_close(r.prior, prior, rtol=1e-9, atol=1e-12)


# -- 4. the discretised decoder -------------------------------------------------------------------------------------
def test_bin_probabilities_sum_to_one():
    levels = torch.arange(256, dtype=F64) / 127.5 - 1.0
    for mean in (-3.0, -1.0, -0.31, 0.0, 0.77, 1.0, 2.5):
        for var in (1e-6, 1e-4, 1e-2, 1.0, 100.0):
            logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), var)
            assert torch.isfinite(logp).all() and (logp <= 0).all()
            assert abs(torch.logsumexp(logp, 0).item()) < 1e-10, (mean, var)


def test_bin_probabilities_match_scipy():
    levels = torch.arange(256, dtype=F64) / 127.5 - 1.0
    mean, var = 0.2, 0.05
    sd = math.sqrt(var)
    logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), var)
    for k in (0, 1, 80, 153, 200, 254, 255):
        x = levels[k].item()
        lo = -math.inf if k == 0 else x - 1 / 255
        hi = math.inf if k == 255 else x + 1 / 255
        want = scipy.stats.norm.cdf(hi, mean, sd) - scipy.stats.norm.cdf(lo, mean, sd)
        assert math.isclose(math.exp(logp[k].item()), want, rel_tol=1e-9), k
    # far tails stay finite (no log 0) and fall off monotonically on both sides of the mean
    tight = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, 0.1), 1e-6)
    assert torch.isfinite(tight).all()
    centre = int(torch.argmax(tight))
    assert (tight[:centre].diff() > 0).all() and (tight[centre:].diff() < 0).all()


class ShrinkNet(torch.nn.Module):
    """A stand-in image ε-network: one learnable scale, in float32."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t):
        assert x.dtype == torch.float32 and t.ndim == 1
        return self.w * x


def images(n=6, lo=0, hi=256, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, 1, 8, 8), generator=g).float() / 127.5 - 1.0


def test_image_decoder_is_a_probability(schedule):
    x = images()
    x[:, :, 0] = -1.0  # make sure the open-ended edge bins occur
    x[:, :, 1] = 1.0
    r = elbo(ShrinkNet(), x, schedule, timesteps=[0, 10, 500, 999], generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(r.total).all() and (r.decoder >= 0).all() and (r.kl >= 0).all() and (r.prior >= 0).all()
    # 4-D input means discrete by default
    r2 = elbo(ShrinkNet(), x, schedule, timesteps=[0, 10, 500, 999], discrete=True,
              generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(r.total, r2.total, rtol=0, atol=0)


def test_discrete_decoder_approaches_density_times_bin_width(schedule):
    """Where σ ≫ the bin width 2/255 and no pixel sits in an open edge bin, P(bin) ≈ density × 2/255, so the
    discrete decoder is the continuous one plus log2(255/2) bits per dimension."""
    x = images(lo=20, hi=236)
    ts = [60, 999]
    kw = dict(timesteps=ts, generator=None)
    r_d = elbo(ShrinkNet(), x, schedule, discrete=True, **{**kw, "generator": torch.Generator().manual_seed(6)})
    r_c = elbo(ShrinkNet(), x, schedule, discrete=False, **{**kw, "generator": torch.Generator().manual_seed(6)})
    torch.testing.assert_close(r_d.decoder, r_c.decoder + math.log2(127.5), rtol=1e-3, atol=0)
    torch.testing.assert_close(r_d.kl, r_c.kl, rtol=0, atol=0)  # same draws, same KL


# -- 5. the learned-variance convention -----------------------------------------------------------------------------
def test_learned_variance_ends(schedule, gaussian):
    x0 = gaussian.sample(500, generator=torch.Generator().manual_seed(7))
    ts = [0, 4, 30, 200, 999]
    exact = ds.ExactEpsilon(gaussian, schedule)

    def go(model, variance):
        return elbo(model, x0, schedule, timesteps=ts, variance=variance, generator=torch.Generator().manual_seed(8))

    post, beta = go(exact, "posterior"), go(exact, "beta")
    v0, v1 = go(Recorder(exact, v=0.0), "learned"), go(Recorder(exact, v=1.0), "learned")
    assert not torch.allclose(post.kl, beta.kl)
    # v = 0 is the posterior end, v = 1 the beta end (Nichol & Dhariwal eq. 15)
    torch.testing.assert_close(v0.kl, post.kl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v0.prior, post.prior, rtol=0, atol=0)
    for a, b in ((v1.kl, beta.kl), (v1.prior, beta.prior), (v1.decoder, beta.decoder), (v1.total, beta.total)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the v = 0 decoder is not the fixed one: its lower end is β̃ of the step τ_2 → τ_1 (log β̃ clipped as in
    # improved-diffusion, since β̃ into the data is 0); test_pointwise_terms checks its value
    assert not torch.allclose(v0.decoder, post.decoder)


def test_learned_variance_splits_image_channels(schedule):
    x = images()
    kw = dict(timesteps=[0, 100, 999], variance="learned")
    net = ShrinkNet()
    r1 = elbo(Recorder(net, v=1.0), x, schedule, **kw, generator=torch.Generator().manual_seed(9))
    rb = elbo(net, x, schedule, timesteps=[0, 100, 999], variance="beta", generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(r1.total, rb.total, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="2C channels"):
        elbo(net, x, schedule, **kw)


# -- the data-set helper --------------------------------------------------------------------------------------------
def test_elbo_bpd(schedule, gaussian):
    x0 = gaussian.sample(300, generator=torch.Generator().manual_seed(10))
    model, ts = ds.ExactEpsilon(gaussian, schedule), K_STEPS
    whole = elbo(model, x0, schedule, timesteps=ts, generator=torch.Generator().manual_seed(11))
    out = elbo_bpd(model, x0, schedule, batch_size=1000, timesteps=ts, generator=torch.Generator().manual_seed(11))
    assert set(out) >= {"elbo_bpd", "elbo_prior_bpd", "elbo_kl_bpd", "elbo_decoder_bpd"}
    assert all(isinstance(v, float) for v in out.values())
    assert math.isclose(out["elbo_bpd"], whole.total.mean().item(), rel_tol=1e-12)
    assert math.isclose(out["elbo_kl_bpd"], whole.kl.sum(1).mean().item(), rel_tol=1e-12)
    assert math.isclose(out["elbo_bpd_stderr"], se(whole.total), rel_tol=1e-6)
    # uneven chunks, and a DataLoader-style iterable of (x, y) tuples: same terms up to Monte-Carlo noise
    chunked = elbo_bpd(model, x0, schedule, batch_size=37, timesteps=ts, progress=True,
                       generator=torch.Generator().manual_seed(12))
    loader = elbo_bpd(model, [(c, None) for c in x0.split(64)], schedule, timesteps=ts,
                      generator=torch.Generator().manual_seed(13))
    for o in (chunked, loader):
        assert o["elbo_num_samples"] == 300
        assert math.isclose(o["elbo_bpd"], o["elbo_prior_bpd"] + o["elbo_kl_bpd"] + o["elbo_decoder_bpd"],
                            rel_tol=1e-12)
        assert abs(o["elbo_bpd"] - out["elbo_bpd"]) < 5 * math.sqrt(2) * out["elbo_bpd_stderr"]


# -- 6. bad input ---------------------------------------------------------------------------------------------------
def test_errors(schedule, gaussian):
    model = ds.ExactEpsilon(gaussian, schedule)
    x0 = gaussian.sample(4, generator=torch.Generator().manual_seed(14))
    for ts, msg in (([5, 3], "strictly increasing"), ([3, 3], "strictly increasing"), ([-1, 5], r"\[0, 999\]"),
                    ([0, T], r"\[0, 999\]"), ([], "non-empty"), ([[0, 1]], "1-D"), ([0.5, 2], "whole numbers")):
        with pytest.raises(ValueError, match=msg):
            elbo(model, x0, schedule, timesteps=ts)
    with pytest.raises(ValueError, match="posterior, beta, learned"):
        elbo(model, x0, schedule, variance="small")
    with pytest.raises(ValueError, match="prediction"):
        elbo(model, x0, schedule, prediction="score")
    with pytest.raises(ValueError, match="non-finite"):
        elbo(lambda x, t: torch.where(t[:, None] > 500, torch.nan, x), x0, schedule, timesteps=[0, 600])
    with pytest.raises(ValueError, match="shape"):
        elbo(lambda x, t: x[:, :1], x0, schedule, timesteps=[0, 5])
    with pytest.raises(ValueError, match="batch"):
        elbo(model, x0[0], schedule)
    with pytest.raises(ValueError, match="non-finite"):
        elbo(model, torch.full((2, 2), math.inf), schedule)
    with pytest.raises(ValueError, match="256-level grid"):
        elbo(ShrinkNet(), images() + 1e-3 * (images() < 0.9), schedule, timesteps=[0, 5])
    with pytest.raises(ValueError, match=r"\[−1, 1\]"):
        elbo(ShrinkNet(), 2 * images(), schedule, timesteps=[0, 5])
    # an ε-network cannot give x̂_0 where ᾱ = 0; v-prediction can
    zt = ds.make_schedule("linear", 50, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="ᾱ_t = 0"):
        elbo(lambda x, t: torch.zeros_like(x), x0, zt, timesteps=[0, 49])
    r = elbo(lambda x, t: torch.zeros_like(x), x0, zt, timesteps=[0, 49], prediction="v")
    assert torch.isfinite(r.total).all() and torch.all(r.prior.abs() < 1e-12)  # q(x_T | x_0) is N(0, I) there
    with pytest.raises(ValueError, match="batch_size"):
        elbo_bpd(model, x0, schedule, batch_size=0)
    with pytest.raises(ValueError, match="no samples"):
        elbo_bpd(model, [], schedule)


def test_single_timestep_chain(schedule, gaussian):
    """K = 1: no transitions, only the prior at τ_1 and the decoder from it (for 'learned' nothing to interpolate)."""
    x0 = gaussian.sample(200, generator=torch.Generator().manual_seed(15))
    exact = ds.ExactEpsilon(gaussian, schedule)
    r = elbo(exact, x0, schedule, timesteps=[250], generator=torch.Generator().manual_seed(16))
    rl = elbo(Recorder(exact, v=0.0), x0, schedule, timesteps=[250], variance="learned",
              generator=torch.Generator().manual_seed(16))
    assert r.kl.shape == (200, 0)
    torch.testing.assert_close(r.total, r.prior + r.decoder, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rl.total, r.total, rtol=1e-12, atol=1e-14)


def test_decoder_on_a_coarse_grid_matches_the_normal_cdf():
    # digits take 17 values in [−1, 1]: bins of half-width 1/16, edge bins open; probabilities sum to 1
    from scipy.stats import norm

    from diffsteps.evaluation.likelihood import discretized_gaussian_log_likelihood

    levels = torch.linspace(-1, 1, 17, dtype=torch.float64)
    mean, var = 0.3, 0.04
    logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), var, levels=17)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    s = var ** 0.5
    want = norm.cdf((0.5 + 1 / 16 - mean) / s) - norm.cdf((0.5 - 1 / 16 - mean) / s)
    assert logp[12].exp().item() == pytest.approx(want, rel=1e-9)  # level 12 sits at 0.5
    with pytest.raises(ValueError, match="17-level grid"):
        ds.elbo(lambda x, t: torch.zeros_like(x), torch.full((2, 1, 2, 2), 0.01), ds.make_schedule("linear", 100),
                levels=17)
