"""``task=min_steps``: the fewest sampling steps whose objective meets a target, found by galloping then bisection
(:func:`diffsteps.steps.search.find_min_steps`) over step counts, each evaluated by the runner's own evaluation loop
(:func:`.evaluate.evaluate`: the same noise at every step count). Also :func:`prepare_model`, the train-or-reuse
preamble the step-policy runners share with ``run``."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from .validate import group_settings

log = logging.getLogger("diffsteps")

__all__ = ["MinStepsSettings", "min_steps_task", "prepare_model"]


@dataclass(frozen=True)
class MinStepsSettings:
    """conf/min_steps/default.yaml: ``target`` (the objective's metric must be ≤ it) or ``within`` (a fraction:
    within it of the value at ``reference_steps``), the step counts searched (``start`` … ``max_steps``; with
    ``sampler.spacing=optimized`` the budgets that have a cached schedule), ``local_scan`` candidates below the
    answer evaluated as well (for non-monotone curves)."""

    target: float | None = None
    within: float | None = None
    reference_steps: int = 200
    start: int = 1
    max_steps: int = 200
    local_scan: int = 0

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> MinStepsSettings:
        s = group_settings(cls, cfg, "min_steps")
        if (s.target is None) == (s.within is None):
            raise ValueError("task=min_steps needs exactly one of min_steps.target=<value of the objective> or "
                             "min_steps.within=<fraction, e.g. 0.05> (of the value at min_steps.reference_steps)")
        for name in ("reference_steps", "start", "max_steps"):
            v = getattr(s, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"min_steps.{name} must be a positive integer, got {v!r}")
        if s.start > s.max_steps:
            raise ValueError(f"min_steps.start={s.start} exceeds min_steps.max_steps={s.max_steps}")
        if isinstance(s.local_scan, bool) or not isinstance(s.local_scan, int) or s.local_scan < 0:
            raise ValueError(f"min_steps.local_scan must be an integer ≥ 0, got {s.local_scan!r}")
        return s


def prepare_model(cfg: DictConfig, steps: list[int], out_dir: Path, loggers=(), checkpoint: dict | None = None):
    """What ``run`` does before evaluating, for a task that evaluates step counts of its own choosing: validate the
    config (with ``steps`` as the step counts), build, train or reuse the checkpoint, write config.yaml and the
    checkpoint link. ``checkpoint``: ``ckpt_path`` already read by :func:`open_checkpoint` (whose config the caller
    needed first). Returns (schedule, datamodule, module)."""
    import lightning as L
    from hydra.utils import instantiate

    from ..reporting.files import save_config, symlink
    from .build import build
    from .checkpoints import load_for_eval, open_checkpoint
    from .train import default_progress_bar, train
    from .validate import check_eval_config, check_eval_data, validate

    if checkpoint is None:
        checkpoint = open_checkpoint(cfg)
    schedule = instantiate(cfg.schedule)
    with open_dict(cfg):
        given = cfg.steps
        cfg.steps = list(steps)
        validate(cfg, schedule)
        check_eval_config(cfg, schedule, list(steps))
        cfg.steps = given
    default_progress_bar(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg, schedule)
    check_eval_data(cfg, datamodule, list(steps))
    if cfg.ckpt_path:
        ckpt = load_for_eval(cfg, module, datamodule, checkpoint)
    else:
        ckpt, _ = train(cfg, module, datamodule, list(loggers), out_dir)
    save_config(cfg, out_dir / "config.yaml")
    symlink(Path(ckpt).resolve(), out_dir / "checkpoint.ckpt")
    return schedule, datamodule, module


def _candidates(cfg: DictConfig, s: MinStepsSettings) -> list[int]:
    spacing = cfg.sampler.get("spacing")
    if isinstance(spacing, str) and spacing.endswith((".yaml", ".yml")):
        raise ValueError(f"sampler.spacing={spacing} holds one step count; task=min_steps searches over step counts: "
                         "use sampler.spacing=optimized (every budget optimised for this model) or a named spacing")
    if spacing != "optimized":
        return list(range(s.start, s.max_steps + 1))
    from .optimize import schedule_cache_dir

    found = sorted({int(yaml.safe_load(p.read_text())["steps"]) for p in
                    schedule_cache_dir(cfg).glob(f"{cfg.sampler.name}_nfe*.yaml")})
    found = [n for n in found if s.start <= n <= s.max_steps]
    if not found:
        raise ValueError(f"sampler.spacing=optimized: no optimised {cfg.sampler.name} schedule for this model with "
                         f"{s.start} … {s.max_steps} steps in {schedule_cache_dir(cfg)}; make them with python run.py "
                         f"task=optimize_steps sampler={cfg.sampler.name} \"steps=[…]\"")
    return found


def min_steps_task(cfg: DictConfig) -> float:
    """Search, write ``min_steps.json`` / ``min_steps_curve.csv`` (and every evaluated row in metrics.json/.csv as it
    is measured), log to the loggers; return the step count found."""
    from ..reporting.files import write_csv, write_json
    from ..reporting.plots import plot_quality_vs_nfe
    from ..steps.search import Target, TargetUnreachable, find_min_steps
    from .evaluate import ResultsFile, best_effort, evaluate
    from .loggers import log_results, make_loggers, print_sync_hint
    from .objects import OBJECTIVE_FLOORS
    from .optimize import resolve_spacing
    from .validate import instantiate_checked

    s = MinStepsSettings.from_cfg(cfg)
    objective = instantiate_checked(cfg.objective)
    floor = OBJECTIVE_FLOORS.get(objective.name)
    if s.target is not None and floor is not None and s.target < floor[0]:
        raise ValueError(f"min_steps.target={s.target:g} is below the least value objective={objective.name} can take "
                         f"({floor[0]:g}: {objective.metric} is {floor[1]}), so no step count meets it; give a target "
                         f"≥ {floor[0]:g}, or min_steps.within=<fraction, e.g. 0.05> of the value at "
                         f"min_steps.reference_steps")
    candidates = _candidates(cfg, s)
    out_dir = Path(cfg.paths.output_dir)
    loggers = make_loggers(cfg, out_dir)
    first = candidates[0] if cfg.sampler.get("spacing") == "optimized" else candidates[-1]
    check = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(check):
        check.steps = [first]
    resolve_spacing(check)  # the optimised schedule exists and fits; a named spacing reaches max_steps
    with open_dict(cfg):
        spacing = cfg.sampler.spacing
        cfg.sampler.spacing = check.sampler.spacing if spacing == "optimized" else spacing
    schedule, datamodule, module = prepare_model(cfg, [first], out_dir, loggers)
    with open_dict(cfg):
        cfg.sampler.spacing = spacing
    results = ResultsFile(out_dir, objective)
    t0 = time.perf_counter()
    cost = {"evaluations": 0, "sampling_model_calls": 0}

    def metric(n: int) -> float:
        sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        with open_dict(sub):
            sub.steps = [n]
            # only what the objective reads: the trajectory reference (600 model calls per sample) and the ELBO
            # would otherwise be recomputed at every step count the search visits
            if objective.name != "mse":
                sub.eval.mse.num_samples = 0
            if objective.name != "elbo":
                sub.eval.elbo.num_samples = 0
        resolve_spacing(sub)
        rows, _ = evaluate(sub, module, datamodule, schedule, [n], out_dir, on_row=results.add)
        row = rows[0]
        cost["evaluations"] += 1
        cost["sampling_model_calls"] += row["nfe"] * row["num_samples"]
        if objective.metric not in row:
            raise ValueError(f"objective={objective.name} ({objective.metric}) was not measured for sampler "
                             f"{cfg.sampler.name} on {datamodule.name}; measured: {', '.join(row)}")
        return float(row[objective.metric])

    reference = metric(s.reference_steps) if s.within is not None else None
    target = Target(absolute=s.target, within=s.within, reference=reference)
    summary = {"objective": objective.name, "metric": objective.metric, "target": str(target),
               "sampler": cfg.sampler.name, "spacing": OmegaConf.to_container(cfg.sampler, resolve=True)["spacing"],
               "reference_steps": s.reference_steps if reference is not None else None, "reference_value": reference,
               "settings": asdict(s)}

    def finish(curve: dict[int, float]) -> None:
        summary["curve"] = {int(n): v for n, v in curve.items()}
        summary["cost"] = {**cost, "seconds": time.perf_counter() - t0,
                           "note": "model calls of sampling only; the trajectory reference (objective=mse) and "
                                   "FID features are extra"}
        write_json(out_dir / "min_steps.json", summary)
        write_csv(out_dir / "min_steps_curve.csv", [{"steps": n, objective.metric: v, "meets": target.met(v)}
                                                   for n, v in sorted(curve.items())])
        rows = sorted(results.rows, key=lambda r: r["steps"])
        best_effort("the quality-vs-NFE plots", plot_quality_vs_nfe, rows, out_dir)
        log_results(rows, loggers, out_dir)

    try:
        found = find_min_steps(metric, target, candidates=candidates, local_scan=s.local_scan)
    except TargetUnreachable as err:
        summary.update(status="unreachable", best={"steps": err.best[0], "value": err.best[1]})
        finish(err.curve)
        raise ValueError(f"task=min_steps: {err}; every evaluated step count is in {out_dir / 'metrics.csv'} and "
                         f"{out_dir / 'min_steps.json'}") from None
    summary.update(status="found", min_steps=found.steps, value=found.value, evaluations=found.evaluations,
                   bracket=list(found.bracket), violations=[list(v) for v in found.violations])
    finish(found.curve)
    if found.violations:
        log.warning("the %s curve is not monotone in the step count: %s meet the target while a larger count does "
                    "not (pairs %s); %d steps is a boundary of the evaluated curve (its predecessor fails), not "
                    "necessarily the smallest count that meets it — min_steps.local_scan=<w> checks w more below",
                    objective.metric, sorted({a for a, _ in found.violations}), found.violations, found.steps)
    for lg in loggers:
        lg.finalize("success")
    print_sync_hint(loggers)
    print(f"min_steps: {found.steps} steps ({objective.metric} = {found.value:.6g}, target {target}); "
          f"{found.evaluations} evaluations ({cost['evaluations']} with the reference), "
          f"{cost['sampling_model_calls']} model calls, {summary['cost']['seconds']:.1f} s; results in {out_dir}")
    return float(found.steps) if math.isfinite(found.value) else math.nan
