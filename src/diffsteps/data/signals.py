"""1-D signal data: MNIST-1D (Greydanus 2020), built by the ``mnist1d`` package's procedural generator.

MNIST-1D is ten 12-point templates (one per digit) turned into length-40 signals by random padding, dilation,
scaling, translation, correlated and i.i.d. noise and shear (``mnist1d.transform``). It is generated here with
``mnist1d.data.make_dataset`` from those templates — never through ``get_dataset``, which downloads a pickle — so
the data are a pure function of the generator's arguments and ``seed``, and nothing is fetched at run time.
"""

from __future__ import annotations

import functools
import hashlib
import random

import numpy as np
import torch

from .base import (
    DataSpec,
    _check_fraction,
    _check_positive_int,
    _fmt,
    _InMemoryData,
)

# The generator standardises the whole set (all splits) to mean 0, std 1; dividing by 3 then gives std 1/3 with
# about 99 % of values in [−1, 1] and the extremes near ±1.8 (measured on the published 5000-signal set), i.e.
# "about [−1, 1]" as the images are, without clipping the rare large excursions that the shear produces.
SCALE = 3.0
LENGTH = 40  # the package's final_seq_length: the published benchmark's signal length
NUM_CLASSES = 10


@functools.lru_cache(maxsize=8)
def generate_mnist1d(num_samples: int, train_split: float, seed: int) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) from ``mnist1d.data.make_dataset`` with the package's default arguments
    (signal length 40, its noise and shear levels) but ``num_samples``, ``train_split`` and ``seed``; x as float32
    (N, 40) in the generator's own standardised units, y int64. Cached in memory (read-only arrays), since one
    5000-signal set takes ~1.5 s to generate.

    ``make_dataset`` seeds numpy's and Python's *global* generators (``mnist1d.utils.set_seed``); their states are
    restored afterwards, so building the data does not change any other random stream of the process."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError("data=mnist1d needs the mnist1d package (a dependency of diffsteps): "
                          "`pip install mnist1d`") from e
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = int(num_samples), float(train_split), int(seed)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    out = (d["x"].astype(np.float32), d["y"].astype(np.int64), d["x_test"].astype(np.float32),
           d["y_test"].astype(np.int64))
    for a in out:
        a.setflags(write=False)
    return out


class MNIST1DData(_InMemoryData):
    """MNIST-1D (Greydanus 2020, "Scaling down deep learning"): ``num_samples`` signals of length 40 in ten
    balanced digit classes, samples (1, 40) (modality ``signal``), labels 0…9.

    Generated in memory by :func:`generate_mnist1d` from ``seed`` (default 42 and ``num_samples=5000``,
    ``val_fraction=0.2``: exactly the published set, 4000 train / 1000 test signals), then divided by
    :data:`SCALE` = 3 (std 1/3, ~99 % of values in [−1, 1]). Train is the generator's train split, val its test
    split, both in its shuffled order (so any prefix is a uniform sample). ``seed`` also seeds the shuffling
    stream, as for the other modules.

    ``conditional=True`` makes the train and val loaders yield ``(x, y)`` tuples (y a LongTensor (B,)) for
    class-conditional training; otherwise bare tensors as every data module. FID/KID default to the shipped
    MNIST-1D classifier's features (``eval.features=auto`` → ``mnist1d``).
    """

    labelled = True

    def __init__(self, num_samples: int = 5000, val_fraction: float = 0.2, conditional: bool = False,
                 batch_size: int = 128, num_workers: int = 0, seed: int = 42):
        super().__init__(batch_size, num_workers, seed, conditional)
        self.num_samples = _check_positive_int("num_samples", num_samples)
        if self.num_samples < 2 * NUM_CLASSES:
            # make_dataset draws num_samples // 10 signals per class; fewer than two each leaves a split empty
            raise ValueError(f"num_samples must be at least {2 * NUM_CLASSES} (two per class), got {num_samples}")
        self.val_fraction = _check_fraction(val_fraction)
        self._check_conditional()
        self.save_hyperparameters()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (1, LENGTH)

    @property
    def spec(self) -> DataSpec:
        return DataSpec("signal", self.sample_shape, num_classes=NUM_CLASSES, features="mnist1d")

    @property
    def name(self) -> str:
        return f"mnist1d-n{self.num_samples}-val{_fmt(self.val_fraction)}-seed{self.seed}"

    def fingerprint(self) -> str:
        """A SHA-256 of the generated signals and labels (both splits): the arguments already identify the data,
        but the generator lives in another package, whose next version could draw them differently; the
        checkpoint cache then retrains instead of reusing weights trained on other signals."""
        self.setup()
        h = hashlib.sha256()
        for split in ("train", "val"):
            for t in (self._data[split], self._labels[split]):
                h.update(f"{split}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
                h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def _load(self):
        x_tr, y_tr, x_te, y_te = generate_mnist1d(self.num_samples, 1.0 - self.val_fraction, self.seed)
        data = {s: torch.from_numpy(x.copy()).div_(SCALE)[:, None, :] for s, x in (("train", x_tr), ("val", x_te))}
        labels = {"train": torch.from_numpy(y_tr.copy()), "val": torch.from_numpy(y_te.copy())}
        return data, labels

