"""The public entry point: :func:`optimize_schedule` — timesteps fitted to a model, a sampler and a budget."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import torch

from ..core.schedules import Schedule
from ..core.spacings import make_timesteps, to_integer_timesteps
from ..sampling.api import ONE_CALL_PER_LEVEL
from ..sampling.registry import get_sampler
from .costs import HISTORY_COSTS, step_costs
from .differentiable import check_differentiable_options
from .dmn import dmn_order, dmn_timesteps
from .dp import dp_paths, dp_paths_history
from .elbo import elbo_chains
from .refine import refine_timesteps
from .teacher import (
    CountingModel,
    candidate_timesteps,
    check_request,
    rms_error,
    run_schedule,
    teacher_solve,
)

__all__ = ["FIXED_SPACINGS", "METHODS", "MIN_HELDOUT", "MIN_TRAIN", "optimize_schedule"]

_F64 = torch.float64
log = logging.getLogger("diffsteps")
METHODS = ("dp", "refine", "elbo", "dmn")
FIXED_SPACINGS = ("trailing", "karras", "logsnr", "linspace")
MIN_TRAIN, MIN_HELDOUT = 8, 4


def optimize_schedule(model: Callable, schedule: Schedule, *, sampler: str, nfe: int | Sequence[int],
                      noise: torch.Tensor | None, method: str = "dp", prediction: str = "epsilon",
                      candidates: int = 64, grid: str = "logsnr", teacher_solver: str = "dpmpp_3m",
                      teacher_substeps: int = 8, holdout: float = 0.25, init: str = "best", iterations: int = 150,
                      lr: float = 0.05, patience: int = 6, fixed: Sequence[str] = FIXED_SPACINGS,
                      data: torch.Tensor | None = None, variance: str = "posterior", discrete: bool = False,
                      levels: int = 256, seed: int = 0,
                      history: bool = True, decoupled: bool = False, radius: float = 0.0,
                      batch: int | None = None, sampler_options: dict | None = None):
    """Timesteps for ``sampler`` at budget ``nfe`` (model evaluations; a list gives one schedule per budget),
    optimised for ``model`` under ``schedule``. Returns ``(timesteps, report)`` — float64, decreasing, for
    ``diffsteps.sample(..., spacing=timesteps)`` — or, for a list of budgets, a list of such pairs.

    ``method``:
      - ``dp`` (GITS, Chen et al. 2024): a converged teacher solve from the training noises through ``candidates``
        levels on ``grid`` (``teacher_solver`` with ``teacher_substeps`` steps between candidates); the cost of one
        sampler step between every pair of teacher levels (:func:`~diffsteps.steps.costs.step_costs`: a multistep
        solver's step is its history-free first step); and the shortest K-step path for every K at once
        (:func:`~diffsteps.steps.dp.dp_paths`).
      - ``refine`` (LD3, Tong et al. 2025): gradient descent on the levels through a differentiable copy of the
        sampler (:mod:`~diffsteps.steps.differentiable`: ddim, euler, dpmpp_2m, heun, dpmpp_3m, unipc) to the
        teacher's endpoint, validated on the held-out noises, with the learning rate decayed on plateaus
        (:func:`~diffsteps.steps.refine.refine_timesteps`); starts from ``init``: ``dp``, ``dmn`` (DMN's levels,
        dpmpp_2m, dpmpp_3m, unipc), a fixed spacing's name, or ``best`` (default: from both the DP path and the fixed
        spacing with the lowest training error, keeping the run with the lower held-out error — a selection on the
        held-out noises, like the early stop).
        ``decoupled=True`` also learns LD3's separate model-evaluation times (dpmpp_2m, dpmpp_3m, unipc): the
        report then holds ``model_timesteps``, to pass as ``diffsteps.sample(..., spacing=timesteps,
        model_timesteps=report["model_timesteps"])``. ``radius``: LD3's soft teacher forcing (off at 0);
        ``batch``: training noises per iteration (all if None).
      - ``dmn`` (Xue et al. 2024): no model call — the levels minimising an analytic bound on a multistep
        data-prediction solver's error (dpmpp_2m, dpmpp_3m, unipc; :func:`~diffsteps.steps.dmn.dmn_timesteps`), the
        same for every model with this schedule; the teacher only measures the result against the fixed spacings.
      - ``elbo`` (Watson et al. 2021): for the ancestral ``ddpm`` sampler, the integer chain minimising the K-step
        ELBO on ``data`` (``noise`` unused), by a DP over pairwise KL terms (:func:`~diffsteps.steps.elbo.elbo_chains`);
        ``discrete=True`` scores the data with the discretised decoder on ``levels`` values (digits: 17), the bound
        the runner reports for discrete data, instead of the Gaussian density.

    ``noise`` (B, …): x at t = T−1; the last ``holdout`` fraction is held out (never used to optimise) and both
    errors are reported, each the RMS distance of the sampler's output from the teacher's endpoint, next to every
    ``fixed`` spacing's (also the median per-sample held-out error, and ``median_ratio`` against the best fixed
    median: a noise that flips mode can dominate an RMS). Integer-step samplers (ddim) get integer candidates and rounded refined timesteps. Every
    input is checked before the first model call."""
    t_start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
    opts = dict(sampler_options or {})
    budgets = check_request(schedule, sampler, nfe, **opts)
    spec = get_sampler(sampler)
    k_max = max(budgets.values())
    for name in fixed:
        make_timesteps(name, 2, schedule)  # unknown names and spacings this schedule cannot do fail here
    if method == "elbo":
        return _elbo(model, schedule, sampler, nfe, budgets, data, prediction, candidates, variance, seed, t_start,
                     discrete, levels)
    if not spec.is_deterministic(**opts):
        raise ValueError(f"method {method!r} needs a deterministic sampler (the step costs and the teacher's "
                         f"endpoint are functions of the noise); {sampler!r} with {opts or 'its defaults'} is "
                         "stochastic — use method='elbo' for ddpm")
    if method == "refine":
        check_differentiable_options(sampler, opts)
    if method == "dmn":
        dmn_order(sampler, opts)
    if method == "refine" and decoupled and sampler not in ONE_CALL_PER_LEVEL:
        raise ValueError(f"decoupled model times need one model call per level ({', '.join(ONE_CALL_PER_LEVEL)}); "
                         f"got {sampler!r}")
    if method == "refine" and init == "dmn":
        dmn_order(sampler, opts)
    elif method == "refine" and init not in ("dp", "best"):
        make_timesteps(init, 2, schedule)
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2:
        raise ValueError("noise must be a batch (B, …) of initial states x_{T−1}")
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    n_held = round(holdout * len(noise))
    n_train = len(noise) - n_held
    if n_train < MIN_TRAIN or n_held < MIN_HELDOUT:
        raise ValueError(f"too few teacher noises: {len(noise)} split {n_train} train / {n_held} held out; need "
                         f"at least {MIN_TRAIN} / {MIN_HELDOUT} (pass more noise or change holdout)")
    cand = candidate_timesteps(schedule, candidates, grid, integer=spec.integer_steps)
    if len(cand) < k_max + 1:
        raise ValueError(f"{len(cand)} candidate levels cannot hold {k_max} steps; raise candidates")

    counter = CountingModel(model)
    noise = noise.to(_F64)
    teacher = teacher_solve(counter, noise, schedule, cand, solver=teacher_solver, substeps=teacher_substeps,
                            prediction=prediction)
    teacher_calls = counter.calls
    log.info("teacher (%s, %d levels × %d substeps) on %d noises: %d model calls, %.1f s", teacher_solver,
             len(cand), teacher_substeps, len(noise), teacher_calls, time.perf_counter() - t_start)
    tr, ho = slice(0, n_train), slice(n_train, None)
    train_teacher = type(teacher)(teacher.t, teacher.states[:, tr], teacher.x0[:, tr], teacher.calls,
                                  teacher.settings)
    if method == "dmn":  # the bound needs no teacher, which only scores the result below
        paths, shared_seconds, shared_calls = {}, 0.0, 0
    elif method == "refine" and init not in ("dp", "best"):  # refine from dmn or a spacing: no DP path to start from
        paths, shared_seconds, shared_calls = {}, time.perf_counter() - t_start, counter.calls
    else:
        cost = step_costs(counter, schedule, sampler, train_teacher, prediction=prediction, **opts)
        if sampler in HISTORY_COSTS and history:
            paths = dp_paths_history(cost.numpy(), HISTORY_COSTS[sampler](schedule, train_teacher).numpy(), k_max)
        else:
            paths = dp_paths(cost.numpy(), k_max)
        shared_seconds, shared_calls = time.perf_counter() - t_start, counter.calls
    target = teacher.states[-1]
    results = []
    for n, k in budgets.items():
        t0, c0 = time.perf_counter(), counter.calls
        if method == "dmn":
            ts, bound = dmn_timesteps(schedule, k, order=dmn_order(sampler, opts),
                                      lower_order_final=opts.get("lower_order_final", True))
            report = {"method": method, "sampler": sampler, "nfe": n, "steps": k, "dmn": bound}
        elif not paths:
            ts, report = None, {"method": method, "sampler": sampler, "nfe": n, "steps": k}
        elif k not in paths:
            raise ValueError(f"no {k}-step path over {len(cand)} candidates")
        else:
            nodes, dp_cost = paths[k]
            ts = cand[nodes[:-1]].clone()
            report = {"method": method, "sampler": sampler, "nfe": n, "steps": k, "dp_cost": dp_cost}
        if method == "refine":
            starts = _refine_starts(init, ts, k, schedule, fixed, counter, sampler, noise[tr], target[tr],
                                    prediction, opts)
            runs = [(name, refine_timesteps(counter, schedule, sampler, start, (noise[tr], target[tr]),
                                            (noise[ho], target[ho]), prediction=prediction, iterations=iterations,
                                            lr=lr, patience=patience, decoupled=decoupled, radius=radius,
                                            batch=batch, seed=seed, options=opts)) for name, start in starts]
            # the validation (held-out) noises pick the run, as they pick the early-stopping iteration
            start_name, r = min(runs, key=lambda nr: nr[1].heldout_error)
            ts = to_integer_timesteps(r.timesteps) if spec.integer_steps else r.timesteps
            report.update(init=start_name, iterations=r.iterations, best_iteration=r.best_iteration,
                          refine_heldout_error_continuous=r.heldout_error)
            if r.model_timesteps is not None:
                report["model_timesteps"] = [float(v) for v in r.model_timesteps]
        calls, seconds = counter.calls - c0, time.perf_counter() - t0
        report["timesteps"] = [float(v) for v in ts]
        report.update(_evaluate(model, schedule, sampler, ts, noise, target, tr, ho, k, prediction, fixed, opts,
                                report.get("model_timesteps")))
        report["teacher"] = {**teacher.settings, "grid": grid, "calls": teacher_calls, "train_noises": n_train,
                             "heldout_noises": n_held}
        report["cost"] = {"model_calls": shared_calls + calls, "seconds": shared_seconds + seconds,
                          "shared_model_calls": shared_calls, "shared_seconds": shared_seconds}
        results.append((ts, report))
        log.info("%s NFE %d (%d steps, %s): held-out RMS %.4g against the best fixed spacing's %.4g (%s); %d model "
                 "calls, %.1f s%s", sampler, n, k, method, report["heldout_error"],
                 report["fixed"].get(report["best_fixed"], {}).get("heldout", math.nan), report["best_fixed"],
                 report["cost"]["model_calls"], report["cost"]["seconds"],
                 " (the teacher only scored it)" if method == "dmn" else
                 f" (the teacher's{' and the step costs' if paths else ''} shared by every budget included)")
    return results[0] if isinstance(nfe, int) else results


def _refine_starts(init, dp_ts, k, schedule, fixed, model, sampler, noise, target, prediction, opts):
    """(name, timesteps) refine starts from: ``init`` alone, or for ``best`` the DP path and the fixed spacing with
    the lowest training error (the DP's local costs ignore how early errors grow, a fixed spacing may start
    closer; both are refined and the held-out noises pick one)."""
    if init == "dp":
        return [("dp", dp_ts)]
    if init == "dmn":
        return [("dmn", dmn_timesteps(schedule, k, order=dmn_order(sampler, opts),
                                      lower_order_final=opts.get("lower_order_final", True))[0])]
    if init != "best":
        return [(init, make_timesteps(init, k, schedule))]
    options = {}
    for name in fixed:
        try:
            options[name] = make_timesteps(name, k, schedule)
        except ValueError:
            continue
    errs = {name: rms_error(run_schedule(model, noise, schedule, sampler, ts, prediction, **opts), target)
            for name, ts in options.items()}
    best = min(errs, key=errs.get)
    return [("dp", dp_ts), (best, options[best])]


def _evaluate(model, schedule, sampler, ts, noise, target, tr, ho, k, prediction, fixed, opts,
              model_ts=None) -> dict:
    """Train and held-out RMS errors of ``ts`` (with its decoupled ``model_ts``, if any) and of every fixed
    spacing at the same step count."""
    def errors(timesteps, model_timesteps=None):
        extra = {} if model_timesteps is None else {"model_timesteps": model_timesteps}
        out = run_schedule(model, noise, schedule, sampler, timesteps, prediction, **opts, **extra)
        # the median per-sample error too: a noise near a boundary between modes can flip mode and dominate an RMS
        per = (out[ho] - target[ho]).reshape(len(out[ho]), -1).square().mean(1).sqrt()
        return {"train": rms_error(out[tr], target[tr]), "heldout": rms_error(out[ho], target[ho]),
                "heldout_median": per.median().item()}

    mine = errors(ts, model_ts)
    table = {}
    for name in fixed:
        try:
            table[name] = errors(make_timesteps(name, k, schedule))
        except ValueError as err:  # a spacing this schedule or step count cannot make
            table[name] = {"error": str(err)}
    ok = {n: v for n, v in table.items() if "heldout" in v}
    best = min(ok, key=lambda n: ok[n]["heldout"]) if ok else None
    out = {"train_error": mine["train"], "heldout_error": mine["heldout"], "heldout_median": mine["heldout_median"],
           "fixed": table, "best_fixed": best}
    if best is not None:
        out["ratio"] = mine["heldout"] / ok[best]["heldout"]
        out["median_ratio"] = mine["heldout_median"] / min(v["heldout_median"] for v in ok.values())
    return out


def _elbo(model, schedule, sampler, nfe, budgets, data, prediction, candidates, variance, seed, t_start,
          discrete, levels):
    if sampler != "ddpm":
        raise ValueError(f"method 'elbo' optimises the chain of the ancestral sampler 'ddpm', got {sampler!r}")
    if not isinstance(data, torch.Tensor) or data.ndim < 2 or len(data) < MIN_TRAIN:
        raise ValueError(f"method 'elbo' needs data=<tensor (N, …)> with N ≥ {MIN_TRAIN} samples of the data")
    T = schedule.num_timesteps
    cand = torch.arange(T) if candidates >= T else torch.linspace(0, T - 1, candidates).round().long().unique()
    counter = CountingModel(model)
    chains, calls = elbo_chains(counter, data, schedule, cand, max(budgets.values()), prediction=prediction,
                                variance=variance, discrete=discrete, levels=levels,
                                generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t_start
    results = []
    for n, k in budgets.items():
        ch = chains[k]
        ts = ch.timesteps.flip(0).to(_F64)
        results.append((ts, {"method": "elbo", "sampler": sampler, "nfe": n, "steps": k, "elbo_bpd": ch.bpd,
                             "variance": variance, "decoder": f"discretised, {levels} levels" if discrete else "gaussian",
                             "seed": seed, "timesteps": [float(v) for v in ts],
                             "cost": {"model_calls": calls, "seconds": seconds}}))
    return results[0] if isinstance(nfe, int) else results
