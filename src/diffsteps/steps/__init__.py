"""Step schedules and step policies: where optimised timesteps (fitted to a model and a budget) and adaptive or
learned step counts live. Builds on :mod:`diffsteps.sampling` and :mod:`diffsteps.evaluation`; nothing below
imports it.

:func:`optimize_schedule` is the entry point; :mod:`.dp` the shortest-path DP, :mod:`.teacher` the candidate grid,
teacher solve and NFE ↔ steps map, :mod:`.costs` GITS's step costs, :mod:`.differentiable` and :mod:`.refine` the
LD3-style refinement, :mod:`.elbo` Watson et al.'s ELBO-optimal chains, :mod:`.dmn` DMN's analytic bound (no model
call). Step policies: :mod:`.search` the fewest steps meeting a quality target, :mod:`.stopping` a calibrated
per-sample stopping rule, :mod:`.predictor` a learned per-sample step budget (loaded on first use: it imports
Lightning)."""

from .dp import dp_paths
from .elbo import elbo_chains
from .optimize import FIXED_SPACINGS, METHODS, optimize_schedule
from .search import SearchResult, Target, TargetUnreachable, find_min_steps
from .stopping import (
           StoppingRule,
           calibrate_stopping,
           sample_with_stopping,
           stopping_trace,
)
from .teacher import candidate_timesteps, nfe_for_steps, steps_for_nfe, teacher_solve

__all__ = [
           "FIXED_SPACINGS",
           "METHODS",
           "SearchResult",
           "StepPredictor",
           "StoppingRule",
           "Target",
           "TargetUnreachable",
           "calibrate_stopping",
           "candidate_timesteps",
           "dp_paths",
           "elbo_chains",
           "find_min_steps",
           "load_predictor",
           "nfe_for_steps",
           "optimize_schedule",
           "oracle_labels",
           "sample_with_stopping",
           "save_predictor",
           "steps_for_nfe",
           "stopping_trace",
           "teacher_solve",
           "train_predictor",
]


_LAZY = {"StepPredictor", "load_predictor", "oracle_labels", "save_predictor", "train_predictor"}


def __getattr__(name: str):
    # the predictor is a LightningModule: importing Lightning (and torchmetrics, scipy) takes seconds, which
    # ``import diffsteps`` — and every run.py that fails on its config — should not pay before it needs them
    if name in _LAZY:
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
