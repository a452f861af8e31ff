"""Data modules: what each declares about itself (DataSpec), shapes, scaling, splits, determinism, exact densities,
image folders and CIFAR-10 files.

Nothing here downloads: CIFAR-10 is faked with pickles in the official format, torchvision with a stub module.
Statistical checks use tolerances of Z standard errors, the standard errors estimated from the same samples; the
data are seeded, so each check passes or fails deterministically.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TEST_SIZE, TRAIN_SIZES, SineSignals, write_fake_cifar
from PIL import Image
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from diffsteps import GaussianMixture
from diffsteps.data import (
    DATAMODULES,
    FEATURE_SPACES,
    MODALITIES,
    CIFAR10Data,
    DataSpec,
    DigitsData,
    GMMData,
    ImageFolderData,
    Toy2DData,
)

Z = 5.0  # a 5-SE band: a correct implementation fails a given check with probability < 1e-6


def assert_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Sample mean and second central moment (about the true mean) against the truth, entry by entry, each within
    Z standard errors; the SE of a mean of i.i.d. terms is their std / √n."""
    x, mean, cov = x.double(), mean.double(), cov.double()
    n = len(x)
    d = x - mean
    assert torch.all((d.mean(0)).abs() < Z * d.std(0) / math.sqrt(n)), (d.mean(0), d.std(0) / math.sqrt(n))
    prod = d[:, :, None] * d[:, None, :]
    err = (prod.mean(0) - cov).abs()
    assert torch.all(err < Z * prod.std(0) / math.sqrt(n)), err


def assert_log_prob_consistent(mixture: GaussianMixture, x: torch.Tensor, seed: int = 123) -> None:
    """The data's mean log-density under ``mixture`` equals E_p[log p] = −entropy, Monte-Carlo estimated from the
    mixture's own independent samples: a KDE-free check that data and density describe the same distribution (a
    wrong scale or misplaced centre shifts it by far more than the combined standard error)."""
    lp_data = mixture.log_prob(x.double())
    ref = mixture.sample(len(x), generator=torch.Generator().manual_seed(seed))
    lp_ref = mixture.log_prob(ref)
    se = math.sqrt(lp_data.var().item() / len(lp_data) + lp_ref.var().item() / len(lp_ref))
    assert abs(lp_data.mean().item() - lp_ref.mean().item()) < Z * se


def scipy_log_prob(mixture: GaussianMixture, x: torch.Tensor) -> np.ndarray:
    comps = [np.log(w) + multivariate_normal(mean=m.numpy(), cov=c.numpy()).logpdf(x.double().numpy())
             for w, m, c in zip(mixture.weights.tolist(), mixture.means, mixture.covs)]
    return logsumexp(np.stack(comps), axis=0)


# -- digits ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    dm = DigitsData(batch_size=64, seed=0)
    dm.setup("fit")
    return dm


def test_digits_shapes_range_and_labels(digits):
    from sklearn.datasets import load_digits

    ref = load_digits()
    train, val = digits.real_samples(split="train"), digits.real_samples(split="val")
    assert digits.sample_shape == (1, 8, 8)
    assert digits.spec == DataSpec("image", (1, 8, 8), levels=17, num_classes=10, features="digits")
    assert train.dtype == val.dtype == torch.float32 and train.shape[1:] == val.shape[1:] == (1, 8, 8)
    assert len(train) + len(val) == 1797
    both = torch.cat([train, val])
    assert both.min().item() == -1.0 and both.max().item() == 1.0
    # 0…16 map onto the grid k/8 − 1: no other values may appear.
    assert torch.equal(both, torch.round((both + 1) * 8) / 8 - 1)
    for split, x in (("train", train), ("val", val)):
        idx = digits.split_indices[split]
        expect = torch.as_tensor(ref.data[idx.numpy()], dtype=torch.float32).reshape(-1, 1, 8, 8) / 8 - 1
        assert torch.equal(x, expect)
        assert torch.equal(digits.labels(split), torch.as_tensor(ref.target[idx.numpy()]))


def test_digits_split_disjoint_and_stratified(digits):
    train, val = digits.split_indices["train"], digits.split_indices["val"]
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1797))
    all_counts = torch.bincount(torch.cat([digits.labels("train"), digits.labels("val")]), minlength=10)
    val_counts = torch.bincount(digits.labels("val"), minlength=10)
    assert torch.equal(val_counts, torch.round(0.2 * all_counts.double()).long())
    # The val split is stored shuffled, so a prefix (what real_samples(n) returns) is not one class.
    assert len(torch.unique(digits.labels("val")[:30])) >= 5


def test_digits_loaders_and_determinism(digits):
    train_loader = digits.train_dataloader()
    batch = next(iter(train_loader))
    assert isinstance(batch, torch.Tensor) and batch.shape == (64, 1, 8, 8) and batch.dtype == torch.float32
    assert len(train_loader) == len(digits.real_samples(split="train")) // 64  # drop_last
    val_batches = list(digits.val_dataloader())
    assert torch.equal(torch.cat(val_batches), digits.real_samples())  # unshuffled, complete

    again = DigitsData(batch_size=64, seed=0)
    assert torch.equal(again.real_samples(), digits.real_samples())  # real_samples sets up by itself
    assert torch.equal(next(iter(again.train_dataloader())), batch)
    other = DigitsData(batch_size=64, seed=1)
    other.setup()
    assert not torch.equal(other.split_indices["val"], digits.split_indices["val"])
    assert other.name != digits.name


def test_setup_is_idempotent_and_errors(digits):
    before = digits.real_samples(split="train")
    digits.setup("fit")
    digits.setup("validate")
    assert digits.real_samples(split="train") is before  # not reloaded (a re-split would differ in general)
    assert torch.equal(digits.real_samples(10), digits.real_samples()[:10])
    with pytest.raises(ValueError, match="only"):
        digits.real_samples(10_000)
    with pytest.raises(ValueError, match="split"):
        digits.real_samples(split="test")
    with pytest.raises(ValueError, match="batch_size"):
        DigitsData(batch_size=5000).train_dataloader()
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsData(val_fraction=1.0)


# -- toy sets ----------------------------------------------------------------------------------------------------------
def test_8gaussians_matches_its_mixture():
    dm = Toy2DData("8gaussians", n_train=20_000, n_val=2_000, seed=0)
    assert dm.sample_shape == (2,) and dm.spec == DataSpec("vector", (2,), has_density=True, features="identity")
    train, val = dm.real_samples(split="train"), dm.real_samples()
    assert train.shape == (20_000, 2) and val.shape == (2_000, 2) and train.dtype == torch.float32
    mix = dm.mixture
    assert isinstance(mix, GaussianMixture) and mix.means.shape == (8, 2)
    # Unit scale by construction: zero mean, identity covariance.
    assert torch.allclose(mix.mean(), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(mix.covariance(), torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert_moments(train, mix.mean(), mix.covariance())
    assert_log_prob_consistent(mix, train)
    probe = torch.cat([val[:200].double(), torch.tensor([[0.0, 0.0], [3.0, -3.0]], dtype=torch.float64)])
    np.testing.assert_allclose(mix.log_prob(probe).numpy(), scipy_log_prob(mix, probe), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["moons", "swissroll"])
def test_moons_swissroll_unit_scale(kind):
    dm = Toy2DData(kind, n_train=20_000, n_val=1_000, seed=3)
    x = dm.real_samples(split="train").double()
    assert dm.mixture is None and x.shape == (20_000, 2) and dm.real_samples().shape == (1_000, 2)
    assert dm.spec == DataSpec("vector", (2,)) and not dm.spec.has_density
    n = len(x)
    assert torch.all(x.mean(0).abs() < Z * x.std(0) / math.sqrt(n))
    # The normalising constants come from the distribution, so the mean per-coordinate second moment is 1 up to
    # sampling error.
    sq = x.square().mean(1)
    assert abs(sq.mean().item() - 1.0) < Z * sq.std().item() / math.sqrt(n)
    assert torch.equal(Toy2DData(kind, n_train=20_000, n_val=1_000, seed=3).real_samples(), dm.real_samples())
    assert not torch.equal(Toy2DData(kind, n_train=20_000, n_val=1_000, seed=4).real_samples(), dm.real_samples())


def test_toy_rejects_unknown_kind():
    with pytest.raises(ValueError, match="8gaussians"):
        Toy2DData("spirals")


def test_gmm_matches_its_mixture():
    dm = GMMData(dim=8, components=4, n_train=20_000, n_val=5_000, seed=0)
    assert dm.sample_shape == (8,) and dm.spec == DataSpec("vector", (8,), has_density=True)
    assert GMMData(dim=3).spec.sample_shape == (3,)
    train = dm.real_samples(split="train")
    assert train.shape == (20_000, 8) and train.dtype == torch.float32 and dm.real_samples().shape == (5_000, 8)
    mix = dm.mixture
    assert mix.means.shape == (4, 8)
    assert_moments(train, mix.mean(), mix.covariance())
    assert_log_prob_consistent(mix, train)
    # The density depends on the seed only, not on the sample sizes; a different seed draws different means.
    assert torch.equal(GMMData(n_train=100, n_val=10, seed=0).mixture.means, mix.means)
    assert not torch.equal(GMMData(seed=1).mixture.means, mix.means)


# -- image folders -----------------------------------------------------------------------------------------------------
def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.new("L", (20, 20), 51).save(root / "a_gray.png")  # 51 → 51/127.5 − 1 = −0.6
    Image.new("RGB", (30, 40), (255, 0, 102)).save(root / "sub" / "b_rgb.PNG")  # upper-case extension
    halves = np.zeros((40, 40), np.uint8)
    halves[20:] = 255  # top black, bottom white: checks rows are not transposed or flipped
    Image.fromarray(halves, "L").save(root / "sub" / "deeper" / "c_halves.png")
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16] = 0
    wide[:, 16:32] = 255
    wide[:, 32:48] = 0
    wide[:, 48:] = 255  # the centre crop keeps columns 16…47: white left, black right
    Image.fromarray(wide, "RGB").save(root / "e_wide.png")
    noise = np.random.default_rng(0).integers(0, 256, (20, 50, 3), dtype=np.uint8)
    Image.fromarray(noise, "RGB").save(root / "d_photo.jpg", quality=90)
    (root / "notes.txt").write_text("not an image")
    (root / "._a_gray.png").write_bytes(b"macOS metadata, not a PNG")  # hidden: must be skipped
    (root / ".hidden" / "x.png").write_bytes(b"garbage")
    return root


def _by_file(dm: ImageFolderData) -> dict[str, torch.Tensor]:
    out = {}
    for split in ("train", "val"):
        for path, x in zip(dm.files[split], dm.real_samples(split=split)):
            out[path.name] = x
    return out


def test_image_folder_rgb(image_root):
    dm = ImageFolderData(image_root, image_size=8, channels=3, val_fraction=0.2, batch_size=2, seed=0)
    assert dm.sample_shape == (3, 8, 8)
    assert dm.spec == DataSpec("image", (3, 8, 8), levels=256, features="inception") and dm._data is None
    dm.setup()
    assert len(dm.files["train"]) == 4 and len(dm.files["val"]) == 1
    assert set(dm.files["train"]).isdisjoint(dm.files["val"])
    imgs = _by_file(dm)
    assert sorted(imgs) == ["a_gray.png", "b_rgb.PNG", "c_halves.png", "d_photo.jpg", "e_wide.png"]
    for x in imgs.values():
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(imgs["a_gray.png"], torch.full((3, 8, 8), -0.6))  # gray replicated to RGB
    rgb = imgs["b_rgb.PNG"]
    assert torch.equal(rgb[0], torch.ones(8, 8)) and torch.equal(rgb[1], -torch.ones(8, 8))
    assert torch.allclose(rgb[2], torch.full((8, 8), 102 / 127.5 - 1))
    wide = imgs["e_wide.png"]
    assert torch.equal(wide[:, :, 0], torch.ones(3, 8)) and torch.equal(wide[:, :, -1], -torch.ones(3, 8))
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.shape == (2, 3, 8, 8) and batch.dtype == torch.float32
    assert torch.equal(ImageFolderData(image_root, image_size=8, val_fraction=0.2, seed=0).real_samples(),
                       dm.real_samples())


def test_image_folder_gray_squash_and_extensions(image_root):
    dm = ImageFolderData(str(image_root), image_size=8, channels=1, center_crop=False, val_fraction=0.2,
                         extensions=[".PNG"], batch_size=2)
    imgs = _by_file(dm)
    assert "d_photo.jpg" not in imgs and len(imgs) == 4
    assert all(x.shape == (1, 8, 8) for x in imgs.values())
    assert torch.allclose(imgs["a_gray.png"], torch.full((1, 8, 8), -0.6))
    halves = imgs["c_halves.png"][0]
    assert torch.equal(halves[:3], -torch.ones(3, 8)) and torch.equal(halves[5:], torch.ones(3, 8))
    # Squashed, not cropped: the black left quarter of e_wide.png is kept.
    assert torch.equal(imgs["e_wide.png"][0, :, 0], -torch.ones(8))


def test_image_folder_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderData(missing).setup()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"no image files found under .*empty.*\.jpeg, \.jpg, \.png"):
        ImageFolderData(empty).setup()

    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (4, 4)).save(bad / "good.png")
    (bad / "broken.png").write_bytes(b"this is not a PNG file")
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolderData(bad).setup()
    (bad / "broken.png").unlink()
    full = _png_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (bad / "truncated.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        ImageFolderData(bad).setup()
    with pytest.raises(ValueError, match="channels"):
        ImageFolderData(bad, channels=2)


# -- CIFAR-10 ----------------------------------------------------------------------------------------------------------


def test_cifar_fake_files(tmp_path):
    written = write_fake_cifar(tmp_path)
    dm = CIFAR10Data(root=tmp_path, batch_size=4)
    assert dm.sample_shape == (3, 32, 32) and dm.name == "cifar10"
    assert dm.spec == DataSpec("image", (3, 32, 32), levels=256, num_classes=10, features="inception")
    train, val = dm.real_samples(split="train"), dm.real_samples()
    assert train.shape == (sum(TRAIN_SIZES), 3, 32, 32) and val.shape == (TEST_SIZE, 3, 32, 32)
    assert train.dtype == torch.float32
    raw_train = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    expect = torch.from_numpy(raw_train.astype(np.float32)).reshape(-1, 3, 32, 32) / 127.5 - 1
    assert torch.equal(train, expect)
    # Layout spot check: byte c·1024 + h·32 + w of a row is channel c, row h, column w.
    i, c, h, w = 7, 1, 5, 30
    assert train[i, c, h, w].item() == pytest.approx(raw_train[i, c * 1024 + h * 32 + w] / 127.5 - 1, abs=1e-7)
    assert torch.equal(val, torch.from_numpy(written["test_batch"][0].astype(np.float32)).reshape(-1, 3, 32, 32)
                       / 127.5 - 1)
    assert dm.labels("train").tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert dm.labels("val").tolist() == written["test_batch"][1]
    both = torch.cat([train, val])
    assert both.min().item() == -1.0 and both.max().item() == 1.0
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32
    assert len(dm.train_dataloader()) == sum(TRAIN_SIZES) // 4


def test_cifar_numpy2_pickles_and_refuses_code(tmp_path):
    write_fake_cifar(tmp_path, numpy1_style=False)
    assert CIFAR10Data(root=tmp_path).real_samples().shape == (TEST_SIZE, 3, 32, 32)

    class Evil:
        def __reduce__(self):
            return (print, ("a pickle ran code",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(ValueError, match="test_batch.*refusing"):
        CIFAR10Data(root=tmp_path).setup()


def test_cifar_missing_files_messages(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"(?s)cifar-10-batches-py.*download=true.*cifar-10-python\.tar\.gz"):
        CIFAR10Data(root=tmp_path, download=False).setup()
    # Whether or not torchvision is installed, make its import fail: this must never download.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match="pip install torchvision"):
        CIFAR10Data(root=tmp_path, download=True).setup()


def test_cifar_download_calls_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_cifar10(root, train=True, download=False):
        calls.append((root, download))
        write_fake_cifar(tmp_path)

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=fake_cifar10)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    dm = CIFAR10Data(root=tmp_path, download=True)
    dm.prepare_data()
    dm.prepare_data()  # files present now: no second download
    assert calls == [(str(tmp_path), True)]
    assert dm.real_samples().shape == (TEST_SIZE, 3, 32, 32)


# -- construction as Hydra does it ---------------------------------------------------------------------------------
def test_plain_kwargs_construction_and_hparams(image_root):
    # Hydra passes YAML values: strings for paths, lists for sequences.
    dm = DATAMODULES["imagefolder"](**{"root": str(image_root), "image_size": 4, "channels": 1,
                                       "extensions": ["png", "jpg"], "batch_size": 2})
    assert dm.real_samples(split="train").shape[1:] == (1, 4, 4)
    assert dm.hparams["image_size"] == 4


def test_every_data_module_has_a_config_and_every_config_a_module():
    # conf/data/*.yaml build the registered modules: a module added without a config is unreachable from run.py
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    conf = Path(__file__).parents[1] / "conf" / "data"
    targets = {get_class(OmegaConf.load(p)._target_) for p in conf.glob("*.yaml")}
    assert targets == set(DATAMODULES.values())


# -- DataSpec: what each module declares, checked against its data -------------------------------------------------


def test_every_spec_is_known_before_setup_and_true_of_the_data(image_root, tmp_path):
    write_fake_cifar(tmp_path / "cifar")
    modules = [DigitsData(), Toy2DData("8gaussians", n_train=500, n_val=100), Toy2DData("moons", n_train=500,
               n_val=100), GMMData(dim=5, n_train=500, n_val=100), ImageFolderData(image_root, image_size=8),
               ImageFolderData(image_root, image_size=6, channels=1), CIFAR10Data(root=tmp_path / "cifar"),
               SineSignals()]
    ranks = {"image": 3, "vector": 1, "signal": 2}
    for dm in modules:
        spec = dm.spec
        assert dm._data is None, dm.name  # reading the spec loads nothing
        assert spec.sample_shape == tuple(dm.sample_shape) and len(spec.sample_shape) == ranks[spec.modality]
        assert spec.features in FEATURE_SPACES and spec.has_density == (dm.mixture is not None)
        x = torch.cat([dm.real_samples(split="train"), dm.real_samples(split="val")])
        assert x.shape[1:] == spec.sample_shape
        k = (x.double() + 1) * ((spec.levels or 256) - 1) / 2
        off_grid = (k - k.round()).abs().max().item()
        if spec.levels is not None:  # every value on the grid −1 + 2k/(levels − 1), k = 0 … levels − 1, up to float32
            assert off_grid < 1e-4 and k.min() >= 0 and k.round().max() <= spec.levels - 1, dm.name
        else:
            assert off_grid > 0.1, dm.name  # continuous: not even on the 8-bit grid
        if spec.num_classes is not None:
            labels = torch.cat([dm.labels("train"), dm.labels("val")])
            assert labels.min() >= 0 and labels.max() < spec.num_classes
        else:
            with pytest.raises(ValueError, match="no labels"):
                dm.labels()
    assert len(torch.unique(DigitsData().labels("train"))) == DigitsData().spec.num_classes


def test_dataspec_checks_itself():
    assert set(MODALITIES) == {"image", "vector", "signal"}
    from diffsteps.evaluation.features import FEATURES

    assert set(FEATURE_SPACES) == set(FEATURES)  # data may not import evaluation: the names are kept in step
    assert DataSpec("image", [3, 4, 4]).features == "inception" and DataSpec("signal", (1, 40)).features == "identity"
    assert DataSpec("image", [3, 4, 4]).sample_shape == (3, 4, 4)
    assert DataSpec("vector", (2,)).describe() == "vector data of shape (2,)"
    for kw, msg in ((dict(modality="audio", sample_shape=(1, 8)), "valid choices: image, vector, signal"),
                    (dict(modality="image", sample_shape=(8, 8)), r"image data have samples of shape \(C, H, W\)"),
                    (dict(modality="signal", sample_shape=(40,)), r"signal data have samples of shape \(C, L\)"),
                    (dict(modality="vector", sample_shape=(0,)), "positive ints"),
                    (dict(modality="vector", sample_shape=(2,), levels=1), "levels must be an int >= 2"),
                    (dict(modality="vector", sample_shape=(2,), num_classes=0), "num_classes must be a positive"),
                    (dict(modality="vector", sample_shape=(2,), features="clip"),
                     "valid choices: digits, inception, identity")):
        with pytest.raises(ValueError, match=msg):
            DataSpec(**kw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DataSpec("vector", (2,)).levels = 3


# -- resuming mid-epoch and the content fingerprint (the checkpoint cache) ---------------------------------------------
def test_resumable_loader_continues_the_epoch_where_the_checkpoint_left_it():
    from diffsteps.data.base import _STREAM_SHUFFLE, ResumableLoader, _generator

    def loader(epoch, state=None):
        dm = Toy2DData(n_train=8 * 16 + 5, n_val=16, batch_size=16, seed=4)
        dl = dm.train_dataloader()
        assert isinstance(dl, ResumableLoader)
        if state is not None:
            dl.load_state_dict(state)
        dl.sampler.set_epoch(epoch)  # as Lightning does before each epoch, after loading the state
        return dm, dl

    dm, dl = loader(2)
    # the order is EpochShuffle's permutation of (seed, epoch), cut into full batches
    perm = torch.randperm(133, generator=_generator(4, _STREAM_SHUFFLE, 2))
    x = dm.real_samples(split="train")
    full = list(dl)
    assert len(full) == 8 and all(torch.equal(b, x[perm[16 * k:16 * (k + 1)]]) for k, b in enumerate(full))
    it = iter(dl)
    for _ in range(3):
        next(it)
    assert dl.state_dict() == {"epoch": 2, "batches": 3}
    # resumed after batch 3 of epoch 2: batches 4…8 of that epoch, not the epoch's first five again
    _, dl = loader(2, {"epoch": 2, "batches": 3})
    rest = list(dl)
    assert len(rest) == 5 and all(torch.equal(a, b) for a, b in zip(rest, full[3:]))
    assert dl.state_dict() == {"epoch": 2, "batches": 8}
    # a checkpoint at epoch 1's last batch resumes at epoch 2's start; the next epoch is not skipped into either
    _, dl = loader(2, {"epoch": 1, "batches": 8})
    assert len(list(dl)) == 8 and len(list(dl)) == 8


def test_file_fingerprint_sees_names_sizes_times_and_sampled_bytes(tmp_path):
    import os

    from diffsteps.data.base import file_fingerprint

    rng = np.random.default_rng(0)
    small, big = tmp_path / "a.bin", tmp_path / "b.bin"
    small.write_bytes(rng.bytes(1000))
    big.write_bytes(rng.bytes(64 * 1024))  # blocks at 0, 30 KiB and 60 KiB (4 KiB each)
    for path in (small, big):
        os.utime(path, (1e9, 1e9))  # in 2001: any later write gives another mtime

    def fp():
        return file_fingerprint([small, big], tmp_path)

    def poke(path, offset, keep_mtime=True):
        st = path.stat()
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 0xFF
        path.write_bytes(bytes(raw))
        if keep_mtime:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    base = fp()
    assert fp() == base
    poke(small, 500)  # a small file is hashed whole: any byte counts, even with its mtime put back
    assert fp() != base
    poke(small, 500)
    assert fp() == base
    poke(big, 31 * 1024)  # inside the middle block
    assert fp() != base
    poke(big, 31 * 1024)
    assert fp() == base
    # the documented miss: a byte outside the three blocks changed with size and mtime kept
    poke(big, 10 * 1024)
    assert fp() == base
    poke(big, 10 * 1024, keep_mtime=False)  # ... while an ordinary write sets the mtime
    assert fp() != base
    # generated data: identified by their arguments, no fingerprint
    assert Toy2DData(n_train=64, n_val=16).fingerprint() is None and DigitsData().fingerprint() is None
