"""Vector data generated from a seed: 2-D toy sets and n-D Gaussian mixtures (exact densities where known)."""

from __future__ import annotations

import functools
import math

import torch

from ..reference.gaussian_mixture import GaussianMixture
from .base import (
    _STREAM_DATA,
    DataSpec,
    _STREAM_GMM,
    _check_positive_int,
    _fmt,
    _generator,
    _InMemoryData,
)

TOY_KINDS = ("8gaussians", "moons", "swissroll")
# Defaults follow FFJORD's toy sets (Grathwohl et al. 2019), in each generator's raw units (see Toy2DData).
_TOY_NOISE = {"8gaussians": 0.125, "moons": 0.1, "swissroll": 1.0}


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
                 noise: float | None = None, batch_size: int = 128, num_workers: int = 0, seed: int = 0,
                 conditional: bool = False):
        super().__init__(batch_size, num_workers, seed, conditional)
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
        self._check_conditional()
        self.save_hyperparameters()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (2,)

    @property
    def spec(self) -> DataSpec:
        return DataSpec("vector", self.sample_shape, has_density=self.mixture is not None)

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
    ``.mixture`` is the exact density (a :class:`GaussianMixture`), available before setup. ``conditional=True``
    labels each point with the component it was drawn from (``spec.num_classes`` = ``components``; unlabelled
    otherwise, the data identical either way): a class-conditional mixture whose exact conditional ε is
    ``ExactEpsilon(mixture, schedule, conditional=True)``.
    """

    labelled = True

    def __init__(self, dim: int = 8, components: int = 4, spread: float = 1.0, component_std: float = 0.25,
                 n_train: int = 20_000, n_val: int = 10_000, batch_size: int = 128, num_workers: int = 0,
                 seed: int = 0, conditional: bool = False):
        super().__init__(batch_size, num_workers, seed, conditional)
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
        self._check_conditional()
        self.save_hyperparameters()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    @property
    def spec(self) -> DataSpec:
        return DataSpec("vector", self.sample_shape, num_classes=self.components if self.conditional else None,
                        has_density=True)

    @property
    def name(self) -> str:
        return (f"gmm-d{self.dim}-k{self.components}-spread{_fmt(self.spread)}-std{_fmt(self.component_std)}"
                f"-n{self.n_train}-{self.n_val}-seed{self.seed}")

    def _load(self):
        x, y = self.mixture.sample(self.n_train + self.n_val, generator=_generator(self.seed, _STREAM_DATA),
                                   return_labels=True)
        x = x.to(torch.float32)
        labels = {"train": y[: self.n_train], "val": y[self.n_train:]} if self.conditional else None
        return {"train": x[: self.n_train], "val": x[self.n_train:]}, labels
