"""One module per measure, each a :class:`Measure` (:mod:`.base`): FID/KID (:class:`Quality`), the exact NLL under a
known density (:class:`MixtureNLL`), the digits classifier's confidence (:class:`ClassifierConfidence`), the
trajectory error against a converged ODE solution (:class:`TrajectoryError`), the log-spectral distance of
signals (:class:`SpectralDistance`) and the ELBO over each step count's chain (:class:`ChainELBO`). How to add one:
the :mod:`diffsteps.evaluation` docstring."""

from .base import Chunk, Measure, Totals
from .classifier import ClassifierConfidence
from .elbo import ChainELBO
from .nll import MixtureNLL
from .quality import Quality
from .spectral import SpectralDistance
from .trajectory import TrajectoryError

__all__ = ["ChainELBO", "Chunk", "ClassifierConfidence", "Measure", "MixtureNLL", "Quality", "SpectralDistance",
           "Totals", "TrajectoryError"]
