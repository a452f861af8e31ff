"""The sampling API: the shared case bit for bit against the textbook updates, conditioning, per-step callbacks and
per-sample noise levels."""

import math

import pytest
import torch
from helpers import noise

import diffsteps as ds
from diffsteps.core.spacings import make_timesteps, to_integer_timesteps


FIXED = [n for n, s in ds.SAMPLERS.items() if not s.adaptive]  # adaptive picks its own steps: test_adaptive.py


# -- the shared case equals the textbook updates to round-off --------------------------------------------------------
# Each reference evaluates the paper's update with Python-float coefficients, in the order the samplers did before
# per-sample levels existed (commit 5d2f75f; these references passed against it bit for bit). The lean loops fold
# each step into precomputed float64 coefficients and fused multiply-adds, which round differently: the bound is a
# few ulps of the state's dtype per step, far below any solver's error (a wrong coefficient shows at 1e-4 or more).
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
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) and (3M) (App. B), orders warming up, first order into the data,
    and below 15 steps at most order n − i on step i (diffusers' lower_order_final, the default)."""
    lam = [0.5 * (math.log(v) - math.log1p(-v)) if v < 1 else math.inf for v in a]
    hist = []
    n = len(t) - 1
    for i in range(n):
        cap = n - i if n < 15 else order
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
            elif len(hist) == 1 or cap == 2:
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
def test_shared_levels_equal_textbook_updates(mixture, linear, sampler, eta, dtype):
    # a new sampler needs its reference here; unipc and plms are checked against diffusers and ipndm against a
    # textbook Adams–Bashforth loop in tests/test_solvers.py, pndm against diffusers in test_diffusers_agreement.py
    assert set(FIXED) - {"unipc", "ipndm", "plms", "pndm"} == {s for s, _ in REFERENCES}
    model = ds.ExactEpsilon(mixture, linear)
    x_T = noise(64, 2, seed=21, dtype=dtype)
    lv = _ref_levels(linear, sampler, 12, "karras")
    opts = {} if eta is None else {"eta": eta}
    got = ds.sample(model, x_T, schedule=linear, sampler=sampler, steps=12, spacing="karras",
                    generator=torch.Generator().manual_seed(3), **opts)
    want = REFERENCES[sampler, eta](model, x_T, lv, torch.Generator().manual_seed(3))
    ulp = torch.finfo(dtype).eps
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{sampler} η={eta} {dtype}: max|Δ|/max|ref| = {err:.1e} = {err / ulp:.1f} ulp")
    assert got.dtype == dtype and err <= 256 * ulp  # measured: 2–16 ulp, dpmpp_3m in float64 53


# -- conditioning ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classes():
    """Three classes, each a Gaussian with its own mean and full covariance: p(x_0 | y) = N(μ_y, Σ_y)."""
    means = torch.tensor([[-2.0, 1.0], [1.5, -1.0], [0.5, 2.0]], dtype=torch.float64)
    covs = torch.tensor([[[0.30, 0.10], [0.10, 0.20]], [[0.05, 0.0], [0.0, 0.40]], [[0.15, -0.08], [-0.08, 0.10]]],
                        dtype=torch.float64)
    return [ds.GaussianMixture(m[None], c[None]) for m, c in zip(means, covs)]


class ClassConditional(torch.nn.Module):
    """The exact class-conditional ε̂(x, t, y): row b uses class y_b's exact Gaussian predictor. ``y`` is required."""

    def __init__(self, classes, schedule):
        super().__init__()
        self.eps = [ds.ExactEpsilon(g, schedule) for g in classes]
        self.calls, self.label_dtypes = 0, set()

    def forward(self, x, t, y):
        self.calls += 1
        self.label_dtypes.add(y.dtype)
        out = torch.empty_like(x)
        for k, eps in enumerate(self.eps):
            rows = y == k
            out[rows] = eps(x[rows], t[rows])
        return out


def assert_moments(x, mean, cov, n_se=4.5):
    """Sample mean and covariance within n_se standard errors (Gaussian fourth moments for the covariance SE)."""
    n = len(x)
    assert torch.all((x.mean(0) - mean).abs() < n_se * (cov.diag() / n).sqrt()), (x.mean(0), mean)
    d = cov.diag()
    se_cov = ((d[:, None] * d[None, :] + cov.square()) / n).sqrt()
    assert torch.all((torch.cov(x.T) - cov).abs() < n_se * se_cov), (torch.cov(x.T), cov)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "ddpm"])
def test_class_conditional_samples_have_each_class_moments(classes, linear, sampler):
    model = ClassConditional(classes, linear)
    n = 4500
    y = torch.arange(n) % 3
    x = ds.sample(model, noise(n, 2, seed=31), schedule=linear, sampler=sampler, steps=200, cond={"y": y},
                  generator=torch.Generator().manual_seed(32))
    assert model.label_dtypes == {torch.long}  # integer cond tensors are passed as they are
    for k, g in enumerate(classes):
        assert_moments(x[y == k], g.mean(), g.covariance())


def test_model_that_needs_cond_fails_clearly_without_it(classes, linear):
    model = ClassConditional(classes, linear)
    with pytest.raises(ValueError, match=r"needs argument\(s\) y .*cond=\{'y'"):
        ds.sample(model, noise(6, 2), schedule=linear, steps=5)
    assert model.calls == 0


@pytest.mark.parametrize("cond,match", [
    ({"y": torch.zeros(5, dtype=torch.long)}, r"cond\['y'\] has shape \(5,\); its first dimension must be .* 6"),
    ({"y": torch.tensor(1)}, r"cond\['y'\] has shape \(\)"),
    ({"y": [0, 1, 2, 0, 1, 2]}, r"cond\['y'\] must be a tensor"),
    ([("y", torch.zeros(6))], "cond must be a mapping"),
    ({"y": torch.zeros(6, dtype=torch.long), "z": torch.zeros(6)}, r"takes no argument\(s\) 'z'.*: y"),
    ({"y": torch.zeros(6, dtype=torch.long), "t": torch.zeros(6)}, "may not hold t"),
])
def test_bad_cond_fails_before_any_model_call(classes, linear, cond, match):
    model = ClassConditional(classes, linear)
    with pytest.raises(ValueError, match=match):
        ds.sample(model, noise(6, 2), schedule=linear, steps=5, cond=cond)
    assert model.calls == 0


def test_floating_cond_follows_the_model_dtype(linear):
    class Net(torch.nn.Module):  # float32 parameters: x and floating cond arrive in float32
        def __init__(self):
            super().__init__()
            self.lin, self.seen = torch.nn.Linear(2, 2), []

        def forward(self, x, t, *, shift, y):
            self.seen.append((x.dtype, shift.dtype, y.dtype))
            return self.lin(x + shift) * (y[:, None] + 1)

    net = Net()
    kw = dict(schedule=linear, steps=3, cond={"shift": torch.ones(4, 2, dtype=torch.float64),
                                              "y": torch.arange(4, dtype=torch.int32)})
    assert ds.sample(net, noise(4, 2), **kw).dtype == torch.float64
    assert set(net.seen) == {(torch.float32, torch.float32, torch.int32)}
    seen = []

    def plain(x, t, **cond):  # no parameters: the state's dtype, float64 here
        seen.append((x.dtype, cond["shift"].dtype, cond["y"].dtype))
        return x * 0.1 + cond["shift"]

    kw["cond"]["shift"] = torch.ones(4, 2, dtype=torch.float32)
    ds.sample(plain, noise(4, 2), **kw)
    assert set(seen) == {(torch.float64, torch.float64, torch.int32)}


# -- callback -------------------------------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, t):
        self.calls += 1
        return self.inner(x, t)


@pytest.mark.parametrize("sampler", FIXED)
def test_callback_sees_every_step(mixture, linear, sampler):
    model = Recorder(ds.ExactEpsilon(mixture, linear))
    kw = dict(schedule=linear, sampler=sampler, steps=9, spacing="karras")
    seen = []

    def callback(info):
        seen.append((info, model.calls))
        return torch.zeros(1)  # ignored

    x_T = noise(16, 2, seed=41)
    out = ds.sample(model, x_T, callback=callback, generator=torch.Generator().manual_seed(4), **kw)
    _, _, planned = ds.plan_sampling(linear, sampler, 9, "karras")
    infos = [s for s, _ in seen]
    assert [s.i for s in infos] == list(range(9)) and {s.steps for s in infos} == {9}
    assert [s.t for s in infos] == planned.tolist()
    assert [s.t_next for s in infos] == planned.tolist()[1:] + [-1.0]
    assert all(type(s.t) is float for s in infos)
    assert torch.equal(infos[-1].x, out)
    # the last step goes to the data with a first-order step, so the sample is that step's x̂_0 (plms, pndm: their
    # AB4 step, diffusers' PLMS with set_alpha_to_one, ends at σ = 0 instead)
    if sampler not in ("plms", "pndm"):
        assert torch.allclose(infos[-1].x0, out, rtol=1e-12, atol=1e-12)
    nfe = {"heun": [min(2 * (i + 1), 17) for i in range(9)], "plms": [i + 2 for i in range(9)],
           "pndm": [4, 8, 12] + [i + 10 for i in range(3, 9)]}  # four calls in each Runge–Kutta warm-up step
    assert [s.nfe for s in infos] == [c for _, c in seen] == nfe.get(sampler, [i + 1 for i in range(9)])
    # x̂_0 is the Tweedie estimate (x − σ ε̂)/α at the state the step started from; Heun's, where it makes a second
    # call, at its Euler predictor x_p = α_n (x/α_s + (σ̃_n − σ̃_s) ε̂)
    a = linear.alpha_bar_at(planned).tolist() + [1.0]
    t = planned.tolist() + [-1.0]

    def eps_at(x, i):
        return model.inner(x, torch.full((16,), t[i], dtype=torch.float64))

    def tweedie(x, i):
        return (x - math.sqrt(1 - a[i]) * eps_at(x, i)) / math.sqrt(a[i])

    def transfer(x, e, a0, a1):  # the DDIM transfer = Euler in x̃, σ̃ (PNDM's φ)
        return math.sqrt(a1) * (x / math.sqrt(a0) + (math.sqrt((1 - a1) / a1) - math.sqrt((1 - a0) / a0)) * e)

    for i, (s, x) in enumerate(zip(infos, [x_T] + [s.x for s in infos[:-1]])):
        if (sampler == "heun" and i < 8) or (sampler == "plms" and i == 0):  # plms: Heun's first step
            sv = [math.sqrt((1 - v) / v) for v in a[i:i + 2]]
            want = tweedie(math.sqrt(a[i + 1]) * (x / math.sqrt(a[i]) + (sv[1] - sv[0]) * eps_at(x, i)), i + 1)
        elif sampler == "pndm" and i < 3:  # its last warm-up call: at φ(x, ε_3, s → n), ε_3 from the half level
            tm = 0.5 * (t[i] + t[i + 1])
            am = linear.alpha_bar_at(tm).item()

            def eps_mid(x):
                return model.inner(x, torch.full((16,), tm, dtype=torch.float64))

            e2 = eps_mid(transfer(x, eps_at(x, i), a[i], am))
            want = tweedie(transfer(x, eps_mid(transfer(x, e2, a[i], am)), a[i], a[i + 1]), i + 1)
        else:
            want = tweedie(x, i)
        assert torch.allclose(s.x0, want, rtol=1e-12, atol=1e-12), (i, s.x0, want)
    # the callback observes and changes nothing
    assert torch.equal(out, ds.sample(model, x_T, generator=torch.Generator().manual_seed(4), **kw))


def test_step_info_is_frozen(mixture, linear):
    seen = []
    ds.sample(ds.ExactEpsilon(mixture, linear), noise(2, 2), schedule=linear, steps=2, callback=seen.append)
    with pytest.raises(AttributeError):
        seen[0].i = 5
    assert isinstance(seen[0], ds.StepInfo)


# -- per-sample levels ----------------------------------------------------------------------------------------------
def table(schedule, k):
    """Six samples, six different timestep sequences of the same length (one starts below T−1)."""
    rows = [make_timesteps(s, k, schedule) for s in ("trailing", "karras", "logsnr", "quadratic", "linspace")]
    return torch.stack(rows + [torch.linspace(700, 2.5, k, dtype=torch.float64)])


CASES = [(n, {}) for n in FIXED] + [("ddim", {"eta": 0.5}), ("ddpm", {"variance": "large"})]


@pytest.mark.parametrize("sampler,opts", CASES)
def test_per_sample_timesteps_match_each_sample_on_its_own(mixture, linear, sampler, opts):
    model = CountingModelFloat(ds.ExactEpsilon(mixture, linear))
    rows = table(linear, 8)
    x_T = noise(6, 2, seed=51)

    def gen():
        return torch.Generator().manual_seed(52)

    kw = dict(schedule=linear, sampler=sampler, generator=gen(), **opts)
    seen = []
    r = ds.sample(model, x_T, spacing=rows, return_info=True, callback=seen.append, **kw)
    shared_nfe = ds.sample(model, x_T, spacing=rows[0], return_info=True, **kw).nfe
    assert r.nfe == shared_nfe and r.sample.dtype == torch.float64 and r.timesteps.shape == (6, 8)
    # the model saw each sample's own t, and the callback reports it
    planned = r.timesteps
    assert torch.equal(model.ts[0], planned[:, 0]) and torch.equal(seen[3].t, planned[:, 3])
    if ds.SAMPLERS[sampler].integer_steps:
        assert torch.equal(planned, planned.round())
    for b in range(6):
        # the same sample alone, its row as a shared spacing; the stochastic samplers draw noise for the whole batch
        # at once, so for them "alone" is the whole batch on row b's spacing, drawing the same noise
        kw["generator"] = gen()
        if ds.SAMPLERS[sampler].is_deterministic(**opts):
            alone = ds.sample(model, x_T[b:b + 1], spacing=rows[b], **kw)[0]
        else:
            alone = ds.sample(model, x_T, spacing=rows[b], **kw)[b]
        assert torch.allclose(r.sample[b], alone, rtol=1e-13, atol=1e-14), (b, r.sample[b], alone)


class CountingModelFloat(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.ts = inner, []

    def forward(self, x, t):
        self.ts.append(t.clone())
        return self.inner(x, t)


@pytest.mark.parametrize("sampler", FIXED)
def test_per_sample_start_points(gaussian3, linear, sampler):
    """SDEdit-style: sample b starts at its own t*_b from x_{t*} ~ q(x_{t*} | x_0), on images of shape (1, 1, 3)."""
    model = ds.ExactEpsilon(gaussian3, linear)
    starts = torch.tensor([999.0, 640.0, 300.0, 77.0], dtype=torch.float64)
    rows = torch.stack([torch.linspace(s.item(), 0, 10, dtype=torch.float64) for s in starts])
    x0 = gaussian3.sample(4, torch.Generator().manual_seed(61))
    x_start = ds.q_sample(linear, x0, starts, generator=torch.Generator().manual_seed(62)).reshape(4, 1, 1, 3)
    kw = dict(schedule=linear, sampler=sampler)
    out = ds.sample(model, x_start, spacing=rows, generator=torch.Generator().manual_seed(63), **kw)
    assert out.shape == (4, 1, 1, 3) and torch.isfinite(out).all()
    for b in range(4):
        if ds.SAMPLERS[sampler].is_deterministic():
            alone = ds.sample(model, x_start[b:b + 1], spacing=rows[b], **kw)[0]
        else:
            alone = ds.sample(model, x_start, spacing=rows[b], generator=torch.Generator().manual_seed(63), **kw)[b]
        assert torch.allclose(out[b], alone, rtol=1e-13, atol=1e-14)


@pytest.fixture(scope="module")
def gaussian3():
    mu = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    a = torch.tensor([[0.6, 0.2, 0.0], [0.0, 0.4, -0.3], [0.1, 0.0, 0.3]], dtype=torch.float64)
    return ds.GaussianMixture(mu[None], (a @ a.T + 0.05 * torch.eye(3, dtype=torch.float64))[None])


@pytest.mark.parametrize("sampler", [n for n, s in ds.SAMPLERS.items() if s.stochastic])
def test_stochastic_per_sample_start_points_reproduce_the_data(gaussian3, linear, sampler):
    """From x_{t*_b} ~ q(x_{t*_b}) at three different t*, every sample ends distributed as the data N(μ, Σ)."""
    n = 4500
    starts = torch.tensor([999.0, 600.0, 250.0], dtype=torch.float64).repeat(n // 3)
    x0 = gaussian3.sample(n, torch.Generator().manual_seed(71))
    x_start = ds.q_sample(linear, x0, starts, generator=torch.Generator().manual_seed(72))
    rows = torch.stack([torch.linspace(s, 0, 250, dtype=torch.float64) for s in (999.0, 600.0, 250.0)]).repeat(
        n // 3, 1)
    x = ds.sample(ds.ExactEpsilon(gaussian3, linear), x_start, schedule=linear, sampler=sampler, spacing=rows,
                  generator=torch.Generator().manual_seed(73))
    for k in range(3):
        assert_moments(x[k::3], gaussian3.mean(), gaussian3.covariance())


def test_per_sample_zero_terminal_snr_and_v_prediction():
    """Rows that start at ᾱ = 0 (λ = −∞) next to rows that start lower: the tensor λ, σ̃ and branch paths."""
    s = ds.make_schedule("linear", 1000, zero_terminal_snr=True)
    gauss = ds.GaussianMixture(torch.zeros(1, 2), 0.25)
    eps_model = ds.ExactEpsilon(gauss, s)

    def v_model(x, t):
        a = s.alpha_bar_at(t)[:, None]
        x0 = 0.25 / (0.25 * a + 1 - a) * a.sqrt() * x
        return a.sqrt() * eps_model(x, t) - (1 - a).sqrt() * x0

    rows = torch.stack([torch.linspace(999, 0, 12, dtype=torch.float64),
                        torch.linspace(800, 0, 12, dtype=torch.float64), make_timesteps("trailing", 12, s)])
    x_T = noise(3, 2, seed=81)
    for sampler in ("ddim", "ddpm", "dpmpp_2m", "dpmpp_3m"):
        kw = dict(schedule=s, sampler=sampler, prediction="v")
        out = ds.sample(v_model, x_T, spacing=rows, generator=torch.Generator().manual_seed(2), **kw)
        assert torch.isfinite(out).all()
        for b in range(3):
            if sampler == "ddpm":
                alone = ds.sample(v_model, x_T, spacing=rows[b], generator=torch.Generator().manual_seed(2), **kw)[b]
            else:
                alone = ds.sample(v_model, x_T[b:b + 1], spacing=rows[b], **kw)[0]
            assert torch.allclose(out[b], alone, rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        ds.sample(v_model, x_T, schedule=s, sampler="heun", spacing=rows, prediction="v")


def test_per_sample_float32_state_and_no_final_denoising(mixture, linear):
    model = ds.ExactEpsilon(mixture, linear)
    rows = table(linear, 6)
    x64 = noise(6, 2, seed=91)
    r = ds.sample(model, x64.float(), schedule=linear, sampler="heun", spacing=rows, denoise_final=False,
                  return_info=True)
    assert r.sample.dtype == torch.float32 and r.timesteps.shape == (6, 5) and r.nfe == 10
    ref = ds.sample(model, x64.float().double(), schedule=linear, sampler="heun", spacing=rows, denoise_final=False)
    assert torch.equal(r.sample, ref.float())  # float64 state inside, float32 out


@pytest.mark.parametrize("kwargs,match", [
    (dict(spacing=torch.tensor([[999.0, 500.0], [9.0, 999.0]])), r"decreasing \(noisiest first\) in every row; row 1 "),
    (dict(spacing=torch.tensor([[999.0, 500.0], [999.0, -1.0]])), r"\[0, 999\]"),
    (dict(spacing=torch.tensor([[999.0, 500.0], [999.0, math.nan]])), "finite"),
    (dict(spacing=torch.tensor([[999.0, 500.0]] * 3)), "3 rows but the batch has 2"),
    (dict(spacing=torch.tensor([[999.0, 500.0]] * 2), steps=5), "steps=5 disagrees"),
    (dict(spacing=torch.zeros(2, 0)), "non-empty"),
])
def test_bad_per_sample_timesteps_fail_before_any_model_call(linear, kwargs, match):
    calls = []
    with pytest.raises(ValueError, match=match):
        ds.sample(lambda x, t: calls.append(1) or x, noise(2, 2), schedule=linear, **kwargs)
    assert not calls
