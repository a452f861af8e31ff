"""Schedules against published values and independent plain-Python recomputation."""

import math

import pytest
import torch

import diffsteps as ds


def cumprod(betas):
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return out


def test_linear_matches_ddpm_definition_and_published_terminal_value():
    s = ds.make_schedule("linear", 1000)
    betas = [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)]
    ref = cumprod(betas)
    assert s.alphas_cumprod.dtype == torch.float64
    assert torch.allclose(s.alphas_cumprod, torch.tensor(ref, dtype=torch.float64), rtol=1e-13, atol=0)
    # Lin et al. 2024, Table 1: √ᾱ_T of the DDPM linear schedule is 0.006353, of Stable Diffusion's 0.068265
    assert math.sqrt(s.alphas_cumprod[-1].item()) == pytest.approx(0.006353, abs=5e-7)
    sd = ds.make_schedule("scaled_linear", 1000)
    assert math.sqrt(sd.alphas_cumprod[-1].item()) == pytest.approx(0.068265, abs=5e-7)


def test_linear_rescales_for_other_T():
    # improved-diffusion: β_start, β_end scaled by 1000/T; the sum of betas stays ≈ constant
    s = ds.make_schedule("linear", 250)
    assert s.betas[0].item() == pytest.approx(4e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.08, rel=1e-12)
    assert s.betas.sum().item() == pytest.approx(ds.make_schedule("linear", 1000).betas.sum().item(), rel=2e-3)


@pytest.mark.parametrize("t", [0, 1, 250, 500, 998])
def test_cosine_equals_closed_form(t):
    # Nichol & Dhariwal eq. 17: ᾱ_t = f(t+1)/f(0) in 0-based indexing, wherever β was not clipped
    f = lambda tau: math.cos((tau / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    s = ds.make_schedule("cosine", 1000)
    assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-12)
    assert s.betas.max().item() == pytest.approx(0.999)  # the clip binds at the last step


def test_derived_quantities():
    s = ds.make_schedule("sigmoid", 1000)
    a = s.alphas_cumprod
    assert torch.allclose(s.sigmas, ((1 - a) / a).sqrt(), rtol=1e-14)
    assert torch.allclose(s.log_snr, -2 * torch.log(s.sigmas), rtol=1e-12)
    assert torch.all(s.log_snr[1:] < s.log_snr[:-1])
    q = ds.make_schedule("quadratic", 1000)
    assert q.betas[0].item() == pytest.approx(1e-4) and q.betas[-1].item() == pytest.approx(0.02)
    assert q.betas[500].item() == pytest.approx((0.01 + 500 / 999 * (math.sqrt(0.02) - 0.01)) ** 2, rel=1e-12)


def test_zero_terminal_snr():
    base = ds.make_schedule("scaled_linear", 1000)
    s = ds.make_schedule("scaled_linear", 1000, zero_terminal_snr=True)
    assert s.alphas_cumprod[-1].item() == 0.0 and s.zero_terminal_snr
    assert s.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    # √ᾱ is an affine function of the original √ᾱ (Lin et al. Alg. 1)
    old, new = base.alphas_cumprod.sqrt(), s.alphas_cumprod.sqrt()
    slope = (new[0] - new[-1]) / (old[0] - old[-1])
    assert torch.allclose(new, slope * (old - old[-1]), atol=1e-13)
    assert s.log_snr[-1].item() == -math.inf
    # continuous extension stays finite-valued and monotone on the last interval
    ab = s.alpha_bar_at(torch.tensor([998.0, 998.5, 999.0]))
    assert ab[0] > ab[1] > ab[2] == 0


def test_continuous_extension_interpolates_log_snr():
    s = ds.make_schedule("cosine", 1000)
    ints = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(s.alpha_bar_at(ints), s.alphas_cumprod)
    lam = s.log_snr
    t = torch.tensor([0.25, 10.5, 499.9, 998.75], dtype=torch.float64)
    lo = t.floor().long()
    want = torch.sigmoid(lam[lo] + (t - lo) * (lam[lo + 1] - lam[lo]))
    assert torch.allclose(s.alpha_bar_at(t), want, rtol=1e-14)
    # exact inverse through σ and through λ
    sig = ((1 - s.alpha_bar_at(t)) / s.alpha_bar_at(t)).sqrt()
    assert torch.allclose(s.t_from_sigma(sig), t, atol=1e-9)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        s.alpha_bar_at(1000.0)


def test_bad_schedule_names_choices():
    with pytest.raises(ValueError, match="valid choices: linear, scaled_linear, cosine, quadratic, sigmoid"):
        ds.make_schedule("cosin")
    with pytest.raises(ValueError, match="num_timesteps"):
        ds.make_schedule("linear", 1)
    with pytest.raises(ValueError, match="bad options"):
        ds.make_schedule("cosine", 1000, beta_start=0.1)
