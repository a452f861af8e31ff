"""The adaptive sampler: its controller against its own math on Gaussian data (closed-form flow), per-sample control
(a hard sample does not cost the easy ones, a sample's result does not depend on its batch), NFE accounting against
a counting model, bad input, the max_nfe cap, and ``python run.py sampler=adaptive``."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import FAST, CountingModel, noise, run_py

import diffsteps as ds


def rms(a, b):
    return (a - b).square().mean().sqrt().item()


def tweedie_flow(gauss, schedule, x_T):
    """x̂_0 at t = 0 of the exact probability-flow solution from x_T at t = T−1 (what the sampler returns): in each
    eigen-direction of Σ (eigenvalue e) x̃ − μ scales as √(e + σ̃²) along the flow, and x̂_0 = μ + e/(e + σ̃²)(x̃ − μ),
    so x̂_0 − μ = U diag(e/√((e + σ̃_0²)(e + σ̃_T²))) Uᵀ (x̃_T − μ)."""
    mu, cov = gauss.means[0], gauss.covs[0]
    e, U = torch.linalg.eigh(cov)
    s0, sT = schedule.sigmas[0] ** 2, schedule.sigmas[-1] ** 2
    xt = x_T / schedule.alphas_cumprod[-1].sqrt()
    return mu + ((xt - mu) @ U) * (e / ((e + s0) * (e + sT)).sqrt()) @ U.T


def exact_step(gauss, schedule, x, t_s, t_t):
    """The exact flow from x at t_s to t_t (per-sample t), in VP coordinates."""
    mu, cov = gauss.means[0], gauss.covs[0]
    e, U = torch.linalg.eigh(cov)
    a_s, a_t = schedule.alpha_bar_at(t_s)[:, None], schedule.alpha_bar_at(t_t)[:, None]
    sv_s, sv_t = (1 - a_s) / a_s, (1 - a_t) / a_t
    xt = x / a_s.sqrt() - mu
    return a_t.sqrt() * (mu + ((xt @ U) * ((e + sv_t) / (e + sv_s)).sqrt()) @ U.T)


def pair23(model, schedule, x, t_s, t_t):
    """DPM-Solver++ 2 (r₁ = ⅓) and 3 (r₂ = ⅔), written in x̃ = x/α, where a data-prediction step is
    x̃_t = e^{−h} x̃_s + (1 − e^{−h}) D (Lu et al. 2022b): returns (x_lo, x_hi) in VP coordinates, α_t, and x̂_0 at
    the start."""
    lam = lambda t: 0.5 * schedule.alpha_bar_at(t).logit()  # noqa: E731
    ls, h = lam(t_s), lam(t_t) - lam(t_s)

    def d(xv, lv):  # x̂_0 at x̃ = xv, λ = lv
        t = schedule.t_from_log_snr(2 * lv)
        a = schedule.alpha_bar_at(t)[:, None]
        return xv - ((1 - a) / a).sqrt() * model(a.sqrt() * xv, t)

    a_s = schedule.alpha_bar_at(t_s)[:, None]
    xs = x / a_s.sqrt()
    h_, r1, r2 = h[:, None], 1 / 3, 2 / 3
    d0 = d(xs, ls)
    d1 = d(torch.exp(-r1 * h_) * xs + (1 - torch.exp(-r1 * h_)) * d0, ls + r1 * h)
    u2 = (torch.exp(-r2 * h_) * xs + (1 - torch.exp(-r2 * h_)) * d0
          + (r2 / r1) * (1 - (1 - torch.exp(-r2 * h_)) / (r2 * h_)) * (d1 - d0))
    d2 = d(u2, ls + r2 * h)
    base = torch.exp(-h_) * xs + (1 - torch.exp(-h_)) * d0
    lo = base + (1 - torch.exp(-h_)) / (2 * r1) * (d1 - d0)
    hi = base + (1 / r2) * (1 - (1 - torch.exp(-h_)) / h_) * (d2 - d0)
    a_t = schedule.alpha_bar_at(t_t)[:, None].sqrt()
    return a_t * lo, a_t * hi, a_t, d0


# -- the controller against its own math ----------------------------------------------------------------------------
@pytest.mark.parametrize("coords", ["x0", "vp"])
def test_accepted_steps_keep_the_error_estimate_under_tolerance(gaussian, linear, coords):
    model = ds.ExactEpsilon(gaussian, linear)
    x_T = noise(8, 3, seed=1)
    rtol, atol = 1e-3, 1e-4
    seen = []
    r = ds.sample(model, x_T, schedule=linear, sampler="adaptive", rtol=rtol, atol=atol, accept_safety=1.0,
                  coords=coords, callback=seen.append, return_info=True)
    assert [s.i for s in seen] == list(range(len(seen))) and {s.steps for s in seen} == {None}
    assert torch.equal(seen[-1].x, r.sample) and torch.all(seen[-1].t_next == -1)
    # replay every accepted step of every sample with an independent implementation of the pair
    x_prev, x = x_T.clone(), x_T.clone()
    checked, ratios, noisy_steps = 0, [], []
    for s in seen:
        moved = (s.t != s.t_next) & (s.t_next >= 0)
        if not moved.any():
            continue
        rows = moved.nonzero().flatten()
        lo, hi, a_t, x0_s = pair23(model, linear, x[rows], s.t[rows], s.t_next[rows])
        torch.testing.assert_close(hi, s.x[rows], rtol=1e-9, atol=1e-11)
        if coords == "vp":  # the VP state against its own size (Lu et al. 2022, eq. 4.4)
            scale, err = torch.maximum(lo.abs(), x_prev[rows].abs()), hi - lo
            true = lo - exact_step(gaussian, linear, x[rows], s.t[rows], s.t_next[rows])
        else:  # x̃ = x/α, the data's units, against the size of x̂_0 at the start
            scale, err = x0_s.abs(), (hi - lo) / a_t
            true = (lo - exact_step(gaussian, linear, x[rows], s.t[rows], s.t_next[rows])) / a_t
        delta = torch.maximum(torch.full_like(lo, atol), rtol * scale)
        est = (err / delta).square().mean(1).sqrt()
        assert torch.all(est <= 1.0), est  # accept_safety = 1: accepted ⇔ E ≤ 1
        # the estimate is the lower solution's true local error (exact flow over the same step) to within 2×
        ratios.append((true / delta).square().mean(1).sqrt() / est)
        lam = [0.5 * linear.alpha_bar_at(t).logit() for t in (s.t[rows], s.t_next[rows])]
        noisy_steps.append((lam[1] - lam[0])[lam[0] < 0])
        x_prev[rows], x[rows] = lo, s.x[rows]
        checked += len(rows)
    assert checked == int(r.accepted.sum()) and checked > 8 * 5
    ratios = torch.cat(ratios)
    assert 0.5 < ratios.median() < 2.0, ratios.median()
    # the default cap: no accepted step from SNR < 1 is longer than h_max_noisy = 0.5 in λ, and some hit it
    noisy_steps = torch.cat(noisy_steps)
    assert len(noisy_steps) >= 8 * 5 and noisy_steps.max() <= 0.5 + 1e-9 and noisy_steps.max() > 0.49
    # rejected tries exist (past the cap the controller grows h until the tolerance bites, and the growth limiter
    # overshoots), so the controller was exercised both ways
    assert r.rejected.sum() > 0


@pytest.mark.parametrize("control,form,coords", [("sample", "data", "x0"), ("batch", "data", "x0"),
                                                 ("sample", "data", "vp"), ("sample", "noise", "ve")])
def test_final_error_shrinks_with_rtol(gaussian, linear, control, form, coords):
    model = ds.ExactEpsilon(gaussian, linear)
    x_T = noise(64, 3, seed=2)
    truth = tweedie_flow(gaussian, linear, x_T)
    rtols = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5]
    errs, nfes = [], []
    # the ve norm is k-diffusion's configuration: its start h_init = 0.05 and no cap (the cap's fixed steps at
    # SNR < 1 put a floor under the error of a loose rtol; the default x0 norm keeps the slope with it)
    anchor_like = {"h_init": 0.05, "h_max_noisy": math.inf} if coords == "ve" else {}
    for rtol in rtols:
        r = ds.sample(model, x_T, schedule=linear, sampler="adaptive", rtol=rtol, atol=0.156 * rtol,
                      control=control, form=form, coords=coords, return_info=True, **anchor_like)
        errs.append(rms(r.sample, truth))
        nfes.append(r.nfe_per_sample.double().mean().item())
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert all(a < b for a, b in zip(nfes, nfes[1:])), nfes
    assert errs[0] / errs[-1] > 30, errs  # 2.5 decades of rtol: well over one decade of error
    slope = np.polyfit(np.log(rtols), np.log(errs), 1)[0]
    assert 0.5 < slope < 1.5, slope  # error ∝ rtol^slope: a calibrated tolerance, not a saturated one


class PIDReference:
    """Söderlind's PID step-size controller as k-diffusion's ``PIDStepSizeController`` states it (Söderlind 2003,
    "Digital filters in adaptive time-stepping"): one sample, scalar Python. ε = 1/(E + 1e-8); the memory holds ε of
    this try and of the last two accepted ones (three copies of the first); f = 1 + atan(ε₀^{b₁} ε₁^{b₂} ε₂^{b₃} − 1)
    with b₁ = (p + i + d)/k, b₂ = −(p + 2d)/k, b₃ = d/k; accept when f ≥ accept_safety; h ← f h either way."""

    def __init__(self, p, i, d, k, h, accept_safety=0.81):
        self.b = ((p + i + d) / k, -(p + 2 * d) / k, d / k)
        self.h, self.safety, self.eps = h, accept_safety, None

    def propose(self, E):
        inv = 1 / (E + 1e-8)
        self.eps = [inv] * 3 if self.eps is None else self.eps
        self.eps[0] = inv
        f = 1 + math.atan(math.prod(e ** b for e, b in zip(self.eps, self.b)) - 1)
        ok = f >= self.safety
        if ok:
            self.eps[1:] = self.eps[:2]
        self.h *= f
        return ok


def replay(model, schedule, x_T, rtol, atol, pid, cap=0.5):
    """One sample's whole error-controlled solve with the test's own pair and controller: the accepted timesteps,
    the rejected count and x̂_0 at t = 0. Default norm: x̃ = x/α against rtol |x̂_0 at the step's start|; at λ < 0
    the controller's h is capped first; a remainder within 1e-5 of h is folded into the step."""
    t_of = lambda v: schedule.t_from_log_snr(torch.tensor([2 * v], dtype=torch.float64))  # noqa: E731
    lam_now, lam_end = (half_log_snr(schedule, torch.tensor(t, dtype=torch.float64)) for t in (999.0, 0.0))
    x = x_T[None]
    ts, rejected = [], 0
    while lam_now < lam_end:
        pid.h = min(pid.h, cap) if lam_now < 0 else pid.h
        left = lam_end - lam_now
        step = left if left - pid.h <= 1e-5 else min(pid.h, left)
        t_s, t_t = t_of(lam_now), (torch.zeros(1, dtype=torch.float64) if step == left else t_of(lam_now + step))
        lo, hi, a_t, x0_s = pair23(model, schedule, x, t_s, t_t)
        delta = torch.clamp(rtol * x0_s.abs(), min=atol)
        if pid.propose((((hi - lo) / a_t / delta).square().mean().sqrt()).item()):
            x, lam_now = hi, (lam_end if step == left else lam_now + step)
            ts.append(t_t.item())
        else:
            rejected += 1
    return ts, rejected, ds.sample(model, x, schedule=schedule, sampler="ddim", spacing=[0.0])[0]


@pytest.mark.parametrize("p,i,d", [(0.0, 1.0, 0.0), (0.3, 1.0, 0.0), (0.4, 0.7, 0.2)])
def test_controller_replays_a_reference_pid_step_for_step(two_modes, linear, p, i, d):
    """Every sample's accepted steps, rejections and result equal a scalar replay with the test's own pair and the
    PID controller (I, PI and PID coefficients): the per-sample controller is k-diffusion's, sample by sample."""
    model, x = two_modes
    rows = [0, 1, 2]  # the boundary sample (several rejections) and two easy ones
    seen = []
    r = ds.sample(model, x[rows], schedule=linear, sampler="adaptive", rtol=0.01, atol=0.0078, pcoeff=p, icoeff=i,
                  dcoeff=d, callback=seen.append, return_info=True)
    for j, b in enumerate(rows):
        ts, rejected, x0 = replay(model, linear, x[b], 0.01, 0.0078, PIDReference(p, i, d, k=3, h=0.5))
        moved = [s.t_next[j].item() for s in seen if s.t[j] != s.t_next[j] and s.t_next[j] >= 0]
        np.testing.assert_allclose(moved, ts, rtol=0, atol=1e-8)
        assert (r.accepted[j].item(), r.rejected[j].item()) == (len(ts), rejected)
        torch.testing.assert_close(r.sample[j], x0, rtol=1e-9, atol=1e-11)
    assert r.rejected[0] > 1  # the boundary sample exercises the rejection path


# -- per-sample control ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_modes(linear):
    """Two narrow modes at (±1, 0): a noise near the boundary x = 0 is a hard trajectory (it decides late, then
    snaps to a mode), one deep in a basin an easy one."""
    mix = ds.GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64), 0.05**2)
    x = noise(256, 2, seed=3)
    u = torch.rand(256, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[:, 0], x[:, 1] = 2.5 + u, 0.3 * x[:, 1]  # easy: deep in the right basin
    x[0] = torch.tensor([0.01, 0.2], dtype=torch.float64)  # hard: next to the boundary
    return ds.ExactEpsilon(mix, linear), x


# the defaults (x0 norm, λ-step cap at SNR < 1: every sample spends ≥ 43 NFE in the noisy half, measured 61 hard vs
# 43 easy, error 2.4e-3 vs batch's 6.5e-3), and k-diffusion's norm and start without the cap (measured 53 vs 25,
# 5.2e-3 vs 2.4e-2)
@pytest.mark.parametrize("opts,nfe_ratio,err_ratio", [({}, 1.3, 0.5),
                                                      ({"coords": "vp", "h_init": 0.05, "h_max_noisy": math.inf},
                                                       1.5, 0.3)])
def test_a_hard_sample_does_not_cost_the_easy_ones(two_modes, linear, opts, nfe_ratio, err_ratio):
    model, x = two_modes
    kw = dict(schedule=linear, sampler="adaptive", rtol=0.01, return_info=True, **opts)
    r = ds.sample(model, x, **kw)
    easy = r.nfe_per_sample[1:].double()
    assert r.nfe_per_sample[0] > nfe_ratio * easy.max(), (r.nfe_per_sample[0], easy.max())
    # each easy sample costs what it costs alone; the batch-wide controller makes them pay for the hard one
    alone = [ds.sample(model, x[b:b + 1], **kw).nfe_per_sample.item() for b in (1, 2, 3)]
    assert alone == r.nfe_per_sample[1:4].tolist()
    # the batch-wide controller (one h, the error norm over the batch) lets the easy majority set the pace: the
    # hard sample gets the easy ones' steps and a much larger error than its own control gives it
    batch = ds.sample(model, x, control="batch", **kw)
    assert torch.all(batch.nfe_per_sample == batch.nfe) and batch.nfe < r.nfe_per_sample[0]
    ref = ds.sample(model, x[:1], schedule=linear, sampler="dpmpp_3m", steps=1000, spacing="logsnr")[0]
    err, err_batch = rms(r.sample[0], ref), rms(batch.sample[0], ref)
    assert err < err_ratio * err_batch, (err, err_batch)


def test_each_sample_independent_of_its_batch(two_modes, linear):
    model, x = two_modes
    kw = dict(schedule=linear, sampler="adaptive", rtol=0.01, return_info=True)
    full = ds.sample(model, x, **kw)
    for b in (0, 5, 255):
        alone = ds.sample(model, x[b:b + 1], **kw)
        torch.testing.assert_close(alone.sample[0], full.sample[b], rtol=1e-12, atol=1e-13)
        assert alone.nfe_per_sample.item() == full.nfe_per_sample[b].item()
        assert alone.accepted.item() == full.accepted[b].item() and alone.rejected.item() == full.rejected[b].item()
    # and inside a different batch (shuffled, halved): the same again
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:128]
    part = ds.sample(model, x[perm], **kw)
    torch.testing.assert_close(part.sample, full.sample[perm], rtol=1e-12, atol=1e-13)
    assert torch.equal(part.nfe_per_sample, full.nfe_per_sample[perm])


# -- accounting, conditioning, bad input, the cap ------------------------------------------------------------------
@pytest.mark.parametrize("order", [2, 3])
def test_nfe_accounting_matches_a_counting_model(two_modes, linear, order):
    model, x = two_modes
    counted = CountingModel(model)
    r = ds.sample(counted, x[:32], schedule=linear, sampler="adaptive", order=order, rtol=0.02, return_info=True)
    rows = sum(len(t) for t in counted.ts)
    # r.nfe counts calls: at least the most any sample received (a retry's call skips rows that kept their x̂_0)
    assert rows == int(r.nfe_per_sample.sum()) and counted.calls == r.nfe >= int(r.nfe_per_sample.max())
    # a try costs `order` calls, a retry after a rejection one fewer (x̂_0 at its start is kept), the end one
    assert torch.equal(r.nfe_per_sample, 1 + order * r.accepted + (order - 1) * r.rejected)
    assert r.timesteps.tolist() == [999.0, 0.0]
    # fixed-step samplers: the same fields, every sample every call
    f = ds.sample(counted, x[:4], schedule=linear, sampler="heun", steps=6, return_info=True)
    assert f.nfe_per_sample.tolist() == [11] * 4 and f.accepted.tolist() == [6] * 4 and f.rejected.tolist() == [0] * 4


def test_conditioning_follows_the_active_rows(linear):
    """A per-sample data scale passed as cond: x_0 ~ N(0, s_b² I), ε* = σ x/(α² s² + σ²); compaction must hand
    each call the scales of exactly the samples in it."""
    def model(x, t, scale):
        a = linear.alpha_bar_at(t.double())[:, None]
        return (1 - a).sqrt() * x / (a * scale[:, None] ** 2 + 1 - a)

    scale = torch.tensor([1.0, 0.02, 3.0, 0.3], dtype=torch.float64)
    x_T = noise(4, 5, seed=4)
    r = ds.sample(model, x_T, schedule=linear, sampler="adaptive", rtol=1e-4, atol=1e-6, cond={"scale": scale},
                  return_info=True)
    s0, sT = linear.sigmas[0] ** 2, linear.sigmas[-1] ** 2
    s2 = scale[:, None] ** 2
    truth = x_T / linear.alphas_cumprod[-1].sqrt() * s2 / ((s2 + s0) * (s2 + sT)).sqrt()
    torch.testing.assert_close(r.sample, truth, rtol=1e-3, atol=1e-4)
    assert len(set(r.nfe_per_sample.tolist())) > 1  # the samples did leave the batch at different rounds


def half_log_snr(schedule, t):
    ab = schedule.alpha_bar_at(t.reshape(1)).item()
    return 0.5 * math.log(ab / (1 - ab))


def test_max_growth_caps_each_step_against_the_last_accepted_one(two_modes, linear):
    model, x = two_modes
    seen = []
    kw = dict(schedule=linear, sampler="adaptive", rtol=0.01, return_info=True)
    r = ds.sample(model, x[:4], max_growth=1.2, callback=seen.append, **kw)
    lam = {}
    for s in seen:  # λ = ½ log-SNR of every accepted step, per sample, from the callback's t before and after
        for b in ((s.t != s.t_next) & (s.t_next >= 0)).nonzero().flatten().tolist():
            lam.setdefault(b, [half_log_snr(linear, s.t[b])])
            lam[b].append(half_log_snr(linear, s.t_next[b]))
    ratios = [h1 / h0 for v in lam.values() for h0, h1 in zip(np.diff(v), np.diff(v)[1:])]
    assert len(ratios) > 20 and max(ratios) <= 1.2 * (1 + 1e-3), max(ratios)
    free = ds.sample(model, x[:4], **kw)  # without the cap it grows faster, in fewer steps
    assert free.accepted.sum() < r.accepted.sum()


@pytest.mark.parametrize("name, options", [("linear", {}), ("cosine", {}), ("linear", {"zero_terminal_snr": True})])
def test_the_solvers_t_of_lambda_is_the_schedules_inverse(name, options):
    """The t the model is called at: the schedule's own λ ↔ t inverse, bit for bit inside its finite range, clamped to
    that range outside it (λ beyond the last finite entry of a zero-terminal-SNR table), exactly the integer step at
    a tabulated λ, and inverted by the forward map: ᾱ(t(λ)) = sigmoid(2λ)."""
    from diffsteps.sampling.adaptive import _TimeOf

    sch = ds.make_schedule(name, 1000, **options)
    table = sch.log_snr
    finite = table[torch.isfinite(table)]
    t_of = _TimeOf(sch, torch.device("cpu"))
    inside = torch.linspace(finite[-1].item(), finite[0].item(), 997, dtype=torch.float64) / 2
    assert torch.equal(t_of(inside), sch.t_from_log_snr(2 * inside))
    torch.testing.assert_close(sch.alpha_bar_at(t_of(inside)), torch.sigmoid(2 * inside), rtol=1e-12, atol=1e-15)
    assert torch.equal(t_of(finite / 2), torch.arange(len(finite), dtype=torch.float64))
    outside = torch.tensor([finite[-1].item() / 2 - 3, finite[0].item() / 2 + 3], dtype=torch.float64)
    assert t_of(outside).tolist() == [len(finite) - 1.0, 0.0]


def test_bad_input_is_rejected_before_any_model_call(gaussian, linear):
    model = CountingModel(ds.ExactEpsilon(gaussian, linear))
    x = noise(4, 3)
    for opts, message in [({"rtol": 0.0}, "rtol must be a finite number > 0"),
                          ({"atol": -1e-3}, "atol must be a finite number ≥ 0"),
                          ({"max_nfe": 3}, "max_nfe must be an integer ≥ 4"),
                          ({"order": 2, "max_nfe": 2}, "max_nfe must be an integer ≥ 3"),
                          ({"order": 4}, "order must be one of: 2, 3"),
                          ({"control": "global"}, "control must be one of: sample, batch"),
                          ({"form": "v"}, "form must be one of: data, noise"),
                          ({"coords": "x"}, "coords must be one of: vp, ve, x0"),
                          ({"h_max_noisy": 0.0}, "h_max_noisy .* must be > 0"),
                          ({"max_growth": 1.0}, "max_growth .* must be > 1"),
                          ({"resolve_lambda": math.inf}, "resolve_lambda .* must be a finite number or None"),
                          ({"resolve_lambda": 0.0, "resolve_factor": 0.5}, r"resolve_factor .* must be ≥ 1"),
                          ({"resolve_lambda": 0.0, "probe_calls": 0}, r"probe_calls .* must be an integer ≥ 1"),
                          ({"resolve_spike": 1.0}, r"resolve_spike .* must be a finite number > 1 or None"),
                          ({"resolve_spike": math.inf}, r"resolve_spike .* must be a finite number > 1 or None"),
                          ({"resolve_spike": 8.0, "spike_back": 0}, r"spike_back .* must be an integer ≥ 1"),
                          ({"resolve_spike": 8.0, "resolve_lambda": 0.0}, "set one of them"),
                          ({"steps": 10}, "chooses its own steps"),
                          ({"gamma": 1.0}, r"has no option\(s\) \['gamma'\]")]:
        with pytest.raises(ValueError, match=message):
            ds.sample(model, x, schedule=linear, sampler="adaptive", **opts)
    zero_snr = ds.make_schedule("linear", 1000, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="finite noise level at the first timestep"):
        ds.sample(model, x, schedule=zero_snr, sampler="adaptive")
    assert model.calls == 0


# -- probe and re-solve (resolve_lambda) ----------------------------------------------------------------------------
def test_growth_probe_finds_the_largest_eigenvalue_of_the_denoisers_jacobian(linear):
    """On Gaussian data N(μ, diag(c)) the posterior covariance is c σ̃²/(c + σ̃²), so J = ∂x̂_0/∂x̃ = diag(c/(c + σ̃²))
    (Tweedie) and μ = max c/(c + σ̃²) in closed form; the probe's power iteration converges to it, and three calls
    (the default) are within 10 % here."""
    from diffsteps.sampling.adaptive import _probe_growth, _TimeOf
    from diffsteps.sampling.denoiser import Denoiser

    c = torch.tensor([1.0, 4.0, 0.25, 0.5], dtype=torch.float64)
    gauss = ds.GaussianMixture(torch.tensor([[0.3, -0.2, 0.1, 0.0]], dtype=torch.float64), c[None])
    counted = CountingModel(ds.ExactEpsilon(gauss, linear))
    denoise = Denoiser(counted)
    x = noise(6, 4, seed=1)
    for lam in (0.0, -1.0, 1.0):
        lams = torch.full((6,), lam, dtype=torch.float64)
        al, sg = (torch.sigmoid(2 * lams).sqrt()[:, None], torch.sigmoid(-2 * lams).sqrt()[:, None])
        t = linear.t_from_log_snr(2 * lams)
        x0 = denoise(x, t, al, sg)[0]
        # J at the model's own noise level ᾱ(t), on the probe's x̃ = x/α(λ) (the two α agree to rounding)
        abar = linear.alpha_bar_at(t[:1]).item()
        exact = (math.sqrt(torch.sigmoid(torch.tensor(2 * lam)).item() / abar)
                 * (c / (c + (1 - abar) / abar)).max().item())
        before = counted.calls
        # (at λ = 1 the two largest are 0.97 and 0.88: power iteration converges slowly)
        t_of = _TimeOf(linear, x.device)
        many = _probe_growth(denoise, t_of, x, x0, lams, torch.arange(6), 200)
        few = _probe_growth(denoise, t_of, x, x0, lams, torch.arange(6), 3)
        assert counted.calls - before == 203  # one model call per power-iteration step
        torch.testing.assert_close(many, torch.full_like(many, exact), rtol=1e-6, atol=0)
        assert torch.all((few - exact).abs() < 0.1 * exact), (lam, few, exact)


def test_resolve_sends_back_only_the_sample_the_flow_amplifies(two_modes, linear):
    """two_modes probed from λ = 0.5 on: the sample next to the boundary, still undecided where its step ends
    (λ ≈ 0.85), has μ̂ ≈ 4.9 (up to ¼·|Δm|²/σ̃² ≈ 5.5 there); the easy ones sit in a basin, μ̂ ≈ 0.03 ≈ 0.05²/σ̃². Only
    the first is re-solved — from its noise at rtol/10, so it equals a plain run at that tolerance — and its error
    falls; the easy ones go on exactly as without the probe, for its 3 calls more; every sample is still independent
    of its batch; the model counts the same NFE."""
    model, x = two_modes
    kw = dict(schedule=linear, sampler="adaptive", rtol=0.01, return_info=True)
    plain = ds.sample(model, x, **kw)
    counted = CountingModel(model)
    r = ds.sample(counted, x, resolve_lambda=0.5, **kw)
    assert sum(len(t) for t in counted.ts) == int(r.nfe_per_sample.sum())
    tight = ds.sample(model, x[:1], schedule=linear, sampler="adaptive", rtol=0.001, atol=0.00078, return_info=True)
    torch.testing.assert_close(r.sample[0], tight.sample[0], rtol=1e-12, atol=1e-13)
    assert r.nfe_per_sample[0] > tight.nfe_per_sample[0] > plain.nfe_per_sample[0]
    ref = ds.sample(model, x[:1], schedule=linear, sampler="dpmpp_3m", steps=1000, spacing="logsnr")[0]
    assert rms(r.sample[0], ref) < 0.3 * rms(plain.sample[0], ref), (rms(r.sample[0], ref), rms(plain.sample[0], ref))
    torch.testing.assert_close(r.sample[1:], plain.sample[1:], rtol=1e-12, atol=1e-13)  # (rows batched otherwise)
    assert torch.equal(r.nfe_per_sample[1:], plain.nfe_per_sample[1:] + 3)
    assert torch.equal(r.accepted[1:], plain.accepted[1:]) and torch.equal(r.rejected[1:], plain.rejected[1:])
    for b in (0, 7):
        alone = ds.sample(model, x[b:b + 1], resolve_lambda=0.5, **kw)
        torch.testing.assert_close(alone.sample[0], r.sample[b], rtol=1e-12, atol=1e-13)
        assert alone.nfe_per_sample.item() == r.nfe_per_sample[b].item()
    # a probe past the end of the flow (or before its start) is no probe: the plain run, call for call
    for lam in (50.0, -50.0):
        same = ds.sample(model, x[:8], resolve_lambda=lam, **kw)
        torch.testing.assert_close(same.sample, plain.sample[:8], rtol=1e-12, atol=1e-13)
        assert torch.equal(same.nfe_per_sample, plain.nfe_per_sample[:8])


# -- spike and re-solve (resolve_spike) ------------------------------------------------------------------------------
def test_spike_resolve_goes_back_for_the_sample_whose_own_estimate_spikes(two_modes, linear):
    """two_modes at rtol 0.01: the sample at the boundary has a try whose own error estimate is 11.8 tolerances
    (measured; the easy ones stay under 1.4). With resolve_spike=8 only it goes back: from its start when
    spike_back exceeds its accepted steps — then it equals a plain run at rtol/10 and costs that run's NFE plus what
    it spent before the spike — and from a later state, for fewer calls, otherwise; its error falls 3.6×. The easy
    ones are the plain run's, at its cost; each sample is independent of its batch (per-sample control) and the
    model counts the NFE the result reports. A spike no try reaches changes nothing, call for call."""
    model, x = two_modes
    kw = dict(schedule=linear, sampler="adaptive", rtol=0.01, return_info=True)
    plain = ds.sample(model, x, **kw)
    same = ds.sample(model, x, resolve_spike=1e6, spike_back=1, **kw)
    assert torch.equal(same.sample, plain.sample) and torch.equal(same.nfe_per_sample, plain.nfe_per_sample)
    assert torch.equal(same.rejected, plain.rejected)
    ref = ds.sample(model, x[:1], schedule=linear, sampler="dpmpp_3m", steps=1000, spacing="logsnr")[0]
    tight = ds.sample(model, x[:1], schedule=linear, sampler="adaptive", rtol=0.001, atol=0.00078, return_info=True)
    runs = {}
    for back in (100, 4, 1):
        counted = CountingModel(model)
        r = runs[back] = ds.sample(counted, x, resolve_spike=8.0, spike_back=back, **kw)
        assert sum(len(t) for t in counted.ts) == int(r.nfe_per_sample.sum())
        torch.testing.assert_close(r.sample[1:], plain.sample[1:], rtol=1e-12, atol=1e-13)  # (rows batched)
        assert torch.equal(r.nfe_per_sample[1:], plain.nfe_per_sample[1:])
        assert torch.equal(r.accepted[1:], plain.accepted[1:]) and torch.equal(r.rejected[1:], plain.rejected[1:])
        assert rms(r.sample[0], ref) < 0.3 * rms(plain.sample[0], ref), (back, rms(r.sample[0], ref))
        alone = ds.sample(model, x[:1], resolve_spike=8.0, spike_back=back, **kw)
        torch.testing.assert_close(alone.sample[0], r.sample[0], rtol=1e-12, atol=1e-13)
        assert alone.nfe_per_sample.item() == r.nfe_per_sample[0].item()
    torch.testing.assert_close(runs[100].sample[0], tight.sample[0], rtol=1e-12, atol=1e-13)
    before_spike = runs[100].nfe_per_sample[0] - tight.nfe_per_sample[0]
    assert 0 < before_spike < plain.nfe_per_sample[0]  # it stopped on its way, where the spike was
    assert runs[1].nfe_per_sample[0] < runs[4].nfe_per_sample[0] < runs[100].nfe_per_sample[0]
    # under batch control the batch's estimate hides the spike, the sample's own does not: it alone goes back
    batch = ds.sample(model, x, control="batch", **kw)
    spiked = ds.sample(model, x, control="batch", resolve_spike=8.0, **kw)
    assert torch.equal(spiked.nfe_per_sample > batch.nfe_per_sample, torch.arange(len(x)) == 0)
    assert rms(spiked.sample[0], ref) < 0.3 * rms(batch.sample[0], ref)


def test_max_nfe_cap_finishes_every_sample_and_says_so(two_modes, linear):
    model, x = two_modes
    with pytest.warns(RuntimeWarning, match=r"1 of 8 samples reached max_nfe=50"):
        r = ds.sample(model, x[:8], schedule=linear, sampler="adaptive", rtol=0.01, max_nfe=50, return_info=True)
    assert r.nfe_per_sample.max() <= 50 and torch.isfinite(r.sample).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        free = ds.sample(model, x[:8], schedule=linear, sampler="adaptive", rtol=0.01, return_info=True)
    # the easy samples never met the cap and are untouched by it; the hard one stopped early, on its way
    assert torch.equal(r.sample[1:], free.sample[1:]) and free.nfe_per_sample[0] > 50
    assert 0 < rms(r.sample[0], free.sample[0]) < 1


def test_run_py_with_the_adaptive_sampler(tmp_path):
    """The runner: steps are ignored for an adaptive sampler (one row, and a warning), its realised mean NFE is the
    row's nfe; the re-solve is an option of the config; the trajectory pictures show the steps it picked."""
    proc = run_py(tmp_path, *FAST, "sampler=adaptive", "sampler.options.rtol=0.05", "steps=[10,20]",
                  "sampler.options.resolve_lambda=-0.5", "eval.num_samples=64", "eval.batch_size=64",
                  "eval.kid_subset_size=32")
    log = proc.stdout + proc.stderr
    assert "steps=[10, 20] ignored" in log and "could not write" not in log
    assert all((tmp_path / "run" / "trajectory" / f"adaptive.{ext}").is_file() for ext in ("png", "gif", "pt"))
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(rows) == 1 and rows[0]["sampler"] == "adaptive" and rows[0]["num_samples"] == 64
    assert 4 <= rows[0]["nfe"] <= 1000 and math.isfinite(rows[0]["nll"])
