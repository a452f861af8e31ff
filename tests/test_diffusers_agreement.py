"""Agreement with diffusers: ``ddim``, ``ddpm``, ``dpmpp_2m`` and ``pndm`` against DDIMScheduler, DDPMScheduler,
DPMSolverMultistepScheduler and PNDMScheduler (diffusers 0.42.1, pinned in pyproject's ``test`` extra).

Both sides get the same model, the same initial noise, the same schedule and the same timesteps; the stochastic
samplers get CPU generators with the same seed. diffusers is an independent implementation — its own float32 β tables
(built by its own code from the schedule names), its own spacing code, its own step formulas and its own noise
draws — so agreement to float32 rounding means our schedules, spacings, parameterisation conversions, clipping /
thresholding and update rules are the ones the de-facto reference computes, not merely self-consistent.

The model is a non-trivial nonlinear one: the exact ε-predictor of a 3-component Gaussian mixture in D = 16 (two
full covariances, one diagonal), wrapped to answer v- or x0-predictions through ``prediction_target`` with the
schedule's √ᾱ, √(1 − ᾱ) at the model's t. Samples are shaped (64, 4, 2, 2) because diffusers' dynamic thresholding
needs (batch, channels, ...).

Tolerances (errors are max |Δ| / max |reference|). diffusers keeps its tables (ᾱ; DPM-Solver's σ) in float32 and
computes its step coefficients in float32 (e.g. 1 − ᾱ_t/ᾱ_s, which loses digits on short steps near t = 0); we
compute every coefficient in float64 from a float64 β table; the state is float32 on both sides. Measured gaps are
2e-7 … 3.4e-5 (the largest: DDPM on an irregular list ending 30 → 9 → 0), so RTOL32 = 2e-4 keeps a 6× margin, while a
deliberate one-index shift of ᾱ already moves the DDIM result by 2e-3 … 8e-2. The float64 tests inject our float64 ᾱ
table into diffusers' DDIM/DDPM schedulers and run in float64, which leaves ~1e-15: the float32 gaps are diffusers'
float32 rounding and nothing else. One case needs more: DPM-Solver with ε-prediction on the cosine schedule, where
diffusers' float32 σ table costs 2.6e-4 (test_dpmpp_2m explains it and shows it vanish with an exact σ table).

Where diffusers means something different, the test says so and checks the difference exactly: DDIM on uneven grids
(test_ddim_linspace), DDPM's noise on the last trailing step (test_ddpm_trailing_large_variance_final_noise), Karras
σ's with rounded model timesteps (test_dpmpp_2m_karras), DPM-Solver's ᾱ_{T−1} = 2^-24 under zero terminal SNR
(test_dpmpp_2m_zero_terminal_snr). Run with ``-rP`` to see every measured gap.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from helpers import agreement_mixture

import diffsteps as ds

T = 1000
SHAPE = (64, 4, 2, 2)  # 64 samples of D = 16
RTOL32 = 2e-4  # diffusers' float32 tables and coefficients vs our float64 ones (module docstring); worst seen 3.4e-5
RTOL64 = 1e-11  # diffusers' step code fed our float64 ᾱ table, float64 state; measured ≤ 1e-15

# diffusers' DPM-Solver set_timesteps calls np.array on a torch tensor, which numpy 2 warns about; not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("epsilon", "v", "x0")
DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}


# -- the model ---------------------------------------------------------------------------------------------------


MIXTURE = agreement_mixture()


class Predictor:
    """The exact model in any parameterisation: ε from :class:`ds.ExactEpsilon`, x̂_0 = (x − σ ε)/α, then
    ``prediction_target``. Where α = 0 (t = T−1 under zero terminal SNR) x_t carries no information about x_0 and
    E[x_0 | x_t] is the mixture mean, the α → 0 limit of the same formula."""

    def __init__(self, schedule: ds.Schedule, prediction: str):
        self.eps_model = ds.ExactEpsilon(MIXTURE, schedule)
        self.schedule, self.prediction = schedule, prediction
        self._abar: dict[float, float] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # computed in float64, returned in x's dtype: the conversion x̂_0 = (x − σ ε)/α is ill-conditioned where α is
        # tiny (cosine: α_{T−1} ≈ 5e-5), and the model itself should not add float32 noise that both sides then share
        x64 = x.to(torch.float64)
        eps = self.eps_model(x64, t)
        if self.prediction == "epsilon":
            return eps.to(x.dtype)
        t0 = float(t[0])
        if t0 not in self._abar:
            self._abar[t0] = self.schedule.alpha_bar_at(t0).item()
        abar = self._abar[t0]
        alpha, sigma = math.sqrt(abar), math.sqrt(1.0 - abar)
        if alpha > 0:
            x0 = (x64 - sigma * eps) / alpha
        else:
            x0 = MIXTURE.mean().reshape(x.shape[1:]).expand_as(x64)
        return ds.prediction_target(x0, eps, alpha, sigma, self.prediction).to(x.dtype)


# -- helpers -----------------------------------------------------------------------------------------------------
def noise(seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def diffusers_config(schedule: str, prediction: str, *, zero_snr: bool = False, **extra) -> dict:
    cfg = dict(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[schedule],
               prediction_type=DIFFUSERS_PREDICTION[prediction], rescale_betas_zero_snr=zero_snr)
    if schedule == "scaled_linear":  # our scaled_linear defaults are Stable Diffusion's, diffusers' are not
        cfg.update(beta_start=0.00085, beta_end=0.012)
    cfg.update(extra)
    return cfg


def ddim_scheduler(schedule, prediction, spacing, **extra) -> DDIMScheduler:
    extra.setdefault("clip_sample", False)  # diffusers defaults to clip_sample=True
    return DDIMScheduler(**diffusers_config(schedule, prediction, timestep_spacing=spacing, **extra))


def ddpm_scheduler(schedule, prediction, spacing, variance, **extra) -> DDPMScheduler:
    extra.setdefault("clip_sample", False)
    return DDPMScheduler(**diffusers_config(schedule, prediction, timestep_spacing=spacing,
                                            variance_type={"small": "fixed_small", "large": "fixed_large"}[variance],
                                            **extra))


def dpm_scheduler(schedule, prediction, **extra) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**diffusers_config(
        schedule, prediction, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        final_sigmas_type="zero", lower_order_final=True, **extra))


def run_diffusers(scheduler, model, x, *, steps=None, timesteps=None, generator=None, before_step=None, **step_kw):
    """The standard diffusers sampling loop. Returns (sample, model calls, the scheduler's timesteps)."""
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(steps)
    x, nfe = x.clone(), 0
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            out = model(x, torch.full((len(x),), int(t), dtype=torch.int64))
            nfe += 1
            if before_step is not None:
                before_step(scheduler, i)
            x = scheduler.step(out, t, x, generator=generator, **step_kw).prev_sample
    return x, nfe, scheduler.timesteps.clone()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (ours.double() - ref.double()).abs().max().item()
    return d, d / ref.double().abs().max().item()


def assert_agree(ours: torch.Tensor, ref: torch.Tensor, rtol: float, what: str = "") -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.isfinite(ours).all() and torch.isfinite(ref).all()
    abs_err, rel = rel_err(ours, ref)
    print(f"{what}: max|Δ| = {abs_err:.2e}, relative {rel:.2e}")
    assert rel <= rtol, f"{what}: max|Δ| = {abs_err:.3g} ({rel:.3g} of max|ref|) exceeds rtol {rtol:g}"


def assert_same_walk(res: ds.SampleResult, nfe: int, timesteps: torch.Tensor) -> None:
    assert res.nfe == nfe == len(timesteps)
    assert torch.equal(res.timesteps, timesteps.to(torch.float64)), (res.timesteps, timesteps)


# -- schedules ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_bar_tables_match(schedule, zero_snr):
    ours = ds.make_schedule(schedule, T, zero_terminal_snr=zero_snr).alphas_cumprod
    ref = DDIMScheduler(**diffusers_config(schedule, "epsilon", zero_snr=zero_snr)).alphas_cumprod.double()
    # float32 tables: measured ≤ 1.3e-5 relative (3.8e-5 at t = 998 for scaled_linear with zero terminal SNR)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)
    if zero_snr:
        assert ours[-1] == 0 and ref[-1] == 0


# -- DDIM --------------------------------------------------------------------------------------------------------
# every schedule with ε-prediction, every prediction on the cosine schedule
SCHEDULE_PREDICTION = [(s, "epsilon") for s in SCHEDULES] + [("cosine", "v"), ("cosine", "x0")]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("schedule,prediction", SCHEDULE_PREDICTION)
def test_ddim_deterministic(schedule, prediction, spacing):
    sched = ds.make_schedule(schedule, T)
    model, z = Predictor(sched, prediction), noise()
    ref, nfe, ts = run_diffusers(ddim_scheduler(schedule, prediction, spacing), model, z, steps=20, eta=0.0)
    res = ds.sample(model, z, schedule=sched, sampler="ddim", steps=20, spacing=spacing, prediction=prediction,
                    eta=0.0, return_info=True)
    assert_same_walk(res, nfe, ts)
    assert_agree(res.sample, ref, RTOL32, f"ddim {schedule} {prediction} {spacing}")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_linspace(schedule):
    """Same timesteps as diffusers' ``linspace``. diffusers' DDIM step goes from t to t − T//n, not to the next
    listed timestep, so on linspace's uneven grid (gaps of 25 and 26 here) its chain mixes levels; ours steps between
    the listed timesteps. Setting ``num_inference_steps`` before each step so that T//n equals the actual gap makes
    diffusers' own step formula take the same steps, and then the two agree to float precision."""
    sched = ds.make_schedule(schedule, T)
    model, z, steps = Predictor(sched, "epsilon"), noise(), 40
    res = ds.sample(model, z, schedule=sched, sampler="ddim", steps=steps, spacing="linspace", return_info=True)

    plain, nfe, ts = run_diffusers(ddim_scheduler(schedule, "epsilon", "linspace"), model, z, steps=steps)
    assert_same_walk(res, nfe, ts)
    gaps = (ts[:-1] - ts[1:]).tolist() + [T]  # the last step goes below 0 (ᾱ = 1) whatever the gap
    assert set(gaps[:-1]) == {25, 26}
    _, plain_rel = rel_err(res.sample, plain)
    assert plain_rel > 10 * RTOL32  # the unpatched diffusers chain is a different one (measured 1.3e-2)

    def n_for_gap(gap: int) -> int:
        return next(n for n in range(1, T + 1) if T // n == gap)

    def set_gap(scheduler, i):
        scheduler.num_inference_steps = n_for_gap(gaps[i])

    ref, _, _ = run_diffusers(ddim_scheduler(schedule, "epsilon", "linspace"), model, z, steps=steps,
                              before_step=set_gap)
    assert_agree(res.sample, ref, RTOL32, f"ddim {schedule} linspace (diffusers stepping to the next timestep)")


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_stochastic_same_generator(eta, spacing):
    """η > 0: diffusers draws randn_tensor(shape, generator) (= torch.randn on the CPU generator) once per step; so
    do we, so the same seed must give the same sample. (diffusers also draws on the last step, where its std is 0;
    that draw comes after every draw that matters.)"""
    sched = ds.make_schedule("linear", T)
    model, z = Predictor(sched, "epsilon"), noise()
    kw = dict(schedule=sched, sampler="ddim", steps=20, spacing=spacing, eta=eta, return_info=True)
    res = ds.sample(model, z, generator=gen(11), **kw)
    again = ds.sample(model, z, generator=gen(11), **kw)
    assert torch.equal(res.sample, again.sample), "ddim with eta > 0 is not reproducible from `generator`"
    ref, nfe, ts = run_diffusers(ddim_scheduler("linear", "epsilon", spacing), model, z, steps=20, eta=eta,
                                 generator=gen(11))
    assert_same_walk(res, nfe, ts)
    assert_agree(res.sample, ref, RTOL32, f"ddim eta={eta} {spacing}")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("mode", ["clip", "threshold"])
def test_ddim_clip_and_dynamic_threshold(mode, prediction):
    """clip_sample ↔ clip_denoised=1; thresholding (ratio p, sample_max_value m) ↔ dynamic_threshold=p,
    threshold_max=m. We re-derive ε̂ from the clipped x̂_0, which in diffusers' DDIM is
    ``use_clipped_model_output=True`` (its default False keeps the unclipped ε̂ for the direction term)."""
    sched = ds.make_schedule("scaled_linear", T)
    model, z = Predictor(sched, prediction), noise()
    if mode == "clip":
        extra, ours_kw = dict(clip_sample=True, clip_sample_range=1.0), dict(clip_denoised=1.0)
    else:
        extra = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.6)
        ours_kw = dict(dynamic_threshold=0.9, threshold_max=1.6)
    ref, nfe, ts = run_diffusers(ddim_scheduler("scaled_linear", prediction, "trailing", **extra), model, z,
                                 steps=20, use_clipped_model_output=True)
    res = ds.sample(model, z, schedule=sched, sampler="ddim", steps=20, spacing="trailing", prediction=prediction,
                    return_info=True, **ours_kw)
    assert_same_walk(res, nfe, ts)
    assert_agree(res.sample, ref, RTOL32, f"ddim {mode} {prediction}")
    unclipped = ds.sample(model, z, schedule=sched, sampler="ddim", steps=20, spacing="trailing",
                          prediction=prediction)
    assert rel_err(unclipped, ref)[1] > 100 * RTOL32  # the clipping / thresholding was active


# -- DDPM --------------------------------------------------------------------------------------------------------
DDPM_CASES = [(s, sp, v) for s in SCHEDULES for sp in ("leading", "trailing", "linspace") for v in ("small", "large")
              if not (sp == "trailing" and v == "large")]  # that one: test_ddpm_trailing_large_variance_final_noise


@pytest.mark.parametrize("schedule,spacing,variance", DDPM_CASES)
def test_ddpm(schedule, spacing, variance):
    sched = ds.make_schedule(schedule, T)
    model, z = Predictor(sched, "epsilon"), noise()
    ref, nfe, ts = run_diffusers(ddpm_scheduler(schedule, "epsilon", spacing, variance), model, z, steps=10,
                                 generator=gen(3))
    res = ds.sample(model, z, schedule=sched, sampler="ddpm", steps=10, spacing=spacing, variance=variance,
                    generator=gen(3), return_info=True)
    assert_same_walk(res, nfe, ts)
    assert_agree(res.sample, ref, RTOL32, f"ddpm {schedule} {spacing} {variance}")


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_ddpm_predictions_custom_timesteps(prediction, variance):
    """v / x0 models, and an irregular explicit timestep list (diffusers ``set_timesteps(timesteps=...)``)."""
    sched = ds.make_schedule("cosine", T)
    model, z = Predictor(sched, prediction), noise()
    steps = [999, 940, 850, 700, 520, 380, 250, 140, 70, 30, 9, 0]
    ref, nfe, ts = run_diffusers(ddpm_scheduler("cosine", prediction, "leading", variance), model, z,
                                 timesteps=steps, generator=gen(4))
    res = ds.sample(model, z, schedule=sched, sampler="ddpm", steps=None, spacing=steps, prediction=prediction,
                    variance=variance, generator=gen(4), return_info=True)
    assert_same_walk(res, nfe, ts)
    assert_agree(res.sample, ref, RTOL32, f"ddpm custom {prediction} {variance}")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddpm_trailing_large_variance_final_noise(schedule):
    """diffusers' DDPM adds noise whenever t > 0; trailing spacing ends at t = T/n − 1 > 0, so its step into the data
    adds √β z with β = 1 − ᾱ_t (fixed_large; fixed_small's β̃ is 0 there, clamped to 1e-20). We add no noise on the
    step into the data. The difference is exactly that term, z being the next draw of the shared generator."""
    sched = ds.make_schedule(schedule, T)
    model, z = Predictor(sched, "epsilon"), noise()
    ref, nfe, ts = run_diffusers(ddpm_scheduler(schedule, "epsilon", "trailing", "large"), model, z, steps=20,
                                 generator=gen(3))
    g = gen(3)
    res = ds.sample(model, z, schedule=sched, sampler="ddpm", steps=20, spacing="trailing", variance="large",
                    generator=g, return_info=True)
    assert_same_walk(res, nfe, ts)
    assert ts[-1] == T // 20 - 1
    extra = math.sqrt(1.0 - sched.alphas_cumprod[ts[-1]].item()) * torch.randn(SHAPE, generator=g)
    assert rel_err(res.sample, ref)[1] > 0.01
    assert_agree(res.sample + extra, ref, RTOL32, f"ddpm {schedule} trailing large (+ final noise)")


@pytest.mark.parametrize("mode", ["clip", "threshold"])
def test_ddpm_clip_and_dynamic_threshold(mode):
    sched = ds.make_schedule("linear", T)
    model, z = Predictor(sched, "epsilon"), noise()
    if mode == "clip":
        extra, ours_kw = dict(clip_sample=True, clip_sample_range=1.0), dict(clip_denoised=1.0)
    else:
        extra = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.6)
        ours_kw = dict(dynamic_threshold=0.9, threshold_max=1.6)
    ref, nfe, ts = run_diffusers(ddpm_scheduler("linear", "epsilon", "leading", "small", **extra), model, z,
                                 steps=20, generator=gen(5))
    res = ds.sample(model, z, schedule=sched, sampler="ddpm", steps=20, spacing="leading", generator=gen(5),
                    return_info=True, **ours_kw)
    assert_same_walk(res, nfe, ts)
    assert_agree(res.sample, ref, RTOL32, f"ddpm {mode}")
    plain = ds.sample(model, z, schedule=sched, sampler="ddpm", steps=20, spacing="leading", generator=gen(5))
    assert rel_err(plain, ref)[1] > 100 * RTOL32  # the clipping / thresholding was active


# -- zero terminal SNR -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_zero_terminal_snr_v_prediction(schedule, sampler):
    """rescale_betas_zero_snr=True ↔ zero_terminal_snr=True, v-prediction, trailing: the first step starts at ᾱ = 0
    exactly on both sides (x̂_0 = −v, ε̂ = x_T)."""
    sched = ds.make_schedule(schedule, T, zero_terminal_snr=True)
    model, z = Predictor(sched, "v"), noise()
    if sampler == "ddim":
        scheduler = ddim_scheduler(schedule, "v", "trailing", rescale_betas_zero_snr=True)
    else:
        scheduler = ddpm_scheduler(schedule, "v", "trailing", "small", rescale_betas_zero_snr=True)
    ref, nfe, ts = run_diffusers(scheduler, model, z, steps=20, generator=gen(6))
    res = ds.sample(model, z, schedule=sched, sampler=sampler, steps=20, spacing="trailing", prediction="v",
                    generator=gen(6), return_info=True)
    assert ts[0] == T - 1 and sched.alphas_cumprod[-1] == 0
    assert_same_walk(res, nfe, ts)
    assert_agree(res.sample, ref, RTOL32, f"{sampler} zero-SNR {schedule} v trailing")


# -- float64: diffusers' step code on our ᾱ table ---------------------------------------------------------------
@pytest.mark.parametrize("sampler,spacing", [("ddim", "leading"), ("ddim", "trailing"), ("ddpm", "leading"),
                                             ("ddpm", "trailing"), ("ddpm", "linspace")])
def test_float64_with_our_table(sampler, spacing):
    """With our float64 ᾱ injected into diffusers' scheduler and a float64 state, only the order of floating-point
    operations differs: agreement to ~1e-14. (DDPM trailing: diffusers adds √1e-20 · z = 1e-10 z on the last
    step, its clamp of a zero β̃. DDIM linspace: see test_ddim_linspace.)"""
    sched = ds.make_schedule("cosine", T)
    model, z = Predictor(sched, "v"), noise(dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    if sampler == "ddim":
        scheduler = ddim_scheduler("cosine", "v", spacing)
        scheduler.final_alpha_cumprod = one
    else:
        scheduler = ddpm_scheduler("cosine", "v", spacing, "small")
        scheduler.one = one
    scheduler.alphas_cumprod = sched.alphas_cumprod.clone()
    ref, nfe, ts = run_diffusers(scheduler, model, z, steps=10, generator=gen(8))
    res = ds.sample(model, z, schedule=sched, sampler=sampler, steps=10, spacing=spacing, prediction="v",
                    generator=gen(8), return_info=True)
    assert_same_walk(res, nfe, ts)
    rtol = 1e-9 if (sampler, spacing) == ("ddpm", "trailing") else RTOL64
    assert_agree(res.sample, ref, rtol, f"{sampler} float64 {spacing}")


# -- DPM-Solver++(2M) --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("schedule,prediction", SCHEDULE_PREDICTION)
def test_dpmpp_2m(schedule, prediction, steps):
    """diffusers' ``linspace`` for DPM-Solver is round(linspace(0, T−1, n+1))[::-1][:-1], not DDIM's, so its
    timesteps are passed to us explicitly. Both take first-order steps first and into σ = 0, midpoint 2M between."""
    sched = ds.make_schedule(schedule, T)
    model, z = Predictor(sched, prediction), noise()
    ref, nfe, ts = run_diffusers(dpm_scheduler(schedule, prediction), model, z, steps=steps)
    res = ds.sample(model, z, schedule=sched, sampler="dpmpp_2m", steps=None, spacing=ts.tolist(),
                    prediction=prediction, return_info=True)
    assert_same_walk(res, nfe, ts)
    assert ts[0] == T - 1 and ts[-1] > 0
    if schedule == "cosine" and prediction == "epsilon":
        # cosine's ᾱ_{T−1} ≈ 2.4e-9 (α ≈ 4.9e-5): at the first step x̂_0 = (x − σ_t ε̂)/α_t divides the float32
        # rounding of diffusers' σ_t = σ·α_t (1 − 6e-8 where the truth is 1 − 1.2e-9) by α_t — a 1e-3 error in x̂_0
        # and 2.6e-4 in the sample (measured). With its σ table replaced by exact float64 values, diffusers' own
        # step code agrees with us like everywhere else.
        assert_agree(res.sample, ref, 3e-3, f"dpmpp_2m {schedule} {prediction} {steps} (float32 σ table)")

        def exact_sigmas(scheduler, i):
            if i == 0:
                abar = sched.alphas_cumprod[scheduler.timesteps]
                scheduler.sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])

        ref, _, _ = run_diffusers(dpm_scheduler(schedule, prediction), model, z, steps=steps,
                                  before_step=exact_sigmas)
    assert_agree(res.sample, ref, RTOL32, f"dpmpp_2m {schedule} {prediction} {steps}")


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_dpmpp_2m_karras(schedule, steps):
    """``use_karras_sigmas=True`` ↔ ``spacing="karras"``: the same σ's (up to diffusers' float32 table), but
    diffusers rounds the model's timestep to an integer while stepping with the unrounded σ, where we evaluate the
    model at the exact real t of that σ. A model that rounds its t the same way removes the whole disagreement."""
    sched = ds.make_schedule(schedule, T)
    model, z = Predictor(sched, "v"), noise()
    scheduler = dpm_scheduler(schedule, "v", use_karras_sigmas=True)
    ref, nfe, ts = run_diffusers(scheduler, model, z, steps=steps)
    res = ds.sample(model, z, schedule=sched, sampler="dpmpp_2m", steps=steps, spacing="karras", prediction="v",
                    return_info=True)
    assert res.nfe == nfe == steps
    assert torch.equal(res.timesteps.round(), ts.double())
    abar = sched.alpha_bar_at(res.timesteps)
    # diffusers takes σ_min from its float32 ᾱ_0, where 1 − ᾱ_0 keeps ~4 digits: measured 8.3e-5 (linear), 1.3e-5
    torch.testing.assert_close(((1 - abar) / abar).sqrt(), scheduler.sigmas[:-1].double(), rtol=3e-4, atol=0)

    exact_t_gap = rel_err(res.sample, ref)
    print(f"dpmpp_2m karras {schedule} {steps}, model at real t vs diffusers' rounded t: "
          f"max|Δ| = {exact_t_gap[0]:.2e}, relative {exact_t_gap[1]:.2e}")

    def rounding_model(x, t):
        return model(x, t.to(torch.float64).round())

    rounded = ds.sample(rounding_model, z, schedule=sched, sampler="dpmpp_2m", steps=steps, spacing="karras",
                        prediction="v")
    assert_agree(rounded, ref, RTOL32, f"dpmpp_2m karras {schedule} {steps} (model rounds t)")


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_zero_terminal_snr(steps):
    """diffusers' DPM-Solver replaces ᾱ_{T−1} = 0 by 2^-24 ("so first sigma is not inf"); we start from ᾱ = 0
    exactly. That is the whole disagreement: run on our table with ᾱ_{T−1} set to 2^-24 (β_{T−1} = 1 − 2^-24/ᾱ_{T−2};
    scaled_linear, whose ᾱ_{T−2} ≈ 2e-7 > 2^-24 keeps the table monotone), we agree to float precision."""
    sched = ds.make_schedule("scaled_linear", T, zero_terminal_snr=True)
    model, z = Predictor(sched, "v"), noise()
    scheduler = dpm_scheduler("scaled_linear", "v", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ref, nfe, ts = run_diffusers(scheduler, model, z, steps=steps)
    assert scheduler.alphas_cumprod[-1].item() == 2.0**-24
    res = ds.sample(model, z, schedule=sched, sampler="dpmpp_2m", steps=steps, spacing="trailing", prediction="v",
                    return_info=True)
    assert_same_walk(res, nfe, ts)
    zero_gap = rel_err(res.sample, ref)
    print(f"dpmpp_2m zero-SNR scaled_linear {steps}, ᾱ_(T-1) = 0 vs diffusers' 2^-24: "
          f"max|Δ| = {zero_gap[0]:.2e}, relative {zero_gap[1]:.2e}")

    betas = sched.betas.clone()
    betas[-1] = 1.0 - 2.0**-24 / sched.alphas_cumprod[-2]
    like_diffusers = ds.Schedule("scaled_linear, ᾱ_(T-1) = 2^-24", betas)
    res = ds.sample(model, z, schedule=like_diffusers, sampler="dpmpp_2m", steps=None, spacing=ts.tolist(),
                    prediction="v")
    assert_agree(res, ref, RTOL32, f"dpmpp_2m zero-SNR scaled_linear {steps} (our table with ᾱ_(T-1) = 2^-24)")


# -- PNDM with its Runge–Kutta warm-up -------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing,steps", [("trailing", 10), ("leading", 20), ("trailing", 4)])
def test_pndm_with_runge_kutta_warmup(spacing, steps):
    """PNDMScheduler(skip_prk_steps=False, set_alpha_to_one=True): three pseudo-Runge–Kutta steps of four model calls
    at t, t − T/2N (twice) and t − T/N, then PLMS (AB4), the last step into ᾱ = 1. The model is called at the same
    timesteps in the same order on both sides (our half-step level (t_s + t_n)/2 is diffusers' t_n + ⌊T/2N⌋ because
    T/N is even here; diffusers steps to t − T//N, the next listed timestep only when N divides T), so the NFE is
    the same, steps + 9, and the samples agree to float32 rounding. ε-prediction only: with v diffusers combines the
    raw v outputs and converts them with the step's first level (as for PLMS in test_solvers.py)."""
    sch = PNDMScheduler(num_train_timesteps=T, beta_schedule="linear", timestep_spacing=spacing,
                        skip_prk_steps=False, set_alpha_to_one=True)
    linear = ds.make_schedule("linear", T)
    model = Predictor(linear, "epsilon")
    sch.set_timesteps(steps)
    ref = noise()
    with torch.no_grad():
        for t in sch.timesteps:
            ref = sch.step(model(ref, torch.full((SHAPE[0],), int(t))), t, ref).prev_sample
    seen = []

    def counting(x, t):
        seen.append(t[0].item())
        return model(x, t)

    res = ds.sample(counting, noise(), schedule=linear, sampler="pndm", steps=steps, spacing=spacing,
                    return_info=True)
    assert res.nfe == len(sch.timesteps) == steps + 9 and seen == sch.timesteps.tolist()
    assert_agree(res.sample, ref, RTOL32, f"pndm {spacing} {steps}")
