"""Lightning data modules: small, in-memory data sets for diffusion experiments.

Every module keeps its whole data set in memory as one tensor per split (images as uint8 where they come from image
files, decoded to float on the fly) and shares one interface, so that training and evaluation code need not know
which data set it has:

- ``setup(stage)`` loads or generates the data once (idempotent); ``real_samples`` and ``labels`` call it themselves,
  so evaluation code can use a module outside a Trainer;
- ``train_dataloader()`` shuffles with a generator seeded from ``seed`` and drops the last partial batch; it is a
  :class:`ResumableLoader`, so a run resumed from a mid-epoch checkpoint continues with the batch after the last one
  trained; ``val_dataloader()`` keeps order. Batches are the data tensor alone, (B, *sample_shape) float32 — unless
  the module was built with ``conditional=True``: then each batch is a tuple ``(x, y)``, y an int64 (B,) tensor of
  class indices in 0 … ``spec.num_classes`` − 1 (only labelled data sets accept it; an unlabelled one raises at
  construction, naming the labelled ones). Under DDP Lightning swaps in a DistributedSampler itself;
- ``spec``, a :class:`DataSpec` saying what the data are (modality, sample shape, levels, classes, exact density,
  default feature space), and ``sample_shape``: both known before setup, so models can be chosen and built first;
  code that must treat images, vectors and signals differently reads ``spec``, never the tensor shapes;
- ``name`` (a file-name-safe key that changes whenever the reference data would, for caching evaluation statistics);
- ``fingerprint()``: the content of file-based data (:func:`file_fingerprint`), None for data generated from the
  module's arguments (which the config already holds); the checkpoint cache keys on it;
- ``real_samples(n, split)``: the first n points of a split; splits are stored in a random order, so any prefix is a
  uniform sample of the split.

Images are scaled to [−1, 1]. 2-D toy sets are centred and scaled to unit mean per-coordinate variance by constants
computed from the generating distribution (not from the sample), so the scaling does not depend on the seed.

``seed`` is the data module's own: it fixes generated data, the held-out split and the shuffling order, through
independent random streams. Keep it fixed while varying the training seed to compare runs on the same reference set.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

SPLITS = ("train", "val")
_STREAM_DATA, _STREAM_SHUFFLE, _STREAM_GMM = 0, 1, 2

# modality → the layout of one sample; the rank is what the nets, plots and feature extractors rely on
MODALITIES = {"image": "(C, H, W)", "vector": "(D,)", "signal": "(C, L)"}
_RANKS = {"image": 3, "vector": 1, "signal": 2}
# feature spaces for FID/KID (the names of diffsteps.evaluation.features.FEATURES, which data may not import)
FEATURE_SPACES = ("digits", "inception", "identity", "mnist1d")


@dataclass(frozen=True)
class DataSpec:
    """What a data set is, declared by its data module (``datamodule.spec``, known before ``setup``), so that
    nets, samplers, metrics and plots never guess it from tensor shapes.

    - ``modality``: ``"image"`` (one sample (C, H, W)), ``"vector"`` ((D,)) or ``"signal"`` ((C, L): C channels
      over L ordered positions, e.g. a time series);
    - ``sample_shape``: the shape of one sample, of the modality's rank;
    - ``levels``: data on that many equally spaced values −1 + 2k/(levels − 1) in [−1, 1] (8-bit images: 256,
      scikit-learn's digits: 17), which the ELBO's discretised decoder needs (Ho et al. 2020, §3.3); None for
      continuous data;
    - ``num_classes``: the number of label classes, None when unlabelled;
    - ``has_density``: an exact density (``datamodule.mixture``) is available, for the samples' exact NLL;
    - ``features``: the default feature space for FID/KID (``eval.features=auto``), one of
      :data:`FEATURE_SPACES`; None takes ``inception`` for images and ``identity`` otherwise.
    """

    modality: str
    sample_shape: tuple[int, ...]
    levels: int | None = None
    num_classes: int | None = None
    has_density: bool = False
    features: str | None = None

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; valid choices: {', '.join(MODALITIES)}")
        shape = tuple(self.sample_shape)
        if len(shape) != _RANKS[self.modality] or any(isinstance(s, bool) or int(s) != s or s < 1 for s in shape):
            raise ValueError(f"{self.modality} data have samples of shape {MODALITIES[self.modality]} (positive "
                             f"ints), got sample_shape {shape!r}")
        object.__setattr__(self, "sample_shape", tuple(int(s) for s in shape))
        if self.levels is not None and (isinstance(self.levels, bool) or int(self.levels) != self.levels
                                        or self.levels < 2):
            raise ValueError(f"levels must be an int >= 2 or None (continuous data), got {self.levels!r}")
        if self.num_classes is not None and (isinstance(self.num_classes, bool)
                                             or int(self.num_classes) != self.num_classes or self.num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None (unlabelled), got {self.num_classes!r}")
        features = self.features
        if features is None:
            features = "inception" if self.modality == "image" else "identity"
        if features not in FEATURE_SPACES:
            raise ValueError(f"unknown features {features!r}; valid choices: {', '.join(FEATURE_SPACES)}")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "has_density", bool(self.has_density))

    def describe(self) -> str:
        """E.g. "image data of shape (1, 8, 8)", for messages."""
        return f"{self.modality} data of shape {self.sample_shape}"


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


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable at any batch. Lightning saves a stateful loader's ``state_dict`` — here the
    sampler's epoch and the number of batches drawn in it — in every checkpoint and hands it back to
    ``load_state_dict`` on resume; the resumed iterator then skips the batches drawn before the checkpoint, so the
    run continues with the batch an uninterrupted run would have trained next.

    Why it is needed: Lightning 2.6 restores the loop counters of a mid-epoch checkpoint but draws the rest of the
    epoch from a fresh iterator, i.e. the epoch's *first* batches again (``_TrainingEpochLoop.on_run_start`` only adds
    the batches already seen to the fetcher's count, so the epoch ends on time, with replayed batches and the rest
    skipped) — unless the loader is stateful (``lightning.fabric.utilities.types._Stateful``, checked per loader in
    ``_TrainingEpochLoop.reset``; ``FitLoop.on_save_checkpoint`` / ``setup_data`` save and restore its state).

    The skip applies only when the resumed epoch is the checkpoint's: after a checkpoint at an epoch's last batch
    Lightning resumes at the next epoch, from its start. Skipped batches are drawn and dropped, which in-memory data
    make cheap and which works under whatever sampler Lightning puts in (DDP's ``DistributedSamplerWrapper``, whose
    order is a function of the epoch as :class:`EpochShuffle`'s is). Counting assumes Lightning does not prefetch,
    which holds for loaders with a length (``_PrefetchDataFetcher`` prefetches only unsized iterables)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch: int | None = None
        self._drawn = 0
        self._resume: dict | None = None

    def _sampler_epoch(self) -> int | None:
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            epoch = getattr(sampler, "epoch", None)
            if epoch is not None:
                return int(epoch)
        return None

    def __iter__(self):
        return self._batches(super().__iter__())

    def _batches(self, it):
        # a generator: its body runs at the first next(), after Lightning's set_epoch for this epoch
        epoch, skip = self._sampler_epoch(), 0
        if self._resume is not None:
            if self._resume["epoch"] == epoch and self._resume["batches"] < len(self):
                skip = self._resume["batches"]
            self._resume = None
        self._epoch, self._drawn = epoch, 0
        for batch in it:
            self._drawn += 1
            if self._drawn > skip:
                yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._drawn}

    def load_state_dict(self, state: dict) -> None:
        self._resume = {"epoch": state.get("epoch"), "batches": int(state.get("batches", 0))}


_BLOCK = 4096


def file_fingerprint(files: Iterable[Path], root: Path) -> str:
    """A SHA-256 content fingerprint of ``files``: per file (in the given order) its path relative to ``root``, its
    size, its modification time (ns) and its first, middle and last 4 KiB (the whole file when shorter than 12 KiB).

    Why that is enough: any ordinary edit, replacement, addition, removal or rename changes a path, a size or an
    mtime (writing a file sets its mtime), so a changed data set changes the fingerprint — while reading ~12 KiB per
    file instead of all of it keeps it fast on large folders (the blocks also catch a same-size replacement copied
    with its timestamps kept, where it touches a header, the middle or the end). What it misses: bytes changed
    outside the three blocks by a tool that keeps both size and mtime (``touch -r``, or an in-place rewrite that
    restores the timestamp). The other way round, a copy that does not keep mtimes (``cp`` without ``-p``) changes
    the fingerprint of unchanged data: a retraining, never a stale reuse."""
    h = hashlib.sha256()
    for path in files:
        st = path.stat()
        h.update(f"{Path(path).relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with open(path, "rb") as f:
            if st.st_size <= 3 * _BLOCK:
                h.update(f.read())
            else:
                for offset in (0, (st.st_size - _BLOCK) // 2, st.st_size - _BLOCK):
                    f.seek(offset)
                    h.update(f.read(_BLOCK))
    return h.hexdigest()[:16]


def _generator(seed: int, stream: int, *more: int) -> torch.Generator:
    # Generation/splitting and shuffling draw from separate streams: one seed reused for both would start them from
    # the same state, and changing how data are generated would silently change the shuffle order.
    state = np.random.SeedSequence([int(seed) % 2**64, stream, *more]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    # 127.5 is exact in binary, so 0 → −1 and 255 → +1 exactly.
    return x.to(torch.float32) / 127.5 - 1.0


class _TensorDataset(Dataset):
    """Rows of one tensor, decoded on access; yields the bare tensor so a batch is a tensor, not a 1-tuple — or
    ``(x, label)`` when given ``labels``, so a batch is ``(x, y)``."""

    def __init__(self, data: torch.Tensor, decode=None, labels: torch.Tensor | None = None):
        self.data, self.decode, self.labels = data, decode, labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x = self.data[i]
        x = x if self.decode is None else self.decode(x)
        return x if self.labels is None else (x, self.labels[i])


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
    ``sample_shape``, ``spec`` and ``name``, and set ``_decode`` when they store raw uint8.

    ``conditional=True`` makes the loaders yield ``(x, y)`` batches (class-conditional training); it needs labels,
    i.e. ``spec.num_classes`` set and ``_load`` returning them. Subclasses call :meth:`_check_conditional` at the
    end of their ``__init__`` (once ``spec`` can be read), so a request for labels an unlabelled set lacks fails
    before anything is loaded."""

    mixture = None  # the exact density where one is known (spec.has_density)
    _decode = None
    labelled = False  # True where the data come with class labels (so conditional=True is possible)

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: int = 0, conditional: bool = False):
        super().__init__()
        if not isinstance(conditional, bool):
            raise ValueError(f"conditional must be true or false, got {conditional!r}")
        self.conditional = conditional
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
    def spec(self) -> DataSpec:
        """What the data are (modality, shape, levels, classes, density, default features), known before ``setup``."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """File-name-safe identity of the data (covers every argument that changes it)."""

    def fingerprint(self) -> str | None:
        """The content of file-based data (:func:`file_fingerprint`); None for data generated from the module's
        arguments, which identify it."""
        return None

    def _check_conditional(self) -> None:
        """Raise if ``conditional=True`` was asked of data without class labels (``spec.num_classes`` None)."""
        if self.conditional and self.spec.num_classes is None:
            from . import DATAMODULES  # the registry, for the message only (imported late: it imports this module)

            labelled = [k for k, cls in DATAMODULES.items() if cls.labelled]
            raise ValueError(f"{type(self).__name__} has no class labels, so conditional=true is impossible; "
                             f"labelled data sets: {', '.join(labelled)}")

    # -- common interface ----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._data is None:
            data, labels = self._load()
            if self.conditional and labels is None:
                raise ValueError(f"{type(self).__name__}(conditional=True) loaded no labels")
            self._data, self._labels = data, labels

    def _split(self, split: str) -> torch.Tensor:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        return self._data[split]

    def _dataset(self, split: str) -> _TensorDataset:
        data = self._split(split)
        return _TensorDataset(data, self._decode, self._labels[split] if self.conditional else None)

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        if len(ds) < self.batch_size:
            # drop_last would otherwise yield an empty epoch and training would silently do nothing.
            raise ValueError(f"{type(self).__name__}: the train split has {len(ds)} samples, fewer than "
                             f"batch_size={self.batch_size}, so no full batch can be formed")
        return ResumableLoader(ds, batch_size=self.batch_size, sampler=EpochShuffle(len(ds), self.seed),
                               drop_last=True, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0)

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
