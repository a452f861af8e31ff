"""Sample-quality metrics: the Fréchet distance against scipy, FID's finite-sample behaviour against theory and
simulation, KID under the null and the alternative, agreement with torchmetrics' own FID/KID, the shipped digits
classifier (checksum, held-out accuracy), the reference-statistics cache, minimum sizes and the inception wiring.

Everything random is seeded, so each statistical check passes or fails deterministically; bands are ≥ 5 standard
errors (or the 0.1 %–99.9 % range of a simulated null), so a correct implementation passes for almost every seed.
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from diffsteps.data import DigitsData
from diffsteps.evaluation.classifier import classifier_confidence
from diffsteps.evaluation.distances import (
    expected_null_fid,
    frechet_distance,
    kernel_distance,
    polynomial_mmd2,
)
from diffsteps.evaluation.features import (
    FEATURES,
    INCEPTION_WEIGHTS_FILE,
    IdentityFeatures,
    make_features,
)
from diffsteps.evaluation.quality import SampleQuality
from diffsteps.reference.digits_classifier import (
    HELD_OUT_CORRECT,
    WEIGHTS_SHA256,
    accuracy,
    default_weights_path,
    load_digits_classifier,
    serialize_state_dict,
)
from diffsteps.training.classifier import train_digits_classifier

Z = 5.0


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_spd(d, seed, cond=10.0):
    """Q diag(λ) Qᵀ with λ log-spaced over [1/cond, 1] × 2 and a random orthogonal Q."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=torch.float64))
    lam = 2.0 * torch.logspace(-math.log10(cond), 0, d, dtype=torch.float64)
    return (q * lam) @ q.T


def gaussian(n, mean, cov, seed):
    return mean + torch.randn(n, len(mean), generator=gen(seed), dtype=torch.float64) @ torch.linalg.cholesky(cov).T


def moments(x):
    """Mean and unbiased covariance over dim −2, batched."""
    mu = x.mean(-2)
    c = x - mu.unsqueeze(-2)
    return mu, c.transpose(-1, -2) @ c / (x.shape[-2] - 1)


def identity_quality(d, **kw):
    kw.setdefault("kid_subset_size", 100)
    kw.setdefault("kid_subsets", 10)
    return SampleQuality("identity", num_features=d, **kw)


def fid_of(real, fake, **kw):
    sq = identity_quality(real.shape[1], **kw)
    sq.set_reference(real)
    sq.update(fake)
    return sq.compute()


@pytest.fixture(scope="module")
def digits():
    return DigitsData(val_fraction=0.2, seed=0)


# -- Fréchet distance ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 5, 40])
def test_frechet_distance_matches_scipy_sqrtm(d):
    s1, s2 = random_spd(d, 1), random_spd(d, 2, cond=100.0)
    mu1 = torch.randn(d, generator=gen(3), dtype=torch.float64)
    mu2 = torch.randn(d, generator=gen(4), dtype=torch.float64)
    # independent route: scipy's Schur-based square root of the non-symmetric product Σ₁Σ₂
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    want = float(((mu1 - mu2) ** 2).sum()) + np.trace(s1.numpy() + s2.numpy() - 2 * covmean)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-6)
    # symmetric in its arguments, zero on identical ones, accepts numpy, float32 inputs computed in float64
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-6)
    assert frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy()) == pytest.approx(want, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9 * float(s1.trace()))


def test_frechet_distance_singular_and_bad_input():
    # rank-1 covariances (N ≤ d in practice): W₂² between two degenerate Gaussians on lines at angle θ through 0,
    # with variances a, b: a + b − 2√(ab)|cos θ|
    a, b, th = 2.0, 0.5, 0.7
    u = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    v = torch.tensor([math.cos(th), math.sin(th), 0.0], dtype=torch.float64)
    got = frechet_distance(torch.zeros(3), a * torch.outer(u, u), torch.zeros(3), b * torch.outer(v, v))
    assert got == pytest.approx(a + b - 2 * math.sqrt(a * b) * abs(math.cos(th)), rel=1e-9)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(torch.tensor([float("nan")]), torch.eye(1), torch.zeros(1), torch.eye(1))


# -- FID's finite-sample behaviour ------------------------------------------------------------------------------------
D, N = 8, 2000
COV = random_spd(D, 10, cond=20.0)
MEAN = torch.linspace(-1, 1, D, dtype=torch.float64)


@pytest.fixture(scope="module")
def null_fids():
    """FID between two independent N-samples of N(MEAN, COV), 1000 replicates (the null distribution)."""
    reps = 1000
    g = gen(11)
    chol = torch.linalg.cholesky(COV)
    out = []
    for _ in range(reps // 100):  # in blocks, to bound memory
        x = MEAN + torch.randn(100, 2, N, D, generator=g, dtype=torch.float64) @ chol.T
        mu, cov = moments(x)
        out += [frechet_distance(mu[r, 0], cov[r, 0], mu[r, 1], cov[r, 1]) for r in range(100)]
    return torch.tensor(out, dtype=torch.float64)


def test_expected_null_fid_formula(null_fids):
    # Σ = I closed form: 2d/N + d(d+1)/(2(N−1))
    assert expected_null_fid(torch.eye(D), N, N) == pytest.approx(2 * D / N + D * (D + 1) / (2 * (N - 1)), rel=1e-12)
    # general Σ: the second-order formula against the simulated mean, within Z standard errors (its own error is
    # O(d/N) relative, far smaller)
    want = expected_null_fid(COV, N, N)
    se = float(null_fids.std()) / math.sqrt(len(null_fids))
    assert abs(float(null_fids.mean()) - want) < Z * se, (float(null_fids.mean()), want, se)


def test_fid_of_two_halves_of_one_gaussian_is_its_finite_sample_bias(null_fids):
    x = gaussian(2 * N, MEAN, COV, seed=12)
    fid = fid_of(x[:N], x[N:])["fid"]
    lo, hi = torch.quantile(null_fids, torch.tensor([0.001, 0.999], dtype=torch.float64)).tolist()
    assert lo <= fid <= hi, (fid, lo, hi)
    assert fid < 3 * expected_null_fid(COV, N, N)


def test_fid_of_shifted_gaussian_is_squared_shift(null_fids):
    delta = torch.randn(D, generator=gen(13), dtype=torch.float64)
    delta = 0.5 * delta / delta.norm()  # ‖Δμ‖² = 0.25
    x, y = gaussian(N, MEAN, COV, seed=14), gaussian(N, MEAN + delta, COV, seed=15)
    fid = fid_of(x, y)["fid"]
    # FID = ‖Δμ + ε‖² + (covariance term), ε = μ̂₂ − μ̂₁ − Δμ ~ N(0, 2Σ/N): the cross term 2Δμᵀε has standard deviation
    # 2·√(Δμᵀ(2Σ/N)Δμ); the rest is the null distribution's (bias plus spread).
    cross_sd = 2 * math.sqrt(float(delta @ COV @ delta) * 2 / N)
    expected = 0.25 + expected_null_fid(COV, N, N)
    assert abs(fid - expected) < Z * cross_sd + float(torch.quantile(null_fids, 0.999)), (fid, expected, cross_sd)


def test_fid_converges_to_closed_form_between_true_gaussians():
    d = 3
    m1, m2 = torch.zeros(d, dtype=torch.float64), torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    s1, s2 = random_spd(d, 20), random_spd(d, 21, cond=5.0)
    true = frechet_distance(m1, s1, m2, s2)
    errors = []
    for n in (1_000, 10_000, 100_000):
        got = fid_of(gaussian(n, m1, s1, seed=22), gaussian(n, m2, s2, seed=23), kid_subsets=1)["fid"]
        # the estimator's spread at this n, from 20 replicates of the sample moments
        reps = []
        for r in range(20):
            mu_a, c_a = moments(gaussian(n, m1, s1, seed=1000 + r))
            mu_b, c_b = moments(gaussian(n, m2, s2, seed=2000 + r))
            reps.append(frechet_distance(mu_a, c_a, mu_b, c_b))
        reps = torch.tensor(reps)
        bias, sd = float(reps.mean()) - true, float(reps.std())
        assert abs(got - true) < Z * sd + 2 * abs(bias), (n, got, true, sd, bias)
        errors.append(Z * sd + 2 * abs(bias))
    # and the band itself shrinks like 1/√n: by ~10× over the 100× range of n
    assert errors[2] < errors[0] / 5
    assert abs(got - true) / true < 0.02


# -- KID ---------------------------------------------------------------------------------------------------------------
def test_kid_null_and_alternative():
    x = gaussian(2 * N, MEAN, COV, seed=30)
    same = fid_of(x[:N], x[N:], kid_subset_size=200, kid_subsets=50)
    assert abs(same["kid_mean"]) < same["kid_std"], same
    shifted = fid_of(x[:N], gaussian(N, MEAN + 0.5, COV, seed=31), kid_subset_size=200, kid_subsets=50)
    assert shifted["kid_mean"] > 10 * shifted["kid_std"] and shifted["kid_mean"] > 10 * abs(same["kid_mean"]), shifted


def test_polynomial_mmd2_by_hand():
    x = torch.randn(5, 3, generator=gen(32), dtype=torch.float64)
    y = torch.randn(4, 3, generator=gen(33), dtype=torch.float64) + 1

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
    assert float(polynomial_mmd2(x, y)) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_agrees_with_torchmetrics_fid_and_kid():
    # torchmetrics' classes accept our identity extractor as a custom feature module (no torch-fidelity needed).
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    d, n = 6, 300
    x = gaussian(n, torch.zeros(d, dtype=torch.float64), random_spd(d, 40), seed=41)
    y = gaussian(n, torch.full((d,), 0.3, dtype=torch.float64), random_spd(d, 42), seed=43)
    # subset_size = n with one subset: every subset is the whole sample (in some order), so the random draws of the
    # two implementations cannot differ
    ours = fid_of(x, y, kid_subset_size=n, kid_subsets=1)
    fid = FrechetInceptionDistance(feature=IdentityFeatures(d))
    fid.update(x, real=True)
    fid.update(y, real=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "KID will save all extracted features in buffer"
        kid = KernelInceptionDistance(feature=IdentityFeatures(d), subset_size=n, subsets=1)
    kid.update(x, real=True)
    kid.update(y, real=False)
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-6)
    assert ours["kid_mean"] == pytest.approx(float(kid.compute()[0]), rel=1e-9)


def test_kid_is_reproducible_and_leaves_global_rng_alone():
    x = gaussian(500, MEAN, COV, seed=50)
    sq = identity_quality(D)
    sq.set_reference(x[:250])
    sq.update(x[250:])
    state = torch.get_rng_state()
    first = sq.compute()
    assert torch.equal(torch.get_rng_state(), state)
    sq._computed = None  # force a recomputation rather than torchmetrics' cached value
    assert sq.compute() == first
    with pytest.raises(ValueError, match="at least 600"):
        kernel_distance(x[:500], x[:500], subset_size=600, subsets=1)


# -- the digits classifier and its features ----------------------------------------------------------------------------
def test_shipped_weights_checksum_and_size():
    data = default_weights_path().read_bytes()
    assert hashlib.sha256(data).hexdigest() == WEIGHTS_SHA256
    assert len(data) < 200_000


def test_digits_classifier_held_out_accuracy(digits):
    model = load_digits_classifier()
    correct, total = accuracy(model, digits.real_samples(split="val"), digits.labels("val"))
    assert total == HELD_OUT_CORRECT[1] == 359
    assert correct / total >= 0.97
    # the recorded figure (module docstring, HELD_OUT_CORRECT), allowing one image for other CPUs' rounding
    assert abs(correct - HELD_OUT_CORRECT[0]) <= 1, correct


def test_digits_features_frozen_and_shaped(digits):
    f = make_features("digits")
    assert f.num_features == 64 and not f.training
    assert all(not p.requires_grad for p in f.parameters())
    f.train()  # a containing model switching to training mode must not change the features
    assert not f.training and not f.net.training
    out = f(digits.real_samples(10))
    assert out.shape == (10, 64)
    # scaled to unit mean square on the training images
    assert float(f(digits.real_samples(split="train")).square().mean()) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        f(torch.zeros(2, 64))


def test_corrupt_or_missing_weights_say_how_to_regenerate(tmp_path):
    bad = tmp_path / "w.pt"
    data = bytearray(default_weights_path().read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="train_digits_classifier.py"):
        load_digits_classifier(bad)
    with pytest.raises(RuntimeError, match="train_digits_classifier.py"):
        load_digits_classifier(tmp_path / "missing.pt")
    # with the check skipped, a corrupt file still fails to load, with the same advice
    bad.write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match="train_digits_classifier.py"):
        load_digits_classifier(bad, sha256=None)


def test_training_is_deterministic_and_keeps_global_rng():
    state = torch.get_rng_state()
    a = serialize_state_dict(train_digits_classifier(epochs=1))
    b = serialize_state_dict(train_digits_classifier(epochs=1))
    assert a == b
    assert torch.equal(torch.get_rng_state(), state)


def test_real_digits_vs_noise(digits):
    sq = SampleQuality("digits")
    sq.set_reference(digits.real_samples(split="val"))
    sq.update(digits.real_samples(split="train"))
    real = sq.compute()
    sq.reset()
    sq.update(torch.rand(1000, 1, 8, 8, generator=gen(60)) * 2 - 1)
    noise = sq.compute()
    assert noise["fid"] > 50 * real["fid"], (real, noise)
    assert abs(real["kid_mean"]) < 2 * real["kid_std"] and noise["kid_mean"] > 10 * noise["kid_std"], (real, noise)


def test_classifier_confidence(digits):
    real = classifier_confidence(digits.real_samples(split="val"))
    assert real["confidence"] > 0.95 and real["confident_fraction"] > 0.9
    assert real["class_histogram"].shape == (10,) and float(real["class_histogram"].sum()) == pytest.approx(1.0)
    assert real["class_entropy_normalized"] > 0.99  # val is stratified: classes within 1 image of equal
    zeros = digits.real_samples(split="val")[digits.labels("val") == 0]
    collapsed = classifier_confidence(zeros)  # "mode collapse": a single digit
    assert collapsed["class_histogram"][0] > 0.95 and collapsed["class_entropy_normalized"] < 0.1
    noise = classifier_confidence(torch.rand(500, 1, 8, 8, generator=gen(61)) * 2 - 1)
    assert noise["confidence"] < real["confidence"] and noise["confident_fraction"] < real["confident_fraction"]


# -- SampleQuality mechanics -----------------------------------------------------------------------------------------
class Counting(IdentityFeatures):
    def __init__(self, d):
        super().__init__(d)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def counting_quality(d, cache_dir):
    return SampleQuality(Counting(d), kid_subset_size=50, kid_subsets=5, cache_dir=cache_dir, chunk_size=64)


def test_reference_cache_round_trip(tmp_path):
    x = gaussian(300, MEAN, COV, seed=70).float()
    y = gaussian(200, MEAN + 0.1, COV, seed=71).float()
    first = counting_quality(D, tmp_path)
    first.set_reference(x, "toy")
    assert first.reference_source == "computed" and first.extractor.calls == 5  # ⌈300 / 64⌉ chunks
    assert first.cache_path("toy") == tmp_path / "toy-identity.pt" and first.cache_path("toy").is_file()
    second = counting_quality(D, tmp_path)
    second.set_reference(x, "toy")
    assert second.reference_source == "cache" and second.extractor.calls == 0
    for sq in (first, second):
        sq.update(y)
    assert first.compute() == second.compute()
    # same key, other data: stale, recomputed (not silently reused)
    third = counting_quality(D, tmp_path)
    with pytest.warns(UserWarning, match="different reference data"):
        third.set_reference(x[:200], "toy")
    assert third.reference_source == "computed" and third.extractor.calls > 0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "tampered"])
def test_corrupt_cache_is_recomputed(tmp_path, damage):
    x = gaussian(300, MEAN, COV, seed=72).float()
    counting_quality(D, tmp_path).set_reference(x, "toy")
    path = tmp_path / "toy-identity.pt"
    if damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:  # a readable file whose content no longer matches its checksum
        payload = torch.load(path, weights_only=True)
        payload["mean"] = payload["mean"] + 1.0
        torch.save(payload, path)
    sq = counting_quality(D, tmp_path)
    with pytest.warns(UserWarning, match="recomputing"):
        sq.set_reference(x, "toy")
    assert sq.reference_source == "computed" and sq.extractor.calls > 0
    assert torch.allclose(sq.ref_mean, x.double().mean(0))
    # rewritten: the next instance loads it again
    again = counting_quality(D, tmp_path)
    again.set_reference(x, "toy")
    assert again.reference_source == "cache"


def test_minimum_sizes():
    x = gaussian(300, MEAN, COV, seed=80)
    sq = identity_quality(D, kid_subset_size=100)
    with pytest.raises(RuntimeError, match="set_reference"):
        sq.update(x)
    with pytest.raises(ValueError, match="at least 100"):
        sq.set_reference(x[:99])
    with pytest.raises(ValueError, match="kid_subset_size must be an integer >= 2"):
        identity_quality(D, kid_subset_size=1)
    sq.set_reference(x[:100])  # exactly the minimum is fine
    with pytest.raises(ValueError, match="at least 100 generated"):
        sq.compute()  # nothing generated yet
    sq.update(x[100:101])
    with pytest.raises(ValueError, match=r"at least 100 generated.*got 1"):
        sq.compute()
    sq.update(x[101:200])
    assert math.isfinite(sq.compute()["fid"])
    # a few generated samples in many dimensions: allowed above the minimum, but warned about
    wide = identity_quality(200, kid_subset_size=10)
    wide.set_reference(torch.randn(300, 200, generator=gen(81)))
    wide.update(torch.randn(50, 200, generator=gen(82)))
    with pytest.warns(UserWarning, match="singular"):
        wide.compute()
    with pytest.raises(ValueError, match="non-finite"):
        wide.update(torch.full((3, 200), float("nan")))


def test_reset_keeps_reference_and_state_dict_stays_small(digits):
    sq = SampleQuality("digits", kid_subset_size=50)
    sq.set_reference(digits.real_samples(100))
    sq.update(digits.real_samples(100, split="train"))
    sq.compute()
    sq.reset()
    assert sq.ref_features is not None and len(sq.fake_features) == 0
    # no extractor weights, no reference in checkpoints; .half() of a containing model leaves float64 statistics
    assert len(sq.state_dict()) == 0 and len(list(sq.parameters())) == 0
    sq.half()
    assert sq.ref_cov.dtype == torch.float64


def test_unknown_features_and_inception_missing_dependency(monkeypatch):
    with pytest.raises(ValueError, match="unknown features.*" + ".*".join(sorted(FEATURES))):
        make_features("vgg")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed, whether or not it is
    for build in (lambda: make_features("inception"), lambda: SampleQuality("inception")):
        with pytest.raises(ModuleNotFoundError) as e:
            build()
        msg = str(e.value)
        assert "pip install torch-fidelity" in msg and "diffsteps[inception]" in msg
        assert INCEPTION_WEIGHTS_FILE in msg and "weights_path" in msg


def test_identity_features_infer_and_check_dimension():
    f = make_features("identity")
    assert f(torch.zeros(4, 2, 3)).shape == (4, 6) and f.num_features == 6
    with pytest.raises(ValueError, match="expected 6"):
        f(torch.zeros(4, 5))


# -- DDP ---------------------------------------------------------------------------------------------------------------
def test_ddp_sync_gathers_generated_samples_but_not_the_reference():
    # Two ranks simulated in one process: torchmetrics calls dist_sync_fn on every synced state at compute() and
    # reduces the per-rank list it returns, exactly as with torch.distributed's all_gather (a real two-process gloo run
    # gives the same result but costs ~25 s of process start-up here).
    real = gaussian(200, MEAN, COV, seed=90)
    fake = gaussian(150, MEAN + 0.2, COV, seed=91)
    ranks, gathered = [], []

    def all_gather(t, group=None):
        gathered.append(tuple(t.shape))
        state = "fake_index" if t.dtype == torch.long else "fake_features"
        return [torch.cat(getattr(r, state)) if isinstance(getattr(r, state), list) else getattr(r, state)
                for r in ranks]

    for rank in range(2):
        sq = identity_quality(D, kid_subset_size=50,
                              metric_kwargs={"dist_sync_fn": all_gather, "distributed_available_fn": lambda: True})
        sq.set_reference(real)  # every rank holds the full reference: it must not be gathered (counted twice)
        sq.update(fake[rank::2], index=torch.arange(rank, 150, 2))  # each rank its own share, interleaved
        ranks.append(sq)
    got = ranks[0].compute()
    assert sorted(gathered) == [(75,), (75, D)]  # the generated features and their indices, nothing else
    assert len(ranks[0].fake_features) == 1 and len(ranks[0].fake_features[0]) == 75  # local state restored after
    # put back in global order, the gathered features are the single-process ones: FID and even KID's random
    # subsets agree to the last digit
    want = fid_of(real, fake, kid_subset_size=50)
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-12)
    assert got["kid_mean"] == want["kid_mean"] and got["kid_std"] == want["kid_std"]
    unordered = fid_of(real, torch.cat([fake[0::2], fake[1::2]]), kid_subset_size=50)
    assert unordered["kid_mean"] != want["kid_mean"]  # the ordering matters, so the test above can fail

def test_shared_reference_gives_the_same_metric(tmp_path):
    real = gaussian(300, MEAN, COV, seed=95)
    fake = gaussian(200, MEAN + 0.3, COV, seed=96)
    extractor = make_features("identity", num_features=D)
    first = SampleQuality(extractor, kid_subset_size=50, kid_subsets=10, cache_dir=tmp_path)
    first.set_reference(real, key="real")
    second = SampleQuality(extractor, kid_subset_size=50, kid_subsets=10)
    second.share_reference(first)
    second.update(fake)
    assert second.compute() == fid_of(real, fake, kid_subset_size=50)
    assert second.features_name == "identity" and first.cache_path("real").is_file()
    with pytest.raises(RuntimeError, match="no reference"):
        second.share_reference(SampleQuality(extractor))
    with pytest.raises(ValueError, match="features differ"):
        SampleQuality("digits").share_reference(first)
