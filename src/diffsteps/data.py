"""Lightning data modules: small, in-memory data sets for diffusion experiments.

Every module keeps its whole data set in memory as one tensor per split (images as uint8 where they come from image
files, decoded to float on the fly) and shares one interface, so that training and evaluation code need not know
which data set it has:

- ``setup(stage)`` loads or generates the data once (idempotent); ``real_samples`` and ``labels`` call it themselves,
  so evaluation code can use a module outside a Trainer;
- ``train_dataloader()`` shuffles with a generator seeded from ``seed`` and drops the last partial batch;
  ``val_dataloader()`` keeps order. Batches are the data tensor alone, (B, *sample_shape) float32 — no labels.
  Under DDP Lightning swaps in a DistributedSampler itself;
- ``sample_shape`` (known before setup, so models can be built first), ``is_image``, ``name`` (a file-name-safe key
  that changes whenever the reference data would, for caching evaluation statistics);
- ``real_samples(n, split)``: the first n points of a split; splits are stored in a random order, so any prefix is a
  uniform sample of the split.

Images are scaled to [−1, 1]. 2-D toy sets are centred and scaled to unit mean per-coordinate variance by constants
computed from the generating distribution (not from the sample), so the scaling does not depend on the seed.

``seed`` is the data module's own: it fixes generated data, the held-out split and the shuffling order, through
independent random streams. Keep it fixed while varying the training seed to compare runs on the same reference set.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import math
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from .gaussian_mixture import GaussianMixture

__all__ = [
    "DigitsData", "Toy2DData", "GMMData", "ImageFolderData", "CIFAR10Data", "DATAMODULES", "TOY_KINDS",
]

SPLITS = ("train", "val")
TOY_KINDS = ("8gaussians", "moons", "swissroll")
# Defaults follow FFJORD's toy sets (Grathwohl et al. 2019), in each generator's raw units (see Toy2DData).
_TOY_NOISE = {"8gaussians": 0.125, "moons": 0.1, "swissroll": 1.0}
_STREAM_DATA, _STREAM_SHUFFLE, _STREAM_GMM = 0, 1, 2


class EpochShuffle(Sampler[int]):
    """A random order per epoch, drawn from (seed, epoch) alone. Lightning calls ``set_epoch`` before every epoch,
    so a run resumed from a checkpoint continues with that epoch's order instead of replaying epoch 0's, which a
    DataLoader generator (restarted with every new iterator) would do."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=_generator(self.seed, _STREAM_SHUFFLE, self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def _generator(seed: int, stream: int, *more: int) -> torch.Generator:
    # Generation/splitting and shuffling draw from separate streams: one seed reused for both would start them from
    # the same state, and changing how data are generated would silently change the shuffle order.
    state = np.random.SeedSequence([int(seed) % 2**64, stream, *more]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    # 127.5 is exact in binary, so 0 → −1 and 255 → +1 exactly.
    return x.to(torch.float32) / 127.5 - 1.0


class _TensorDataset(Dataset):
    """Rows of one tensor, decoded on access; yields the bare tensor so a batch is a tensor, not a 1-tuple."""

    def __init__(self, data: torch.Tensor, decode=None):
        self.data, self.decode = data, decode

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x = self.data[i]
        return x if self.decode is None else self.decode(x)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_fraction(value) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {value}")
    return value


def _fmt(x: float) -> str:
    return f"{float(x):g}"


class _InMemoryData(LightningDataModule, abc.ABC):
    """Shared machinery; subclasses implement ``_load`` (returning per-split data and optional labels),
    ``sample_shape``, ``name`` and ``is_image``, and set ``_decode`` when they store raw uint8."""

    is_image: bool = False
    levels: int | None = None  # discrete data: the number of equally spaced values in [−1, 1] (the ELBO's decoder)
    _decode = None

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.batch_size = _check_positive_int("batch_size", batch_size)
        if int(num_workers) != num_workers or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self._data: dict[str, torch.Tensor] | None = None
        self._labels: dict[str, torch.Tensor] | None = None

    # -- subclass hooks ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _load(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """Per-split data and optional labels."""

    @property
    @abc.abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, known before ``setup``."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """File-name-safe identity of the data (covers every argument that changes it)."""

    # -- common interface ----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._data is None:
            data, labels = self._load()
            self._data, self._labels = data, labels

    def _split(self, split: str) -> torch.Tensor:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        return self._data[split]

    def _dataset(self, split: str) -> _TensorDataset:
        return _TensorDataset(self._split(split), self._decode)

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        if len(ds) < self.batch_size:
            # drop_last would otherwise yield an empty epoch and training would silently do nothing.
            raise ValueError(f"{type(self).__name__}: the train split has {len(ds)} samples, fewer than "
                             f"batch_size={self.batch_size}, so no full batch can be formed")
        return DataLoader(ds, batch_size=self.batch_size, sampler=EpochShuffle(len(ds), self.seed), drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("val"), batch_size=self.batch_size, shuffle=False, drop_last=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def real_samples(self, n: int | None = None, split: str = "val") -> torch.Tensor:
        """The first ``n`` points of ``split`` (all if None) as float32 (n, *sample_shape). May share memory with
        the stored data set: do not modify it in place."""
        data = self._split(split)
        if n is not None:
            if int(n) != n or n < 0:
                raise ValueError(f"n must be a non-negative integer or None, got {n!r}")
            if n > len(data):
                # Silently returning fewer points would bias reference statistics computed for n points.
                raise ValueError(f"{self.name}: asked for {n} {split} samples, the split has only {len(data)}")
            data = data[: int(n)]
        return data if self._decode is None else self._decode(data)

    def labels(self, split: str = "val") -> torch.Tensor:
        """Class labels (int64) of ``split``, aligned with ``real_samples(split=split)``."""
        self._split(split)
        if self._labels is None:
            raise ValueError(f"{type(self).__name__} has no labels")
        return self._labels[split]


def _stratified_split(labels: torch.Tensor, val_fraction: float, g: torch.Generator):
    """Indices (train, val), each class contributing round(val_fraction · its size) to val, each split in random
    order (so a prefix of a split is a uniform sample, not one class)."""
    val, train = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(val_fraction * len(idx)))
        val.append(idx[:k])
        train.append(idx[k:])
    train, val = torch.cat(train), torch.cat(val)
    return train[torch.randperm(len(train), generator=g)], val[torch.randperm(len(val), generator=g)]


class DigitsData(_InMemoryData):
    """The UCI optical-recognition handwritten digits (1,797 8×8 images, 10 classes; Alpaydin & Kaynak 1998) as
    shipped inside scikit-learn (``sklearn.datasets.load_digits`` — no download).

    Pixels (integers 0…16) map linearly to [−1, 1] (0 → −1, 16 → 1), shape (N, 1, 8, 8) float32. The held-out
    split is stratified by class with a permutation drawn from ``seed``. ``labels(split)`` gives the digit classes;
    ``split_indices[split]`` the positions in ``load_digits()`` order.
    """

    is_image = True
    levels = 17
    num_classes = 10

    def __init__(self, val_fraction: float = 0.2, batch_size: int = 128, num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size, num_workers, seed)
        self.val_fraction = _check_fraction(val_fraction)
        self._split_indices: dict[str, torch.Tensor] | None = None
        self.save_hyperparameters()

    @property
    def split_indices(self) -> dict[str, torch.Tensor]:
        self.setup()
        return self._split_indices

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    @property
    def name(self) -> str:
        return f"digits-val{_fmt(self.val_fraction)}-seed{self.seed}"

    def _load(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
        y = torch.as_tensor(digits.target, dtype=torch.int64)
        train, val = _stratified_split(y, self.val_fraction, _generator(self.seed, _STREAM_DATA))
        self._split_indices = {"train": train, "val": val}
        return {"train": x[train], "val": x[val]}, {"train": y[train], "val": y[val]}


# -- 2-D toy sets ----------------------------------------------------------------------------------------------------
def _moons_curve(u: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    # scikit-learn's make_moons geometry (outer upper half circle, inner lower one shifted), but with the angle drawn
    # uniformly at random rather than on a grid, so that train and val are independent samples of one distribution.
    t = math.pi * u
    outer = torch.stack([torch.cos(t), torch.sin(t)], -1)
    inner = torch.stack([1.0 - torch.cos(t), 0.5 - torch.sin(t)], -1)
    return torch.where(branch[:, None].bool(), inner, outer)


def _swissroll_curve(u: torch.Tensor) -> torch.Tensor:
    # scikit-learn's make_swiss_roll, keeping its (x, z) plane as FFJORD does: t ∈ [1.5π, 4.5π], (t cos t, t sin t).
    t = 1.5 * math.pi * (1.0 + 2.0 * u)
    return torch.stack([t * torch.cos(t), t * torch.sin(t)], -1)


@functools.lru_cache(maxsize=None)
def _curve_moments(kind: str, m: int = 20_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (2,) and per-axis variance (2,) of the noise-free curve distribution by the midpoint rule in u; its
    relative error (~1e-6 for the swiss roll, whose integrand varies fastest) is far below any sampling error."""
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    if kind == "moons":
        pts = torch.cat([_moons_curve(u, torch.zeros(m)), _moons_curve(u, torch.ones(m))])
    else:
        pts = _swissroll_curve(u)
    return pts.mean(0), pts.var(0, unbiased=False)


class Toy2DData(_InMemoryData):
    """2-D toy distributions, generated here from ``seed`` (no files):

    - ``8gaussians``: eight equal Gaussians at angles kπ/4 on a circle, each with std ``noise`` × the radius;
      ``.mixture`` is its exact density (a :class:`GaussianMixture`);
    - ``moons``: scikit-learn's two interleaved half circles (unit radius) with uniform random angles plus isotropic
      Gaussian noise of std ``noise`` in those units;
    - ``swissroll``: scikit-learn's swiss roll in its (x, z) plane (t ∈ [1.5π, 4.5π]) plus noise of std ``noise``.

    ``noise=None`` takes FFJORD's values (0.125, 0.1, 1.0). Each set is then centred and scaled by one scalar (so
    the shape is kept) such that the per-coordinate variance averages 1, using the distribution's own moments.
    ``.mixture`` is None for moons and swiss roll. Train points are the first ``n_train`` draws, val the next.
    """

    def __init__(self, kind: str = "8gaussians", n_train: int = 20_000, n_val: int = 10_000,
                 noise: float | None = None, batch_size: int = 128, num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size, num_workers, seed)
        if kind not in TOY_KINDS:
            raise ValueError(f"unknown toy kind {kind!r}; choose one of {TOY_KINDS}")
        self.kind = kind
        self.n_train = _check_positive_int("n_train", n_train)
        self.n_val = _check_positive_int("n_val", n_val)
        self.noise = _TOY_NOISE[kind] if noise is None else float(noise)
        if self.noise < 0 or (kind == "8gaussians" and self.noise == 0):
            raise ValueError(f"noise must be non-negative (positive for 8gaussians), got {self.noise}")
        # Built eagerly: it is cheap, and callers may want the exact density before any data exist.
        self.mixture = self._make_mixture() if kind == "8gaussians" else None
        self.save_hyperparameters()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (2,)

    @property
    def name(self) -> str:
        return f"toy2d-{self.kind}-noise{_fmt(self.noise)}-n{self.n_train}-{self.n_val}-seed{self.seed}"

    def _make_mixture(self) -> GaussianMixture:
        angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        centres = torch.stack([torch.cos(angles), torch.sin(angles)], -1)
        # Unit-radius circle: each coordinate of the centres has mean 0 and variance 1/2, so the mixture's
        # per-coordinate variance is 1/2 + noise²; dividing by its square root makes it exactly 1.
        scale = 1.0 / math.sqrt(0.5 + self.noise**2)
        return GaussianMixture(centres * scale, (self.noise * scale) ** 2)

    def _load(self):
        g = _generator(self.seed, _STREAM_DATA)
        n = self.n_train + self.n_val
        if self.kind == "8gaussians":
            x = self.mixture.sample(n, generator=g)
        else:
            u = torch.rand(n, generator=g, dtype=torch.float64)
            if self.kind == "moons":
                branch = torch.randint(0, 2, (n,), generator=g)
                x = _moons_curve(u, branch)
            else:
                x = _swissroll_curve(u)
            x = x + self.noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
            mean, var = _curve_moments(self.kind)
            x = (x - mean) / math.sqrt(var.mean().item() + self.noise**2)
        x = x.to(torch.float32)
        return {"train": x[: self.n_train], "val": x[self.n_train:]}, None


class GMMData(_InMemoryData):
    """Samples of an n-D Gaussian mixture generated from ``seed`` (no files): ``components`` equally weighted,
    isotropic components of std ``component_std`` whose means are drawn i.i.d. from N(0, spread² I).
    ``.mixture`` is the exact density (a :class:`GaussianMixture`), available before setup.
    """

    def __init__(self, dim: int = 8, components: int = 4, spread: float = 1.0, component_std: float = 0.25,
                 n_train: int = 20_000, n_val: int = 10_000, batch_size: int = 128, num_workers: int = 0,
                 seed: int = 0):
        super().__init__(batch_size, num_workers, seed)
        self.dim = _check_positive_int("dim", dim)
        self.components = _check_positive_int("components", components)
        self.n_train = _check_positive_int("n_train", n_train)
        self.n_val = _check_positive_int("n_val", n_val)
        self.spread, self.component_std = float(spread), float(component_std)
        if self.spread < 0 or self.component_std <= 0:
            raise ValueError("spread must be non-negative and component_std positive")
        # Its own stream, so the mixture does not depend on n_train or n_val.
        means = self.spread * torch.randn(self.components, self.dim, generator=_generator(self.seed, _STREAM_GMM),
                                          dtype=torch.float64)
        self.mixture = GaussianMixture(means, self.component_std**2)
        self.save_hyperparameters()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    @property
    def name(self) -> str:
        return (f"gmm-d{self.dim}-k{self.components}-spread{_fmt(self.spread)}-std{_fmt(self.component_std)}"
                f"-n{self.n_train}-{self.n_val}-seed{self.seed}")

    def _load(self):
        x = self.mixture.sample(self.n_train + self.n_val, generator=_generator(self.seed, _STREAM_DATA))
        x = x.to(torch.float32)
        return {"train": x[: self.n_train], "val": x[self.n_train:]}, None


# -- image files -----------------------------------------------------------------------------------------------------
def _load_image(path: Path, size: int, channels: int, center_crop: bool) -> np.ndarray:
    """One image file → uint8 (C, size, size). Any failure is re-raised naming the file, since a bare PIL error
    inside a folder of thousands does not say which one is broken."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit files: PIL's conversion to 8 bit clips rather than rescales.
                a = np.asarray(im, dtype=np.float64) / 257.0
                im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # avoids PIL's warning; alpha is then dropped as torchvision does
            im = im.convert("L" if channels == 1 else "RGB")
            if center_crop:
                w, h = im.size
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
            # Pillow's resampling filters widen with the scale factor when shrinking, i.e. they antialias.
            im = im.resize((size, size), Image.Resampling.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise ValueError(f"could not read image file {path}: {type(e).__name__}: {e}") from e
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


class ImageFolderData(_InMemoryData):
    """Every image under ``root`` (searched recursively; files and folders whose name starts with "." are skipped,
    e.g. macOS "._x.png" metadata), read with Pillow, loaded into memory once at setup.

    Each image is converted to gray (``channels=1``) or RGB (``channels=3``; alpha is dropped), centre-cropped to a
    square if ``center_crop`` (otherwise squashed), resized to ``image_size``² with antialiased bilinear filtering
    and scaled from 0…255 to [−1, 1]. Stored as uint8 (N, C, S, S). The held-out split is a permutation from
    ``seed`` of the files in sorted path order; ``files[split]`` lists them in split order. Unlabelled.

    ``name`` is derived from the folder's resolved path, not its content: change the files, change the cache key.
    """

    is_image = True
    levels = 256
    _decode = staticmethod(_uint8_to_unit)

    def __init__(self, root: str, image_size: int = 32, channels: int = 3,
                 extensions: Sequence[str] = ("png", "jpg", "jpeg"), val_fraction: float = 0.1,
                 center_crop: bool = True, batch_size: int = 128, num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size, num_workers, seed)
        self.root = Path(os.path.expanduser(str(root)))
        self.image_size = _check_positive_int("image_size", image_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels!r}")
        self.channels = int(channels)
        if isinstance(extensions, str):
            extensions = (extensions,)
        self.extensions = tuple(sorted({str(e).lower().lstrip(".") for e in extensions}))
        if not self.extensions:
            raise ValueError("extensions must name at least one file extension")
        self.val_fraction = _check_fraction(val_fraction)
        self.center_crop = bool(center_crop)
        self._files: dict[str, list[Path]] | None = None
        self.save_hyperparameters()

    @property
    def files(self) -> dict[str, list[Path]]:
        self.setup()
        return self._files

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def name(self) -> str:
        key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:8]
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.root.resolve().name) or "root"
        return (f"imagefolder-{stem}-{key}-{self.image_size}px-c{self.channels}"
                f"{'' if self.center_crop else '-squash'}-val{_fmt(self.val_fraction)}-seed{self.seed}")

    def _find_files(self) -> list[Path]:
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {self.root} is not a directory")
        files = sorted(
            p for p in self.root.rglob("*")
            if p.suffix.lower().lstrip(".") in self.extensions
            and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
            and p.is_file()
        )
        if not files:
            raise ValueError(f"no image files found under {self.root} (searched recursively for extensions "
                             f"{', '.join('.' + e for e in self.extensions)}, case-insensitive)")
        if len(files) < 2:
            raise ValueError(f"only one image file under {self.root}; a train/val split needs at least two")
        return files

    def _load(self):
        files = self._find_files()
        n_val = min(max(int(round(self.val_fraction * len(files))), 1), len(files) - 1)
        perm = torch.randperm(len(files), generator=_generator(self.seed, _STREAM_DATA)).tolist()
        order = {"val": perm[:n_val], "train": perm[n_val:]}
        # Decoding and resizing release the GIL, so threads give a real speed-up on large folders.
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            arrays = list(pool.map(
                lambda p: _load_image(p, self.image_size, self.channels, self.center_crop), files))
        data = torch.from_numpy(np.stack(arrays))
        self._files = {s: [files[i] for i in idx] for s, idx in order.items()}
        return {s: data[torch.as_tensor(idx, dtype=torch.long)] for s, idx in order.items()}, None


# -- CIFAR-10 ----------------------------------------------------------------------------------------------------------
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, strings and numpy arrays: a file dropped into the data folder cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol ≤ 2
    }

    def find_class(self, module, name):
        # The official files were written by numpy 1 (numpy.core); numpy 2 renamed it numpy._core and only
        # reaches the old name through a deprecation shim.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR-10 batch file")
        if module.startswith("numpy._core") and int(np.__version__.split(".")[0]) < 2:
            module = "numpy.core" + module[len("numpy._core"):]
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:
        raise ValueError(f"could not read CIFAR-10 batch file {path}: {type(e).__name__}: {e}") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"CIFAR-10 batch file {path}: expected data (N, 3072) with N labels, got data "
                         f"{data.shape} and {len(labels)} labels")
    return data, labels


class CIFAR10Data(_InMemoryData):
    """CIFAR-10 (Krizhevsky 2009; 50,000 train and 10,000 test 32×32 RGB images, 10 classes) read directly from the
    official python version: ``<root>/cifar-10-batches-py/data_batch_1…5`` (train) and ``test_batch`` (val), each a
    pickled dict with b"data" (uint8 (N, 3072), channel-major R, G, B planes of row-major 32×32) and b"labels".

    Images are (N, 3, 32, 32) in [−1, 1] (stored as uint8, 150 MB, decoded per batch). ``labels(split)`` gives the
    classes. If the folder is missing, ``download=True`` fetches it with ``torchvision.datasets.CIFAR10`` (imported
    only then; torchvision is otherwise not needed) in ``prepare_data``; ``download=False`` raises, saying how to
    provide the files.
    """

    is_image = True
    levels = 256
    num_classes = 10
    _decode = staticmethod(_uint8_to_unit)

    def __init__(self, root: str = "data", download: bool = False, batch_size: int = 128, num_workers: int = 0,
                 seed: int = 0):
        super().__init__(batch_size, num_workers, seed)
        self.root = Path(os.path.expanduser(str(root)))
        self.download = bool(download)
        self.save_hyperparameters()

    @property
    def folder(self) -> Path:
        return self.root / _CIFAR_DIR

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

    @property
    def name(self) -> str:
        # The official split is fixed, so neither the root nor the seed changes the reference data.
        return "cifar10"

    def _missing(self) -> list[str]:
        return [f for f in (*_CIFAR_TRAIN, _CIFAR_TEST) if not (self.folder / f).is_file()]

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node before setup, so a download is never raced by DDP ranks.
        if self.download and self._missing():
            try:
                import torchvision
            except ImportError as e:
                raise ImportError(
                    f"CIFAR10Data(download=True) uses torchvision to download CIFAR-10, and torchvision is not "
                    f"installed: `pip install torchvision`, or download {_CIFAR_URL} yourself and extract it into "
                    f"{self.root}") from e
            torchvision.datasets.CIFAR10(str(self.root), train=True, download=True)

    def _load(self):
        if self._missing():
            self.prepare_data()  # downloads if allowed (a no-op otherwise), for use outside a Trainer
        missing = self._missing()
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 not found: {self.folder} lacks {', '.join(missing)}. Set download=true (needs "
                f"torchvision) to fetch it, or download {_CIFAR_URL} and extract it into {self.root} so that "
                f"{self.folder} holds data_batch_1 … data_batch_5 and test_batch.")
        train = [_read_cifar_batch(self.folder / f) for f in _CIFAR_TRAIN]
        x_val, y_val = _read_cifar_batch(self.folder / _CIFAR_TEST)
        x_train = np.concatenate([x for x, _ in train])
        y_train = np.concatenate([y for _, y in train])
        data = {s: torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()) for s, x in (("train", x_train), ("val", x_val))}
        labels = {"train": torch.from_numpy(y_train), "val": torch.from_numpy(y_val)}
        # Kept in the official order: the files are already shuffled, and the usual "first n test images" then
        # mean the same thing here as elsewhere.
        return data, labels


DATAMODULES = {
    "digits": DigitsData,
    "toy2d": Toy2DData,
    "gmm": GMMData,
    "imagefolder": ImageFolderData,
    "cifar10": CIFAR10Data,
}
