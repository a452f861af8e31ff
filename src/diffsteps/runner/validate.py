"""Everything that would otherwise fail after training, checked in seconds before it: task, objective, sampler,
spacing, steps, sampler options, loggers, evaluation sizes, and keys that must follow ``train.*``."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..sampling.api import plan_sampling
from .objects import OBJECTIVE_COSTS, OBJECTIVES, Objective, SamplerChoice

__all__ = ["FOLLOWS_TRAIN", "OBJECTIVES", "OBJECTIVE_COSTS", "TASKS", "check_follows_train", "check_training",
           "instantiate_checked", "steps_list", "validate"]

TASKS = ("train_eval", "train", "eval", "schedules", "report")
# keys that the checkpoint cache must see: they live in `train` (part of the training key) and these interpolate them;
# a different value set on the derived key would train something the cache files under another config
FOLLOWS_TRAIN = {"trainer.max_steps": "train.max_steps", "trainer.gradient_clip_val": "train.gradient_clip_val",
                 "callbacks.ema.decay": "train.ema_decay"}


def steps_list(cfg: DictConfig) -> list[int]:
    steps = cfg.steps
    steps = list(steps) if OmegaConf.is_list(steps) or isinstance(steps, (list, tuple)) else [steps]
    if not steps:
        raise ValueError("steps is empty; give one int or a list, e.g. steps=20 or steps=[10,20,50]")
    return steps


def instantiate_checked(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` with the target's own exception re-raised (Hydra wraps it in an
    InstantiationException whose message repeats the config), so a bad value reads as its plain message."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, TypeError)):
            raise err.__cause__ from None
        raise


def check_follows_train(cfg: DictConfig) -> None:
    """Reject a ``trainer.max_steps`` (etc.) that differs from the ``train.*`` key it must follow."""
    marker = object()
    for derived, source in FOLLOWS_TRAIN.items():
        want = OmegaConf.select(cfg, source, default=marker)
        if want is marker:
            continue
        got = OmegaConf.select(cfg, derived, default=marker)
        if got is marker or got != want:
            shown = "absent" if got is marker else repr(got)
            raise ValueError(f"{derived} is {shown} but {source} is {want!r}: set {source} instead ({derived} follows "
                             f"it as ${{{source}}}, and the checkpoint cache keys on {source})")


def check_training(cfg: DictConfig) -> None:
    """The ``train`` settings the checkpoint cache relies on: a finite number of steps ≥ 1 (0 would cache an untrained
    network as complete; −1, Lightning's "no limit", has no end to cache) and a boolean ``wait_for_lock``."""
    steps = OmegaConf.select(cfg, "train.max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        why = {0: " (0 would train nothing and cache the untrained network as a finished model)",
               -1: " (-1, Lightning's 'no limit', is not supported: a cached model needs a finite training)"}
        raise ValueError(f"train.max_steps must be an integer >= 1, the optimiser steps to train; got {steps!r}"
                         f"{why.get(steps, '') if isinstance(steps, int) else ''}")
    wait = OmegaConf.select(cfg, "train.wait_for_lock", default=True)
    if not isinstance(wait, bool):
        raise ValueError(f"train.wait_for_lock must be true or false, got {wait!r}")


def validate(cfg: DictConfig, schedule) -> list[int]:
    """Check everything that would otherwise fail after training: task, objective, sampler, spacing, steps and
    sampler options (each against the schedule), loggers, evaluation sizes, keys that follow ``train.*``. Returns
    the step counts."""
    from .loggers import check_loggers

    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; valid choices: {', '.join(TASKS)}")
    objective: Objective = instantiate_checked(cfg.objective)
    sampler: SamplerChoice = instantiate_checked(cfg.sampler)
    check_follows_train(cfg)
    check_training(cfg)
    check_loggers(cfg)
    steps = steps_list(cfg)
    for n in steps:
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"steps must be integers, got {n!r}")
        plan_sampling(schedule, sampler.name, n, sampler.spacing, **sampler.options)
    e = cfg.eval
    if e.batch_size < 1:
        raise ValueError(f"eval.batch_size must be ≥ 1, got {e.batch_size}")
    least = max(2, e.kid_subset_size)
    if e.num_samples < least:
        raise ValueError(f"eval.num_samples={e.num_samples} is below the minimum {least}: FID needs ≥ 2 samples and "
                         f"KID ≥ eval.kid_subset_size={e.kid_subset_size}; raise num_samples or lower "
                         "kid_subset_size")
    if objective.name == "mse" and not (sampler.deterministic and e.mse.num_samples > 0):
        raise ValueError(f"objective=mse needs a deterministic sampler (not {sampler.name!r} with {sampler.options}) "
                         f"and eval.mse.num_samples > 0")
    if objective.name == "elbo" and not e.elbo.num_samples > 0:
        raise ValueError("objective=elbo needs eval.elbo.num_samples > 0")
    return steps

