"""Restoration: inpainting (replacement, RePaint), super-resolution (SR3 conditioning, ILVR), anomaly detection by
partial noising, and their metrics — against closed forms on an exact Gaussian model and independent computations."""

import itertools
import math

import numpy as np
import pytest
import torch
from helpers import CountingModel

import diffsteps as ds
from diffsteps.data import DigitsData, PhotoPatches
from diffsteps.nets.sr3 import SR3UNet
from diffsteps.restoration.anomaly import corrupt, pixel_score, reconstruct
from diffsteps.restoration.baselines import nearest_neighbour_fill
from diffsteps.restoration.inpaint import inpaint, repaint, repaint_path
from diffsteps.restoration.masks import check_mask, make_mask
from diffsteps.restoration.metrics import auroc, psnr, ssim
from diffsteps.restoration.superres import consistency, down, ilvr, sr3

F64 = torch.float64


# -- an exact Gaussian and the closed-form law of the replacement / RePaint chains --------------------------------
@pytest.fixture(scope="module")
def correlated():
    """N(μ, Σ) in 3-D with correlations 0.9 and −0.8 between the known coordinate 0 and the unknown 1, 2: the
    replacement method's bias is large here, so a wrong chain cannot pass for a right one."""
    mu = torch.tensor([0.5, -0.3, 0.2], dtype=F64)
    corr = torch.tensor([[1.0, 0.9, -0.8], [0.9, 1.0, -0.75], [-0.8, -0.75, 1.0]], dtype=F64)
    sd = torch.tensor([1.0, 0.8, 1.2], dtype=F64)
    return ds.GaussianMixture(mu[None], (corr * sd[:, None] * sd[None, :])[None])


KNOWN = np.array([True, False, False])
Y = np.array([1.5, 0.0, 0.0])  # the known value 1.5 (the unknown entries of y are never read)


def exact_conditional(g):
    mu, S = g.means[0].numpy(), g.covs[0].numpy()
    k, u = KNOWN, ~KNOWN
    gain = S[np.ix_(u, k)] @ np.linalg.inv(S[np.ix_(k, k)])
    return mu[u] + gain @ (Y[k] - mu[k]), S[np.ix_(u, u)] - gain @ S[np.ix_(k, u)]


def chain_law(g, abars, moves):
    """Mean and covariance of the DDPM chain with replacement, propagated in closed form (numpy): every step is
    linear-Gaussian for Gaussian data. ``abars``: ᾱ of each level index (last = 1, the data); ``moves``: the walk
    over level indices (descents one level at a time; climbs re-noise)."""
    mu, S = g.means[0].numpy(), g.covs[0].numpy()
    D = len(mu)
    m, C = np.zeros(D), np.eye(D)
    for a, b in itertools.pairwise(moves):
        at, as_ = abars[a], abars[b]
        if b < a:  # climb: x' = √(ᾱ'/ᾱ) x + √(1 − ᾱ'/ᾱ) z
            r = as_ / at
            m, C = math.sqrt(r) * m, r * C + (1 - r) * np.eye(D)
            continue
        al, s2 = math.sqrt(at), 1 - at
        K = al * S @ np.linalg.inv(at * S + s2 * np.eye(D))  # E[x0 | x_t] = μ + K (x_t − α μ)
        beta = 1 - at / as_
        c0, ct, var = math.sqrt(as_) * beta / (1 - at), math.sqrt(at / as_) * (1 - as_) / (1 - at), \
            (1 - as_) * beta / (1 - at)
        A = c0 * K + ct * np.eye(D)
        m, C = A @ m + c0 * (mu - al * K @ mu), A @ C @ A.T + var * np.eye(D)
        # replacement: the known entries become a fresh noising of y, independent of the rest
        m[KNOWN] = math.sqrt(as_) * Y[KNOWN]
        C[KNOWN, :] = 0
        C[:, KNOWN] = 0
        C[np.ix_(KNOWN, KNOWN)] = (1 - as_) * np.eye(KNOWN.sum())
    return m, C


def assert_moments(x, m, C, z=4.5):
    """Sample mean and covariance of x (N, D) within z standard errors of (m, C)."""
    x = x.numpy()
    n = len(x)
    se_m = np.sqrt(np.diag(C) / n)
    np.testing.assert_array_less(np.abs(x.mean(0) - m), z * se_m + 1e-12)
    se_c = np.sqrt((np.outer(np.diag(C), np.diag(C)) + C**2) / n)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - C), z * se_c + 1e-12)


def _setup(g, linear, steps, sampler="ddpm"):
    _, _, ts = ds.plan_sampling(linear, sampler, steps, "trailing")
    abars = np.append(linear.alphas_cumprod[ts.long()].numpy(), 1.0)
    return ds.ExactEpsilon(g, linear), abars


def gauss_kl(m1, C1, m0, C0):
    """KL(N(m1, C1) ‖ N(m0, C0))."""
    P = np.linalg.inv(C0)
    d = m1 - m0
    return 0.5 * (np.trace(P @ C1) + d @ P @ d - len(m0) + np.log(np.linalg.det(C0) / np.linalg.det(C1)))


def test_replacement_keeps_the_known_part_and_follows_its_closed_form_law(correlated, linear):
    model, abars = _setup(correlated, linear, 25)
    n = 20000
    y = torch.tensor(Y, dtype=F64).expand(n, 3)
    out = inpaint(model, y, torch.tensor(KNOWN, dtype=F64), schedule=linear, sampler="ddpm", steps=25,
                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.sample[:, 0], y[:, 0]) and out.nfe == 25
    m, C = chain_law(correlated, abars, list(range(26)))
    assert_moments(out.sample[:, 1:], m[1:], C[1:, 1:])
    # the method's known bias: its law is far from the exact conditional, by many standard errors — so the
    # comparison above would catch a chain that sampled the conditional (or anything else) instead
    mc, _ = exact_conditional(correlated)
    assert np.abs(m[1:] - mc).max() > 30 * np.sqrt(np.diag(C[1:, 1:]) / n).max()


def test_repaint_follows_its_closed_form_law_and_approaches_the_exact_conditional(correlated, linear):
    steps, jl, jn = 20, 4, 5
    model, abars = _setup(correlated, linear, steps)
    n = 12000
    y = torch.tensor(Y, dtype=F64).expand(n, 3)
    out = repaint(model, y, torch.tensor(KNOWN, dtype=F64), schedule=linear, steps=steps, jump_length=jl,
                  jump_n_sample=jn, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.sample[:, 0], y[:, 0])
    path = repaint_path(steps, jl, jn)
    m, C = chain_law(correlated, abars, path)
    assert_moments(out.sample[:, 1:], m[1:], C[1:, 1:])
    # resampling harmonises: the law is much closer to the exact conditional than plain replacement's
    mc, Cc = exact_conditional(correlated)
    mr, Cr = chain_law(correlated, abars, list(range(steps + 1)))
    kl_repaint, kl_replace = gauss_kl(m[1:], C[1:, 1:], mc, Cc), gauss_kl(mr[1:], Cr[1:, 1:], mc, Cc)
    assert kl_repaint < kl_replace / 2, (kl_repaint, kl_replace)
    # and, with the law now trusted, converges to it: 250 levels, jumps of 10 resampled 10 times (the paper's
    # setting) bring KL from replacement's 0.49 to below 0.01
    _, abars = _setup(correlated, linear, 250)
    m, C = chain_law(correlated, abars, repaint_path(250, 10, 10))
    mr, Cr = chain_law(correlated, abars, list(range(251)))
    assert gauss_kl(m[1:], C[1:, 1:], mc, Cc) < 0.01
    assert gauss_kl(mr[1:], Cr[1:, 1:], mc, Cc) > 0.4


def test_repaint_path_is_repaints_jump_schedule():
    # get_schedule_jump(t_T=10, jump_length=2, jump_n_sample=3) of Lugmayr et al.'s code, as level indices
    # (index = 9 − t, the data = 10)
    assert repaint_path(10, 2, 3) == [0, 1, 2, 3, 2, 1, 2, 3, 2, 1, 2, 3, 4, 5, 4, 3, 4, 5, 4, 3, 4, 5, 6, 7, 6, 5,
                                      6, 7, 6, 5, 6, 7, 8, 9, 8, 7, 8, 9, 8, 7, 8, 9, 10]
    assert repaint_path(5, 1, 1) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("sampler", ["ddpm", "heun"])
def test_repaint_nfe_is_the_models_call_count(mixture, linear, sampler):
    model = CountingModel(ds.ExactEpsilon(mixture, linear))
    y = mixture.sample(64, torch.Generator().manual_seed(0))
    out = repaint(model, y, torch.tensor([1.0, 0.0]), schedule=linear, steps=12, jump_length=3, jump_n_sample=4,
                  sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert out.nfe == model.calls
    if sampler == "ddpm":  # one call per level visited: 12 + 3 extra descents of 3 levels at each of 3 jump points
        assert model.calls == 12 + (4 - 1) * 3 * 3
    assert torch.equal(out.sample[:, 0], y[:, 0])


def test_replacement_works_through_every_samplers_callback(mixture, linear):
    y = mixture.sample(32, torch.Generator().manual_seed(2)).reshape(32, 1, 1, 2)
    mask = torch.tensor([[[1.0, 0.0]]])
    model = ds.ExactEpsilon(mixture, linear)
    for name in [n for n, s in ds.SAMPLERS.items() if not s.adaptive]:
        out = inpaint(model, y, mask, schedule=linear, sampler=name, steps=8, spacing="trailing",
                      generator=torch.Generator().manual_seed(0))
        assert torch.equal(out.sample[..., 0], y[..., 0]), name
        assert torch.isfinite(out.sample).all() and not torch.equal(out.sample[..., 1], y[..., 1]), name
    with pytest.raises(ValueError, match="needs a fixed-step sampler.*ddim"):
        inpaint(model, y, mask, schedule=linear, sampler="adaptive")


# -- super-resolution -----------------------------------------------------------------------------------------------
def test_ilvr_output_reproduces_its_low_resolution_input(linear):
    g = torch.Generator().manual_seed(0)
    D = 16  # 1 × 4 × 4 images from a correlated Gaussian
    A = torch.randn(D, D, generator=g, dtype=F64) / 4
    gauss = ds.GaussianMixture(torch.zeros(1, D, dtype=F64), (A @ A.T + 0.1 * torch.eye(D, dtype=F64))[None])
    hr = gauss.sample(64, g).reshape(64, 1, 4, 4)
    lr = down(hr, 2)
    out = ilvr(ds.ExactEpsilon(gauss, linear), lr, 4, schedule=linear, sampler="ddpm", steps=20, generator=g)
    assert consistency(out.sample, lr).max() < 1e-12
    free = ds.sample(ds.ExactEpsilon(gauss, linear), torch.randn(64, 1, 4, 4, generator=g, dtype=F64),
                     schedule=linear, sampler="ddpm", steps=20, generator=g)
    assert consistency(free, lr).mean() > 0.1  # without the guidance nothing ties the result to y


def test_sr3_net_takes_the_low_resolution_image_as_cond(linear):
    torch.manual_seed(0)
    net = SR3UNet(channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), num_groups=4)
    lr = torch.rand(3, 1, 4, 4) * 2 - 1
    torch.nn.init.normal_(net.unet.out[-1].weight, std=0.1)  # an untrained net predicts 0: make it see its input
    a = net(torch.zeros(3, 1, 8, 8), torch.full((3,), 500.0), low_res=lr)
    b = net(torch.zeros(3, 1, 8, 8), torch.full((3,), 500.0), low_res=-lr)
    assert a.shape == (3, 1, 8, 8) and (a - b).abs().max() > 1e-4
    out = sr3(net, lr, 8, schedule=linear, steps=3)
    assert out.sample.shape == (3, 1, 8, 8) and out.nfe == 3


# -- bad input: clear errors before any model call -----------------------------------------------------------------
def test_bad_input_fails_before_any_model_call(mixture, linear):
    model = CountingModel(ds.ExactEpsilon(mixture, linear))
    imgs = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match="does not fit the data"):
        inpaint(model, imgs, torch.ones(1, 6, 6), schedule=linear, steps=5)
    with pytest.raises(ValueError, match="binary"):
        inpaint(model, imgs, torch.full((8, 8), 0.5), schedule=linear, steps=5)
    with pytest.raises(ValueError, match="binary"):
        repaint(model, imgs, torch.full((8, 8), 2.0), schedule=linear, steps=5)
    with pytest.raises(ValueError, match="does not divide the target size 8; valid sides: 1, 2, 4"):
        ilvr(model, torch.zeros(4, 1, 3, 3), 8, schedule=linear, steps=5)
    with pytest.raises(ValueError, match="does not divide"):
        sr3(model, torch.zeros(4, 1, 3, 3), 8, schedule=linear, steps=5)
    for t_star in (-1, 1000, 2.5):
        with pytest.raises(ValueError, match=r"t\* .* must be an integer in \[0, 1000\)"):
            reconstruct(model, imgs, t_star, schedule=linear, steps=5)
    with pytest.raises(ValueError, match="unknown mask 'circle'; valid choices: box, half, strokes, file"):
        make_mask("circle", 8)
    assert model.calls == 0


# -- metrics against independent computations -----------------------------------------------------------------------
def test_ssim_and_psnr_against_direct_computations():
    from scipy.ndimage import gaussian_filter

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 32, 32, generator=g, dtype=F64) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g, dtype=F64)).clamp(-1, 1)

    def ref_ssim(a, b):  # scipy's Gaussian filter with an 11-tap (radius 5) window, then the valid region
        f = lambda z: gaussian_filter(z, 1.5, truncate=5 / 1.5)[5:-5, 5:-5]
        c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
        ma, mb = f(a), f(b)
        va, vb, cab = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
        return ((2 * ma * mb + c1) * (2 * cab + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))).mean()

    want = [np.mean([ref_ssim(x[i, c].numpy(), y[i, c].numpy()) for c in range(2)]) for i in range(3)]
    np.testing.assert_allclose(ssim(x, y).numpy(), want, rtol=1e-10)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=F64))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 4:30] = 1
    sel = mask.expand_as(x).bool()
    for i in range(3):
        d = (x[i][sel[i]] - y[i][sel[i]]).numpy()
        assert psnr(x, y, mask)[i].item() == pytest.approx(10 * np.log10(4 / np.mean(d**2)), rel=1e-12)
    assert psnr(x, y)[0].item() == pytest.approx(10 * np.log10(4 / np.mean((x[0] - y[0]).numpy() ** 2)), rel=1e-12)


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 24, 24, generator=g, dtype=F64) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=F64)).clamp(-1, 1)
    want = metrics.structural_similarity(x[0, 0].numpy(), y[0, 0].numpy(), data_range=2.0, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False)
    assert ssim(x, y).item() == pytest.approx(want, rel=1e-9)


def test_auroc_against_pairwise_counting_and_sklearn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    labels = torch.rand(300, generator=g) < 0.3
    scores = (torch.randn(300, generator=g) + labels.double()).round(decimals=1)  # with ties
    pos, neg = scores[labels].numpy(), scores[~labels].numpy()
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(pairwise, abs=1e-12)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        auroc(scores, torch.zeros(300))


# -- masks, anomalies, baselines, data -----------------------------------------------------------------------------
def test_masks_anomalies_and_nearest_neighbour_fill(tmp_path):
    box, half = make_mask("box", 8), make_mask("half", 8)
    assert box.shape == (1, 1, 8, 8) and box.sum() == 64 - 16 and half[..., :, 4:].sum() == 0
    strokes = make_mask("strokes", 16, n=3, seed=0)
    assert strokes.shape == (3, 1, 16, 16) and 0 < strokes.mean() < 1 and not torch.equal(strokes[0], strokes[1])
    np.save(tmp_path / "m.npy", box[0, 0].numpy())
    assert torch.equal(make_mask("file", 8, path=str(tmp_path / "m.npy")), box)
    assert check_mask(box, torch.zeros(5, 3, 8, 8)).shape == (1, 1, 8, 8)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1
    for kind in ("blob", "flip", "swap"):
        bad, region = corrupt(x, kind, generator=g)
        changed = (bad != x).any(1, keepdim=True)
        assert changed.any() and not (changed & (region == 0)).any(), kind  # every change lies in the region
    train = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    known = train[[3, 17]]
    filled = nearest_neighbour_fill(known * box, box, train)  # the known part identifies each training image
    assert torch.equal(filled, known)
    assert pixel_score(train[:5] + 3, train).min() > pixel_score(train[:5], train).max()


def test_photo_patches_split_is_deterministic_and_leak_free():
    d = PhotoPatches(stride=16, channels=1)
    d.setup()
    tr, va = d._data["train"], d._data["val"]
    assert tr.dtype == torch.uint8 and tr.shape[1:] == (1, 32, 32) and len(va) > 0
    again = PhotoPatches(stride=16, channels=1)
    again.setup()
    assert torch.equal(again._data["val"], va)
    flat_tr, flat_va = tr.flatten(1), va.flatten(1)
    assert not (flat_va[:, None, :] == flat_tr[None, :, :]).all(-1).any()
    x = d.real_samples(4)
    assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1


# -- the runner: task=restore ---------------------------------------------------------------------------------------
def _compose(tmp_path, monkeypatch, *overrides):
    import os

    from helpers import ROOT
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    monkeypatch.setenv("DIFFSTEPS_ROOT", str(tmp_path))
    try:
        OmegaConf.register_new_resolver("launch_dir", os.getcwd)
    except ValueError:  # registered by run.py in this process already
        pass
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={tmp_path}/run", "logger=csv", *overrides])


@pytest.mark.parametrize("override, message", [
    ("restore.factor=3", r"restore.factor=3 does not divide the image size 8; valid factors: 2, 4, 8"),
    ("restore.mask=circle", r"unknown restore.mask 'circle'; valid choices: box, half, strokes, file"),
    ("restore.t_star=1000", r"t\* \(the noise level to restart from\) must be an integer in \[0, 1000\)"),
    ("restore.task=denoise", r"unknown restore.task 'denoise'; valid choices: inpaint, superres, anomaly"),
])
def test_restore_config_errors_come_before_training(tmp_path, monkeypatch, override, message):
    from diffsteps.runner import run

    task = {"restore.factor=3": "superres", "restore.t_star=1000": "anomaly"}.get(override, "inpaint")
    with pytest.raises(ValueError, match=message):
        run(_compose(tmp_path, monkeypatch, f"experiment={task}", override))
    assert not (tmp_path / "outputs" / "checkpoints").exists()


def test_superres_preset_end_to_end(tmp_path, monkeypatch):
    """A few training steps, then ILVR and SR3 at two step counts: rows, curves, grid; ILVR keeps its low-pass
    consistency through the runner, and the bicubic baseline is the one computed here."""
    import json

    from diffsteps.restoration.superres import bicubic
    from diffsteps.runner import run

    cfg = _compose(tmp_path, monkeypatch, "experiment=superres", "train.max_steps=3", "lr_scheduler.warmup_steps=1",
                   "trainer.val_check_interval=3", "restore.num_images=8", "restore.sr3.max_steps=2",
                   "restore.sr3.batch_size=8", "steps=[2,3]")
    run(cfg)
    out = tmp_path / "run"
    rows = json.loads((out / "metrics.json").read_text())
    assert [(r["method"], r["steps"]) for r in rows] == [("ilvr", 2), ("ilvr", 3), ("sr3", 2), ("sr3", 3)]
    assert all(r["consistency"] < 1e-6 for r in rows if r["method"] == "ilvr")
    x = DigitsData().real_samples(8, split="val").double()
    want = psnr(bicubic(down(x, 2), 8), x).mean().item()
    assert rows[0]["baseline_psnr"] == pytest.approx(want, rel=1e-9)
    assert (out / "grid_restore.png").is_file() and (out / "superres_psnr_vs_steps.png").is_file()


def test_steps_for_fraction_of_the_best_gain():
    from diffsteps.restoration.study import steps_for_fraction

    rows = [{"steps": 5, "psnr": 12.0}, {"steps": 10, "psnr": 13.9}, {"steps": 20, "psnr": 14.0}]
    assert steps_for_fraction(rows, "psnr", 0.95, baseline=10.0) == 10   # gains 2, 3.9, 4: 3.9 ≥ 0.95 · 4
    assert steps_for_fraction(rows, "psnr", 0.95, baseline=14.5) is None  # never above the baseline
