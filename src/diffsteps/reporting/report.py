"""Reports over finished runs: the noise-schedule figure (``task=schedules``), summaries of a Hydra multirun
(``task=report`` and the :class:`MultirunSummary` callback): every job's ``metrics.json`` as flat rows, a table
sorted by configuration and NFE, quality-versus-NFE figures and their Pareto fronts.

Kept cheap to import: Hydra instantiates the callback in every process it starts, so torch and matplotlib are
imported inside the functions that draw or build schedules.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from hydra.experimental.callback import Callback

from .files import atomic_open, write_csv, write_text

__all__ = ["schedule_figure", "collect", "pareto_front", "summarize", "run_report", "aggregate_seeds", "mean_interval",
           "MultirunSummary", "NoResultsError", "SUMMARY_METRICS"]

log = logging.getLogger("diffsteps.report")

# plots.CURVE_METRICS, kept here too: importing plots (matplotlib) would slow every Hydra start
SUMMARY_METRICS = ("fid", "kid_mean", "nll", "mse", "mse_median", "elbo_bpd")
# overrides that vary inside one job's rows (steps) or only label the run: never a configuration group
_NOT_GROUP_KEYS = ("steps",)
# overrides that only repeat a configuration with other random numbers: aggregated over, never a group of their own
SEED_KEYS = ("seed", "data.seed", "eval.noise_seed", "eval.kid_seed")
# what identifies one configuration's row across seeds, besides the non-seed overrides
_POINT_KEYS = ("sampler", "spacing", "steps")
# settings read from each job's config.yaml: what a reader needs to tell runs apart even if no override named them
_CONFIG_FIELDS = {"schedule": "schedule.name", "zero_terminal_snr": "schedule.zero_terminal_snr",
                  "loss": "loss.kind", "prediction": "loss.prediction", "data": "data._target_", "seed": "seed"}


class NoResultsError(FileNotFoundError):
    """A report was asked of a folder that holds no ``metrics.json``."""


# -- noise schedules ------------------------------------------------------------------------------------------------
def schedule_figure(out_dir: str | Path, num_timesteps: int = 1000, names: Sequence[str] | None = None,
                    zero_terminal_snr: Sequence[str] = ("linear",)) -> Path:
    """Build the schedules ``names`` (default: every one in ``schedules.SCHEDULES``) plus the zero-terminal-SNR
    variant of each in ``zero_terminal_snr`` (labelled ``<name>_ztsnr``), and write ``schedules.png`` (see
    :func:`plots.plot_schedules`) and ``schedules.csv`` (the full curves: ``t``, ``t_over_T`` and per schedule
    ``<label>_beta``, ``<label>_alpha_bar``, ``<label>_log_snr``, float64 written exactly) to ``out_dir``.
    Returns the PNG's path."""
    from ..core.schedules import SCHEDULES, make_schedule
    from .plots import plot_schedules

    names = list(SCHEDULES) if names is None else list(names)
    schedules = {n: make_schedule(n, num_timesteps) for n in names}
    for n in zero_terminal_snr:
        schedules[f"{n}_ztsnr"] = make_schedule(n, num_timesteps, zero_terminal_snr=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_schedule_csv(schedules, out_dir / "schedules.csv")
    return plot_schedules(schedules, out_dir / "schedules.png")


def _write_schedule_csv(schedules: dict, path: Path) -> None:
    columns = {"t": None, "t_over_T": None}
    for label, s in schedules.items():
        columns.update({f"{label}_beta": s.betas, f"{label}_alpha_bar": s.alphas_cumprod,
                        f"{label}_log_snr": s.log_snr})
    T = next(iter(schedules.values())).num_timesteps
    with atomic_open(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for t in range(T):
            # repr of a Python float round-trips float64 exactly (and writes −∞ as "-inf")
            w.writerow([t, t / T, *(v[t].item() for k, v in columns.items() if v is not None)])


# -- collecting a sweep ---------------------------------------------------------------------------------------------
def collect(sweep_dir: str | Path) -> list[dict]:
    """Every job's ``metrics.json`` under ``sweep_dir`` as flat rows, one per (job, step count).

    Each row holds the metrics row itself (sampler, spacing, steps, nfe, timings, quality) plus ``job`` (Hydra's job
    number, else the folder's path relative to ``sweep_dir``), ``dir``, the settings in ``_CONFIG_FIELDS`` read from
    the job's ``config.yaml``, ``overrides`` (the job's ``.hydra/overrides.yaml`` joined by spaces) and ``group``:
    the overrides that differ between jobs, ``steps`` excepted, e.g. ``"sampler=heun schedule=cosine"`` (the sampler
    name when no override differs). The override values behind ``group`` are also columns of their own. Raises
    ``FileNotFoundError`` for a missing folder and :class:`NoResultsError` for one without results."""
    return _collect(sweep_dir)[0]


def _collect(sweep_dir: str | Path) -> tuple[list[dict], list[str]]:
    """:func:`collect`'s rows and the override keys that make up their groups."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {sweep_dir}")
    files = sorted(sweep_dir.rglob("metrics.json"), key=lambda p: _job_sort_key(p.parent, sweep_dir))
    jobs = [job for p in files if (job := _read_job(p.parent, sweep_dir)) is not None and job["rows"]]
    if not jobs:
        raise NoResultsError(f"no results under {sweep_dir}: no job there finished its evaluation (a job writes "
                             f"<sweep dir>/<job num>/metrics.json after sampling)")
    varying = _varying_keys([j["overrides"] for j in jobs])
    rows = []
    for job in jobs:
        chosen = {k: job["overrides"].get(k, "") for k in varying}
        for metrics_row in job["rows"]:
            group = " ".join(f"{k}={v}" for k, v in chosen.items()) or str(metrics_row.get("sampler", "all"))
            # the override values last: they are what the user typed, e.g. data=toy2d rather than the class name
            rows.append({"job": job["job"], "group": group, **job["config"], **metrics_row, **chosen,
                         "overrides": " ".join(job["override_list"]), "dir": str(job["dir"])})
    return rows, varying


def _job_sort_key(job_dir: Path, sweep_dir: Path) -> tuple:
    rel = job_dir.relative_to(sweep_dir).parts
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in rel)


def _read_job(job_dir: Path, sweep_dir: Path) -> dict[str, Any] | None:
    """One job's rows, overrides and config settings; None (with a warning) when its metrics.json is unreadable."""
    from omegaconf import OmegaConf

    try:
        rows = json.loads((job_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        log.warning("skipping %s: unreadable metrics.json (%s)", job_dir, err)
        return None
    if isinstance(rows, dict):
        rows = [rows]
    override_file = job_dir / ".hydra" / "overrides.yaml"
    override_list = [str(o) for o in OmegaConf.load(override_file)] if override_file.is_file() else []
    config = {}
    if (job_dir / "config.yaml").is_file():
        cfg = OmegaConf.load(job_dir / "config.yaml")
        for name, key in _CONFIG_FIELDS.items():
            value = OmegaConf.select(cfg, key, default=None)
            if value is not None:
                config[name] = value.rsplit(".", 1)[-1] if name == "data" else value
    rel = job_dir.relative_to(sweep_dir)
    job: Any = int(rel.name) if rel.name.isdigit() else (str(rel) if rel.parts else ".")
    hydra_file = job_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        num = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.num", default=None)
        job = num if isinstance(num, int) else job
    return {"job": job, "dir": job_dir, "rows": rows, "config": config, "override_list": override_list,
            "overrides": _parse_overrides(override_list)}


def _parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """``["+experiment=x", "sampler.spacing=karras"]`` → ``{"experiment": "x", "sampler.spacing": "karras"}``;
    deletions (``~key``) keep their marker in the key, so they never collide with a setting of that key."""
    parsed = {}
    for o in overrides:
        key, _, value = o.partition("=")
        parsed[key.lstrip("+")] = value
    return parsed


def _varying_keys(overrides: list[dict[str, str]]) -> list[str]:
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    return [k for k in keys if k not in _NOT_GROUP_KEYS and len({o.get(k) for o in overrides}) > 1]


# -- Pareto front ---------------------------------------------------------------------------------------------------
def _value(row: dict, key: str) -> float | None:
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def pareto_front(rows: list[dict], cost: str = "nfe", metric: str = "fid") -> list[dict]:
    """The rows no other row dominates, lower being better for both ``cost`` and ``metric``: a row is dominated
    when another has ≤ cost and ≤ metric, one of them strictly. Rows with equal (cost, metric) do not dominate each
    other, so both stay. Rows lacking either value (or holding NaN) are left out. Returned by increasing cost, ties
    in input order; O(n log n)."""
    pts = [(c, m, i) for i, r in enumerate(rows)
           if (c := _value(r, cost)) is not None and (m := _value(r, metric)) is not None]
    pts.sort()
    front, best_cheaper = [], math.inf  # best metric among strictly cheaper rows
    i = 0
    while i < len(pts):
        j = i
        while j < len(pts) and pts[j][0] == pts[i][0]:
            j += 1
        group_best = pts[i][1]  # sorted by metric within a cost: the first is this cost's best
        if group_best < best_cheaper:
            front.extend(rows[k] for c, m, k in pts[i:j] if m == group_best)
            best_cheaper = group_best
        i = j
    return front


# -- uncertainty over seeds -----------------------------------------------------------------------------------------
def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, standard deviation, half-width) of the Student-t interval of the mean of ``values``:
    x̄ ± t_{(1+level)/2, n−1} · s/√n with s the sample standard deviation (n − 1 in the denominator); the seeds of a
    multirun are n independent draws of the whole pipeline (data split, initialisation, noise, KID subsets). One
    value has no spread: s and the half-width are NaN."""
    import numpy as np
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    if n == 1:
        return float(x[0]), math.nan, math.nan
    sd = float(x.std(ddof=1))
    return float(x.mean()), sd, float(t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))


def aggregate_seeds(rows: list[dict], varying: Sequence[str], metrics: Sequence[str] = SUMMARY_METRICS,
                    level: float = 0.95) -> list[dict]:
    """A multirun over seeds (``-m seed=0,1,2``, with any other overrides) as one row per configuration and point
    — the overrides in ``varying`` except :data:`SEED_KEYS`, and (sampler, spacing, steps) — holding ``n_seeds``,
    ``seeds``, the mean of ``nfe``, ``sample_seconds`` and ``kid_std`` (KID's own spread over subsets), and per
    metric ``<m>`` (the mean over seeds), ``<m>_sd`` and ``<m>_ci`` (the half-width of the ``level`` interval,
    :func:`mean_interval`). ``group`` names the configuration without the seed. Empty when every row has the same
    seed."""
    if len({str(r.get("seed")) for r in rows}) < 2:
        return []
    keys = [k for k in varying if k not in SEED_KEYS]
    points: dict[tuple, list[dict]] = {}
    for r in rows:
        points.setdefault((*(str(r.get(k, "")) for k in keys), *(str(r.get(k)) for k in _POINT_KEYS)), []).append(r)
    out = []
    for key, same in points.items():
        first = same[0]
        row = {"group": " ".join(f"{k}={first.get(k, '')}" for k in keys) or str(first.get("sampler", "all")),
               **{k: first.get(k) for k in (*keys, *_POINT_KEYS)}, "n_seeds": len(same),
               "seeds": ",".join(sorted({str(r.get("seed")) for r in same}, key=lambda v: (len(v), v)))}
        for k in ("nfe", "sample_seconds", "kid_std"):
            vals = [v for r in same if (v := _value(r, k)) is not None]
            if vals:  # NFE is the same for every seed: kept as it is (an int)
                row[k] = first[k] if len(set(vals)) == 1 else sum(vals) / len(vals)
        for m in metrics:
            vals = [v for r in same if (v := _value(r, m)) is not None]
            if vals:
                row[m], row[f"{m}_sd"], row[f"{m}_ci"] = mean_interval(vals, level)
        out.append(row)
    out.sort(key=lambda r: (str(r["group"]), _value(r, "nfe") or 0.0, _value(r, "steps") or 0.0))
    return out


# -- summary --------------------------------------------------------------------------------------------------------
def summarize(sweep_dir: str | Path, metrics: Sequence[str] = SUMMARY_METRICS, html: bool = True) -> dict[str, Any]:
    """Collect a sweep (:func:`collect`) and write into ``sweep_dir``: ``summary.csv`` (every row, every column),
    ``summary.md`` (a table sorted by configuration group and NFE, with the Pareto-optimal rows marked), and for
    each of ``metrics`` that some row holds ``summary_<metric>_vs_nfe.png`` (quality against NFE and against
    sampling time, a line per group, the Pareto front drawn) and ``pareto_<metric>.csv`` (the NFE front).

    A multirun over seeds (:func:`aggregate_seeds`) also gets ``summary_seeds.csv`` and ``summary_seeds.md``; its
    figures and fronts are then of the means over seeds, each point with its 95 % interval as an error bar. Without
    seeds, KID's points carry ± its standard deviation over subsets. ``html``: also ``report.html``
    (:func:`~.html.sweep_page`). Returns ``{"rows": n, "metrics": [...], "files": [paths], "pareto": {metric:
    rows}, "seeds": aggregated rows, "html": path or None}``."""
    from .plots import plot_sweep_metric

    sweep_dir = Path(sweep_dir)
    rows, varying = _collect(sweep_dir)
    rows.sort(key=_row_order)
    present = [m for m in metrics if any(_value(r, m) is not None for r in rows)]
    seeds = aggregate_seeds(rows, varying, present)
    drawn = seeds or rows  # what the figures and fronts are of: means over seeds when there are seeds
    fronts = {m: pareto_front(drawn, "nfe", m) for m in present}
    files = [_write_csv(rows, sweep_dir / "summary.csv")]
    ident = [k for k in varying if not (seeds and k in SEED_KEYS)] or ["sampler"]
    files.append(write_text(sweep_dir / "summary.md", _markdown(rows, varying or ["sampler"], present,
                                                               {} if seeds else fronts, sweep_dir)))
    if seeds:
        files.append(_write_csv(seeds, sweep_dir / "summary_seeds.csv"))
        files.append(write_text(sweep_dir / "summary_seeds.md", _seeds_markdown(seeds, ident, present, fronts)))
    for m in present:
        have = [r for r in drawn if _value(r, m) is not None and _value(r, "nfe") is not None]
        costs = {"nfe": fronts[m]}
        if all(_value(r, "sample_seconds") is not None for r in have):
            costs["sample_seconds"] = pareto_front(have, "sample_seconds", m)
        errors = f"{m}_ci" if seeds else ("kid_std" if m == "kid_mean" else None)
        files.append(plot_sweep_metric(have, m, sweep_dir / f"summary_{m}_vs_nfe.png", costs, errors=errors))
        files.append(_write_csv(fronts[m], sweep_dir / f"pareto_{m}.csv", columns=_columns(drawn)))
    from .trajectory import gather_samplers_grid

    grid = gather_samplers_grid(sweep_dir)  # every run's result from the same noise, when the runs saved one
    if grid is not None:
        files.append(grid)
    result = {"rows": len(rows), "metrics": present, "files": files, "pareto": fronts, "seeds": seeds,
              "html": None}
    if html:
        from .html import sweep_page

        result["html"] = sweep_page(sweep_dir, rows, seeds, fronts)
    return result


def run_report(run_dir: str | Path, metrics: Sequence[str] = SUMMARY_METRICS) -> Path:
    """``<run_dir>/report.html`` (:func:`~.html.run_page`) from the run's ``metrics.json``, with the NFE Pareto front
    of each of ``metrics`` it holds. Returns its path."""
    from .html import run_page

    run_dir = Path(run_dir)
    rows = json.loads((run_dir / "metrics.json").read_text())
    rows = [rows] if isinstance(rows, dict) else rows
    return run_page(run_dir, rows, {m: pareto_front(rows, "nfe", m) for m in metrics
                                    if any(_value(r, m) is not None for r in rows)})


def _seeds_markdown(seeds: list[dict], ident: list[str], metrics: list[str], fronts: dict[str, list[dict]]) -> str:
    on_front = {m: {id(r) for r in fronts[m]} for m in metrics}
    cols = [*ident, "steps", "nfe", "n_seeds", *metrics, "pareto"]
    lines = ["# Mean over seeds ± 95 % interval (Student t)", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in seeds:
        cells = [_fmt(r.get(c, "")) for c in (*ident, "steps", "nfe", "n_seeds")]
        cells += [f"{_fmt(r[m])} ± {_fmt(r[f'{m}_ci'])}" if m in r else "" for m in metrics]
        cells.append(", ".join(m for m in metrics if id(r) in on_front[m]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _row_order(r: dict) -> tuple:
    return (str(r["group"]), _value(r, "nfe") or 0.0, _value(r, "steps") or 0.0, str(r["job"]))


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _write_csv(rows: list[dict], path: Path, columns: list[str] | None = None) -> Path:
    return write_csv(path, rows, columns or _columns(rows))


def _markdown(rows: list[dict], ident: list[str], metrics: list[str], fronts: dict[str, list[dict]],
              sweep_dir: Path) -> str:
    cols = ["job", *ident, "steps", "nfe", "sample_seconds", *metrics, "pareto"]
    on_front = {m: {id(r) for r in fronts.get(m, ())} for m in metrics}
    lines = [f"# Sweep summary: {sweep_dir}", "",
             f"{len(rows)} rows from {len({r['dir'] for r in rows})} jobs; lower is better for every metric; "
             "`pareto` lists the metrics for which the row is on the NFE–quality Pareto front.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [_fmt(r.get(c, "")) for c in cols[:-1]]
        cells.append(", ".join(m for m in metrics if id(r) in on_front[m]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


# -- Hydra callback -------------------------------------------------------------------------------------------------
class MultirunSummary(Callback):
    """Summarize a multirun when it ends (:func:`summarize` on ``hydra.sweep.dir``). Register it under
    ``hydra.callbacks``. A sweep whose jobs all failed gets a warning, not an error: the sweep's own failure is what
    the user needs to see, and a summary can be made later with ``task=report``."""

    def __init__(self, metrics: Sequence[str] | None = None) -> None:
        self.metrics = tuple(metrics) if metrics is not None else SUMMARY_METRICS

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            result = summarize(sweep_dir, self.metrics)
        except FileNotFoundError as err:  # NoResultsError included
            log.warning("no sweep summary: %s", err)
            return
        except Exception:  # a finished sweep's results stay on disk; a reporting bug must not fail the command
            log.exception("the sweep summary of %s failed; the jobs' results are untouched", sweep_dir)
            return
        log.info("sweep summary of %d rows in %s: summary.md, summary.csv%s", result["rows"], sweep_dir,
                 "".join(f", summary_{m}_vs_nfe.png, pareto_{m}.csv" for m in result["metrics"]))
