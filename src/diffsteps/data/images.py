"""Image data: the scikit-learn digits (embedded), a folder of image files, CIFAR-10 from its pickles."""

from __future__ import annotations

import hashlib
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .base import (
    _STREAM_DATA,
    DataSpec,
    _check_fraction,
    _check_positive_int,
    _fmt,
    _generator,
    _InMemoryData,
    _stratified_split,
    _uint8_to_unit,
    file_fingerprint,
)


class DigitsData(_InMemoryData):
    """The UCI optical-recognition handwritten digits (1,797 8×8 images, 10 classes; Alpaydin & Kaynak 1998) as
    shipped inside scikit-learn (``sklearn.datasets.load_digits`` — no download).

    Pixels (integers 0…16) map linearly to [−1, 1] (0 → −1, 16 → 1), shape (N, 1, 8, 8) float32. The held-out
    split is stratified by class with a permutation drawn from ``seed``. ``labels(split)`` gives the digit classes;
    ``split_indices[split]`` the positions in ``load_digits()`` order. ``conditional=True``: batches ``(x, y)``
    with the digit y.
    """

    labelled = True

    def __init__(self, val_fraction: float = 0.2, batch_size: int = 128, num_workers: int = 0, seed: int = 0,
                 conditional: bool = False):
        super().__init__(batch_size, num_workers, seed, conditional)
        self.val_fraction = _check_fraction(val_fraction)
        self._split_indices: dict[str, torch.Tensor] | None = None
        self._check_conditional()
        self.save_hyperparameters()

    @property
    def split_indices(self) -> dict[str, torch.Tensor]:
        self.setup()
        return self._split_indices

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    @property
    def spec(self) -> DataSpec:
        # pixels are integers 0…16: 17 levels; FID/KID in the shipped digits classifier's features
        return DataSpec("image", self.sample_shape, levels=17, num_classes=10, features="digits")

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

    ``name`` is derived from the folder's resolved path, not its content (cached reference statistics are checked
    against a hash of the images themselves); ``fingerprint()`` covers the content, for the checkpoint cache.
    """

    _decode = staticmethod(_uint8_to_unit)

    def __init__(self, root: str, image_size: int = 32, channels: int = 3,
                 extensions: Sequence[str] = ("png", "jpg", "jpeg"), val_fraction: float = 0.1,
                 center_crop: bool = True, batch_size: int = 128, num_workers: int = 0, seed: int = 0,
                 conditional: bool = False):
        super().__init__(batch_size, num_workers, seed, conditional)
        self.root = Path(os.path.expanduser(str(root)))
        self.image_size = _check_positive_int("image_size", image_size)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels!r}")
        self.channels = int(channels)
        if isinstance(extensions, str):
            extensions = (extensions,)
        # a plain tuple (Hydra passes a ListConfig): hparams go into checkpoints, which load with weights_only=True
        extensions = tuple(str(e) for e in extensions)
        self.extensions = tuple(sorted({e.lower().lstrip(".") for e in extensions}))
        if not self.extensions:
            raise ValueError("extensions must name at least one file extension")
        self.val_fraction = _check_fraction(val_fraction)
        self.center_crop = bool(center_crop)
        self._files: dict[str, list[Path]] | None = None
        self._fingerprint: str | None = None
        self._check_conditional()
        self.save_hyperparameters()

    def fingerprint(self) -> str:
        """:func:`~diffsteps.data.base.file_fingerprint` of the image files (computed once per instance)."""
        if self._fingerprint is None:
            self._fingerprint = file_fingerprint(self._find_files(), self.root)
        return self._fingerprint

    @property
    def files(self) -> dict[str, list[Path]]:
        self.setup()
        return self._files

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def spec(self) -> DataSpec:
        # stored as uint8 after resizing, so the data stay on the 256 levels of 8-bit images
        return DataSpec("image", self.sample_shape, levels=256)

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
    provide the files. ``conditional=True``: batches ``(x, y)`` with the class y.
    """

    _decode = staticmethod(_uint8_to_unit)
    labelled = True

    def __init__(self, root: str = "data", download: bool = False, batch_size: int = 128, num_workers: int = 0,
                 seed: int = 0, conditional: bool = False):
        super().__init__(batch_size, num_workers, seed, conditional)
        self.root = Path(os.path.expanduser(str(root)))
        self.download = bool(download)
        self._check_conditional()
        self.save_hyperparameters()

    @property
    def folder(self) -> Path:
        return self.root / _CIFAR_DIR

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

    @property
    def spec(self) -> DataSpec:
        return DataSpec("image", self.sample_shape, levels=256, num_classes=10)

    @property
    def name(self) -> str:
        # The official split is fixed, so neither the root nor the seed changes the reference data.
        return "cifar10"

    def _missing(self) -> list[str]:
        return [f for f in (*_CIFAR_TRAIN, _CIFAR_TEST) if not (self.folder / f).is_file()]

    def fingerprint(self) -> str:
        """:func:`~diffsteps.data.base.file_fingerprint` of the six batch files (downloading them first when allowed
        and missing, as ``setup`` would)."""
        if self._missing():
            self.prepare_data()
        missing = self._missing()
        if missing:
            self._load()  # raises, saying how to provide the files
        return file_fingerprint([self.folder / f for f in (*_CIFAR_TRAIN, _CIFAR_TEST)], self.folder)

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
