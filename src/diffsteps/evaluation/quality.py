"""Sample quality: FID and KID of generated samples against a cached reference, in one torchmetrics ``Metric``.

standard deviation of the subset values (as in torchmetrics and Bińkowski et al.'s code), not a standard error. Its
expectation is exactly 0 when both samples come from one distribution, so — unlike FID — it can come out negative.

Why :class:`SampleQuality` is its own torchmetrics ``Metric`` rather than a wrapper of torchmetrics'
``FrechetInceptionDistance`` / ``KernelInceptionDistance`` (both accept a custom feature module, and vector inputs
work; tests check that the numbers agree with them):

1. The reference statistics are cached and loaded on every process. torchmetrics keeps the real side in metric states
   that are all-reduced under DDP even with ``reset_real_features=False``, so a reference loaded on each of W ranks
   is counted W times: FID's sums survive that almost unharmed (covariance denominators W·N − 1 instead of N − 1),
   but KID gathers W copies of every reference point, and copies drawn into one subset act as i = j terms in
   Σ_{i≠j} k(xᵢ, xⱼ), biasing the "unbiased" estimate upwards. Here the reference is held in plain attributes (not
   states, not buffers) and only generated features are synced (``dist_reduce_fx="cat"``); injecting cached
   statistics would also have meant writing torchmetrics' private state tensors.
2. The two classes would each run the feature extractor on every batch (twice the cost); here it runs once.
3. torchmetrics' KID draws its subsets from the global RNG, so results are not reproducible and evaluating in the
   middle of training shifts the training's random stream; here they come from a private generator (``kid_seed``),
   which also gives the same subsets at every step count (common random numbers for comparisons).
4. torchmetrics' FID takes eigenvalues of the non-symmetric Σ₁Σ₂; :func:`frechet_distance` uses symmetric
   eigendecompositions in float64, which are stable and never return complex values.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from .distances import _mean_cov, frechet_distance, kernel_distance
from .features import FEATURES, _freeze, make_features

_CACHE_FORMAT = 1


def _tensor_digest(h, name: str, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _payload_checksum(payload: dict) -> str:
    h = hashlib.sha256()
    for k in ("format", "features", "fingerprint", "input_sha256", "n"):
        h.update(f"{k}={payload[k]!r};".encode())
    for k in ("mean", "cov", "features_matrix"):
        _tensor_digest(h, k, payload[k])
    return h.hexdigest()


def _input_sha256(x: Tensor) -> str:
    h = hashlib.sha256()
    _tensor_digest(h, "real", x)
    return h.hexdigest()


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class SampleQuality(Metric):
    r"""FID and KID of generated samples against a fixed reference set, in the feature space ``features``.

    ``features`` is a :data:`FEATURES` name (``feature_kwargs`` go to it, e.g. ``weights_path`` for ``inception``)
    or any frozen ``nn.Module`` mapping (N, ...) → (N, d) with a ``num_features`` attribute. The extractor is not a
    child module (it would otherwise be written into every checkpoint and appear among the model's parameters); it
    is moved to the metric's device when used, never cast to another dtype.

    Usage: ``set_reference(real, key)`` once; then per evaluation (e.g. per number of sampling steps) ``update(fake)``
    on any number of batches, ``compute()`` → ``{"fid", "kid_mean", "kid_std"}`` (floats), ``reset()``.

    - ``set_reference`` computes the reference features, their mean and covariance (float64), and with ``cache_dir``
      stores them in ``cache_dir/<key>-<features>.pt`` with a sha256 checksum, the extractor's fingerprint and a
      hash of ``real``. Later calls load that file instead of running the extractor — unless it is unreadable,
      fails its checksum (both: corrupt), or was made by other features or from other data (stale); then it is
      recomputed and rewritten, with a warning. Written atomically, so DDP ranks sharing a folder are safe.
    - Inputs are run through the extractor in chunks of ``chunk_size`` under ``no_grad``; non-finite inputs raise.
    - Minimum sizes: FID needs ≥ 2 samples per side (the covariance divides by n − 1); KID needs ≥
      ``kid_subset_size`` per side. Fewer raise ``ValueError``. Between 2 and d samples the covariance is singular:
      FID is still defined but dominated by its O(d²/N) bias (a warning says so); compare FIDs only at equal N.
    - KID subsets come from a private generator seeded with ``kid_seed`` at every ``compute``.
    - Under DDP each rank updates with its own generated samples; ``compute`` gathers them (``cat``). The reference
      is not synced: every rank holds the full one.

    ``metric_kwargs`` go to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``, ``process_group``).
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    fake_features: list[Tensor]

    def __init__(self, features: str | nn.Module = "digits", kid_subset_size: int = 100, kid_subsets: int = 50,
                 cache_dir: str | Path | None = None, device: str | torch.device = "cpu", *, chunk_size: int = 512,
                 kid_seed: int = 0, metric_kwargs: dict | None = None, **feature_kwargs):
        super().__init__(**(metric_kwargs or {}))
        if isinstance(features, str):
            extractor = make_features(features, **feature_kwargs)
            self.features_name = features
        elif isinstance(features, nn.Module):
            if feature_kwargs:
                raise ValueError("feature_kwargs are only for features given by name")
            if not hasattr(features, "num_features"):
                raise ValueError("a custom feature module needs a num_features attribute")
            extractor = _freeze(features)
            self.features_name = str(getattr(features, "name", "") or type(features).__name__)
        else:
            raise TypeError(f"features must be a name in {sorted(FEATURES)} or an nn.Module, got {type(features)}")
        # Stored outside the module tree on purpose (see the class docstring).
        self.__dict__["_extractor"] = extractor
        self.fingerprint = str(getattr(extractor, "fingerprint", self.features_name))
        self.kid_subset_size = _check_int("kid_subset_size", kid_subset_size, 2)
        self.kid_subsets = _check_int("kid_subsets", kid_subsets, 1)
        self.chunk_size = _check_int("chunk_size", chunk_size, 1)
        self.kid_seed = int(kid_seed)
        self.cache_dir = None if cache_dir is None else Path(os.path.expanduser(str(cache_dir)))
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")
        # the global sample index of each feature row: after a DDP gather the rows are put back in index order, so
        # KID's random subsets (and float sums) see exactly what one process would
        self.add_state("fake_index", default=[], dist_reduce_fx="cat")
        # Reference statistics: plain attributes, not buffers or states — not synced under DDP (every rank holds the
        # full reference), not written into checkpoints, and moved by .to(device) (see _apply) but never cast by a
        # containing model's .half()/.double(): a float16 covariance would ruin the FID.
        self.ref_mean: Tensor | None = None
        self.ref_cov: Tensor | None = None
        self.ref_features: Tensor | None = None
        self.reference_key: str | None = None
        self.reference_source: str | None = None  # "computed" or "cache"
        self.to(device)

    def _apply(self, fn, *args, **kwargs):
        this = super()._apply(fn, *args, **kwargs)  # updates self.device (torchmetrics tracks it)
        for k in ("ref_mean", "ref_cov", "ref_features"):
            v = getattr(this, k, None)
            if v is not None:
                setattr(this, k, v.to(this.device))
        return this

    @property
    def extractor(self) -> nn.Module:
        return self.__dict__["_extractor"]

    @property
    def min_samples(self) -> int:
        """The fewest samples per side that ``compute`` accepts: max(2, kid_subset_size)."""
        return max(2, self.kid_subset_size)

    # -- features ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _extract(self, x: Tensor, what: str) -> Tensor:
        x = torch.as_tensor(x)
        if x.ndim == 0:
            raise ValueError(f"{what}: expected a batch (N, ...), got a scalar")
        bad = (~torch.isfinite(x)).sum().item() if x.is_floating_point() else 0
        if bad:
            raise ValueError(f"{what} contains {bad} non-finite values (a diverged sampler?)")
        ext = self.extractor.to(self.device)  # device only: never a dtype conversion of the extractor
        out = []
        for i in range(0, len(x), self.chunk_size):
            f = ext(x[i:i + self.chunk_size].to(self.device))
            out.append(f.reshape(f.shape[0], -1))
        if not out:
            return torch.empty(0, self.extractor.num_features or 0, device=self.device)
        f = torch.cat(out)
        if self.extractor.num_features is not None and f.shape[1] != self.extractor.num_features:
            raise ValueError(f"the feature extractor returned {f.shape[1]} features, its num_features is "
                             f"{self.extractor.num_features}")
        return f

    # -- reference ---------------------------------------------------------------------------------------------------
    def cache_path(self, key: str) -> Path:
        if self.cache_dir is None:
            raise ValueError("no cache_dir was given")
        return self.cache_dir / f"{key}-{self.features_name}.pt"

    def set_reference(self, real: Tensor, key: str | None = None) -> None:
        """Fix the reference set ``real`` (N, ...), N ≥ max(2, kid_subset_size); with ``cache_dir``, ``key`` (a
        file-name-safe string naming the reference data, e.g. ``f"{data.name}-val"``) names the cache file."""
        real = torch.as_tensor(real)
        n = len(real) if real.ndim else 0
        if n < self.min_samples:
            raise ValueError(f"the reference set needs at least {self.min_samples} samples (FID: 2; KID: "
                             f"kid_subset_size={self.kid_subset_size}), got {n}")
        path = None
        if self.cache_dir is not None:
            if not key or not isinstance(key, str) or any(c in key for c in "/\\\0") or key in (".", ".."):
                raise ValueError(f"key must be a non-empty file-name-safe string, got {key!r}")
            path = self.cache_path(key)
        input_sha = _input_sha256(real)
        payload = self._load_cache(path, input_sha) if path is not None else None
        if payload is None:
            feats = self._extract(real, "the reference set")
            mu, cov = _mean_cov(feats)
            payload = {"format": _CACHE_FORMAT, "features": self.features_name, "fingerprint": self.fingerprint,
                       "input_sha256": input_sha, "n": n, "mean": mu.cpu(), "cov": cov.cpu(),
                       "features_matrix": feats.cpu()}
            payload["checksum"] = _payload_checksum(payload)
            if path is not None:
                self._write_cache(path, payload)
            self.reference_source = "computed"
        else:
            self.reference_source = "cache"
        self.ref_mean = payload["mean"].to(self.device)
        self.ref_cov = payload["cov"].to(self.device)
        self.ref_features = payload["features_matrix"].to(self.device)
        self.reference_key = key
        self._computed = None

    def share_reference(self, other: "SampleQuality") -> None:
        """Use ``other``'s reference statistics (same features): several metrics over one reference — one per step
        count — then read, hash and hold it once."""
        if other.ref_features is None:
            raise RuntimeError("the other metric has no reference: call its set_reference first")
        if other.fingerprint != self.fingerprint:
            raise ValueError(f"features differ: {other.fingerprint!r} vs {self.fingerprint!r}")
        self.ref_mean, self.ref_cov, self.ref_features = (t.to(self.device) for t in
                                                          (other.ref_mean, other.ref_cov, other.ref_features))
        self.reference_key, self.reference_source = other.reference_key, other.reference_source
        self._computed = None

    def _load_cache(self, path: Path, input_sha: str) -> dict | None:
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            ok = isinstance(payload, dict) and payload.get("checksum") == _payload_checksum(payload)
            problem = None if ok else "its checksum does not match its content"
        except Exception as e:  # unreadable: truncated, not a torch file, missing keys, ...
            payload, problem = None, f"it cannot be read ({type(e).__name__}: {e})"
        if problem is None:
            if payload["format"] != _CACHE_FORMAT:
                problem = f"it has format {payload['format']}, expected {_CACHE_FORMAT}"
            elif payload["fingerprint"] != self.fingerprint:
                problem = f"it was made with features {payload['fingerprint']!r}, not {self.fingerprint!r}"
            elif payload["input_sha256"] != input_sha:
                problem = "it was computed from different reference data (same key, other samples)"
        if problem is not None:
            warnings.warn(f"reference statistics cache {path} not used: {problem}; recomputing and overwriting it",
                          stacklevel=3)
            return None
        return payload

    @staticmethod
    def _write_cache(path: Path, payload: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temporary file + rename: a reader (another DDP rank, a crashed run) never sees a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- torchmetrics interface -------------------------------------------------------------------------------------
    def update(self, fake: Tensor, index: Tensor | None = None) -> None:
        """Add a batch of generated samples (N, ...), same layout and range as the reference. ``index`` (N,) are
        the samples' global indices (default: in order of arrival); ``compute`` orders the features by them, which
        makes the result independent of how samples were split among DDP ranks."""
        if self.ref_features is None:
            raise RuntimeError("call set_reference(real, key) before update()")
        f = self._extract(fake, "the generated batch")
        if index is None:
            start = sum(len(i) for i in self.fake_index)
            index = torch.arange(start, start + len(f))
        index = torch.as_tensor(index, dtype=torch.long, device=self.device).reshape(-1)
        if len(index) != len(f):
            raise ValueError(f"index has {len(index)} entries for {len(f)} samples")
        if len(f):
            self.fake_features.append(f)
            self.fake_index.append(index)

    def compute(self) -> dict[str, float]:
        """``{"fid": FID, "kid_mean": KID, "kid_std": std of KID over subsets}`` for all samples since ``reset``."""
        if self.ref_features is None:
            raise RuntimeError("call set_reference(real, key) before compute()")
        fake = self.fake_features
        if isinstance(fake, Tensor) or len(fake):
            fake = dim_zero_cat(fake)[torch.argsort(dim_zero_cat(self.fake_index), stable=True)]
        else:
            fake = self.ref_features[:0]
        n, d = len(fake), self.ref_features.shape[1]
        if n < self.min_samples:
            raise ValueError(f"need at least {self.min_samples} generated samples (FID: 2; KID: "
                             f"kid_subset_size={self.kid_subset_size}), got {n}")
        if n <= d:
            warnings.warn(f"{n} generated samples in a {d}-d feature space: the covariance is singular and FID is "
                          f"dominated by its finite-sample bias; use N >> {d}", stacklevel=2)
        mu, cov = _mean_cov(fake)
        fid = frechet_distance(self.ref_mean, self.ref_cov, mu, cov)
        g = torch.Generator().manual_seed(self.kid_seed)
        kid_mean, kid_std = kernel_distance(self.ref_features, fake, self.kid_subset_size, self.kid_subsets, g)
        return {"fid": fid, "kid_mean": kid_mean, "kid_std": kid_std}
