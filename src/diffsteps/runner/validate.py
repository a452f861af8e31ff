"""Everything that would otherwise fail after training, checked in seconds before it: task, objective, sampler,
spacing, steps, sampler options, loggers, evaluation sizes, and keys that must follow ``train.*``."""

from __future__ import annotations

import logging
from dataclasses import fields

from omegaconf import DictConfig, OmegaConf

from ..sampling.api import plan_sampling
from ..sampling.registry import get_sampler
from .objects import OBJECTIVE_COSTS, OBJECTIVES, Objective, SamplerChoice

__all__ = ["FOLLOWS_TRAIN", "OBJECTIVES", "OBJECTIVE_COSTS", "TASKS", "check_follows_train", "check_training",
           "group_settings", "instantiate_checked", "steps_list", "validate"]

TASKS = ("train_eval", "train", "eval", "schedules", "report", "optimize_steps", "export", "restore", "min_steps",
         "policies")
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


def group_settings(cls, cfg: DictConfig, group: str):
    """The frozen settings dataclass ``cls`` filled from the optional config group ``cfg.<group>`` (absent: all
    defaults); a key the dataclass lacks is refused with the list of valid keys."""
    node = cfg.get(group) or {}
    given = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    names = [f.name for f in fields(cls)]
    unknown = set(given) - set(names)
    if unknown:
        raise ValueError(f"{group} has no key(s) {sorted(unknown)}; its keys: {', '.join(names)}")
    return cls(**given)


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
    steps = steps_list(cfg)
    for n in steps:
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"steps must be integers, got {n!r}")
    if get_sampler(sampler.name).adaptive:
        if cfg.task == "optimize_steps":
            raise ValueError(f"task=optimize_steps fits step schedules; sampler {sampler.name!r} picks its own steps")
        plan_sampling(schedule, sampler.name, None, sampler.spacing, **sampler.options)
        logging.getLogger("diffsteps").warning(
            "sampler=%s picks its own steps (rtol, atol, max_nfe): steps=%s ignored, one evaluation row (labelled "
            "steps=%d) whose nfe is the realised mean NFE", sampler.name, steps, steps[0])
        steps = steps[:1]
    else:
        for n in steps:
            plan_sampling(schedule, sampler.name, n, sampler.spacing, **sampler.options)
    if sampler.guidance_interval is not None:  # the interval in the schedule's training-time range
        from ..sampling.guidance import check_guidance_options

        check_guidance_options(sampler.guidance_scale, sampler.guidance_interval, schedule.num_timesteps)
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
    check_loggers(cfg)  # last: a logger's class imports Lightning (seconds) — the checks above report without it
    return steps



# -- the evaluation's inputs and the config's keys: everything that used to fail after training -------------------
def primary_keys() -> set[str] | None:
    """The top-level keys of the primary config (conf/config.yaml) as its files compose it with this run's group
    choices — an experiment preset's own keys included — but without the command line's ``+key=…``/``++key=…``
    additions; None outside a Hydra run (e.g. a config from the compose API), where there is nothing to compare."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    if not HydraConfig.initialized() or not GlobalHydra.instance().is_initialized():
        return None
    hc = HydraConfig.get()
    overrides = OverridesParser.create().parse_overrides(list(hc.overrides.task))
    kept = [o.input_line for o in overrides if not (o.is_add() or o.is_force_add())]
    try:
        primary = GlobalHydra.instance().config_loader().load_configuration(hc.job.config_name, kept, RunMode.RUN)
    except Exception:  # noqa: BLE001 (Hydra composed this run with these overrides and more: no second opinion)
        return None
    return set(primary) - {"hydra"}


def check_top_level_keys(cfg: DictConfig) -> None:
    """Reject top-level keys the primary config does not have (``+foo=1``, ``+num_samples=…``): Hydra's ``+``
    appends any key by design, and nothing would read it, so a typo would silently change nothing."""
    from hydra.core.hydra_config import HydraConfig

    known = primary_keys()
    if known is None:
        return
    unknown = sorted(set(cfg) - known)
    if unknown:
        added = [o for o in HydraConfig.get().overrides.task
                 if o.lstrip("+").split("=", 1)[0].split(".", 1)[0] in unknown]
        raise ValueError(f"unknown top-level key(s) {', '.join(unknown)}"
                         + (f" (from {' '.join(added)})" if added else "")
                         + f"; the valid top-level keys: {', '.join(sorted(known))}. Settings go under their "
                         "section without '+', e.g. eval.num_samples=500")


def _int(name: str, value, minimum: int, meaning: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}{meaning}, got {value!r}")
    return value


def check_eval_config(cfg: DictConfig, schedule, steps: list[int]) -> None:
    """The evaluation settings that the config alone decides, checked before training (the data-dependent sizes:
    :func:`check_eval_data`): distinct step counts; grid and sample-file sizes (0: off); KID's subset size; the
    split names; the ELBO's variance; the trajectory reference (a deterministic sampler the schedule can run)."""
    from ..data.base import SPLITS
    from ..evaluation.likelihood import VARIANCES
    from ..sampling.registry import SAMPLERS, get_sampler

    repeated = sorted({n for n in steps if steps.count(n) > 1})
    if repeated:
        raise ValueError(f"steps={list(steps)} repeats {', '.join(map(str, repeated))}: each step count is one row "
                         "of the results, list each once")
    if cfg.task == "train":
        return
    e = cfg.eval
    _int("eval.kid_subset_size", e.kid_subset_size, 2, " (KID averages over subsets of this size)")
    for key in ("grid_size", "grid_columns", "save_samples"):
        _int(f"eval.{key}", e[key], 0, " (0: none)")
    if e.num_reference is not None:
        _int("eval.num_reference", e.num_reference, max(2, e.kid_subset_size),
             f" (FID needs 2 reference samples, KID eval.kid_subset_size={e.kid_subset_size}; null: the whole split)")
    if e.reference_split not in SPLITS:
        raise ValueError(f"unknown eval.reference_split {e.reference_split!r}; valid choices: {', '.join(SPLITS)}")
    elbo = e.elbo
    _int("eval.elbo.num_samples", elbo.num_samples, 0, " (0: no ELBO)")
    if elbo.num_samples > 0:
        if elbo.split not in SPLITS:
            raise ValueError(f"unknown eval.elbo.split {elbo.split!r}; valid choices: {', '.join(SPLITS)}")
        if elbo.variance not in VARIANCES:
            raise ValueError(f"unknown eval.elbo.variance {elbo.variance!r}; valid choices: {', '.join(VARIANCES)}")
    mse = e.mse
    _int("eval.mse.num_samples", mse.num_samples, 0, " (0: no trajectory error)")
    sampler: SamplerChoice = instantiate_checked(cfg.sampler)
    if mse.num_samples > 0 and sampler.deterministic:
        ref = get_sampler(mse.reference_sampler)  # unknown: the valid choices in the message
        if not ref.is_deterministic():
            raise ValueError(f"eval.mse.reference_sampler must be deterministic (it solves the probability-flow "
                             f"ODE), got {mse.reference_sampler!r}; choose one of: "
                             f"{', '.join(n for n, s in SAMPLERS.items() if s.is_deterministic())}")
        _int("eval.mse.reference_steps", mse.reference_steps, 2, " (its convergence check reruns it at half)")
        for n in (mse.reference_steps, mse.reference_steps // 2):
            try:
                plan_sampling(schedule, mse.reference_sampler, n, mse.reference_spacing)
            except ValueError as err:
                raise ValueError(f"the trajectory reference (eval.mse.reference_sampler={mse.reference_sampler}, "
                                 f"reference_steps={n}, reference_spacing={mse.reference_spacing}): {err}") from None


def _split_size(datamodule, split: str) -> int:
    # the stored split, not decoded: real_samples(None) would decode (and copy) a whole image split to float
    data = datamodule._split(split) if hasattr(datamodule, "_split") else datamodule.real_samples(None, split=split)
    return len(data)


def check_eval_data(cfg: DictConfig, datamodule, steps: list[int]) -> None:
    """The evaluation's sizes against the data, before training: the reference set (``eval.num_reference`` of
    ``eval.reference_split``) holds at least 2 samples and ``eval.kid_subset_size``; ``eval.elbo.num_samples`` fit
    in ``eval.elbo.split``; the evaluation plan builds. Loads the data (training would)."""
    from .evaluate import make_plan

    if cfg.task == "train":
        return
    e = cfg.eval
    split = e.reference_split
    size = _split_size(datamodule, split)
    name = getattr(datamodule, "name", type(datamodule).__name__)
    if e.num_reference is not None and e.num_reference > size:
        raise ValueError(f"eval.num_reference={e.num_reference} but the {split} split of {name} has {size} "
                         f"samples: lower it, or null for the whole split")
    reference = size if e.num_reference is None else e.num_reference
    if reference < max(2, e.kid_subset_size):
        raise ValueError(f"eval.kid_subset_size={e.kid_subset_size} exceeds the reference set: {reference} samples "
                         f"of the {split} split of {name}; lower kid_subset_size (KID needs a subset of the "
                         "reference and of the samples)")
    if e.elbo.num_samples > 0:
        elbo_size = _split_size(datamodule, e.elbo.split)
        if e.elbo.num_samples > elbo_size:
            raise ValueError(f"eval.elbo.num_samples={e.elbo.num_samples} but the {e.elbo.split} split of {name} "
                             f"has {elbo_size} samples: lower it (0: no ELBO) or choose eval.elbo.split="
                             + ("train" if e.elbo.split == "val" else "val"))
    make_plan(cfg, datamodule, steps)
