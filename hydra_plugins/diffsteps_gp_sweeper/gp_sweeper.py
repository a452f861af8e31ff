"""The ``gp`` sweeper: Bayesian optimisation of the float a Hydra task returns (see ``core.py`` for the algorithm).

Files in ``hydra.sweep.dir``: ``sweep_state.yaml`` (every finished trial, rewritten after each batch; re-running the
same command with the same ``hydra.sweep.dir`` resumes from it), ``optimization_results.yaml`` (best_params,
best_value, n_trials, n_failed and all trials), ``convergence.png`` and ``partial_dependence.png``; ``multirun.yaml``
as Hydra's basic sweeper writes it. Job folders are numbered on across resumes.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from . import config as _config  # noqa: F401  registers hydra/sweeper=gp wherever this module is imported
from .core import (
    ACQ_FUNCS,
    Dim,
    Search,
    SweepError,
    TooManyFailures,
    Trial,
    minimize,
    parse_space,
)

log = logging.getLogger(__name__)

STATE, RESULTS = "sweep_state.yaml", "optimization_results.yaml"


def _flatten(params: Any, prefix: str = "") -> List[str]:
    """``{optimizer: {lr: spec}, "loss.w": spec}`` → ``["optimizer.lr=spec", "loss.w=spec"]``; a null drops the key."""
    out = []
    for k, v in (params or {}).items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        elif v is not None:
            out.append(f"{prefix}{k}={v}")
    return out


def _write_yaml(data: Any, path: Path) -> None:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # best_params is also a trial's params: write both out
            return True

    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True))
    os.replace(tmp, path)  # a sweep killed mid-write keeps the previous state


def _names_schedule(spacing: Any) -> bool:
    """Whether a ``sampler.spacing`` value names an optimised step schedule rather than a fixed spacing."""
    return isinstance(spacing, str) and (spacing == "optimized" or spacing.endswith((".yaml", ".yml")))


def _check_schedule(cfg: DictConfig) -> None:
    """diffsteps' own check (``runner.optimize.resolve_spacing``: the cached schedule for this model, sampler and
    step count, or the file's model key, sampler and length), on a copy of one trial's config."""
    from diffsteps.runner.optimize import resolve_spacing

    task = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(task):
        task.pop("hydra", None)
    try:
        resolve_spacing(task)
    except (ValueError, FileNotFoundError) as e:
        raise SweepError(f"GP sweep: sampler.spacing={cfg.sampler.spacing} with steps={cfg.steps} cannot be "
                         f"sampled: {e}") from None


class GPSweeper(Sweeper):
    """Asks the GP for ``n_jobs`` points at a time, launches them as one batch through the configured launcher and
    tells it the returned objectives, until ``n_calls`` trials are done."""

    def __init__(self, n_calls: int, n_initial_points: int, acq_func: str, random_state: Optional[int], n_jobs: int,
                 max_failure_rate: float, params: Any = None, wandb: Any = None) -> None:
        super().__init__()
        if acq_func not in ACQ_FUNCS:
            raise SweepError(f"hydra.sweeper.acq_func={acq_func!r}: valid choices: {', '.join(ACQ_FUNCS)}")
        if n_jobs < 1:
            raise SweepError(f"hydra.sweeper.n_jobs={n_jobs}: need at least 1 trial per batch")
        if n_initial_points < 1 or n_calls < n_initial_points:
            raise SweepError(f"hydra.sweeper.n_calls={n_calls} with n_initial_points={n_initial_points}: need "
                             "1 <= n_initial_points <= n_calls (the GP needs random points to start from)")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise SweepError(f"hydra.sweeper.max_failure_rate={max_failure_rate}: must lie in [0, 1]")
        self.n_calls, self.n_initial_points, self.acq_func = n_calls, n_initial_points, acq_func
        self.random_state, self.n_jobs, self.max_failure_rate = random_state, n_jobs, max_failure_rate
        self.params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else params
        self.wandb = OmegaConf.to_container(wandb, resolve=True) if isinstance(wandb, DictConfig) else (wandb or {})
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    # -- the sweep ----------------------------------------------------------------------------------------------------
    def sweep(self, arguments: List[str]) -> Dict[str, Any]:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        dims, fixed = parse_space(_flatten(self.params) + list(arguments), parser)
        if not dims:
            raise SweepError("hydra.sweeper.params and the command line hold no sweep "
                             "(e.g. 'steps=int(interval(5,50))')")
        self._check_composes(dims, fixed)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        space = {d.name: str(d.dimension) for d in dims}
        done = self._load_state(sweep_dir / STATE, space, fixed)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        search = Search(dims, self.n_initial_points, self.acq_func, self.random_state, done)
        if done:
            log.info(f"GP sweep: resuming from {len(done)} trials in {sweep_dir / STATE}")
        log.info(f"GP sweep over {', '.join(f'{k}: {v}' for k, v in space.items())}; {self.n_calls} trials in "
                 f"batches of {self.n_jobs}" + (f", fixed: {' '.join(fixed)}" if fixed else ""))

        def evaluate(xs: List[list], first: int) -> List[Any]:
            batch = [fixed + search.overrides(x) for x in xs]
            results = []
            for r in self.launcher.launch(batch, initial_job_idx=first):
                try:
                    results.append(r.return_value)
                except Exception as e:  # a failed job re-raises its exception here
                    results.append(e)
            return results

        def on_batch(batch: List[Trial]) -> None:
            for t in batch:
                shown = f"{t.value:.6g}" if t.value is not None else f"FAILED ({t.error})"
                log.info(f"  trial #{t.number}: {self._show(t.params)} -> {shown}")
            best = search.best
            log.info(f"batch of jobs #{batch[0].number}-#{batch[-1].number} done, {len(search.trials)}/"
                     f"{self.n_calls} trials; best so far: "
                     + (f"{best.value:.6g} at #{best.number} ({self._show(best.params)})" if best else "none"))
            _write_yaml({"version": 1, "space": space, "fixed": fixed,
                         "trials": [t.as_dict() for t in search.trials]}, sweep_dir / STATE)
            _write_yaml(self._results(search, space, fixed), sweep_dir / RESULTS)

        try:
            minimize(search, evaluate, self.n_calls, self.n_jobs, self.max_failure_rate, on_batch)
        except TooManyFailures as e:
            raise TooManyFailures(f"GP sweep stopped: {e}. Trials so far: {sweep_dir / RESULTS}") from None
        results = self._results(search, space, fixed)
        _write_yaml(results, sweep_dir / RESULTS)
        if search.best is None:
            raise TooManyFailures(f"GP sweep: every trial failed; see {sweep_dir / RESULTS}")
        from .report import log_to_wandb, save_plots

        plots = save_plots(search, sweep_dir)
        if self.wandb.get("enabled"):
            log_to_wandb(results, plots, sweep_dir, self.wandb)
        log.info(f"GP sweep done: best {results['best_value']:.6g} at {self._show(results['best_params'])} "
                 f"(job #{results['best_job']}); results in {sweep_dir / RESULTS}")
        return results

    # -- helpers ------------------------------------------------------------------------------------------------------
    def _check_composes(self, dims: List[Dim], fixed: List[str]) -> None:
        """Compose the task config at the lower corner of the space, and once per category of each categorical
        dimension (these may be config-group choices), so that an unknown key or choice fails before any trial. Where
        a composed ``sampler.spacing`` names an optimised schedule (``optimized`` or a schedule YAML), it must exist
        for the model and sampler at every step count the sweep may pair it with: each value of a ``steps``
        dimension is checked too (:func:`_check_schedule`)."""
        from skopt.space import Categorical

        corner = [d.dimension.categories[0] if isinstance(d.dimension, Categorical) else d.dimension.low
                  for d in dims]
        points = [corner] + [corner[:i] + [c] + corner[i + 1:] for i, d in enumerate(dims)
                             if isinstance(d.dimension, Categorical) for c in d.dimension.categories[1:]]
        steps_at = next((i for i, d in enumerate(dims) if d.name == "steps"), None)
        for x in points:
            cfg = self._compose(dims, fixed, x)
            if not _names_schedule(OmegaConf.select(cfg, "sampler.spacing")):
                continue
            if steps_at is None:
                _check_schedule(cfg)
                continue
            dim = dims[steps_at].dimension
            for v in dim.categories if isinstance(dim, Categorical) else range(dim.low, dim.high + 1):
                _check_schedule(self._compose(dims, fixed, x[:steps_at] + [v] + x[steps_at + 1:]))

    def _compose(self, dims: List[Dim], fixed: List[str], x: list) -> DictConfig:
        overrides = fixed + [d.override(d.coordinate(v)) for d, v in zip(dims, x, strict=True)]
        try:
            return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        except Exception as e:
            hint = ("\n(the default search space includes loss.denoise_weight, which loss=vlb does not have: "
                    "choose another loss, or drop it with '~hydra.sweeper.params.loss')"
                    if "denoise_weight" in str(e) else "")
            raise SweepError(f"GP sweep: the search space does not fit the config ({' '.join(overrides)}):\n"
                             f"{e}{hint}") from None

    @staticmethod
    def _load_state(path: Path, space: Dict[str, str], fixed: List[str]) -> List[Trial]:
        if not path.exists():
            return []
        import yaml

        state = yaml.safe_load(path.read_text())
        if state.get("space") != space or state.get("fixed") != fixed:
            raise SweepError(f"{path} holds a sweep over {state.get('space')} with fixed overrides "
                             f"{state.get('fixed')}, not {space} with {fixed}: resume with the same search space and "
                             "overrides, or choose a new hydra.sweep.dir")
        return [Trial(**t) for t in state["trials"]]

    def _results(self, search: Search, space: Dict[str, str], fixed: List[str]) -> Dict[str, Any]:
        best = search.best
        return {
            "best_params": best.params if best else None,
            "best_value": best.value if best else None,
            "best_job": best.number if best else None,
            "n_trials": len(search.trials),
            "n_failed": search.n_failed,
            "sweeper": {"n_calls": self.n_calls, "n_initial_points": self.n_initial_points, "acq_func": self.acq_func,
                        "random_state": self.random_state, "n_jobs": self.n_jobs},
            "space": space,
            "fixed": fixed,
            "trials": [{"job": t.number, "params": t.params, "value": t.value, "status": t.status, "error": t.error}
                       for t in search.trials],
        }

    @staticmethod
    def _show(params: Dict[str, Any]) -> str:
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
                        for k, v in params.items())
