"""Measures as modules: the rows equal the evaluator's before the split (tests/legacy_evaluation.py, commit 5d2f75f)
key for key and bit for bit, the ELBO's step counts can be split among processes without changing a number, the
package docstring's example measure works as written, and misuse fails with a clear error."""

import re
import textwrap
from types import SimpleNamespace

import legacy_evaluation as legacy
import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

import diffsteps as ds
import diffsteps.evaluation
from diffsteps.core.spacings import make_timesteps, to_integer_timesteps
from diffsteps.data import DigitsData
from diffsteps.evaluation import evaluator as evaluator_module
from diffsteps.evaluation.evaluator import Evaluator
from diffsteps.evaluation.measures import (
    ChainELBO,
    Chunk,
    ClassifierConfidence,
    Measure,
    MixtureNLL,
    Quality,
    Totals,
    TrajectoryError,
)
from diffsteps.evaluation.plan import EvalPlan
from diffsteps.evaluation.quality import SampleQuality

# wall-clock entries: measured, so they differ between any two runs
SECONDS = {"sample_seconds", "model_seconds", "seconds_per_sample", "mse_reference_seconds"}
CPU = torch.device("cpu")


class WithParameter(nn.Module):
    """A parameter-free model with one (unused) parameter: the old runner read the device from the parameters. Its
    dtype is the one the Denoiser casts x to."""

    def __init__(self, inner, dtype=torch.float64):
        super().__init__()
        self.inner, self.anchor = inner, nn.Parameter(torch.zeros((), dtype=dtype))

    def forward(self, x, t):
        return self.inner(x, t)


class Shrink(nn.Module):  # a fixed, cheap "denoiser" on 8×8 images: ε̂ = x/2
    def forward(self, x, t):
        return 0.5 * x


def quality_factory(real, features, **kw):
    def quality():
        q = SampleQuality(features, **kw)
        q.set_reference(real)
        return q
    return quality


def old_rows(plan, schedule, net, *, quality, mixture, classifier, elbo):
    """The evaluator and the runner's ELBO of commit 5d2f75f, called the way runner/evaluate.py called them."""
    ev = legacy.Evaluator(plan, schedule, "epsilon", quality=quality, mixture=mixture, classifier=classifier)
    for c in range(plan.num_chunks):
        ev.run_chunk(net, c, CPU)
    rows = ev.compute()
    cfg = OmegaConf.create({"eval": {"batch_size": plan.batch_size, "noise_seed": plan.noise_seed,
                                     "elbo": {"variance": elbo["variance"], "full": elbo["full"],
                                              "num_samples": len(elbo["data"]), "split": "val"}},
                            "sampler": {"spacing": plan.spacing}})
    datamodule = SimpleNamespace(real_samples=lambda n, split: elbo["data"][:n], levels=elbo["levels"])
    elbo_at = legacy._elbo(cfg, SimpleNamespace(net=net, prediction="epsilon"), datamodule, schedule)
    for row in rows:
        row.update(elbo_at(row["steps"]))
    return rows


def measures(plan, schedule, quality, mixture, classifier, elbo):
    """The measures as runner/evaluate.py builds them, in its order."""
    return [m for m in (
        Quality(plan, quality),
        MixtureNLL(plan, mixture) if mixture is not None else None,
        ClassifierConfidence(plan) if classifier else None,
        TrajectoryError(plan, schedule, "epsilon"),
        ChainELBO(plan, schedule, "epsilon", elbo["data"], variance=elbo["variance"], levels=elbo["levels"],
                  full=elbo["full"]),
    ) if m is not None]


def new_rows(plan, schedule, net, *, quality, mixture, classifier, elbo):
    """The split evaluator, chunks outer (as before the step-major order)."""
    ev = Evaluator(plan, schedule, "epsilon", measures(plan, schedule, quality, mixture, classifier, elbo))
    for c in range(plan.num_chunks):
        ev.run_chunk(net, c, CPU)
    ev.run_steps(net, CPU)
    return ev.compute()


def new_rows_by_step(plan, schedule, net, *, quality, mixture, classifier, elbo):
    """The same measures in the order the runner now takes them: one step count at a time (every chunk at it, its
    ELBO, its row), as ``EvaluationModule.test_step`` does."""
    ev = Evaluator(plan, schedule, "epsilon", measures(plan, schedule, quality, mixture, classifier, elbo))
    rows = []
    for n in plan.steps:
        for c in ev.my_chunks():
            ev.run_chunk(net, c, CPU, steps=[n])
        ev.run_steps(net, CPU, steps=[n])
        rows.append(ev.row(n))
    return rows


def assert_identical(new, old):
    assert len(new) == len(old)
    for a, b in zip(new, old):
        assert list(a) == list(b)  # the same keys in the same order
        for k in a:
            if k in SECONDS:
                assert a[k] > 0 and b[k] > 0, k
            else:
                assert type(a[k]) is type(b[k]) and a[k] == b[k], (k, a[k], b[k])


def test_vector_rows_equal_the_old_evaluators(mixture, linear):
    # every vector measure: FID/KID (identity features), the exact mixture NLL, trajectory error (the first 100 of
    # 150 samples: across a chunk boundary), the ELBO over each chain and over all T (100 points: a short last batch)
    net = WithParameter(ds.ExactEpsilon(mixture, linear))
    plan = EvalPlan("dpmpp_2m", (4, 9), (2,), num_samples=150, batch_size=64, spacing="logsnr", mse_samples=100,
                    reference_steps=40)
    real = mixture.sample(400, generator=torch.Generator().manual_seed(1)).float()
    data = mixture.sample(100, generator=torch.Generator().manual_seed(2)).float()
    kw = dict(quality=quality_factory(real, "identity", kid_subset_size=50, kid_subsets=10, num_features=2),
              mixture=mixture, classifier=False,
              elbo={"data": data, "variance": "posterior", "levels": None, "full": True})
    old, new = old_rows(plan, linear, net, **kw), new_rows(plan, linear, net, **kw)
    assert_identical(new, old)
    assert_identical(new_rows_by_step(plan, linear, net, **kw), old)
    assert {"fid", "kid_std", "nll", "mse", "mse_median", "mse_reference_gap", "elbo_kl_bpd",
            "elbo_full_bpd"} <= set(new[0])
    assert new[0]["elbo_full_bpd"] == new[1]["elbo_full_bpd"] and new[0]["mse"] > new[1]["mse"]


def test_image_rows_equal_the_old_evaluators(linear):
    # the image measures: FID/KID in the digits features, the classifier's confidence, the trajectory error of
    # clipped DDIM, the ELBO of digits (17 levels: the discretised decoder) with the β variance
    net = WithParameter(Shrink(), dtype=torch.float32)
    plan = EvalPlan("ddim", (3, 8), (1, 8, 8), num_samples=90, batch_size=40, options={"clip_denoised": 1.0},
                    mse_samples=50, reference_steps=20)
    digits = DigitsData(val_fraction=0.2, seed=0)
    kw = dict(quality=quality_factory(digits.real_samples(200, split="train"), "digits", kid_subset_size=50,
                                      kid_subsets=10),
              mixture=None, classifier=True,
              elbo={"data": digits.real_samples(48, split="val"), "variance": "beta", "levels": 17, "full": False})
    old, new = old_rows(plan, linear, net, **kw), new_rows(plan, linear, net, **kw)
    assert_identical(new, old)
    assert_identical(new_rows_by_step(plan, linear, net, **kw), old)
    assert {"fid", "classifier_confidence", "classifier_class_entropy_normalized", "mse", "elbo_decoder_bpd"} \
        <= set(new[0])


def test_elbo_split_among_processes_equals_one_process(mixture, linear, monkeypatch):
    # three step counts on two "ranks": rank 0 computes the 1st and 3rd (and the all-T bound), rank 1 the 2nd;
    # their states merged as a DDP sum would give exactly the bounds one process computes
    net = ds.ExactEpsilon(mixture, linear)
    plan = EvalPlan("ddim", (3, 5, 8), (2,), num_samples=16, batch_size=16)
    data = mixture.sample(24, generator=torch.Generator().manual_seed(3)).float()

    def run(rank, world):
        m = ChainELBO(plan, linear, "epsilon", data, full=True)
        monkeypatch.setattr(evaluator_module, "_rank_world", lambda: (rank, world))
        Evaluator(plan, linear, "epsilon", [m]).run_steps(net, CPU)
        return m

    alone, first, second = run(0, 1), run(0, 2), run(1, 2)
    assert first.totals.done.tolist() == [1, 0, 1] and second.totals.done.tolist() == [0, 1, 0]
    assert float(first.totals.full_done) == 1 and float(second.totals.full_done) == 0
    first.totals.merge_state(second.totals)
    for n in plan.steps:
        assert first.compute(n) == alone.compute(n)
    # and one process's bound at n steps is elbo_bpd over the integer timesteps of that chain, reseeded
    ts = torch.unique(to_integer_timesteps(make_timesteps("trailing", 5, linear)))
    direct = ds.elbo_bpd(net, data, linear, timesteps=ts, batch_size=16,
                         generator=torch.Generator().manual_seed(plan.noise_seed))
    assert alone.compute(5)["elbo_bpd"] == direct["elbo_bpd"] and len(ts) == 5


def test_the_package_docstrings_example_measure(mixture, linear):
    # the example in diffsteps.evaluation's docstring, run as written: its entry follows the cost entries and
    # equals the mean squared norm of all samples, accumulated over chunks taken in any order
    code = re.search(r"::\n\n(.*?)\n\n    MeanSquare\(plan\)", diffsteps.evaluation.__doc__, re.DOTALL).group(1)
    scope = {"Measure": Measure, "Totals": Totals, "Chunk": Chunk, "EvalPlan": EvalPlan, "Tensor": Tensor}
    exec(textwrap.dedent(code), scope)  # noqa: S102 (the docstring's own example, run as documentation)
    plan = EvalPlan("ddpm", (4, 10), (2,), num_samples=70, batch_size=32, keep_samples=70)
    ev = Evaluator(plan, linear, "epsilon", [MixtureNLL(plan, mixture), scope["MeanSquare"](plan)])
    for c in (2, 0, 1):
        ev.run_chunk(ds.ExactEpsilon(mixture, linear), c, CPU)
    rows = ev.compute()
    for row in rows:
        x = ev.samples(row["steps"]).double()
        assert list(row)[-2:] == ["nll", "mean_square"]
        assert row["mean_square"] == pytest.approx(x.square().sum(1).mean().item(), rel=1e-12)
    assert rows[0]["mean_square"] != rows[1]["mean_square"]


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric Totals was called before")
def test_misuse_fails_clearly(mixture, linear):
    plan = EvalPlan("ddim", (3,), (2,), num_samples=8, batch_size=8)
    with pytest.raises(TypeError, match="must be Measure instances.*got SampleQuality"):
        Evaluator(plan, linear, "epsilon", [SampleQuality("identity", num_features=2)])
    with pytest.raises(ValueError, match="unknown ELBO variance 'fixed'; valid choices: posterior, beta, learned"):
        ChainELBO(plan, linear, "epsilon", torch.zeros(4, 2), variance="fixed")
    net = ds.ExactEpsilon(mixture, linear)
    ev = Evaluator(plan, linear, "epsilon", [MixtureNLL(plan, mixture), MixtureNLL(plan, mixture)])
    ev.run_chunk(net, 0, CPU)
    with pytest.raises(ValueError, match=r"MixtureNLL reports \['nll'\], which another measure already reported"):
        ev.compute()
    ev = Evaluator(plan, linear, "epsilon", [ChainELBO(plan, linear, "epsilon", torch.zeros(4, 2))])
    ev.run_chunk(net, 0, CPU)
    with pytest.raises(RuntimeError, match="computed 0 times.*call Evaluator.run_steps"):
        ev.compute()


def test_the_trajectory_reference_is_solved_once_per_chunk(mixture, linear, monkeypatch):
    # step counts outer: every chunk is seen once per step count, its reference solve (200 Heun steps by default,
    # the costliest part of a short evaluation) done the first time only — and the same errors as chunk-major
    from diffsteps.evaluation.measures import trajectory as trajectory_module

    solved = []
    solve = trajectory_module.trajectory_reference

    def counting(net, noise, **kw):
        solved.append(len(noise))
        return solve(net, noise, **kw)

    monkeypatch.setattr(trajectory_module, "trajectory_reference", counting)
    net = ds.ExactEpsilon(mixture, linear)
    plan = EvalPlan("ddim", (3, 6, 9), (2,), num_samples=100, batch_size=30, mse_samples=70, reference_steps=20)
    by_step = TrajectoryError(plan, linear, "epsilon")
    ev = Evaluator(plan, linear, "epsilon", [by_step])
    rows = []
    for n in plan.steps:
        for c in range(plan.num_chunks):
            ev.run_chunk(net, c, CPU, steps=[n])
        rows.append(ev.row(n))
    assert solved == [30, 30, 10]  # chunks 0, 1, 2 (the first 70 samples), once each; chunk 3 has none
    whole = Evaluator(plan, linear, "epsilon", [TrajectoryError(plan, linear, "epsilon")])
    for c in range(plan.num_chunks):
        whole.run_chunk(net, c, CPU)
    for a, b in zip(rows, whole.compute(), strict=True):
        for k in ("mse", "mse_median", "mse_reference_gap"):
            assert a[k] == b[k], k
    assert rows[0]["mse"] > rows[2]["mse"] and rows[0]["mse_reference_gap"] == rows[2]["mse_reference_gap"]
