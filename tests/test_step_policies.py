"""Step policies (diffsteps.steps.search / stopping / predictor, task=min_steps): the quality-threshold search against
a full scan of step counts on the exact mixture, the calibrated stopping rule's coverage on fresh noise, the
predictor's labels against the oracle computed sample by sample, and the bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import FAST, noise, run_py

import diffsteps as ds
from diffsteps.evaluation.trajectory import trajectory_reference
from diffsteps.steps.predictor import (
    ladder_errors,
    load_predictor,
    oracle_labels,
    save_predictor,
    train_predictor,
)
from diffsteps.steps.search import Target, TargetUnreachable, find_min_steps
from diffsteps.steps.stopping import (
    binomial_interval,
    calibrate_stopping,
    sample_with_stopping,
    stop_outcome,
    stopping_trace,
)
from diffsteps.steps.teacher import CountingModel


@pytest.fixture(scope="module")
def exact(mixture, linear):
    """The exact 2-D mixture model, 1000 noises and their converged ODE solutions (Heun, 200 log-SNR steps)."""
    model = ds.ExactEpsilon(mixture, linear)
    x = noise(1000, 2, seed=3)
    ref, gap = trajectory_reference(model, x, schedule=linear, prediction="epsilon")
    assert gap.max() < 1e-3  # the reference converged far below the targets used here
    return model, x, ref


def test_search_equals_full_scan_with_fewer_evaluations(exact, linear):
    model, x, ref = exact
    x, ref = x[:128], ref[:128]
    # the full scan: every step count 1 … 64 from the same noise (common random numbers)
    outs = {n: ds.sample(model, x, schedule=linear, sampler="ddim", steps=n) for n in range(1, 65)}
    mse = {n: float((o - ref).pow(2).mean()) for n, o in outs.items()}
    for target in (1e-2, 3e-3, 1e-3):
        truth = next(n for n, v in mse.items() if v <= target)
        calls = []
        found = find_min_steps(lambda n, calls=calls: calls.append(n) or mse[n], Target(absolute=target), max_steps=64)
        print(f"MSE ≤ {target:g}: search {found.steps} steps in {found.evaluations} evaluations; full scan "
              f"{truth} steps in 64 evaluations ({truth} up to the answer)")
        assert found.steps == truth
        assert found.evaluations == len(calls) == len(set(calls)) < truth
        assert found.violations == [] and found.bracket == (truth - 1, truth)
    # within 5 % of the converged value (at 64 steps) of a metric that converges to a non-zero value: the exact NLL
    nll = {n: float(-model.mixture.log_prob(o).mean()) for n, o in outs.items()}
    within = Target(within=0.05, reference=nll[64])
    truth = next(n for n, v in nll.items() if within.met(v))
    found = find_min_steps(nll.__getitem__, within, max_steps=64)
    print(f"NLL within 5 %: search {found.steps} in {found.evaluations} evaluations; scan {truth}")
    assert found.steps == truth and found.evaluations < truth and found.violations == []


def test_search_reports_a_non_monotone_curve():
    # meets the target at 5, fails at 6 and 7, meets from 8 on: galloping 1, 2, 4, 8 brackets (4, 8]
    curve = {n: (0.0 if n == 5 or n >= 8 else 1.0) for n in range(1, 33)}
    found = find_min_steps(curve.__getitem__, Target(absolute=0.5), max_steps=32)
    assert found.steps in (5, 8)
    if found.steps == 8:  # bisection landed on the right of the dip: the violation is seen once 5 was evaluated
        assert 5 not in found.curve or (5, 6) in found.violations or (5, 7) in found.violations
    scanned = find_min_steps(curve.__getitem__, Target(absolute=0.5), max_steps=32, local_scan=3)
    assert scanned.steps == 5
    assert any(a == 5 for a, _ in scanned.violations)  # 5 meets, 6 or 7 (evaluated) does not


def test_unreachable_target_names_the_best_value(exact, linear):
    model, x, ref = exact
    seen = {}

    def metric(n):
        seen[n] = float((ds.sample(model, x[:64], schedule=linear, sampler="ddim", steps=n) - ref[:64]).pow(2).mean())
        return seen[n]

    with pytest.raises(TargetUnreachable, match=r"no step count up to 8 meets the target ≤ 1e-12") as err:
        find_min_steps(metric, Target(absolute=1e-12), max_steps=8)
    best = min(seen, key=seen.get)
    assert err.value.best == (best, seen[best]) and best == 8
    assert f"{seen[8]:.6g} at 8 steps" in str(err.value)
    assert err.value.curve == seen  # everything evaluated comes back with the error
    with pytest.raises(ValueError, match="exactly one of"):
        Target()
    with pytest.raises(ValueError, match="positive fraction"):
        Target(within=-0.1, reference=1.0)


def test_calibrated_stopping_meets_its_coverage_on_fresh_noise(exact, linear):
    model, x, ref = exact
    n_cal, alpha, target, K = 400, 0.1, 3e-3, 50
    trace = stopping_trace(model, x[:n_cal], ref[:n_cal], schedule=linear, sampler="ddim", steps=K)
    rule = calibrate_stopping(trace, error_target=target, alpha=alpha, sampler="ddim", steps=K)
    assert rule.tau > 0  # the rule does stop samples early, so the check below is not the fixed K-step sampler's
    counter = CountingModel(model)
    out, nfe = sample_with_stopping(counter, x[n_cal:], rule, schedule=linear)
    fresh = len(out)
    err = (out - ref[n_cal:]).pow(2).mean(1)
    met = int((err <= target).sum())
    # split-conformal: the expected coverage lies in [1 − α, 1 − α + 1/(n + 1)]; given the calibration set it
    # varies with sd √(α(1 − α)/n) — within 2.6 sd of that range and inside the fresh samples' 99 % interval
    lo, hi = binomial_interval(met, fresh, 0.99)
    slack = 2.6 * math.sqrt(alpha * (1 - alpha) / n_cal)
    print(f"coverage {met / fresh:.3f} on {fresh} fresh noises (99 % interval {lo:.3f}…{hi:.3f}), stated "
          f"{1 - alpha:g}; mean NFE {nfe.double().mean():.1f} of {K}")
    assert hi >= 1 - alpha - slack and lo <= 1 - alpha + 1 / (n_cal + 1) + slack
    assert nfe.double().mean() < K - 1  # samples do stop early
    # the NFE counted per sample is what the model was called on: stopped samples leave every later call
    assert counter.rows == int(nfe.sum())
    # and the run equals the recorded trajectory of the same noise: the same stop step and output for every sample
    err_trace, nfe_trace = stop_outcome(stopping_trace(model, x[n_cal:], ref[n_cal:], schedule=linear,
                                                       sampler="ddim", steps=K), rule.tau)
    assert torch.equal(nfe_trace, nfe)
    assert torch.allclose(err_trace, err, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="cannot certify"):
        calibrate_stopping(stop_trace_of(trace, 5), error_target=target, alpha=0.1, sampler="ddim", steps=K)


def stop_trace_of(trace, n):
    from diffsteps.steps.stopping import StopTrace

    return StopTrace(trace.scores[:, :n], trace.errors[:, :n], trace.nfe)


def test_predictor_labels_are_the_oracle_and_its_checkpoint_knows_its_model(exact, linear, tmp_path):
    model, x, ref = exact
    ladder, target = [2, 4, 8, 16, 32], 2e-3
    errors, nfe = ladder_errors(model, x[:24], ref[:24], ladder, schedule=linear, sampler="ddim", batch_size=10)
    labels = oracle_labels(errors, target)
    assert nfe.tolist() == ladder  # ddim: one model call per step
    for i in range(24):  # the oracle sample by sample, each alone, ladder rung by rung
        direct = len(ladder)
        for r, n in enumerate(ladder):
            out = ds.sample(model, x[i:i + 1], schedule=linear, sampler="ddim", steps=n)
            if float((out - ref[i:i + 1]).pow(2).mean()) <= target:
                direct = r
                break
        assert labels[i] == direct
    assert len(set(labels.tolist())) > 1  # samples differ in difficulty here
    pred = train_predictor(x[:24], labels, ladder, hidden=8, epochs=2, batch_size=8)
    path = save_predictor(pred, tmp_path / "p.pt", model_key="abc123")
    again = load_predictor(path, model_key="abc123")
    assert torch.equal(again.budget_index(x[:8], 0.5), pred.budget_index(x[:8], 0.5))
    with pytest.raises(ValueError, match="training key 'abc123', not this model's 'zzz999'"):
        load_predictor(path, model_key="zzz999")


def test_adaptive_row_reads_per_sample_nfe_and_reports_the_test_noise(exact, linear):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from diffsteps.runner.policies import PolicySettings, _adaptive_row

    model, x, ref = exact
    cal, test, ref_cal, ref_test = x[:300], x[300:600], ref[:300], ref[300:600]
    # not loosest-first on purpose; the target lies between the 90th-percentile MSE on the calibration noise at rtol
    # 0.05 and 0.02 (measured 8.5e-6, 4.1e-6; 1.2e-5 at 0.1, 2.2e-6 at 0.01), 8× above the reference's own (7e-7)
    rtols, target = (0.01, 0.1, 0.05, 0.02), 6e-6
    s = PolicySettings(error_target=target, alpha=0.1, adaptive_rtols=rtols, adaptive_caps=(0.5,), batch_size=128,
                       single_samples=2)

    def direct(noise, ref_, rtol, cap=0.5, lam=None, spike=None):  # the sampler on its own, the set in one batch
        counter = CountingModel(model)
        r = ds.sample(counter, noise, schedule=linear, sampler="adaptive", rtol=rtol, h_max_noisy=cap,
                      resolve_lambda=lam, resolve_spike=spike, atol=s.adaptive_atol_per_rtol * rtol,
                      max_nfe=s.adaptive_max_nfe, return_info=True)
        return (r.sample - ref_).pow(2).mean(1), r.nfe_per_sample, counter.rows

    cal_runs = {rtol: direct(cal, ref_cal, rtol) for rtol in rtols}
    cal_cov = {rtol: float((e <= target).double().mean()) for rtol, (e, _, _) in cal_runs.items()}
    chosen = max(r for r in rtols if cal_cov[r] >= 0.9)  # the loosest meeting the target on calibration noise
    assert chosen == 0.02 and cal_cov[0.01] >= 0.9  # a first-meeting-in-list-order choice would take 0.01

    args = (cal, test, ref_cal, ref_test, {"schedule": linear, "prediction": "epsilon"}, {},
            {"evals": 7, "seconds": 0.0}, 0.9)
    M = SimpleNamespace(net=model, mixture=model.mixture)
    rows, curves = _adaptive_row(M, s, *args)
    [row], curve = rows, curves["adaptive, cap 0.5"]
    err, nfe, _ = direct(test, ref_test, chosen)
    cov = float((err <= target).double().mean())
    print(f"adaptive rtol {chosen}: mean NFE {row['nfe_mean']:.2f} (per sample {nfe.min()}…{nfe.max()}), "
          f"coverage {row['coverage']:.3f} on test noise, {cal_cov[chosen]:.3f} on calibration noise")
    assert row["knob"] == f"rtol = {chosen:g}, cap 0.5"
    assert nfe.min() < nfe.max()  # samples differ, so the batch's model calls are not the per-sample NFE
    assert row["nfe_mean"] == pytest.approx(float(nfe.double().mean()), abs=1e-12)
    assert (row["nfe_p95"], row["nfe_max"]) == (float(torch.quantile(nfe.double(), 0.95)), float(nfe.max()))
    assert row["coverage"] == cov != cal_cov[chosen]  # on the test noise, not the calibration noise
    assert row["mse"] == pytest.approx(float(err.mean()), rel=1e-9)
    # one-off: the teacher's 7 plus every rtol's calibration run, as many rows as the model evaluated
    assert row["oneoff_model_evals"] == 7 + sum(rows_ for _, _, rows_ in cal_runs.values())
    # the knob curve: every rtol, on the test noise
    assert len(curve) == len(rtols) and curve[[0.1, 0.05, 0.02, 0.01].index(chosen)] == pytest.approx(
        (row["nfe_mean"], row["mse"], row["coverage"]), rel=1e-9)
    # with a second cap (none), each cap's loosest meeting rtol, and of the two the one cheaper on calibration noise
    uncapped = {rtol: direct(cal, ref_cal, rtol, math.inf) for rtol in (0.1, 0.05, 0.02)}
    rtol_inf = next((r for r in (0.1, 0.05, 0.02) if float((uncapped[r][0] <= target).double().mean()) >= 0.9), None)
    nfe_capped = float(cal_runs[chosen][1].double().mean())
    nfe_inf = math.inf if rtol_inf is None else float(uncapped[rtol_inf][1].double().mean())
    print(f"calibration mean NFE: cap 0.5 at rtol {chosen} {nfe_capped:.1f}, no cap at rtol {rtol_inf} {nfe_inf:.1f}")
    knobs = {}
    [row2], curves2 = _adaptive_row(M, PolicySettings(**{**vars(s), "adaptive_rtols": (0.1, 0.05, 0.02),
                                                          "adaptive_caps": (0.5, math.inf)}), *args, knobs=knobs)
    expect = (chosen, 0.5) if nfe_capped <= nfe_inf else (rtol_inf, math.inf)
    assert (knobs["adaptive_rtol"], knobs["adaptive_cap"]) == expect and set(curves2) == {"adaptive, cap 0.5",
                                                                                          "adaptive, no cap"}
    # a growth probe and re-solve (policies.adaptive_resolve) competes like a cap: per λ the loosest meeting rtol,
    # then the cheapest on calibration noise; its row is the sampler's own run with resolve_lambda=λ
    lam, few = -0.5, (0.05, 0.02)
    probed = {rtol: direct(cal, ref_cal, rtol, lam=lam) for rtol in few}
    rtol_lam = next((r for r in few if float((probed[r][0] <= target).double().mean()) >= 0.9), None)
    nfe_lam = math.inf if rtol_lam is None else float(probed[rtol_lam][1].double().mean())
    assert all((probed[r][1] >= cal_runs[r][1] + 3).all() for r in few)  # the probe's 3 calls, and any re-solve
    knobs = {}
    [row3], curves3 = _adaptive_row(M, PolicySettings(**{**vars(s), "adaptive_rtols": few,
                                                          "adaptive_resolve": (None, lam)}), *args, knobs=knobs)
    expect = (chosen, None) if nfe_capped <= nfe_lam else (rtol_lam, lam)
    print(f"calibration mean NFE with the probe at λ {lam}: rtol {rtol_lam} {nfe_lam:.1f}; chosen {expect}")
    assert (knobs["adaptive_rtol"], knobs["adaptive_resolve"]) == expect
    assert set(curves3) == {"adaptive, cap 0.5", f"adaptive, cap 0.5, re-solve at λ {lam:g}"}
    [row4], _ = _adaptive_row(M, PolicySettings(**{**vars(s), "adaptive_rtols": few, "adaptive_resolve": (lam,)}),
                              *args)
    err4, nfe4, _ = direct(test, ref_test, rtol_lam, lam=lam)
    assert row4["knob"] == f"rtol = {rtol_lam:g}, cap 0.5, re-solve at λ {lam:g}"
    assert row4["nfe_mean"] == pytest.approx(float(nfe4.double().mean()), abs=1e-12)
    assert row4["mse"] == pytest.approx(float(err4.mean()), rel=1e-9)
    # so does the spike re-solve (policies.adaptive_spike), never combined with a probe: its row is the sampler's run
    # with resolve_spike
    knobs = {}
    both = PolicySettings(**{**vars(s), "adaptive_rtols": few, "adaptive_resolve": (None, lam),
                             "adaptive_spike": (None, 3.0)})
    _, curves5 = _adaptive_row(M, both, *args, knobs=knobs)
    assert set(curves5) == {"adaptive, cap 0.5", "adaptive, cap 0.5, re-solve on a spike > 3",
                            f"adaptive, cap 0.5, re-solve at λ {lam:g}"}
    spiked = {rtol: direct(cal, ref_cal, rtol, spike=3.0) for rtol in few}
    rtol_s = next((r for r in few if float((spiked[r][0] <= target).double().mean()) >= 0.9), None)
    nfe_s = math.inf if rtol_s is None else float(spiked[rtol_s][1].double().mean())
    assert any((spiked[r][1] > cal_runs[r][1]).any() for r in few)  # some sample went back
    rtol_p = next((r for r in few if cal_cov[r] >= 0.9), None)
    nfe_p = math.inf if rtol_p is None else float(cal_runs[rtol_p][1].double().mean())
    options = [(nfe_p, (rtol_p, None, None)), (nfe_s, (rtol_s, None, 3.0)), (nfe_lam, (rtol_lam, lam, None))]
    expect = min(options, key=lambda o: o[0])[1]  # the first of equals, as the row takes them
    print(f"calibration mean NFE: plain {nfe_p:.2f}, spike > 3 {nfe_s:.2f}, probe {nfe_lam:.2f}; chosen {expect}")
    assert (knobs["adaptive_rtol"], knobs["adaptive_resolve"], knobs["adaptive_spike"]) == expect
    [row5], _ = _adaptive_row(M, PolicySettings(**{**vars(s), "adaptive_rtols": few, "adaptive_spike": (3.0,)}),
                              *args)
    err5, nfe5, _ = direct(test, ref_test, rtol_s, spike=3.0)  # rtol_s: 0.02 (measured)
    assert row5["knob"] == f"rtol = {rtol_s:g}, cap 0.5, re-solve on a spike > 3"
    assert row5["nfe_mean"] == pytest.approx(float(nfe5.double().mean()), abs=1e-12)
    assert row5["mse"] == pytest.approx(float(err5.mean()), rel=1e-9)
    for bad, match in (({"adaptive_rtols": [0.05, 0]}, "adaptive_rtols must be finite tolerances > 0"),
                       ({"adaptive_resolve": [None, ".nan"]}, r"adaptive_resolve must list .* got \[None, '\.nan'\]"),
                       ({"adaptive_resolve": []}, "adaptive_resolve must list the adaptive sampler's resolve_lambda"),
                       ({"adaptive_spike": [None, 1]}, r"adaptive_spike must list .* got \[None, 1\]"),
                       ({"adaptive_caps": [0.5, 0]}, "adaptive_caps must be λ-step caps > 0"),
                       ({"adaptive_caps": [".inf"]}, r"no cap: inf on the command line, \.inf in YAML\), got \['\.inf'\]"),
                       ({"adaptive_max_nfe": 3}, "adaptive_max_nfe must be an integer ≥ 4")):
        with pytest.raises(ValueError, match=match):  # before any model call
            PolicySettings.from_cfg(OmegaConf.create({"policies": bad}))


def test_min_steps_run_with_unreachable_target_keeps_what_it_evaluated(tmp_path):
    proc = run_py(tmp_path, *FAST, "task=min_steps", "min_steps.target=-100", "min_steps.max_steps=2",
                  "eval.grid_size=0", "eval.save_samples=0", "eval.grid_columns=0", "logger=none",
                  "eval.mse.num_samples=0", "eval.elbo.num_samples=0", check=False)
    assert proc.returncode != 0
    assert "no step count up to 2 meets the target ≤ -100: the best value reached is" in proc.stderr
    out = tmp_path / "run"
    summary = json.loads((out / "min_steps.json").read_text())
    assert summary["status"] == "unreachable" and sorted(summary["curve"]) == ["1", "2"]
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["steps"] for r in rows] == [1, 2]
    assert summary["best"]["value"] == min(r["nll"] for r in rows)


@pytest.mark.parametrize("objective, metric, why", [("fid", "fid", "a squared Fréchet distance"),
                                                   ("mse", "mse", "a mean of squared errors")])
def test_min_steps_target_below_the_metrics_floor_is_refused_before_any_work(tmp_path, monkeypatch, objective,
                                                                             metric, why):
    """A target no metric value can meet (FID or MSE below 0) is refused before training or evaluating; a target at
    the floor, and a negative one for metrics that can be negative (NLL of continuous data), are searched."""
    from diffsteps.runner import min_steps

    def never(*args, **kwargs):
        raise AssertionError("a model was built, trained or evaluated")

    monkeypatch.setattr(min_steps, "prepare_model", never)
    cfg = compose_policies(tmp_path, monkeypatch, *FAST, "task=min_steps", f"objective={objective}",
                           "min_steps.target=-0.5")
    with pytest.raises(ValueError, match=rf"min_steps.target=-0.5 is below the least value objective={objective} "
                                         rf"can take \(0: {metric} is {why}\), so no step count meets it; give a "
                                         r"target ≥ 0, or min_steps.within="):
        min_steps.min_steps_task(cfg)
    assert not (tmp_path / "run" / "min_steps.json").exists()
    for ok in ([f"objective={objective}", "min_steps.target=0"], ["objective=nll", "min_steps.target=-0.5"]):
        with pytest.raises(AssertionError, match="a model was built"):  # past the check, at the model
            min_steps.min_steps_task(compose_policies(tmp_path, monkeypatch, *FAST, "task=min_steps", *ok))


def test_condition_vector_makes_class_dependent_difficulty_predictable(linear):
    """Issue 13: the step predictor reads the prompt. Three Gaussian classes N(μ_k, s_k I) with s_k = 0.002, 0.05, 1
    under the exact conditional ε; the teacher is each class's probability flow in closed form (helpers.exact_flow).
    x_T is drawn independently of the prompt, so without the condition vector the predictor can only rank samples
    within a class; with ``encoder.vectors(prompts)`` it also knows the class, which sets most of the difficulty."""
    from helpers import exact_flow

    from diffsteps.nets.encoders import DIGIT_WORDS, DigitPrompts
    from diffsteps.steps.predictor import condition_vectors, spearman

    means = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    covs = torch.stack([s * torch.eye(2, dtype=torch.float64) for s in (0.002, 0.05, 1.0)])
    model = ds.ExactEpsilon(ds.GaussianMixture(means, covs), linear, conditional=True)
    n, templates = 300, ("the digit {}", "a handwritten {}", "an image of the number {}")
    # class i % 3 named as a numeral or a word, in a template that varies independently of the class
    prompts = [templates[i // 3 % 3].format(DIGIT_WORDS[i % 3] if i % 2 else str(i % 3)) for i in range(n)]
    enc = DigitPrompts()
    y, c = enc.labels(prompts), condition_vectors(prompts=prompts, encoder=enc)
    assert torch.equal(c[:, :10], condition_vectors(labels=y, num_classes=10))  # the one-hot path is the same class
    x = noise(n, 2, seed=2)
    ref = torch.empty_like(x)
    for k in range(3):
        ref[y == k] = exact_flow(ds.GaussianMixture(means[k:k + 1], covs[k:k + 1]), linear, x[y == k])
    ladder = [2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    errors, _ = ladder_errors(model, x, ref, ladder, schedule=linear, sampler="ddim", cond=enc.cond(prompts),
                              batch_size=128)
    labels = oracle_labels(errors, 1e-2)
    steps = torch.tensor(ladder + ladder[-1:])
    mean_steps = [steps[labels[y == k]].double().mean() for k in range(3)]
    assert mean_steps[0] < mean_steps[1] < mean_steps[2]  # the difficulty is the class's
    tr, te = slice(0, 200), slice(200, n)
    rho = {}
    for name, cond in (("without", None), ("with", c)):
        pred = train_predictor(x[tr], labels[tr], ladder, cond=None if cond is None else cond[tr], hidden=16,
                               epochs=120, batch_size=64)
        rho[name] = spearman(pred.expected_steps(x[te], None if cond is None else cond[te]), steps[labels[te]])
    assert rho["with"] > 0.8 and rho["with"] > rho["without"] + 0.35, rho  # measured 0.939 vs 0.417
    with pytest.raises(ValueError, match="either prompts= .* or labels="):
        condition_vectors()
    with pytest.raises(ValueError, match="every label in 0 … num_classes − 1"):
        condition_vectors(labels=torch.tensor([0, 3]), num_classes=3)


# -- the policies table (task=policies) run in this process ---------------------------------------------------------
def compose_policies(tmp_path, monkeypatch, *overrides):
    """run.py's config composed here (no subprocess), no logger."""
    from helpers import compose_run

    return compose_run(tmp_path, monkeypatch, "logger=none", *overrides)


# an exact class-conditional 2-D mixture of three well-separated classes, and policies settings that run in seconds
COND_GMM = ["experiment=step_policies", "data=gmm", "data.dim=2", "data.components=3", "data.spread=2.0",
            "data.component_std=0.2", "data.n_train=3000", "data.n_val=500", "data.conditional=true",
            "policies.calibration_noises=90", "policies.test_noises=60", "policies.ladder=[2,4,8,16,32,64]",
            "policies.predictor_epochs=5", "policies.single_samples=1", "policies.adaptive_rtols=[0.1,0.05]",
            "policies.batch_size=32", "policies.error_target=0.003", "eval.mse.reference_steps=100"]


@pytest.mark.parametrize("guidance", [None, 2.0])
def test_policies_condition_every_row_on_the_same_labels(tmp_path, monkeypatch, guidance):
    """data.conditional=true: the teacher and every row sample with one label per noise, the same in every row;
    each row's samples equal diffsteps.sample(..., cond={"y": labels}) (and the stopping rule's and predictor's own
    samplers) on the same noise, computed here in one batch; the predictor reads the one-hot label. With
    classifier-free guidance every row and the teacher are guided alike."""
    from hydra.utils import instantiate

    from diffsteps.runner.policies import policies_task
    from diffsteps.steps.predictor import condition_vectors
    from diffsteps.steps.stopping import StoppingRule

    cfg = compose_policies(tmp_path, monkeypatch, *COND_GMM,
                           *([] if guidance is None else [f"sampler.guidance_scale={guidance}"]))
    policies_task(cfg)
    out = tmp_path / "run"
    saved = torch.load(out / "policies_samples.pt", weights_only=False)
    diag = json.loads((out / "policies.json").read_text())["diagnostics"]
    data, schedule = instantiate(cfg.data), instantiate(cfg.schedule)
    model = ds.ExactEpsilon(data.mixture, schedule, conditional=True)
    x_T, y, rows = saved["noise"], saved["labels"], saved["rows"]
    assert set(rows) == {"fixed N*", "adaptive", "stopping", "predictor"}
    # the labels: one per noise, every class, drawn from the training split's (unequal) class frequencies
    assert y.shape == (60,) and diag["condition"] == "labels" and diag["num_classes"] == 3
    assert diag["test_class_counts"] == torch.bincount(y, minlength=3).tolist() and min(diag["test_class_counts"]) > 0
    kw = {"schedule": schedule, "prediction": "epsilon", "cond": {"y": y}, "guidance_scale": guidance}
    ref, _ = trajectory_reference(model, x_T, steps=100, **kw)
    assert torch.allclose(saved["reference"], ref, rtol=0, atol=1e-12)  # the teacher is conditional too
    n_star = diag["fixed_n_star"]
    fixed = ds.sample(model, x_T, sampler="ddim", steps=n_star, spacing="trailing", **kw)
    assert torch.allclose(rows["fixed N*"]["samples"], fixed, rtol=0, atol=1e-12)
    # the labels are obeyed: each sample lies nearest its own class's mean, unlike the unconditional (null-label) one
    nearest = torch.cdist(fixed, data.mixture.means.to(fixed.dtype)).argmin(1)
    assert (nearest == y).double().mean() > 0.95
    unconditional = ds.sample(model, x_T, sampler="ddim", steps=n_star, **{**kw, "guidance_scale": 0})
    assert not torch.allclose(unconditional, fixed, atol=1e-3)
    rtol, cap = diag["adaptive_rtol"], diag["adaptive_cap"] or math.inf
    adaptive = ds.sample(model, x_T, sampler="adaptive", rtol=rtol, atol=0.156 * rtol, max_nfe=500, h_max_noisy=cap,
                         **kw, return_info=True)
    assert torch.allclose(rows["adaptive"]["samples"], adaptive.sample, rtol=0, atol=1e-10)
    assert torch.equal(rows["adaptive"]["nfe"].long(), adaptive.nfe_per_sample)
    assert int(rows["fixed N*"]["nfe"][0]) == n_star * (1 if guidance is None else 2)  # a guided step costs 2
    rule = StoppingRule(diag["stopping_tau"], 0.1, 0.003, "ddim", diag["stopping_grid"], "trailing",
                        {"eta": 0.0, "guidance_scale": guidance})
    stopped, nfe = sample_with_stopping(model, x_T, rule, **{k: v for k, v in kw.items() if k != "guidance_scale"})
    assert torch.allclose(rows["stopping"]["samples"], stopped, rtol=0, atol=1e-12) and torch.equal(rows["stopping"]["nfe"], nfe)
    pred = load_predictor(out / "step_predictor.pt", model_key=diag["model_key"])
    assert pred.hparams.cond_dim == 3  # x_T ⊕ the one-hot label
    ladder = [2, 4, 8, 16, 32, 64]
    idx = pred.budget_index(x_T, diag["predictor_q"], condition_vectors(labels=y, num_classes=3))
    for r in idx.unique().tolist():
        at = idx == r
        want = ds.sample(model, x_T[at], sampler="ddim", steps=ladder[r], schedule=schedule, cond={"y": y[at]},
                         guidance_scale=guidance)
        assert torch.allclose(rows["predictor"]["samples"][at], want, rtol=0, atol=1e-12)
    table = (out / "policies.md").read_text()
    assert "conditioned on the same class labels (3 classes" in table and "FID" not in table and "NLL" in table


def test_policies_optimised_row_samples_a_decoupled_schedule_with_its_model_times(tmp_path, monkeypatch):
    """A cached decoupled artefact (optimize.decoupled=true: timesteps and model_timesteps) gives the optimised row
    diffsteps.sample(..., spacing=timesteps, model_timesteps=...) on the test noise, not the timesteps alone. The
    exact model has no cache (its key names no checkpoint), so the artefact is handed in."""
    from hydra.utils import instantiate

    import diffsteps.runner.policies as policies

    cfg = compose_policies(tmp_path, monkeypatch, *[a for a in COND_GMM if a != "data.conditional=true"],
                           "sampler.name=dpmpp_2m", "sampler.spacing=logsnr", "~sampler.options.eta")
    schedule = instantiate(cfg.schedule)
    ts = ds.make_timesteps("logsnr", 20, schedule)
    mts = (ts - 1.0).clamp(min=0.0)  # each model call a little later than its level
    entry = {"method": "refine_decoupled", "steps": 20, "timesteps": ts.tolist(), "model_timesteps": mts.tolist(),
             "heldout_error": 0.01, "cost": {"model_calls": 7, "seconds": 0.5}}
    monkeypatch.setattr(policies, "_optimised_schedules", lambda *a: [(20, entry)])
    policies.policies_task(cfg)
    saved = torch.load(tmp_path / "run" / "policies_samples.pt", weights_only=False)
    model = ds.ExactEpsilon(instantiate(cfg.data).mixture, schedule)
    kw = {"schedule": schedule, "sampler": "dpmpp_2m", "spacing": ts}
    want = ds.sample(model, saved["noise"], model_timesteps=mts, **kw)
    row = saved["rows"]["optimised schedule"]["samples"]
    assert torch.allclose(row, want, rtol=0, atol=1e-12)
    assert (row - ds.sample(model, saved["noise"], **kw)).abs().max() > 1e-6  # the model times mattered


def test_policies_condition_refused_for_an_unconditional_model_before_any_model_call(tmp_path, monkeypatch):
    from diffsteps.runner import min_steps
    from diffsteps.runner.policies import policies_task

    def never(*args, **kwargs):
        raise AssertionError("a model was built or called")

    monkeypatch.setattr(ds.ExactEpsilon, "forward", never)
    monkeypatch.setattr(min_steps, "prepare_model", never)  # the trained model: nothing trained either
    unconditional = [o for o in COND_GMM if o != "data.conditional=true"]
    for data in (unconditional, ["experiment=step_policies"]):  # the exact mixture; digits (a trained model)
        with pytest.raises(ValueError, match=r"policies.condition=labels needs a class-conditional model, but the "
                                             r"data .* are unconditional \(data.conditional=false\).* set "
                                             r"data.conditional=true \(labelled data: .*digits"):
            policies_task(compose_policies(tmp_path, monkeypatch, *data, "policies.condition=labels"))
    with pytest.raises(ValueError, match=r"policies.condition=none, but the data gmm-.* are class-conditional"):
        policies_task(compose_policies(tmp_path, monkeypatch, *COND_GMM, "policies.condition=none"))
    with pytest.raises(ValueError, match="policies.condition must be one of: auto, labels, none; got 'yes'"):
        policies_task(compose_policies(tmp_path, monkeypatch, *COND_GMM, "policies.condition=yes"))
    assert not (tmp_path / "run" / "policies.md").exists()


def test_policies_fid_kid_on_images_are_task_eval_numbers(tmp_path, monkeypatch):
    """On image data every row gets FID/KID from the evaluation's own machinery (its reference set, features, KID
    subsets) on the fresh noise, which is the evaluation's noise: the fixed-N* row's FID/KID equal what task=eval
    reports at N* steps for eval.num_samples = policies.test_noises — here a 4-step digits UNet (debug=fast), the
    evaluation run separately with its own reference cache."""
    from diffsteps.runner import run
    from diffsteps.runner.policies import policies_task

    cfg = compose_policies(tmp_path, monkeypatch, "debug=fast", "experiment=step_policies", "policies.alpha=0.25",
                           "policies.calibration_noises=24", "policies.test_noises=40", "policies.ladder=[2,3,4,6,8]",
                           "policies.error_target=0.05", "policies.predictor_epochs=2", "policies.single_samples=1",
                           "policies.adaptive_rtols=[0.1]", "policies.adaptive_max_nfe=60", "policies.batch_size=64",
                           "policies.stop_alphas=[0.25]", "eval.batch_size=64")
    policies_task(cfg)
    table = json.loads((tmp_path / "run" / "policies.json").read_text())
    rows, n_star = table["rows"], table["diagnostics"]["fixed_n_star"]
    assert all(math.isfinite(r["fid"]) and math.isfinite(r["kid_mean"]) for r in rows) and "nll" not in rows[0]
    assert table["diagnostics"]["quality"]["reference"] == "digits-val0.2-seed0-train-128"  # debug=fast's reference
    assert "| FID | KID |" in (tmp_path / "run" / "policies.md").read_text()
    evaluated = compose_policies(tmp_path, monkeypatch, "debug=fast", "task=eval", f"paths.output_dir={tmp_path}/eval",
                                 f"ckpt_path={tmp_path}/run/checkpoint.ckpt", f"steps=[{n_star}]",
                                 "eval.num_samples=40", "eval.batch_size=64", "eval.mse.num_samples=0",
                                 "eval.elbo.num_samples=0", "eval.grid_size=0", "eval.grid_columns=0",
                                 "eval.save_samples=0", "eval.trajectory_samples=0")
    run(evaluated)
    (row,) = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (tmp_path / "eval" / "debug_cache" / "reference").is_dir()  # its own reference statistics, not ours
    print(f"N* = {n_star}: policies FID {rows[0]['fid']:.6f} KID {rows[0]['kid_mean']:.6f}; task=eval FID "
          f"{row['fid']:.6f} KID {row['kid_mean']:.6f}")
    assert row["steps"] == n_star and row["num_samples"] == 40
    for k in ("fid", "kid_mean", "kid_std"):
        assert rows[0][k] == pytest.approx(row[k], rel=1e-9, abs=1e-12), k
    assert rows[0]["fid"] != rows[1]["fid"]  # the adaptive row's own samples, scored on their own


def test_stopping_under_guidance_equals_its_recorded_trajectory(mixture, linear):
    """Classifier-free guidance calls the model on [x; x] with [y; ∅]: the stopped samples leave both halves, and the
    run still equals the recorded guided trajectory (stop step, NFE — 2 per guided step — and output)."""
    from diffsteps.steps.stopping import StoppingRule

    model = ds.ExactEpsilon(mixture, linear, conditional=True)
    x, y = noise(64, 2, seed=5), torch.arange(64) % 3
    kw = {"schedule": linear, "cond": {"y": y}}
    ref = ds.sample(model, x, sampler="heun", steps=100, spacing="logsnr", guidance_scale=2.0, **kw)
    trace = stopping_trace(model, x, ref, sampler="ddim", steps=20, guidance_scale=2.0, **kw)
    tau = float(trace.scores[1].median())  # about half the samples stop after step 1, the rest later or never
    rule = StoppingRule(tau, 0.1, 1e-3, "ddim", 20, "trailing", {"guidance_scale": 2.0})
    counter = CountingModel(model)
    counter.num_classes = model.num_classes
    out, nfe = sample_with_stopping(counter, x, rule, **kw)
    err_trace, nfe_trace = stop_outcome(trace, tau)
    assert torch.equal(nfe, nfe_trace) and int(nfe.min()) < int(nfe.max()) <= 2 * 20 and not (nfe % 2).any()
    assert counter.rows == int(nfe.sum())  # each guided step: a row per sample and branch
    assert torch.allclose((out - ref).pow(2).mean(1), err_trace, rtol=0, atol=1e-12)


def test_policies_takes_the_condition_from_a_checkpoint(tmp_path, monkeypatch):
    """ckpt_path=<a class-conditional model>: its training config (data.conditional=true) becomes the run's before
    the condition is decided, so policies.condition=labels holds without data.conditional on the command line, and
    every row gets labels (a 4-step conditional digits UNet, debug=fast)."""
    from diffsteps.runner import checkpoints, run
    from diffsteps.runner.policies import policies_task

    run(compose_policies(tmp_path, monkeypatch, "debug=fast", "task=train", "data.conditional=true",
                         f"paths.output_dir={tmp_path}/train"))
    # task=policies, not experiment=step_policies: a preset counts as setting every training section itself
    given = ["debug=fast", "task=policies", f"ckpt_path={tmp_path}/train/checkpoint.ckpt",
             "policies.condition=labels", "policies.alpha=0.25", "policies.calibration_noises=24",
             "policies.test_noises=32", "policies.ladder=[2,4,8]", "policies.error_target=0.5",
             "policies.predictor_epochs=1", "policies.single_samples=1", "policies.adaptive_rtols=[0.2]",
             "policies.adaptive_max_nfe=40", "policies.stop_steps=4"]
    # what Hydra reports as set on the command line (in-process there is no Hydra run: every key would count)
    monkeypatch.setattr(checkpoints, "explicit_overrides", lambda: [o.split("=")[0] for o in given])
    cfg = compose_policies(tmp_path, monkeypatch, *given)
    assert cfg.data.conditional is False  # until the checkpoint is opened
    policies_task(cfg)
    out = tmp_path / "run"
    diag = json.loads((out / "policies.json").read_text())["diagnostics"]
    saved = torch.load(out / "policies_samples.pt", weights_only=False)
    assert diag["condition"] == "labels" and diag["num_classes"] == 10 and saved["labels"].shape == (32,)
    assert load_predictor(out / "step_predictor.pt", model_key=diag["model_key"]).hparams.cond_dim == 10
    assert "conditional: true" in (out / "config.yaml").read_text()
