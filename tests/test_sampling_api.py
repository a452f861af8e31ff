"""The sampling API: the shared case bit for bit against the textbook updates, conditioning, per-step callbacks and
per-sample noise levels."""

import math

import pytest
import torch
from conftest import noise

import diffsteps as ds
from diffsteps.core.spacings import make_timesteps, to_integer_timesteps


# -- the shared case is bit-identical to the textbook updates -------------------------------------------------------
# Each reference evaluates the paper's update with Python-float coefficients, in the order the samplers did before
# per-sample levels existed (commit 5d2f75f; these references passed against it bit for bit). torch.equal, not
# allclose: the shared case must not change by one ulp.
def _ref_levels(schedule, sampler, steps, spacing):
    ts = make_timesteps(spacing, steps, schedule)
    if ds.SAMPLERS[sampler].integer_steps:
        ts = to_integer_timesteps(ts)
    a = schedule.alpha_bar_at(ts).tolist() + [1.0]
    return ts.tolist() + [-1.0], a, [math.sqrt(v) for v in a], [math.sqrt(1 - v) for v in a]


def _eps(model, x, t):
    return model(x, torch.full((len(x),), t, dtype=torch.promote_types(x.dtype, torch.float32)))


def ref_ddim(model, x, t, a, al, sg, eta=0.0, gen=None):
    """Song et al. 2021, eq. 12 and 16."""
    for i in range(len(t) - 1):
        eps = _eps(model, x, t[i])
        x0 = (x - sg[i] * eps) / al[i]
        c = eta * math.sqrt((1 - a[i + 1]) / (1 - a[i]) * (1 - a[i] / a[i + 1]))
        x = al[i + 1] * x0 + math.sqrt(max(1 - a[i + 1] - c * c, 0.0)) * eps
        if c > 0:
            x = x + c * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x


def ref_ddpm(model, x, t, a, al, sg, gen=None):
    """Ho et al. 2020, Alg. 2, posterior variance β̃, between any two levels (β_t → 1 − ᾱ_t/ᾱ_s)."""
    for i in range(len(t) - 1):
        x0 = (x - sg[i] * _eps(model, x, t[i])) / al[i]
        beta = 1 - a[i] / a[i + 1]
        x = (a[i + 1] ** 0.5 * beta / (1 - a[i])) * x0 + ((a[i] / a[i + 1]) ** 0.5 * (1 - a[i + 1]) / (1 - a[i])) * x
        if a[i + 1] < 1:
            x = x + math.sqrt((1 - a[i + 1]) * beta / (1 - a[i])) * torch.randn(x.shape, generator=gen,
                                                                               dtype=x.dtype)
    return x


def ref_euler_heun(model, x, t, a, al, sg, heun=False):
    """Karras et al. 2022, Alg. 1 (no churn) in x̃ = x/α, σ̃ = σ/α; Euler when ``heun`` is False."""
    sv = [s / v for s, v in zip(sg, al)]
    for i in range(len(t) - 1):
        eps = _eps(model, x, t[i])
        xs = x / al[i]
        x_next = xs + (sv[i + 1] - sv[i]) * eps
        if heun and sv[i + 1] > 0:
            eps2 = _eps(model, al[i + 1] * x_next, t[i + 1])
            x_next = xs + (sv[i + 1] - sv[i]) * 0.5 * (eps + eps2)
        x = al[i + 1] * (x_next if heun else x / al[i] + (sv[i + 1] - sv[i]) * eps)
    return x


def ref_sde_euler(model, x, t, a, al, sg, gen=None):
    """Euler–Maruyama on the reverse VP SDE with B = log(ᾱ_n/ᾱ_s) (Song et al. 2021b, eq. 6)."""
    for i in range(len(t) - 1):
        eps = _eps(model, x, t[i])
        if a[i + 1] == 1:
            return (x - sg[i] * eps) / al[i]
        rate = math.log(a[i + 1] / a[i])
        x = x + rate * (0.5 * x - eps / sg[i]) + math.sqrt(rate) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x


def ref_dpmpp(model, x, t, a, al, sg, order=2):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) and (3M) (App. B), orders warming up, first order into the data."""
    lam = [0.5 * (math.log(v) - math.log1p(-v)) if v < 1 else math.inf for v in a]
    hist = []
    for i in range(len(t) - 1):
        x0 = (x - sg[i] * _eps(model, x, t[i])) / al[i]
        h = lam[i + 1] - lam[i]
        phi1 = math.expm1(-h)
        if order == 2:
            d = x0
            if hist and sg[i + 1] > 0:
                r = (lam[i] - hist[-1][1]) / h
                d = (1 + 0.5 / r) * x0 - (0.5 / r) * hist[-1][0]
            x = (sg[i + 1] / sg[i]) * x - al[i + 1] * phi1 * d
        else:
            base = (sg[i + 1] / sg[i]) * x - al[i + 1] * phi1 * x0
            if sg[i + 1] == 0 or not hist:
                x = base
            elif len(hist) == 1:
                x = base - al[i + 1] * phi1 * (0.5 / ((lam[i] - hist[-1][1]) / h)) * (x0 - hist[-1][0])
            else:
                (m2, l2), (m1, l1) = hist[-2], hist[-1]
                r0, r1 = (lam[i] - l1) / h, (l1 - l2) / h
                d1_0, d1_1 = (x0 - m1) / r0, (m1 - m2) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = base + al[i + 1] * (phi1 / h + 1) * d1 - al[i + 1] * ((phi1 + h) / h**2 - 0.5) * d2
        hist = (hist + [(x0, lam[i])])[-2:]
    return x


REFERENCES = {
    ("ddim", 0.0): lambda m, x, lv, g: ref_ddim(m, x, *lv),
    ("ddim", 0.5): lambda m, x, lv, g: ref_ddim(m, x, *lv, eta=0.5, gen=g),
    ("ddpm", None): lambda m, x, lv, g: ref_ddpm(m, x, *lv, gen=g),
    ("euler", None): lambda m, x, lv, g: ref_euler_heun(m, x, *lv),
    ("heun", None): lambda m, x, lv, g: ref_euler_heun(m, x, *lv, heun=True),
    ("sde_euler", None): lambda m, x, lv, g: ref_sde_euler(m, x, *lv, gen=g),
    ("dpmpp_2m", None): lambda m, x, lv, g: ref_dpmpp(m, x, *lv, order=2),
    ("dpmpp_3m", None): lambda m, x, lv, g: ref_dpmpp(m, x, *lv, order=3),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sampler,eta", list(REFERENCES))
def test_shared_levels_bit_identical_to_textbook_updates(mixture, linear, sampler, eta, dtype):
    assert set(ds.SAMPLERS) == {s for s, _ in REFERENCES}  # a new sampler needs its reference here
    model = ds.ExactEpsilon(mixture, linear)
    x_T = noise(64, 2, seed=21, dtype=dtype)
    lv = _ref_levels(linear, sampler, 12, "karras")
    opts = {} if eta is None else {"eta": eta}
    got = ds.sample(model, x_T, schedule=linear, sampler=sampler, steps=12, spacing="karras",
                    generator=torch.Generator().manual_seed(3), **opts)
    want = REFERENCES[sampler, eta](model, x_T, lv, torch.Generator().manual_seed(3))
    assert got.dtype == dtype and torch.equal(got, want)
