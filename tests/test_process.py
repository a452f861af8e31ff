"""Forward process and posterior against Bayes' rule computed independently."""

import math

import pytest
import torch

import diffsteps as ds


@pytest.mark.parametrize("t", [1, 17, 500, 999])
def test_posterior_is_bayes_rule(linear, t):
    a = linear.alphas_cumprod.tolist()
    beta = linear.betas[t].item()
    x0, xt = torch.tensor([0.7, -1.3], dtype=torch.float64), torch.tensor([0.2, 0.4], dtype=torch.float64)
    # q(x_{t-1}|x_0) = N(√ᾱ_{t-1} x_0, 1−ᾱ_{t-1}),  q(x_t|x_{t-1}) = N(√(1−β_t) x_{t-1}, β_t): multiply the Gaussians
    prec = 1 / (1 - a[t - 1]) + (1 - beta) / beta
    mean = (math.sqrt(a[t - 1]) * x0 / (1 - a[t - 1]) + math.sqrt(1 - beta) * xt / beta) / prec
    m, v = ds.q_posterior(linear, x0[None], xt[None], torch.tensor([t]))
    assert torch.allclose(m[0], mean, rtol=1e-10)
    assert v.item() == pytest.approx(1 / prec, rel=1e-10)


def test_posterior_over_skipped_steps_matches_chain(linear):
    # a skip from t to s is the same Bayes rule with the composite step q(x_t | x_s) = N(√(ᾱ_t/ᾱ_s) x_s, 1 − ᾱ_t/ᾱ_s)
    a = linear.alphas_cumprod.tolist()
    t, s = 700, 300
    c0, ct, var, beta = ds.posterior_coefficients(a[t], a[s])
    prec = 1 / (1 - a[s]) + (a[t] / a[s]) / (1 - a[t] / a[s])
    assert var == pytest.approx(1 / prec, rel=1e-12)
    assert c0 == pytest.approx(math.sqrt(a[s]) / (1 - a[s]) / prec, rel=1e-12)
    assert ct == pytest.approx(math.sqrt(a[t] / a[s]) / (1 - a[t] / a[s]) / prec, rel=1e-12)


def test_q_sample_moments(linear):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 2.0, dtype=torch.float64)
    t = torch.full((200_000,), 300.0, dtype=torch.float64)
    xt = ds.q_sample(linear, x0, t, generator=g)
    a = linear.alphas_cumprod[300].item()
    se = math.sqrt((1 - a) / 200_000)
    assert xt.mean().item() == pytest.approx(2 * math.sqrt(a), abs=5 * se)
    assert xt.var().item() == pytest.approx(1 - a, rel=5 * math.sqrt(2 / 200_000))
