"""Step spacings against their published definitions."""

import pytest
import torch

import diffsteps as ds
from diffsteps.core.spacings import to_integer_timesteps


def test_diffusers_spacings_match_lin_et_al_table2(linear):
    # Lin et al. 2024, Table 2 (T = 1000, 10 steps), shifted to 0-based timesteps
    ts = lambda sp: ds.make_timesteps(sp, 10, linear).tolist()
    assert ts("linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert ts("leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert ts("trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]


def test_karras_sigmas_follow_edm_eq5(linear):
    n, rho = 12, 7.0
    ts = ds.make_timesteps("karras", n, linear)
    sig = linear.sigmas
    smax, smin = sig[-1].item(), sig[0].item()
    want = [(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)]
    a = linear.alpha_bar_at(ts)
    got = ((1 - a) / a).sqrt()
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10)
    assert ts[0].item() == 999 and ts[-1].item() == 0


def test_logsnr_is_uniform_in_log_snr():
    s = ds.make_schedule("cosine", 1000)
    ts = ds.make_timesteps("logsnr", 9, s)
    a = s.alpha_bar_at(ts)
    lam = torch.log(a) - torch.log1p(-a)
    d = lam[1:] - lam[:-1]
    assert torch.allclose(d, d.mean().expand_as(d), rtol=1e-9)
    assert lam[0].item() == pytest.approx(s.log_snr[-1].item()) and lam[-1].item() == pytest.approx(s.log_snr[0].item())


def test_quadratic_is_denser_near_data(linear):
    ts = ds.make_timesteps("quadratic", 5, linear)
    assert torch.allclose(ts, torch.tensor([999, 999 * 0.5625, 999 * 0.25, 999 * 0.0625, 0], dtype=torch.float64))


@pytest.mark.parametrize("spacing", ["quadratic", "karras", "logsnr", "leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 100, 999, 1000])
def test_integer_timesteps_distinct_in_range(linear, spacing, steps):
    ts = to_integer_timesteps(ds.make_timesteps(spacing, steps, linear))
    assert len(ts) == steps
    assert torch.all(ts == ts.round()) and torch.all(ts[1:] < ts[:-1])
    assert ts.min() >= 0 and ts.max() <= 999


def test_explicit_lists_and_bad_input(linear):
    assert ds.make_timesteps([999, 500, 0], None, linear).tolist() == [999, 500, 0]
    with pytest.raises(ValueError, match="strictly decreasing"):
        ds.make_timesteps([500, 999, 0], None, linear)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        ds.make_timesteps([1000, 5], None, linear)
    with pytest.raises(ValueError, match="disagrees"):
        ds.make_timesteps([999, 5], 3, linear)
    with pytest.raises(ValueError, match="valid choices: leading, trailing, linspace, quadratic, karras, logsnr"):
        ds.make_timesteps("uniform", 10, linear)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            ds.make_timesteps("trailing", bad, linear)
    with pytest.raises(ValueError, match="exceeds the 1000 training timesteps"):
        ds.make_timesteps("trailing", 1001, linear)
