"""Everything that would otherwise fail after training, checked in seconds before it: task, objective, sampler,
spacing, steps, sampler options and evaluation sizes."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from ..sampling.api import plan_sampling

# objective name → the metrics.json key it reads
OBJECTIVES = {"fid": "fid", "kid": "kid_mean", "mse": "mse", "nll": "nll", "elbo": "elbo_bpd"}
OBJECTIVE_COSTS = {"nfe": "nfe", "seconds": "seconds_per_sample"}
TASKS = ("train_eval", "train", "eval", "schedules", "report")


def steps_list(cfg: DictConfig) -> list[int]:
    steps = cfg.steps
    steps = list(steps) if OmegaConf.is_list(steps) or isinstance(steps, (list, tuple)) else [steps]
    if not steps:
        raise ValueError("steps is empty; give one int or a list, e.g. steps=20 or steps=[10,20,50]")
    return steps


def validate(cfg: DictConfig, schedule) -> list[int]:
    """Check everything that would otherwise fail after training: task, objective, sampler, spacing, steps and
    sampler options (each against the schedule), evaluation sizes. Returns the step counts."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; valid choices: {', '.join(TASKS)}")
    o = cfg.objective
    if o.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {o.name!r}; valid choices: {', '.join(OBJECTIVES)}")
    if o.cost not in OBJECTIVE_COSTS:
        raise ValueError(f"unknown objective.cost {o.cost!r}; valid choices: {', '.join(OBJECTIVE_COSTS)}")
    if not (isinstance(o.cost_weight, (int, float)) and math.isfinite(o.cost_weight)):
        raise ValueError(f"objective.cost_weight must be a finite number, got {o.cost_weight!r}")
    steps = steps_list(cfg)
    options = OmegaConf.to_container(cfg.sampler.options, resolve=True) or {}
    spec = None
    for n in steps:
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"steps must be integers, got {n!r}")
        spec, _, _ = plan_sampling(schedule, cfg.sampler.name, n, cfg.sampler.spacing, **options)
    e = cfg.eval
    if e.batch_size < 1:
        raise ValueError(f"eval.batch_size must be ≥ 1, got {e.batch_size}")
    least = max(2, e.kid_subset_size)
    if e.num_samples < least:
        raise ValueError(f"eval.num_samples={e.num_samples} is below the minimum {least}: FID needs ≥ 2 samples and "
                         f"KID ≥ eval.kid_subset_size={e.kid_subset_size}; raise num_samples or lower "
                         "kid_subset_size")
    if o.name == "mse" and not (spec.is_deterministic(**options) and e.mse.num_samples > 0):
        raise ValueError(f"objective=mse needs a deterministic sampler (not {cfg.sampler.name!r} with {options}) "
                         f"and eval.mse.num_samples > 0")
    if o.name == "elbo" and not e.elbo.num_samples > 0:
        raise ValueError("objective=elbo needs eval.elbo.num_samples > 0")
    return steps



def objective_value(cfg: DictConfig, row: dict) -> float:
    """``cfg.objective.name``'s metric in ``row`` (one step count) + ``cost_weight`` × its cost (NFE or seconds per
    sample). ``run`` returns it at the last step count."""
    o = cfg.objective
    value = float(row.get(OBJECTIVES[o.name], math.nan))  # validate() rejected objectives this run cannot measure
    return value + float(o.cost_weight) * float(row[OBJECTIVE_COSTS[o.cost]]) if o.cost_weight else value
