"""The exact model: its density, score and ε-predictor against independent computations."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import diffsteps as ds


def test_log_prob_matches_scipy(mixture):
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    want = np.log(sum(w * multivariate_normal(m, c).pdf(x.numpy()) for w, m, c in
                      zip(mixture.weights.numpy(), mixture.means.numpy(), mixture.covs.numpy())))
    assert np.allclose(mixture.log_prob(x).numpy(), want, rtol=1e-10)


@pytest.mark.parametrize("abar", [0.999, 0.3, 1e-4])
def test_score_is_gradient_of_noised_log_density(mixture, abar):
    # p_t written out independently: components N(√ᾱ μ_k, ᾱ Σ_k + (1−ᾱ) I)
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64).requires_grad_()
    comps = [torch.distributions.MultivariateNormal(math.sqrt(abar) * m, abar * c + (1 - abar) * torch.eye(2, dtype=torch.float64))
             for m, c in zip(mixture.means, mixture.covs)]
    logp = torch.logsumexp(torch.stack([math.log(w) + d.log_prob(x) for w, d in zip(mixture.weights, comps)]), 0)
    grad, = torch.autograd.grad(logp.sum(), x)
    assert torch.allclose(mixture.score(x.detach(), abar), grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(mixture.log_prob(x.detach(), abar), logp.detach(), rtol=1e-12)


def test_exact_eps_is_the_mmse_denoiser(mixture, linear):
    """ε*(x_t) = E[ε | x_t]: regressing the true noise on ε* leaves no residual correlated with ε* (Monte Carlo)."""
    g = torch.Generator().manual_seed(3)
    x0 = mixture.sample(200_000, g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = 600.0
    a = linear.alphas_cumprod[600].item()
    xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    pred = ds.ExactEpsilon(mixture, linear)(xt, torch.full((len(xt),), t, dtype=torch.float64))
    resid = eps - pred
    # orthogonality E[(ε − ε*) ε*ᵀ] = 0 and E[ε − ε*] = 0, each within 5 standard errors
    for m in (resid, resid[:, :1] * pred, resid[:, 1:] * pred):
        se = m.std(0) / math.sqrt(len(m))
        assert torch.all(m.mean(0).abs() < 5 * se)
    # and it beats a perturbed predictor
    assert resid.square().mean() < (eps - 1.05 * pred).square().mean()


def test_mixture_moments_and_sampling(mixture):
    g = torch.Generator().manual_seed(4)
    x, labels = mixture.sample(100_000, g, return_labels=True)
    assert torch.allclose(x.mean(0), mixture.mean(), atol=5 * (mixture.covariance().diag() / 1e5).sqrt().max())
    assert torch.allclose(torch.cov(x.T), mixture.covariance(), atol=0.05)
    freq = torch.bincount(labels, minlength=3).double() / 1e5
    assert torch.allclose(freq, mixture.weights, atol=5 * math.sqrt(0.25 / 1e5))


def test_bad_mixture_input():
    with pytest.raises(ValueError, match="weights"):
        ds.GaussianMixture(torch.zeros(2, 3), 1.0, weights=[0.2, 0.2])
    with pytest.raises(ValueError, match=r"\(K, D\)"):
        ds.GaussianMixture(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="flattens"):
        ds.ExactEpsilon(ds.GaussianMixture(torch.zeros(2, 3)), ds.make_schedule())(torch.zeros(4, 5), torch.zeros(4))
