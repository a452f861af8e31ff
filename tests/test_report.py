"""Reports: Pareto fronts, sweep collection and summaries, the schedule figure, the multirun callback."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from diffsteps.core.schedules import SCHEDULES, make_schedule
from diffsteps.reporting import report
from diffsteps.reporting.plots import plot_schedules


# -- Pareto front ---------------------------------------------------------------------------------------------------
def brute_force_front(rows, cost, metric):
    def dominates(q, p):
        return (q[cost] <= p[cost] and q[metric] <= p[metric]) and (q[cost] < p[cost] or q[metric] < p[metric])

    return [p for p in rows if not any(dominates(q, p) for q in rows)]


@pytest.mark.parametrize("seed", range(40))
def test_pareto_front_matches_brute_force_with_ties(seed):
    rng = random.Random(seed)
    # few distinct values, so equal costs, equal metrics and exact duplicates are common
    rows = [{"nfe": rng.randint(1, 8), "fid": rng.randint(0, 6), "i": i} for i in range(rng.randint(1, 30))]
    got = report.pareto_front(rows, "nfe", "fid")
    want = brute_force_front(rows, "nfe", "fid")
    assert sorted(r["i"] for r in got) == sorted(r["i"] for r in want)
    assert [r["nfe"] for r in got] == sorted(r["nfe"] for r in got)
    # along the front, more cost must buy strictly better quality
    assert all(b["fid"] < a["fid"] for a, b in zip(got, got[1:]) if b["nfe"] > a["nfe"])


def test_pareto_front_keeps_duplicates_and_skips_missing_or_nan():
    rows = [{"nfe": 10, "fid": 2.0, "i": 0}, {"nfe": 10, "fid": 2.0, "i": 1}, {"nfe": 10, "fid": 3.0, "i": 2},
            {"nfe": 20, "fid": 2.0, "i": 3}, {"nfe": 20, "fid": 1.0, "i": 4}, {"nfe": 5, "i": 5},
            {"nfe": 1, "fid": math.nan, "i": 6}, {"nfe": 50, "fid": 1.0, "i": 7}]
    assert [r["i"] for r in report.pareto_front(rows)] == [0, 1, 4]
    assert report.pareto_front([]) == []


# -- a synthetic sweep ----------------------------------------------------------------------------------------------
SAMPLERS = {"ddim": 1, "heun": 2}  # NFE per step
SCHEDS = ("linear", "cosine")


def fake_fid(sampler, schedule, nfe):
    return round(50.0 / nfe + (0.5 if sampler == "heun" else 0.0) + (0.3 if schedule == "linear" else 0.0), 6)


def make_sweep(root: Path, failed_job: bool = True) -> Path:
    """Hydra's multirun layout: <sweep>/<job num>/{metrics.json, config.yaml, .hydra/overrides.yaml}."""
    job = 0
    for schedule in SCHEDS:
        for sampler, per_step in SAMPLERS.items():
            d = root / str(job)
            (d / ".hydra").mkdir(parents=True)
            OmegaConf.save(OmegaConf.create(["experiment=sampler_comparison", f"sampler={sampler}",
                                             f"schedule={schedule}"]), d / ".hydra" / "overrides.yaml")
            OmegaConf.save(OmegaConf.create({"sampler": {"name": sampler}, "seed": 0,
                                             "schedule": {"name": schedule, "zero_terminal_snr": False},
                                             "loss": {"kind": "simple", "prediction": "v"},
                                             "data": {"_target_": "diffsteps.data.DigitsData"}}), d / "config.yaml")
            rows = []
            for steps in (5, 10, 20):
                nfe = steps * per_step
                rows.append({"sampler": sampler, "spacing": "karras", "steps": steps, "nfe": nfe,
                             "sample_seconds": 0.01 * nfe, "seconds_per_sample": 1e-5 * nfe,
                             "fid": fake_fid(sampler, schedule, nfe), "kid_mean": 0.1 / nfe, "kid_std": 0.01})
            (d / "metrics.json").write_text(json.dumps(rows))
            job += 1
    if failed_job:  # a job that crashed before evaluating: a folder with overrides and no metrics
        (root / str(job) / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(["sampler=euler"]), root / str(job) / ".hydra" / "overrides.yaml")
    return root


def test_collect_reads_every_job_into_flat_rows(tmp_path):
    rows = report.collect(make_sweep(tmp_path / "sweep"))
    assert len(rows) == len(SCHEDS) * len(SAMPLERS) * 3
    assert sorted({r["job"] for r in rows}) == [0, 1, 2, 3]
    r = next(r for r in rows if r["job"] == 3 and r["steps"] == 10)
    assert r["sampler"] == "heun" and r["schedule"] == "cosine" and r["nfe"] == 20 and r["loss"] == "simple"
    assert r["prediction"] == "v" and r["data"] == "DigitsData" and r["fid"] == fake_fid("heun", "cosine", 20)
    # experiment= is the same in every job: it names no group
    assert r["group"] == "sampler=heun schedule=cosine"
    assert "experiment=sampler_comparison" in r["overrides"]


def test_collect_groups_by_sampler_when_nothing_varies(tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps([{"sampler": "ddim", "steps": 5, "nfe": 5, "fid": 1.0}]))
    [row] = report.collect(d)
    assert row["group"] == "ddim" and row["job"] == "."


def test_summarize_writes_table_figures_and_pareto(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    result = report.summarize(sweep)
    assert result["rows"] == 12 and result["metrics"] == ["fid", "kid_mean"]
    for name in ("summary.csv", "summary.md", "summary_fid_vs_nfe.png", "summary_kid_mean_vs_nfe.png",
                 "pareto_fid.csv", "pareto_kid_mean.csv"):
        assert (sweep / name).is_file() and (sweep / name).stat().st_size > 0, name
        assert sweep / name in result["files"]
    assert not (sweep / "summary_mse_vs_nfe.png").exists()

    with open(sweep / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12
    assert {(r["group"], int(r["nfe"])) for r in table} == {
        (f"sampler={s} schedule={c}", k * n) for s, k in SAMPLERS.items() for c in SCHEDS for n in (5, 10, 20)}
    # sorted by group, then NFE
    keys = [(r["group"], int(r["nfe"])) for r in table]
    assert keys == sorted(keys)

    # fid = 50/nfe + penalties: cosine-ddim is best at every NFE it has (5, 10, 20); heun only adds NFE 40,
    # where cosine-heun (50/40 + 0.5 = 1.75) beats cosine-ddim at 20 (2.5)
    want = {("ddim", "cosine", 5), ("ddim", "cosine", 10), ("ddim", "cosine", 20), ("heun", "cosine", 40)}
    with open(sweep / "pareto_fid.csv") as f:
        front = {(r["sampler"], r["schedule"], int(r["nfe"])) for r in csv.DictReader(f)}
    assert front == want
    assert {(r["sampler"], r["schedule"], r["nfe"]) for r in result["pareto"]["fid"]} == want

    md = (sweep / "summary.md").read_text().splitlines()
    body = [line for line in md if line.startswith("| ") and not line.startswith("| job")]
    assert len(body) == 12
    header = [c.strip() for c in next(line for line in md if line.startswith("| job")).strip("|").split("|")]
    assert header[:3] == ["job", "sampler", "schedule"] and header[-1] == "pareto"
    marked = set()
    for line in body:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        if "fid" in cells["pareto"].split(", "):
            marked.add((cells["sampler"], cells["schedule"], int(cells["nfe"])))
    assert marked == want


def test_missing_and_empty_folders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found.*nowhere"):
        report.summarize(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    (empty / "0" / ".hydra").mkdir(parents=True)
    with pytest.raises(report.NoResultsError, match=f"no results under {empty}"):
        report.summarize(empty)
    (empty / "0" / "metrics.json").write_text("[]")  # a job that evaluated nothing
    with pytest.raises(report.NoResultsError):
        report.collect(empty)


# -- the multirun callback ------------------------------------------------------------------------------------------
def hydra_config(sweep_dir: Path):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir), "subdir": "${hydra.job.num}"}}})


def test_callback_summarizes_the_sweep(tmp_path, caplog):
    sweep = make_sweep(tmp_path / "sweep")
    with caplog.at_level(logging.INFO, logger="diffsteps.report"):
        report.MultirunSummary().on_multirun_end(config=hydra_config(sweep), config_name="config")
    assert (sweep / "summary.md").is_file() and (sweep / "pareto_fid.csv").is_file()
    assert str(sweep) in caplog.text and "summary.md" in caplog.text


def test_callback_warns_instead_of_raising_without_results(tmp_path, caplog):
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="diffsteps.report"):
        report.MultirunSummary().on_multirun_end(config=hydra_config(tmp_path / "sweep"))
        report.MultirunSummary().on_multirun_end(config=hydra_config(tmp_path / "missing"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "no results under" in warnings[0].getMessage()
    assert not (tmp_path / "sweep" / "summary.md").exists()


def test_callback_is_instantiable_by_hydra():
    from hydra.utils import instantiate

    cb = instantiate({"_target_": "diffsteps.reporting.report.MultirunSummary", "metrics": ["fid"]})
    assert isinstance(cb, report.MultirunSummary) and cb.metrics == ("fid",)


# -- schedules ------------------------------------------------------------------------------------------------------
def read_schedule_csv(path: Path) -> dict[str, list[float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in rows[0]}


def test_schedule_figure_writes_png_and_exact_csv(tmp_path):
    png = report.schedule_figure(tmp_path / "out", num_timesteps=200)
    assert png == tmp_path / "out" / "schedules.png" and png.stat().st_size > 10_000
    table = read_schedule_csv(tmp_path / "out" / "schedules.csv")
    assert table["t"] == list(range(200))
    for name in SCHEDULES:
        s = make_schedule(name, 200)
        assert table[f"{name}_alpha_bar"] == s.alphas_cumprod.tolist()  # exact: float64 round-trips through text
        assert table[f"{name}_beta"] == s.betas.tolist()
        assert table[f"{name}_log_snr"] == s.log_snr.tolist()
    z = make_schedule("linear", 200, zero_terminal_snr=True)
    assert table["linear_ztsnr_alpha_bar"] == z.alphas_cumprod.tolist()
    assert table["linear_ztsnr_alpha_bar"][-1] == 0.0 and table["linear_ztsnr_log_snr"][-1] == -math.inf


def test_schedule_csv_cosine_matches_closed_form(tmp_path):
    T, s = 1000, 0.008
    report.schedule_figure(tmp_path, num_timesteps=T, names=["cosine"], zero_terminal_snr=())
    abar = read_schedule_csv(tmp_path / "schedules.csv")["cosine_alpha_bar"]

    def f(tau):
        return math.cos((tau / T + s) / (1 + s) * math.pi / 2) ** 2

    # repository index convention: ᾱ at index t is the closed form at τ = t + 1 (t = 0 is the first noisy step);
    # β is clipped to 0.999 only in the last few steps, so compare the interior
    for t in (0, 1, 10, 100, 250, 500, 750, 900, 990):
        assert abar[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9), t


def test_plot_schedules_clips_infinite_log_snr(tmp_path):
    scheds = {"linear": make_schedule("linear", 100),
              "linear (zero terminal SNR)": make_schedule("linear", 100, zero_terminal_snr=True)}
    path = plot_schedules(scheds, tmp_path / "s.png")
    assert path.is_file() and path.stat().st_size > 10_000
