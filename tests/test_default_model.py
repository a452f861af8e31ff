"""model=auto, the default: the network chosen from the data's DataSpec (the UNet for images, sized so that every
level and attention resolution exists; the MLP for vectors), today's digits UNet exactly, clear build-time errors
for a model that cannot take the data, the FID feature check before training, and run.py on every data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TEST_SIZE, TRAIN_SIZES, SineSignals, compose_run, run_py, write_fake_cifar
from omegaconf import OmegaConf
from PIL import Image

from diffsteps.data import (
    CIFAR10Data,
    DigitsData,
    GMMData,
    ImageFolderData,
    Toy2DData,
)
from diffsteps.nets import MLP, AttentionBlock, UNet
from diffsteps.runner import build as build_mod
from diffsteps.runner.build import auto_unet, build, build_net, check_eval_features
from diffsteps.runner.checkpoints import training_key

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def model_cfg(name: str, **extra):
    return OmegaConf.create({"model": OmegaConf.load(CONF / "model" / f"{name}.yaml"), **extra})


def attention_sizes(net: UNet, shape) -> list[int]:
    """The spatial sizes at which the net's attention blocks actually run, recorded by forward hooks."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-1]))
             for m in net.modules() if isinstance(m, AttentionBlock)]
    with torch.no_grad():
        out = net(torch.zeros(1, *shape), torch.tensor([10.0]))
    for h in hooks:
        h.remove()
    assert out.shape == (1, *shape)
    return seen


def png_folder(root: Path, n: int = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "RGB").save(root / f"img_{i:02d}.png")
    return root


# -- the digits default is today's UNet --------------------------------------------------------------------------
def test_auto_on_digits_is_exactly_the_unet_config_and_shares_its_checkpoint():
    spec = DigitsData().spec
    train_keys = dict(data=OmegaConf.load(CONF / "data" / "digits.yaml"), schedule={"name": "linear"},
                      loss={"name": "simple"}, train={"max_steps": 1500}, optimizer={"lr": 2e-3}, lr_scheduler={}, seed=0)
    auto, unet = model_cfg("auto", **train_keys), model_cfg("unet", **train_keys)
    torch.manual_seed(0)
    net_auto = build_net(auto, spec, "digits")
    torch.manual_seed(0)
    net_unet = build_net(unet, spec, "digits")
    # the chosen config replaces model=auto and equals conf/model/unet.yaml key for key
    assert OmegaConf.to_container(auto.model) == OmegaConf.to_container(unet.model)
    assert OmegaConf.to_container(unet.model) == {
        "_target_": "diffsteps.nets.UNet", "in_channels": None, "image_size": None, "base_channels": 16,
        "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4], "dropout": 0.0}
    n_auto = sum(p.numel() for p in net_auto.parameters())
    assert n_auto == sum(p.numel() for p in net_unet.parameters()) == 190_369
    # the same seed gives the same weights: the same initialisation, hence the same trained model and numbers
    sa, su = net_auto.state_dict(), net_unet.state_dict()
    assert list(sa) == list(su) and all(torch.equal(sa[k], su[k]) for k in sa)
    assert attention_sizes(net_auto, (1, 8, 8)) == [4, 4, 4, 4]  # at 4×4: one down, the middle, two up blocks
    # the checkpoint key is computed from the resolved config: model=auto reuses model=unet's trained digits model
    assert training_key(auto) == training_key(unet)


# -- what model=auto builds for each data module -------------------------------------------------------------------
def _modules(tmp_path):
    write_fake_cifar(tmp_path / "cifar")
    folder = png_folder(tmp_path / "pngs", n=6)
    return {
        "digits": DigitsData(),
        "toy2d": Toy2DData(n_train=64, n_val=16),
        "gmm3": GMMData(dim=3, n_train=64, n_val=16),
        "gmm8": GMMData(n_train=64, n_val=16),
        "folder16_rgb": ImageFolderData(folder, image_size=16, channels=3),
        "folder28_gray": ImageFolderData(folder, image_size=28, channels=1),
        "cifar10": CIFAR10Data(root=tmp_path / "cifar"),
    }


# (net, in_channels or dim, image size, base_channels, channel_mult, attention resolutions)
EXPECTED = {
    "digits": (UNet, 1, 8, 16, (1, 2), (4,)),
    "toy2d": (MLP, 2, None, None, None, None),
    "gmm3": (MLP, 3, None, None, None, None),
    "gmm8": (MLP, 8, None, None, None, None),
    "folder16_rgb": (UNet, 3, 16, 16, (1, 2, 2), (4,)),
    "folder28_gray": (UNet, 1, 28, 16, (1, 2, 2), (7,)),
    "cifar10": (UNet, 3, 32, 64, (1, 2, 2), (16,)),
}


def test_auto_builds_the_net_for_each_data_module(tmp_path):
    for key, dm in _modules(tmp_path).items():
        cls, width, size, base, mult, attn = EXPECTED[key]
        cfg = model_cfg("auto")
        net = build_net(cfg, dm.spec, dm.name)
        assert type(net) is cls, key
        x = dm.real_samples(2, split="train")
        assert net(x, torch.tensor([5.0, 500.0])).shape == x.shape
        if cls is MLP:
            assert net.dim == width and cfg.model.hidden == 256 and cfg.model.depth == 4
            continue
        assert (net.in_channels, net.image_size, net.channel_mult, net.attention_resolutions) == \
            (width, size, mult, attn), key
        assert net.conv_in.out_channels == base and cfg.model.base_channels == base
        sizes = attention_sizes(net, dm.sample_shape)
        assert sizes and set(sizes) == set(attn), key


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 48, 64])
def test_auto_unet_builds_at_every_size_with_attention_where_it_says(size):
    kw = auto_unet(size)
    resolutions = [size // 2**i for i in range(len(kw["channel_mult"]))]
    assert resolutions[-1] * 2 ** (len(resolutions) - 1) == size  # every level halves exactly
    assert set(kw["attention_resolutions"]) <= set(resolutions)
    if size >= 32:
        kw["base_channels"] = 16  # the 64-wide net's layout at a quarter of the cost: the rule under test is the same
    net = UNet(in_channels=1, image_size=size, **kw)
    assert set(attention_sizes(net, (1, size, size))) == set(kw["attention_resolutions"])


def test_auto_knobs_override_the_choice():
    cfg = model_cfg("auto")
    cfg.model.base_channels = 32
    cfg.model.dropout = 0.1
    net = build_net(cfg, DigitsData().spec, "digits")
    assert net.conv_in.out_channels == 32 and cfg.model.channel_mult == [1, 2] and cfg.model.dropout == 0.1
    cfg = model_cfg("auto")
    cfg.model.hidden = 64
    assert build_net(cfg, Toy2DData().spec).proj_in.out_features == 64
    cfg = model_cfg("auto")
    cfg.model.hidden = 64
    with pytest.raises(ValueError, match="chose the UNET for image data.*no hidden; its settable sizes: "
                                         "base_channels, channel_mult"):
        build_net(cfg, DigitsData().spec, "digits")


# -- a model that cannot take the data fails at build time, naming the one to use ---------------------------------
def test_explicit_model_for_other_data_names_the_model_to_use():
    toy = Toy2DData()
    with pytest.raises(ValueError) as err:
        build_net(model_cfg("unet"), toy.spec, toy.name)
    assert str(err.value) == (f"model=unet needs image data (C, H, W); data {toy.name} is vector data of shape (2,): "
                              "use model=mlp or model=auto")
    with pytest.raises(ValueError, match=r"model=mlp needs vector data \(D,\); data digits-val0.2-seed0 is image "
                                         r"data of shape \(1, 8, 8\): use model=unet or model=auto"):
        build_net(model_cfg("mlp"), DigitsData().spec, DigitsData().name)


def test_unet_attention_never_reached_names_the_resolutions_that_exist(tmp_path):
    write_fake_cifar(tmp_path)
    dm = CIFAR10Data(root=tmp_path)
    # conf/model/unet.yaml is the digits net: attention at 4×4, which two levels from 32×32 never reach
    with pytest.raises(ValueError, match=r"model=unet cannot be built for data cifar10 \(image data of shape "
                                         r"\(3, 32, 32\)\): attention_resolutions \[4\] never occur .* valid "
                                         r"values: 32, 16; model=auto chooses levels and attention resolutions"):
        build_net(model_cfg("unet"), dm.spec, dm.name)
    cfg = model_cfg("mlp")
    cfg.model.hidden = 0  # not a size question: no hint
    with pytest.raises(ValueError, match=r"model=mlp cannot be built for data toy2d.*: hidden must be a positive int, "
                                         r"got 0$"):
        build_net(cfg, Toy2DData().spec, Toy2DData().name)


def test_signal_data_take_the_1d_unet_and_refuse_the_others():
    dm = SineSignals()
    for name in ("unet", "mlp"):
        with pytest.raises(ValueError, match=r"data sines-c2-l40 is signal data of shape \(2, 40\): use "
                                             r"model=unet1d or model=auto"):
            build_net(model_cfg(name), dm.spec, dm.name)


# -- FID features for the data, checked before training ------------------------------------------------------------
def test_eval_features_follow_the_spec_and_need_torch_fidelity_for_inception(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path)
    cifar = CIFAR10Data(root=tmp_path)

    def cfg(features="auto", task="train_eval"):
        return OmegaConf.create({"task": task, "eval": {"features": features}})

    assert check_eval_features(cfg(), DigitsData().spec) == "digits"
    assert check_eval_features(cfg(), Toy2DData().spec) == "identity"
    assert check_eval_features(cfg(), SineSignals().spec) == "identity"
    assert check_eval_features(cfg("identity"), cifar.spec) == "identity"
    monkeypatch.setattr(build_mod, "_has_torch_fidelity", lambda: True)
    assert check_eval_features(cfg(), cifar.spec) == "inception"
    monkeypatch.setattr(build_mod, "_has_torch_fidelity", lambda: False)
    with pytest.raises(ValueError) as err:
        check_eval_features(cfg(), cifar.spec, cifar.name)
    msg = str(err.value)
    assert msg.startswith("eval.features=auto chooses the Inception features for data cifar10")
    assert 'pip install -e ".[inception]"' in msg and "eval.features=identity" in msg
    with pytest.raises(ValueError, match=r'eval.features=inception asks .*pip install -e "\.\[inception\]"'):
        check_eval_features(cfg("inception"), cifar.spec, cifar.name)
    assert check_eval_features(cfg(task="train"), cifar.spec) is None  # no FID, no extractor needed
    with pytest.raises(ValueError, match="valid choices: auto, digits, inception, identity"):
        check_eval_features(cfg("clip"), cifar.spec)
    with pytest.raises(ValueError, match=r"eval.features=digits needs the 8×8 digits images"):
        check_eval_features(cfg("digits"), cifar.spec)
    with pytest.raises(ValueError, match="eval.features=inception needs image data"):
        check_eval_features(cfg("inception"), Toy2DData().spec)


def test_build_checks_features_before_building_the_net(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path)
    built = []
    monkeypatch.setattr(build_mod, "_has_torch_fidelity", lambda: False)
    monkeypatch.setattr(build_mod, "build_net", lambda *a, **k: built.append(a))
    cfg = OmegaConf.create({"task": "train_eval", "eval": {"features": "auto"},
                            "data": {"_target_": "diffsteps.data.CIFAR10Data", "root": str(tmp_path)},
                            "model": OmegaConf.load(CONF / "model" / "auto.yaml")})
    with pytest.raises(ValueError, match=r'pip install -e "\.\[inception\]"'):
        build(cfg, schedule=None)
    assert built == []


# -- run.py with the default model on every data set -----------------------------------------------------------------
TINY = ["train.max_steps=20", "lr_scheduler.warmup_steps=5", "eval.num_samples=64", "eval.batch_size=32",
        "eval.kid_subset_size=16", "eval.mse.num_samples=8", "eval.mse.reference_steps=10",
        "eval.elbo.num_samples=16", "steps=[5]", "logger=csv"]


# data → (its overrides, the net config.yaml must record)
RUNS = {
    "toy2d": (["data=toy2d", "data.n_train=512", "data.n_val=256"],
              {"_target_": "diffsteps.nets.MLP", "hidden": 256, "depth": 4}),
    "gmm": (["data=gmm", "data.n_train=512", "data.n_val=256"],
            {"_target_": "diffsteps.nets.MLP", "hidden": 256, "depth": 4}),
    "image_folder": (["data=image_folder", "data.root={tmp}/pngs", "data.image_size=16", "data.val_fraction=0.4",
                      "data.batch_size=8",
                      "eval.features=identity"],
                     {"_target_": "diffsteps.nets.UNet", "base_channels": 16, "channel_mult": [1, 2, 2],
                      "attention_resolutions": [4]}),
    # the 32×32 choice at a quarter of its width (model.base_channels=16, an auto knob): the same layout and code
    # path, 16× fewer multiply-adds; the full-width choice is built above (test_auto_builds_the_net_...)
    "cifar10": (["data=cifar10", "data.batch_size=8", "eval.features=identity", "eval.elbo.split=train",
                 "model.base_channels=16"],
                {"_target_": "diffsteps.nets.UNet", "base_channels": 16, "channel_mult": [1, 2, 2],
                 "attention_resolutions": [16]}),
}


@pytest.mark.parametrize("data", list(RUNS))
def test_run_py_with_the_default_model(tmp_path, data):
    overrides, want = RUNS[data]
    if data == "image_folder":
        png_folder(tmp_path / "pngs")
    if data == "cifar10":
        write_fake_cifar(tmp_path / "data")  # paths.data_dir, the config's default root
        assert sum(TRAIN_SIZES) >= 16 and TEST_SIZE < 16  # hence KID's 16 from train, the ELBO on train
    proc = run_py(tmp_path, *TINY, *[o.format(tmp=tmp_path) for o in overrides], name="run")
    out = tmp_path / "run"
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["steps"] for r in rows] == [5] and rows[0]["num_samples"] == 64
    for k in ("fid", "kid_mean", "mse", "elbo_bpd"):
        assert np.isfinite(rows[0][k]), k
    model = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert "name" not in model and want.items() <= model.items(), model
    assert "model=auto for" in proc.stdout + proc.stderr
    assert (out / "grid_ddim_5.png").is_file() and (out / "grid_steps_ddim.png").is_file()


def compose_config(tmp_path, monkeypatch, *overrides):
    """run.py's config (TINY settings) composed in this process: run() itself without a subprocess."""
    return compose_run(tmp_path, monkeypatch, *TINY, *overrides)


def test_run_with_a_model_for_other_data_fails_before_training(tmp_path, monkeypatch):
    from diffsteps.runner import run

    with pytest.raises(ValueError) as err:
        run(compose_config(tmp_path, monkeypatch, "data=toy2d", "model=unet"))
    assert str(err.value) == ("model=unet needs image data (C, H, W); data toy2d-8gaussians-noise0.125-n20000-10000-"
                              "seed0 is vector data of shape (2,): use model=mlp or model=auto")
    assert not (tmp_path / "outputs" / "checkpoints").exists()  # nothing trained


def test_run_on_rgb_images_without_torch_fidelity_fails_before_training(tmp_path, monkeypatch):
    from diffsteps.runner import run

    write_fake_cifar(tmp_path / "data")
    monkeypatch.setattr(build_mod, "_has_torch_fidelity", lambda: False)  # as here; the same wherever it is installed
    with pytest.raises(ValueError, match=r'^eval.features=auto chooses the Inception features for data cifar10 .*'
                                         r'pip install -e "\.\[inception\]".*or set eval.features=identity'):
        run(compose_config(tmp_path, monkeypatch, "data=cifar10", "data.batch_size=8"))
    assert not (tmp_path / "outputs" / "checkpoints").exists()
