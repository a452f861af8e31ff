"""The evaluation loop against exact models: trajectory error at each sampler's order, the exact NLL of samples,
and invariance of every metric to how chunks are split and ordered (what makes DDP equal one process)."""

import math

import numpy as np
import pytest
import torch
from helpers import exact_flow

import diffsteps as ds
from diffsteps.evaluation.evaluator import Evaluator
from diffsteps.evaluation.measures import (
    ClassifierConfidence,
    MixtureNLL,
    Quality,
    TrajectoryError,
)
from diffsteps.evaluation.plan import EvalPlan, chunk_noise
from diffsteps.evaluation.quality import SampleQuality
from diffsteps.evaluation.trajectory import trajectory_reference


@pytest.fixture(scope="module")
def exact(mixture, linear):
    return ds.ExactEpsilon(mixture, linear)


def evaluate(plan, linear, model, order=None, quality=None, mixture=None, classifier=False):
    # the measures the runner would build (runner/evaluate.py), trajectory error whenever the plan asks for it
    measures = [m for m in (Quality(plan, quality) if quality is not None else None,
                            MixtureNLL(plan, mixture) if mixture is not None else None,
                            ClassifierConfidence(plan) if classifier else None,
                            TrajectoryError(plan, linear, "epsilon") if plan.mse_samples > 0 else None)
                if m is not None]
    ev = Evaluator(plan, linear, "epsilon", measures)
    for c in order if order is not None else range(plan.num_chunks):
        ev.run_chunk(model, c, torch.device("cpu"))
    return ev, ev.compute()


@pytest.mark.parametrize("sampler,spacing,order", [("ddim", "trailing", 1), ("heun", "logsnr", 2),
                                                   ("dpmpp_2m", "logsnr", 2)])
def test_trajectory_mse_shrinks_at_the_samplers_order(gaussian, linear, sampler, spacing, order):
    # Gaussian data keeps the flow smooth everywhere (a mixture has trajectories near the basin boundaries whose
    # error converges late), so three step counts sit in the asymptotic regime
    plan = EvalPlan(sampler, (10, 20, 40, 80), (3,), num_samples=64, batch_size=32, spacing=spacing,
                    mse_samples=48, reference_steps=1000)
    _, rows = evaluate(plan, linear, ds.ExactEpsilon(gaussian, linear))
    mses = [r["mse"] for r in rows]
    assert all(a > b for a, b in zip(mses, mses[1:]))
    steps = [r["steps"] for r in rows]
    got = -np.polyfit(np.log(steps), np.log(mses), 1)[0] / 2  # MSE ∝ h^(2p)
    assert order - 0.25 < got < order + 0.6, (got, mses)
    # the reference converged: its own error (≈ gap/3 for Heun) is a few % of the smallest error measured (Heun at
    # 80 log-SNR steps is itself within 1e-6, DPM-Solver++(2M) within 3e-7)
    assert rows[0]["mse_reference_gap"] < 5e-2 * min(mses)


def test_reference_is_the_exact_flow_solution(linear):
    # Gaussian data: the probability-flow ODE has a closed-form end point (helpers.exact_flow)
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    gauss = ds.GaussianMixture(mu[None], torch.tensor([[[0.3, 0.1], [0.1, 0.2]]], dtype=torch.float64))
    x_T = torch.randn(200, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref, gap = trajectory_reference(ds.ExactEpsilon(gauss, linear), x_T, schedule=linear, prediction="epsilon",
                                    steps=200)
    err = (ref - exact_flow(gauss, linear, x_T)).pow(2).mean().item()
    assert err < 1e-8 and gap.mean().item() < 1e-6
    with pytest.raises(ValueError, match="must be deterministic.*ddim"):
        trajectory_reference(ds.ExactEpsilon(gauss, linear), x_T, schedule=linear, prediction="epsilon",
                             sampler="ddpm")


def test_stochastic_sampler_reports_no_trajectory_error(exact, linear):
    plan = EvalPlan("ddpm", (10,), (2,), num_samples=16, batch_size=16, mse_samples=16)
    _, rows = evaluate(plan, linear, exact)
    assert "mse" not in rows[0]
    plan = EvalPlan("ddim", (10,), (2,), num_samples=16, batch_size=16, mse_samples=16, options={"eta": 1.0})
    assert "mse" not in evaluate(plan, linear, exact)[1][0]


def test_exact_model_samples_have_the_data_entropy(exact, mixture, linear):
    # with the exact ε, 100 DPM-Solver++ steps sample p itself: −E log p(x) over samples ≈ the entropy of p
    plan = EvalPlan("dpmpp_2m", (100,), (2,), num_samples=4000, batch_size=1000)
    _, rows = evaluate(plan, linear, exact, mixture=mixture)
    x = mixture.sample(200_000, generator=torch.Generator().manual_seed(0))
    entropy = -mixture.log_prob(x).mean().item() / 2
    se = mixture.log_prob(x[:4000]).std().item() / 2 / math.sqrt(4000)
    assert rows[0]["nll"] == pytest.approx(entropy, abs=4 * se)


def test_metrics_do_not_depend_on_chunk_order_or_split(exact, mixture, linear):
    real = mixture.sample(400, generator=torch.Generator().manual_seed(1)).float()

    def quality():
        q = SampleQuality("identity", kid_subset_size=50, kid_subsets=10, num_features=2)
        q.set_reference(real)
        return q

    plan = EvalPlan("ddpm", (5, 20), (2,), num_samples=300, batch_size=64, mse_samples=0)
    _, a = evaluate(plan, linear, exact, quality=quality, mixture=mixture)
    ev, b = evaluate(plan, linear, exact, order=[3, 0, 4, 2, 1], quality=quality, mixture=mixture)
    for ra, rb in zip(a, b):
        for k in ("fid", "kid_mean", "kid_std", "nfe", "num_samples"):
            assert ra[k] == rb[k], k
        assert ra["nll"] == pytest.approx(rb["nll"], rel=1e-12)
    assert a[0]["num_samples"] == 300 and a[0]["fid"] > a[1]["fid"]
    # common random numbers: chunk noise is a function of (seed, chunk) only, and the first kept samples are
    # chunk 0's at every step count
    assert torch.equal(chunk_noise(plan, 2), chunk_noise(plan, 2)) and not torch.equal(chunk_noise(plan, 1),
                                                                                         chunk_noise(plan, 2))
    assert len(ev.samples(5)) == plan.keep_samples


def test_plan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_samples must be ≥ 2"):
        EvalPlan("ddim", (10,), (2,), num_samples=1)
    with pytest.raises(ValueError, match="steps is empty"):
        EvalPlan("ddim", (), (2,))


def test_classifier_confidence_accumulates_over_chunks_like_one_batch(linear):
    from diffsteps.evaluation.classifier import classifier_confidence

    class Shrink(torch.nn.Module):  # a fixed, cheap "denoiser" on 8×8 images: ε̂ = x/2
        def forward(self, x, t):
            return 0.5 * x

    plan = EvalPlan("ddim", (3, 8), (1, 8, 8), num_samples=90, batch_size=40, keep_samples=90)
    ev, rows = evaluate(plan, linear, Shrink(), classifier=True)
    for row in rows:
        whole = classifier_confidence(ev.samples(row["steps"]))
        for k in ("confidence", "confident_fraction", "class_entropy"):
            assert row[f"classifier_{k}"] == pytest.approx(whole[k], rel=1e-9), k


def test_trajectory_errors_equal_a_direct_computation(gaussian, linear):
    # the evaluator's mean and median over chunks equal the per-sample errors of sample() against the reference
    model = ds.ExactEpsilon(gaussian, linear)
    plan = EvalPlan("dpmpp_2m", (7,), (3,), num_samples=50, batch_size=20, mse_samples=45, reference_steps=50)
    _, rows = evaluate(plan, linear, model, order=[2, 0, 1])
    errs = []
    for c in range(plan.num_chunks):
        start, size = plan.chunk(c)
        x = chunk_noise(plan, c)[: max(0, min(size, 45 - start))]
        ref, _ = trajectory_reference(model, x, schedule=linear, prediction="epsilon", steps=50)
        out = ds.sample(model, x, schedule=linear, sampler="dpmpp_2m", steps=7).double()
        errs.append((out - ref).pow(2).mean(1))
    errs = torch.cat(errs)
    assert len(errs) == 45
    # (float32 states: the evaluator steps whole chunks, this the first rows only)
    assert rows[0]["mse"] == pytest.approx(errs.mean().item(), rel=1e-6)
    assert rows[0]["mse_median"] == pytest.approx(errs.median().item(), rel=1e-6)
