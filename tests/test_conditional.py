"""Class-conditional generation: labels through data, nets, training and sampling; classifier-free guidance against
closed forms; bad input rejected before any model call."""

import math

import pytest
import torch

import diffsteps as ds
from diffsteps.data import DigitsData, GMMData, Toy2DData
from diffsteps.nets import MLP, UNet
from diffsteps.training.module import DiffusionModule
from helpers import CountingModel, exact_flow, noise

F64 = torch.float64


class CountingConditional(CountingModel):
    """helpers.CountingModel for a class-conditional model: counts calls, records t and the labels it was given."""

    def __init__(self, inner):
        super().__init__(inner)
        self.num_classes, self.ys, self.batches = inner.num_classes, [], []

    def forward(self, x, t, y=None):
        self.calls += 1
        self.ts.append(t.clone())
        self.ys.append(None if y is None else y.clone())
        self.batches.append(len(x))
        return self.inner(x, t, y=y)


# -- the exact class-conditional model -------------------------------------------------------------------------------
# three classes N(μ_k, Σ) with one full covariance, and an unconditional model N(m, Σ) with the same covariance:
# then p_t(x | y)^w p_t(x)^{1−w} ∝ N(α(w μ_y + (1 − w) m), α²Σ + σ²I) at every noise level — exactly the noised
# tilted density N(w μ_y + (1 − w) m, Σ) — so CFG's ODE is that density's probability flow and must end on it
MEANS = torch.tensor([[1.5, 0.0], [-1.0, 1.0], [0.0, -1.5]], dtype=F64)
SIGMA = torch.tensor([[0.30, 0.08], [0.08, 0.15]], dtype=F64)
M_UNCOND = torch.tensor([0.2, -0.1], dtype=F64)


@pytest.fixture(scope="module")
def classes():
    return ds.GaussianMixture(MEANS, SIGMA.expand(3, 2, 2).clone())


@pytest.fixture(scope="module")
def cond_model(classes, linear):
    return ds.ExactEpsilon(classes, linear, conditional=True, unconditional=ds.GaussianMixture(M_UNCOND[None],
                                                                                                SIGMA[None]))


def tilted(y: int, w: float) -> ds.GaussianMixture:
    return ds.GaussianMixture((w * MEANS[y] + (1 - w) * M_UNCOND)[None], SIGMA[None])


def test_exact_conditional_eps_is_each_components_and_null_is_the_marginal(mixture, linear):
    model = ds.ExactEpsilon(mixture, linear, conditional=True)
    x, t = noise(64, 2, seed=3), torch.full((64,), 400.0, dtype=F64)
    abar = linear.alpha_bar_at(t[:1])
    for k in range(3):  # component k alone is a one-component mixture: its ε is the independent check
        alone = ds.GaussianMixture(mixture.means[k:k + 1], mixture.covs[k:k + 1])
        assert torch.allclose(model(x, t, y=torch.full((64,), k)), alone.eps(x, abar), atol=1e-12)
    assert torch.equal(model(x, t), ds.ExactEpsilon(mixture, linear)(x, t))
    assert torch.equal(model(x, t, y=torch.full((64,), 3)), model(x, t))  # row K: the null label
    # the marginal ε is the posterior-weighted average of the conditional ones (Bayes)
    r = mixture.responsibilities(x, abar)
    avg = sum(r[:, k:k + 1] * model(x, t, y=torch.full((64,), k)) for k in range(3))
    assert torch.allclose(avg, model(x, t), atol=1e-12)


@pytest.mark.parametrize("w", [0.0, 2.5])
def test_guided_sampler_samples_the_tilted_density(cond_model, linear, w):
    n, y = 3000, torch.arange(3000) % 3
    x_T = noise(n, 2, seed=11)
    kw = dict(schedule=linear, sampler="dpmpp_2m", steps=120, spacing="logsnr", cond={"y": y}, return_info=True)
    res = ds.sample(cond_model, x_T, guidance_scale=w, **kw)
    for k in range(3):
        sel = y == k
        target = tilted(k, w)
        # the same noise through the tilted density's own probability flow (closed form): the sampler follows it
        flow = exact_flow(target, linear, x_T[sel])
        assert (res.sample[sel] - flow).abs().max() < 1.5e-3  # measured 6.4e-4 (the solver's error, 120 steps)
        # and the samples have the tilted density's moments, up to sampling error (+ the N(0, I) start's bias,
        # |μ|·√(λ/σ̃_T²) ≈ 4e-3 at most here)
        x = res.sample[sel]
        se = (target.covs[0].diagonal() / len(x)).sqrt()
        assert ((x.mean(0) - target.means[0]).abs() < 4 * se + 5e-3).all(), (x.mean(0), target.means[0])
        cov_err = (torch.cov(x.T) - target.covs[0]).abs()
        assert (cov_err < 4 * target.covs[0].diagonal().max() * math.sqrt(2 / len(x)) + 5e-3).all(), cov_err
    # w = 0 runs the unconditional branch alone; any other w both, in one doubled batch: 2 NFE per call
    assert res.nfe == (1 if w == 0 else 2) * ds.sample(cond_model, x_T[:2], **{**kw, "cond": {"y": y[:2]}}).nfe


def test_guidance_batches_both_branches_and_scale_one_is_plain_conditional(cond_model, linear):
    y, x_T = torch.tensor([0, 1, 2, 1]), noise(4, 2, seed=5)
    counting = CountingConditional(cond_model)
    guided = ds.sample(counting, x_T, schedule=linear, steps=6, cond={"y": y}, guidance_scale=3.0)
    assert counting.calls == 6 and set(counting.batches) == {8}  # one forward of 2B per step
    assert all(torch.equal(ys, torch.tensor([0, 1, 2, 1, 3, 3, 3, 3])) for ys in counting.ys)  # null label = K
    # the combination by hand, per step, on the same trajectory: ε̃ = ε_u + w (ε_c − ε_u)
    manual = ds.sample(lambda x, t: cond_model(x, t) + 3.0 * (cond_model(x, t, y=y) - cond_model(x, t)), x_T,
                       schedule=linear, steps=6)
    assert torch.allclose(guided, manual, atol=1e-12)
    plain = ds.sample(cond_model, x_T, schedule=linear, steps=6, cond={"y": y})
    assert torch.equal(ds.sample(cond_model, x_T, schedule=linear, steps=6, cond={"y": y}, guidance_scale=1.0),
                       plain)
    # an interval that no visited t falls in: plain conditional sampling, one branch per step
    res = ds.sample(cond_model, x_T, schedule=linear, steps=6, cond={"y": y}, guidance_scale=3.0,
                    guidance_interval=(10.0, 100.0), return_info=True)
    assert not ((res.timesteps >= 10) & (res.timesteps <= 100)).any()
    assert torch.equal(res.sample, plain) and res.nfe == 6
    # an interval holding only the last visited level: guided (2 NFE) there, conditional before
    t_last = float(res.timesteps[-1])
    res = ds.sample(counting, x_T, schedule=linear, steps=6, cond={"y": y}, guidance_scale=3.0,
                    guidance_interval=(0.0, t_last), return_info=True)
    assert res.nfe == 7 and counting.batches[-6:] == [4, 4, 4, 4, 4, 8]
    assert not torch.equal(res.sample, plain) and not torch.equal(res.sample, guided)
    inside = ds.sample(cond_model, x_T, schedule=linear, steps=6, cond={"y": y}, guidance_scale=3.0,
                       guidance_interval=(0.0, 999.0))
    assert torch.equal(inside, guided)


# -- nets, data, training ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda k: MLP(dim=3, hidden=16, depth=1, time_dim=8, num_classes=k),
                                  lambda k: UNet(base_channels=8, channel_mult=(1,), attention_resolutions=(),
                                                 num_groups=4, num_classes=k)])
def test_conditional_nets_take_labels_and_none_is_the_null_label(make):
    torch.manual_seed(0)
    net = make(4)
    shape = (5, 3) if isinstance(net, MLP) else (5, 1, 8, 8)
    out_layer = net.proj_out if isinstance(net, MLP) else net.out[-1]
    torch.nn.init.normal_(out_layer.weight)  # the zero-initialised output would hide every input
    x, t = torch.randn(shape), torch.full((5,), 300.0)
    assert net.class_embed.table.num_embeddings == 5
    assert torch.equal(net(x, t), net(x, t, y=torch.full((5,), 4)))
    a, b = net(x, t, y=torch.zeros(5, dtype=torch.long)), net(x, t, y=torch.ones(5, dtype=torch.long))
    assert a.shape == shape and (a - b).abs().max() > 1e-3  # the label reaches the output
    mixed = net(x, t, y=torch.tensor([0, 1, 0, 1, 4]))  # per-sample labels: sample i sees only its own
    assert torch.allclose(mixed[0], a[0]) and torch.allclose(mixed[1], b[1]) and torch.allclose(mixed[4], net(x, t)[4])
    plain = make(0)
    assert plain.class_embed is None and plain.num_classes == 0 and plain(x, t).shape == shape
    with pytest.raises(ValueError, match="without classes"):
        plain(x, t, y=torch.zeros(5, dtype=torch.long))


def test_conditional_data_yield_labels_and_unlabelled_data_refuse():
    x, y = next(iter(DigitsData(batch_size=16, conditional=True).train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and y.dtype == torch.int64 and y.shape == (16,)
    plain = DigitsData(batch_size=16)
    assert torch.equal(next(iter(plain.train_dataloader())), x)  # same data, same order; only the labels added
    # each image comes with its own label: look it up in the split (digits images are not all distinct, so
    # compare with the labels of every identical image)
    train, labels = plain.real_samples(split="train").flatten(1), plain.labels("train")
    for xi, yi in zip(x.flatten(1), y):
        assert yi in labels[(train == xi).all(1)]
    gmm = GMMData(dim=2, components=3, n_train=64, n_val=16, batch_size=64, conditional=True)
    xg, yg = next(iter(gmm.train_dataloader()))
    assert gmm.spec.num_classes == 3
    # each point is nearest (in the Mahalanobis sense, well-separated components) to its own component's mean
    nearest = ((xg.double()[:, None] - gmm.mixture.means[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == yg).float().mean() > 0.8
    with pytest.raises(ValueError, match="no class labels.*labelled data sets: digits, gmm, cifar10"):
        Toy2DData(conditional=True)


def test_label_dropout_rate_and_labels_reach_the_net(linear):
    seen = []

    class Recorder(MLP):
        def forward(self, x, t, y=None):
            seen.append(y)
            return super().forward(x, t, y=y)

    module = DiffusionModule(Recorder(dim=2, hidden=8, depth=1, time_dim=8, num_classes=5), linear,
                             ds.DiffusionLoss(), p_uncond=0.3)
    y = torch.randint(0, 5, (20_000,))
    dropped = module._drop_labels(y, seed=7) == 5
    # binomial: 20 000 draws at p = 0.3 have sd 0.0032
    assert abs(dropped.float().mean().item() - 0.3) < 0.015
    kept = ~dropped
    assert torch.equal(module._drop_labels(y, seed=7)[kept], y[kept])
    module.training_step((torch.randn(64, 2), torch.randint(0, 5, (64,))), 0)
    assert seen[-1].shape == (64,) and 0 < int((seen[-1] == 5).sum()) < 64
    module.validation_step((torch.randn(64, 2), torch.full((64,), 2)), 0)
    assert torch.equal(seen[-1], torch.full((64,), 2))  # validation: the labels as given
    with pytest.raises(ValueError, match="p_uncond"):
        DiffusionModule(MLP(dim=2), linear, ds.DiffusionLoss(), p_uncond=1.5)
    unconditional = DiffusionModule(MLP(dim=2, hidden=8, depth=1, time_dim=8), linear, ds.DiffusionLoss())
    with pytest.raises(ValueError, match="built without classes"):
        unconditional.training_step((torch.randn(8, 2), torch.zeros(8, dtype=torch.long)), 0)


# -- bad input: a clear error before any model call -----------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(cond={"y": torch.tensor([0, 3])}), r"unknown class label\(s\) \[3\].*valid labels 0 … 2"),
    (dict(cond={"y": torch.tensor([-1, 0])}), r"unknown class label\(s\) \[-1\]"),
    (dict(), "sampled without its condition.*cond=\\{'y': labels\\}"),
    (dict(cond={"y": torch.tensor([0.0, 1.0])}), "integer tensor"),
    (dict(cond={"y": torch.tensor([0, 1])}, guidance_scale=float("nan")), "finite number"),
    (dict(cond={"y": torch.tensor([0, 1])}, guidance_scale=2.0, guidance_interval=(500, 100)), "t_lo <= t_hi"),
    (dict(cond={"y": torch.tensor([0, 1])}, guidance_scale=2.0, guidance_interval=(0, 1000)), "<= 999"),
    (dict(cond={"y": torch.tensor([0, 1])}, guidance_interval=(0, 10)), "without guidance_scale"),
])
def test_bad_conditioning_fails_before_any_model_call(cond_model, linear, kwargs, match):
    counting = CountingConditional(cond_model)
    with pytest.raises(ValueError, match=match):
        ds.sample(counting, noise(2, 2), schedule=linear, steps=4, **kwargs)
    assert counting.calls == 0


def test_guidance_on_an_unconditional_model_fails_before_any_model_call(classes, linear):
    counting = CountingModel(ds.ExactEpsilon(classes, linear))
    with pytest.raises(ValueError, match="needs a class-conditional model.*is unconditional"):
        ds.sample(counting, noise(2, 2), schedule=linear, steps=4, guidance_scale=2.0)
    assert counting.calls == 0


# -- text prompts -----------------------------------------------------------------------------------------------------
def test_digit_prompts_read_the_embedded_datas_prompts():
    from diffsteps.nets import DigitPrompts

    enc = DigitPrompts()
    prompts = ["a handwritten seven", "the digit 7", "7", "seven", "Seven!", "an image of the number 3", "zero",
               "a hand-written 9", "Draw the digit eight.", "1"]
    assert enc.labels(prompts).tolist() == [7, 7, 7, 7, 7, 3, 0, 9, 8, 1]
    assert enc.cond(["two"])["y"].dtype == torch.int64
    v = enc.vectors(["7", "a handwritten seven"])
    assert v.shape == (2, 11) and torch.equal(v[:, :10], torch.nn.functional.one_hot(torch.tensor([7, 7]), 10).float())
    assert v[:, 10].tolist() == [1.0, 3.0]  # the prompt's length in words: the step-predictor hook's complexity


@pytest.mark.parametrize("prompt", ["a cat", "seven or eight", "the digit 12", "", "a handwritten sevn"])
def test_unreadable_prompt_fails_before_any_model_call(cond_model, linear, prompt):
    from diffsteps.nets import DigitPrompts

    counting = CountingConditional(cond_model)
    with pytest.raises(ValueError, match="cannot read prompt.*names exactly one digit.*zero, one, two"):
        ds.sample(counting, noise(2, 2), schedule=linear, steps=4, cond=DigitPrompts().cond([prompt, "7"]))
    assert counting.calls == 0


def test_sentence_transformer_encoder_needs_a_local_folder(tmp_path):
    from diffsteps.nets import SentenceTransformerPrompts

    with pytest.raises(ValueError, match="local folder.*never downloaded"):
        SentenceTransformerPrompts("sentence-transformers/all-MiniLM-L6-v2")  # a hub name, not a folder


# -- evaluation ---------------------------------------------------------------------------------------------------------
def test_eval_labels_are_balanced_and_agreement_is_the_classifiers_accuracy():
    from diffsteps.evaluation.classifier import class_agreement
    from diffsteps.evaluation.measures import ClassifierConfidence
    from diffsteps.evaluation.measures.base import Chunk
    from diffsteps.evaluation.plan import EvalPlan, chunk_cond, eval_labels
    from diffsteps.reference.digits_classifier import HELD_OUT_CORRECT

    plan = EvalPlan(sampler="ddim", steps=(5,), shape=(1, 8, 8), num_samples=359, batch_size=100, num_classes=10)
    y = eval_labels(plan)
    assert torch.bincount(y, minlength=10).tolist() == [36] * 9 + [35]
    assert torch.equal(torch.cat([chunk_cond(plan, c)["y"] for c in range(plan.num_chunks)]), y)
    assert not torch.equal(y, eval_labels(EvalPlan(**{**plan.__dict__, "noise_seed": 7})))  # the order is seeded
    # real held-out digits "generated for" their true class: agreement is the classifier's held-out accuracy, also
    # when accumulated chunk by chunk as the evaluator does
    digits = DigitsData()
    x, truth = digits.real_samples(split="val"), digits.labels("val")
    assert class_agreement(x, truth) == HELD_OUT_CORRECT[0] / HELD_OUT_CORRECT[1]
    measure = ClassifierConfidence(plan)
    for c in range(plan.num_chunks):
        s, n = plan.chunk(c)
        measure.update(5, x[s:s + n], Chunk(c, torch.arange(s, s + n), x[s:s + n], None, torch.device("cpu"),
                                            {"y": truth[s:s + n]}))
    assert measure.compute(5)["classifier_agreement"] == pytest.approx(HELD_OUT_CORRECT[0] / HELD_OUT_CORRECT[1])


def test_run_py_trains_a_conditional_model_and_evaluates_it_guided(tmp_path):
    import json

    from helpers import run_py

    run_py(tmp_path, "data.conditional=true", "sampler.guidance_scale=2", "train.max_steps=8",
           "trainer.val_check_interval=8", "callbacks.model_checkpoint.every_n_train_steps=8",
           "lr_scheduler.warmup_steps=2", "eval.num_samples=60", "eval.batch_size=60", "eval.kid_subset_size=20",
           "eval.mse.num_samples=8", "eval.mse.reference_steps=4", "eval.elbo.num_samples=16", "steps=[3]",
           "logger=csv", "encoder=digits", "prompts=[a handwritten seven,the digit 3]", "eval.grid_columns=4")
    out = tmp_path / "run"
    (row,) = json.loads((out / "metrics.json").read_text())
    assert row["guidance_scale"] == 2.0 and row["nfe"] == 6  # both branches at each of the 3 steps
    assert 0.0 <= row["classifier_agreement"] <= 1.0 and "mse" in row and "elbo_bpd" in row
    assert "num_classes: 10" in (out / "config.yaml").read_text()  # model=auto sized the label table
    assert (out / "prompts_ddim.png").stat().st_size > 0
