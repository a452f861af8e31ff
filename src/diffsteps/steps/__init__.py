"""Step schedules and step policies: where optimised timesteps (fitted to a model and a budget) and adaptive or
learned step counts live. Builds on :mod:`diffsteps.sampling` and :mod:`diffsteps.evaluation`; nothing below
imports it."""
