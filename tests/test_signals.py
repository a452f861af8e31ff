"""1-D signals: MNIST-1D data, the 1-D UNet, the shipped MNIST-1D classifier, the spectral distance, and a run."""

from __future__ import annotations

import hashlib
import json
import math
import random

import numpy as np
import pytest
import torch
from helpers import FAST, ROOT, SineSignals, run_py
from omegaconf import OmegaConf

from diffsteps.data import MNIST1DData
from diffsteps.data.signals import SCALE, generate_mnist1d
from diffsteps.evaluation.distances import log_spectral_distance, mean_power_spectrum
from diffsteps.evaluation.measures import Chunk, SpectralDistance
from diffsteps.evaluation.plan import EvalPlan
from diffsteps.nets import UNet1D
from diffsteps.reference.digits_classifier import accuracy
from diffsteps.reference.mnist1d_classifier import (
    HELD_OUT_CORRECT,
    WEIGHTS_SHA256,
    default_weights_path,
    load_mnist1d_classifier,
)
from diffsteps.reporting.plots import plt, spectra_figure
from diffsteps.runner.build import build_net, check_eval_features

CONF = ROOT / "conf"


# -- data ----------------------------------------------------------------------------------------------------------
def test_mnist1d_is_the_package_generator_scaled_and_deterministic():
    from mnist1d.data import get_dataset_args, make_dataset

    generate_mnist1d.cache_clear()  # so that this test generates, whatever ran before it
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    dm = MNIST1DData(num_samples=200, val_fraction=0.25, seed=7)
    x_tr, y_tr = dm.real_samples(split="train"), dm.labels("train")
    x_va, y_va = dm.real_samples(split="val"), dm.labels("val")
    # building the data leaves the global generators where they were (make_dataset seeds them)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = 200, 0.75, 7
    ref = make_dataset(args)
    assert x_tr.shape == (150, 1, 40) and x_va.shape == (50, 1, 40) and dm.sample_shape == (1, 40)
    np.testing.assert_allclose(x_tr[:, 0].numpy(), ref["x"] / SCALE, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(x_va[:, 0].numpy(), ref["x_test"] / SCALE, rtol=1e-6, atol=1e-7)
    assert torch.equal(y_tr, torch.as_tensor(ref["y"])) and torch.equal(y_va, torch.as_tensor(ref["y_test"]))
    # the generator standardises the whole set; / 3 gives std 1/3 and about [-1, 1]
    both = torch.cat([x_tr, x_va]).double()
    assert float(both.mean()) == pytest.approx(0.0, abs=1e-6) and float(both.std(unbiased=False)) == \
        pytest.approx(1 / 3, rel=1e-5)
    assert float((both.abs() <= 1).double().mean()) > 0.97
    # ten balanced classes: num_samples // 10 each over both splits
    assert torch.bincount(torch.cat([y_tr, y_va]), minlength=10).tolist() == [20] * 10 and y_tr.dtype == torch.int64

    # regenerated from scratch (not the in-memory cache): bit-identical; another seed: different signals
    again = generate_mnist1d.__wrapped__(200, 0.75, 7)
    assert np.array_equal(again[0] / SCALE, x_tr[:, 0].numpy())
    assert not torch.equal(MNIST1DData(num_samples=200, val_fraction=0.25, seed=8).real_samples(split="train"), x_tr)

    spec = dm.spec
    assert (spec.modality, spec.sample_shape, spec.num_classes, spec.features) == ("signal", (1, 40), 10, "mnist1d")
    assert dm.name == "mnist1d-n200-val0.25-seed7"
    # the content fingerprint (checkpoint key): the same signals give the same one, other signals another
    assert dm.fingerprint() == MNIST1DData(num_samples=200, val_fraction=0.25, seed=7).fingerprint()
    assert dm.fingerprint() != MNIST1DData(num_samples=200, val_fraction=0.25, seed=8).fingerprint()


def test_mnist1d_batches_are_tensors_or_labelled_tuples():
    plain = next(iter(MNIST1DData(num_samples=200, batch_size=16, seed=7).train_dataloader()))
    assert isinstance(plain, torch.Tensor) and plain.shape == (16, 1, 40)
    dm = MNIST1DData(num_samples=200, batch_size=16, seed=7, conditional=True)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 40) and y.shape == (16,) and y.dtype == torch.int64
    # each label belongs to its signal: find the signal in the train split and compare labels
    data, labels = dm.real_samples(split="train"), dm.labels("train")
    idx = [int(torch.nonzero((data == xi).all(-1).all(-1)).flatten()[0]) for xi in x]
    assert torch.equal(labels[idx], y)
    vx, vy = next(iter(dm.val_dataloader()))
    assert torch.equal(vx, dm.real_samples(16)) and torch.equal(vy, dm.labels("val")[:16])
    with pytest.raises(ValueError, match="num_samples must be at least 20"):
        MNIST1DData(num_samples=10)


# -- the 1-D UNet --------------------------------------------------------------------------------------------------
def test_unet1d_shapes_and_class_labels():
    torch.manual_seed(0)
    net = UNet1D(base_channels=8, num_classes=10)
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)  # the zero-initialised output would hide the labels
    x, t = torch.randn(4, 1, 40), torch.tensor([0.0, 10.0, 500.0, 999.0])
    y = torch.tensor([0, 3, 7, 9])
    out = net(x, t, y)
    assert out.shape == (4, 1, 40) and torch.isfinite(out).all()
    # y=None is the null label (row num_classes), which differs from every real class
    assert torch.equal(net(x, t), net(x, t, torch.full((4,), 10)))
    assert not torch.allclose(net(x, t), out) and not torch.allclose(net(x, t, (y + 1) % 10), out)
    # each sample is conditioned on its own label: permuting the batch permutes the outputs
    p = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(net(x[p], t[p], y[p]), out[p], rtol=1e-5, atol=1e-6)
    plain = UNet1D(base_channels=8, channel_mult=(1, 2), attention_lengths=(20,), in_channels=2, length=40)
    assert plain(torch.randn(3, 2, 40), torch.tensor(5.0)).shape == (3, 2, 40)
    with pytest.raises(ValueError, match="without classes"):
        plain(torch.randn(3, 2, 40), torch.tensor(5.0), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_lengths \\[7\\] never occur.*valid values: 40, 20"):
        UNet1D(channel_mult=(1, 2), attention_lengths=(7,))
    with pytest.raises(ValueError, match="length=40 is not divisible by 2\\*\\*\\(len\\(channel_mult\\)-1\\)=16"):
        UNet1D(channel_mult=(1, 1, 1, 1, 1), attention_lengths=())


def test_model_auto_builds_the_1d_unet_for_signals():
    dm = MNIST1DData()
    cfg = OmegaConf.create({"model": OmegaConf.load(CONF / "model" / "auto.yaml")})
    net = build_net(cfg, dm.spec, dm.name)
    assert isinstance(net, UNet1D) and (net.in_channels, net.length, net.num_classes) == (1, 40, 0)
    assert net.channel_mult == (1, 2, 2) and net.attention_lengths == (10,)
    assert cfg.model._target_ == "diffsteps.nets.UNet1D"  # the chosen config replaces auto, for the checkpoint key
    # auto.yaml's attention knob is in lengths for the 1-D net; conf/model/unet1d.yaml is auto's choice at 40
    cfg = OmegaConf.create({"model": {**OmegaConf.load(CONF / "model" / "auto.yaml"), "attention_resolutions": [20]}})
    assert build_net(cfg, dm.spec).attention_lengths == (20,)
    explicit = build_net(OmegaConf.create({"model": OmegaConf.load(CONF / "model" / "unet1d.yaml")}), dm.spec)
    assert sum(p.numel() for p in explicit.parameters()) == sum(p.numel() for p in net.parameters())
    # the MNIST-1D features take MNIST-1D only; auto picks them for it
    assert check_eval_features(OmegaConf.create({"eval": {"features": "auto"}}), dm.spec) == "mnist1d"
    sines = SineSignals()
    with pytest.raises(ValueError, match="eval.features=mnist1d needs MNIST-1D signals"):
        check_eval_features(OmegaConf.create({"eval": {"features": "mnist1d"}}), sines.spec, sines.name)


# -- the shipped classifier ----------------------------------------------------------------------------------------
def test_shipped_mnist1d_classifier_checksum_and_held_out_accuracy():
    assert hashlib.sha256(default_weights_path().read_bytes()).hexdigest() == WEIGHTS_SHA256
    clf = load_mnist1d_classifier()
    # the published test split (seed 42), generated afresh here; the classifier was trained on seed 2020's signals
    held_out = MNIST1DData()
    correct, total = accuracy(clf, held_out.real_samples(split="val"), held_out.labels("val"))
    assert total == HELD_OUT_CORRECT[1] == 1000
    assert correct / total >= 0.90
    assert abs(correct - HELD_OUT_CORRECT[0]) <= 2, correct  # the recorded figure, up to other CPUs' rounding
    with pytest.raises(RuntimeError, match="have sha256 .* expected 0000"):
        load_mnist1d_classifier(sha256="0000")


# -- spectral distance ---------------------------------------------------------------------------------------------
def test_spectral_distance_against_numpy_and_over_chunks():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 2, 40, generator=g, dtype=torch.float64).cumsum(-1) * 0.1  # red-ish spectrum
    fake = torch.randn(200, 2, 40, generator=g, dtype=torch.float64)                   # white spectrum
    assert log_spectral_distance(mean_power_spectrum(real), mean_power_spectrum(real)) == 0.0

    p_real = (np.abs(np.fft.rfft(real.numpy(), axis=-1)) ** 2).mean((0, 1))
    p_fake = (np.abs(np.fft.rfft(fake.numpy(), axis=-1)) ** 2).mean((0, 1))
    np.testing.assert_allclose(mean_power_spectrum(real).numpy(), p_real, rtol=1e-12)
    expected = math.sqrt(np.mean((10 * np.log10(p_fake / p_real)) ** 2))
    assert log_spectral_distance(mean_power_spectrum(real), mean_power_spectrum(fake)) == pytest.approx(expected,
                                                                                                        rel=1e-12)
    # a uniform power ratio r is |10 log10 r| dB at every frequency
    assert log_spectral_distance(mean_power_spectrum(real), mean_power_spectrum(2 * real)) == \
        pytest.approx(20 * math.log10(2), rel=1e-12)

    # the spectra figure: the real spectrum and one line per generated set, labelled with its distance
    fig = spectra_figure(real, {"fake": fake, "none": fake[:0]})
    try:
        labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert labels == ["real (300)", f"fake: {expected:.2f} dB"]
        np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), p_real, rtol=1e-6)
    finally:
        plt.close(fig)

    # the measure sums chunks: the same number as all samples at once
    plan = EvalPlan(sampler="ddim", steps=(5,), shape=(2, 40), num_samples=200, batch_size=64, spacing="uniform",
                    options={}, noise_seed=0)
    m = SpectralDistance(plan, real)
    for start in range(0, 200, 64):
        idx = torch.arange(start, min(start + 64, 200))
        m.update(5, fake[idx].float(), Chunk(start // 64, idx, fake[idx], torch.nn.Identity(), torch.device("cpu")))
    expected32 = log_spectral_distance(mean_power_spectrum(real), mean_power_spectrum(fake.float()))
    assert m.compute(5)["spectral_distance"] == pytest.approx(expected32, rel=1e-10)


# -- a run ---------------------------------------------------------------------------------------------------------
def test_run_py_on_mnist1d_conditional_guided(tmp_path):
    """The end-to-end path of conditional MNIST-1D: model=auto sizes the UNet1D's label table, the evaluation asks
    for balanced classes and guides both branches, and classifier_agreement is the MNIST-1D classifier's (recomputed
    here from the saved samples and the plan's requested labels)."""
    from diffsteps.evaluation.classifier import class_agreement
    from diffsteps.evaluation.plan import eval_labels

    overrides = [o for o in FAST if not o.startswith(("data", "model", "objective"))]
    run_py(tmp_path, *overrides, "data=mnist1d", "data.num_samples=400", "data.conditional=true", "model=auto",
           "model.base_channels=8", "objective=fid", "steps=[2,4]", "sampler.guidance_scale=2",
           "eval.mse.num_samples=0", "eval.elbo.num_samples=0", "logger=csv",
           # dozens of line-plot panels cost seconds in matplotlib: a 4-column steps grid (with a real row) only
           "eval.grid_size=0", "eval.grid_columns=4", "eval.save_samples=256")
    out = tmp_path / "run"
    rows = json.loads((out / "metrics.json").read_text())
    config = OmegaConf.load(out / "config.yaml")
    assert config.model._target_ == "diffsteps.nets.UNet1D" and config.model.num_classes == 10
    assert [r["steps"] for r in rows] == [2, 4]
    plan = EvalPlan(sampler="ddim", steps=(2, 4), shape=(1, 40), num_samples=256, batch_size=128, num_classes=10,
                    noise_seed=config.eval.noise_seed)
    labels = eval_labels(plan)
    classifier = load_mnist1d_classifier()
    for r in rows:
        for k in ("fid", "kid_mean", "spectral_distance", "classifier_confidence"):
            assert math.isfinite(r[k]), (k, r)
        assert r["spectral_distance"] > 0 and 0.1 <= r["classifier_confidence"] <= 1
        assert r["guidance_scale"] == 2.0 and r["nfe"] == 2 * r["steps"]  # both branches in every call
        x = torch.load(out / f"samples_ddim_{r['steps']}.pt")
        assert x.shape == (256, 1, 40)
        # chunked (128) vs one batch: allow one borderline argmax to flip
        assert r["classifier_agreement"] == pytest.approx(class_agreement(x, labels, classifier), abs=1.01 / 256)
    for png in ("grid_steps_ddim.png", "spectra_ddim.png", "spectral_distance_vs_nfe.png", "fid_vs_nfe.png",
                "classifier_agreement_vs_nfe.png"):
        assert (out / png).is_file(), png


def test_signal_grids_caption_each_sample_with_its_class():
    from diffsteps.reporting.plots import grid_figure, steps_grid_figure

    x = torch.randn(3, 1, 40)
    fig = steps_grid_figure({"real data": x, "5 steps": x}, modality="signal", column_labels=["a", "b", "c"])
    assert [ax.get_xlabel() for ax in fig.axes[-3:]] == ["a", "b", "c"]  # under the bottom row
    plt.close(fig)
    fig = grid_figure(x, modality="signal", labels=["class 0", "class 1", "class 2"])
    assert [ax.get_title() for ax in fig.axes] == ["class 0", "class 1", "class 2"]
    plt.close(fig)
    with pytest.raises(ValueError, match="signal data only"):
        grid_figure(torch.zeros(3, 1, 8, 8), modality="image", labels=["0", "1", "2"])
    with pytest.raises(ValueError, match="2 labels for 3 samples"):
        grid_figure(x, modality="signal", labels=["0", "1"])
