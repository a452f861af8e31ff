"""Step schedules and step policies: where optimised timesteps (fitted to a model and a budget) and adaptive or
learned step counts live. Builds on :mod:`diffsteps.sampling` and :mod:`diffsteps.evaluation`; nothing below
imports it.

:func:`optimize_schedule` is the entry point; :mod:`.dp` the shortest-path DP, :mod:`.teacher` the candidate grid,
teacher solve and NFE ↔ steps map, :mod:`.costs` GITS's step costs, :mod:`.differentiable` and :mod:`.refine` the
LD3-style refinement, :mod:`.elbo` Watson et al.'s ELBO-optimal chains."""

from .dp import dp_paths
from .elbo import elbo_chains
from .optimize import FIXED_SPACINGS, METHODS, optimize_schedule
from .teacher import candidate_timesteps, nfe_for_steps, steps_for_nfe, teacher_solve

__all__ = [
           "FIXED_SPACINGS",
           "METHODS",
           "candidate_timesteps",
           "dp_paths",
           "elbo_chains",
           "nfe_for_steps",
           "optimize_schedule",
           "steps_for_nfe",
           "teacher_solve",
]
