"""run.py end to end, as users call it: a subprocess per run, outputs under a temporary root."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys

import pytest
from helpers import FAST, ROOT, run_command, run_py  # noqa: F401  (other files import FAST from here too)

# a small, fast configuration: 2-D mixture data, a small MLP, a few dozen training steps




@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runner")
    proc = run_py(tmp, *FAST, "steps=[5,20]", "sampler=ddim", "eval.elbo.full=true", name="first")
    return tmp, proc


def test_default_run_writes_every_output(trained):
    tmp, proc = trained
    out = tmp / "first"
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["steps"] for r in rows] == [5, 20] and [r["nfe"] for r in rows] == [5, 20]
    for r in rows:
        assert r["nll"] > 0 and r["fid"] >= 0 and r["sample_seconds"] > 0
        assert (out / f"samples_ddim_{r['steps']}.pt").is_file() and (out / f"grid_ddim_{r['steps']}.png").is_file()
    with open(out / "metrics.csv") as f:
        assert [int(r["steps"]) for r in csv.DictReader(f)] == [5, 20]
    assert (out / "config.yaml").is_file() and (out / "checkpoint.ckpt").resolve().is_file()
    assert (out / "fid_vs_nfe.png").is_file() and (out / "nll_vs_nfe.png").is_file()
    # 20 DDIM steps of a (briefly) trained model are closer to the data than 5
    assert rows[1]["fid"] < rows[0]["fid"]
    # the ELBO over each step count's own chain; the all-T bound once, the same in every row
    assert rows[0]["elbo_bpd"] != rows[1]["elbo_bpd"] and math.isfinite(rows[0]["elbo_full_bpd"])
    assert rows[0]["elbo_full_bpd"] == rows[1]["elbo_full_bpd"]
    assert rows[0]["elbo_bpd"] == pytest.approx(rows[0]["elbo_prior_bpd"] + rows[0]["elbo_kl_bpd"]
                                                + rows[0]["elbo_decoder_bpd"], rel=1e-9)


def test_console_shows_each_lightning_line_once_and_no_adverts(trained):
    tmp, proc = trained
    console = proc.stdout + proc.stderr
    # Lightning's package logger has a console handler of its own; passed on to Hydra's too, each line printed twice
    log = (tmp / "first" / "run.log").read_text()
    lines = [line.split("] - ", 1)[1] for line in log.splitlines() if "][lightning." in line]
    assert any(line.startswith("GPU available:") for line in lines)  # still in the run's log file
    for line in set(lines):
        assert console.count(line) == lines.count(line), line
    assert "Tip:" not in console + log and "LeafSpec" not in console and "logging interval" not in console


def test_offline_wandb_run_and_csv_log(trained):
    tmp, proc = trained
    out = tmp / "first"
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert "wandb sync" in proc.stdout + proc.stderr
    # the CSV logger beside W&B holds the training curve and the quality-vs-steps results
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/loss_step") for r in rows)
    evals = {int(r["step"]): float(r["eval/nll"]) for r in rows if r.get("eval/nll")}
    summary = json.loads((out / "metrics.json").read_text())
    assert evals == {r["steps"]: pytest.approx(r["nll"]) for r in summary}


def test_progress_is_log_lines_without_a_terminal(trained):
    # stderr is a pipe here: no progress bar (its carriage-return updates would fill the log), periodic lines instead
    tmp, proc = trained
    log_file = (tmp / "first" / "run.log").read_text()
    for text in (proc.stdout + proc.stderr, log_file):
        assert "\r" not in text
        for step in (10, 20, 30):
            assert re.search(rf"step {step}/30 \({100 * step // 30}%\): loss \S+, [\d.e+]+ steps/s, ETA \S+", text)
        assert re.search(r"validation at step 15: val/loss [\d.]+", text)
        assert "training done: step 30" in text


def test_seed_reaches_kid_subsets_and_explicit_sub_seeds_win(trained):
    # the first run's checkpoint evaluated with seed=1 but data.seed=0 and eval.noise_seed=0 pinned: the same data,
    # noise and samples, so FID, NLL, MSE and ELBO repeat; only KID's subsets (eval.kid_seed = seed) change
    tmp, _ = trained
    run_py(tmp, *FAST, "steps=[5,20]", "sampler=ddim", "logger=csv", "seed=1", "data.seed=0", "eval.noise_seed=0",
           f"ckpt_path={tmp}/first/checkpoint.ckpt", "task=eval", name="seed1")
    first = json.loads((tmp / "first" / "metrics.json").read_text())
    again = json.loads((tmp / "seed1" / "metrics.json").read_text())
    for a, b in zip(first, again):
        for k in ("fid", "nll", "mse", "elbo_bpd"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
        assert a["kid_mean"] != pytest.approx(b["kid_mean"], rel=1e-6)


def test_sampler_and_steps_change_reuses_checkpoint(trained):
    tmp, _ = trained
    ckpt = (tmp / "first" / "checkpoint.ckpt").resolve()
    before = ckpt.stat().st_mtime_ns
    proc = run_py(tmp, *FAST, "steps=10", "sampler=heun", name="second")
    assert "reusing the checkpoint" in proc.stdout + proc.stderr
    assert ckpt.stat().st_mtime_ns == before and (tmp / "second" / "checkpoint.ckpt").resolve() == ckpt
    rows = json.loads((tmp / "second" / "metrics.json").read_text())
    assert rows[0]["nfe"] == 19  # Heun: 2·10 − 1
    assert not list((tmp / "second").glob("csv/*.ckpt"))


@pytest.mark.parametrize("override,message", [
    ("steps=0", "positive integer"),
    ("steps=[10,2000]", "exceeds the 1000 training timesteps"),
    ("sampler.spacing=cosine", "valid choices: leading, trailing"),
    ("sampler.options.eta=2.0", r"eta in \[0, 1\]"),
    ("objective=accuracy", r"Available options in 'objective':\s+elbo\s+fid\s+kid\s+mse\s+nll"),
    ("objective.cost=joules", "valid choices: nfe, seconds"),
    ("sampler.name=dpm_fast", "unknown sampler 'dpm_fast'; valid choices: ddpm, ddim"),
    ("+sampler.options.gamma=1", r"sampler 'ddim' has no option\(s\) \['gamma'\]; its options: eta"),
    ("trainer.max_steps=10", r"trainer.max_steps is 10 but train.max_steps is 30: set train.max_steps instead"),
    ("callbacks.ema.decay=0.9", "callbacks.ema.decay is 0.9 but train.ema_decay is 0.995"),
    ("optimizer.lr=0", "the optimizer's lr must be a finite number > 0"),
    ("lr_scheduler.min_lr_ratio=2", r"min_lr_ratio must lie in \[0, 1\]"),
    ("eval.num_samples=50", "eval.num_samples=50 is below the minimum 64"),
    ("objective=mse sampler=ddpm", "objective=mse needs a deterministic sampler"),
    ("data.kind=moons", "objective=nll needs data with a known density"),
    ("sampler=dpm_fast", r"Available options in 'sampler':\s+adaptive\s+ddim\s+ddpm"),  # Hydra lists the group's choices
])
def test_bad_config_fails_before_training(tmp_path, override, message):
    # in this process but for one case (a new interpreter spends seconds on imports before failing)
    proc = run_py(tmp_path, *FAST, *override.split(), check=False, in_process=override != "steps=0")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert re.search(message, text), text[-2000:]
    assert not (tmp_path / "outputs" / "checkpoints").exists()  # nothing trained


def test_config_errors_do_not_wait_for_lightning():
    # run.py reports a bad step count, sampler, spacing or evaluation size in ~3 s, not the ~10 s importing Lightning
    # (with torchmetrics, scipy and matplotlib) would add: nothing run.py imports before validate() pulls it in
    code = ("import sys, diffsteps, diffsteps.runner.run, diffsteps.runner.validate; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'torchmetrics', 'wandb'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_missing_and_corrupt_checkpoint(tmp_path):
    proc = run_py(tmp_path, *FAST, f"ckpt_path={tmp_path}/nope.ckpt", check=False, in_process=True)
    assert proc.returncode != 0 and "checkpoint not found" in proc.stderr
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    proc = run_py(tmp_path, *FAST, f"ckpt_path={bad}", name="bad", check=False, in_process=True)
    assert proc.returncode != 0 and "corrupt or not a diffsteps checkpoint" in proc.stderr


def test_ddp_two_processes_train_once_and_evaluate_as_one_process(tmp_path):
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "logger=csv", "steps=[5,10]",
           "eval.num_samples=300", "eval.batch_size=64", "eval.mse.num_samples=100"]
    proc = run_py(tmp_path, *FAST, *ddp, name="ddp")
    text = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in text and "All distributed processes registered" in text
    rows = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert [r["nfe"] for r in rows] == [5, 10] and rows[0]["num_samples"] == 300
    assert text.count("results in") == 1  # one set of results, written by rank zero
    assert len(list((tmp_path / "outputs" / "checkpoints").glob("*/last.ckpt"))) == 1
    assert len(list(tmp_path.glob("*/metrics.json"))) == 1
    # the same checkpoint evaluated by one process: 5 chunks split 3/2 between the ranks gave the same numbers
    single = [o.replace("trainer=ddp", "trainer=cpu") for o in ddp if not o.startswith("trainer.")]
    run_py(tmp_path, *FAST, *single, f"ckpt_path={tmp_path}/ddp/checkpoint.ckpt", "task=eval", name="single")
    alone = json.loads((tmp_path / "single" / "metrics.json").read_text())
    for a, b in zip(rows, alone):
        for k in ("fid", "kid_mean", "kid_std", "nll", "mse", "mse_median", "elbo_bpd"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
        assert a["num_samples"] == b["num_samples"] and a["nfe"] == b["nfe"]


def test_multirun_grid_shares_one_training(tmp_path):
    env = {**os.environ, "DIFFSTEPS_ROOT": str(tmp_path), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = run_command([sys.executable, str(ROOT / "run.py"), "-m", *FAST, "logger=csv", "sampler=ddim,heun",
                        "steps=5"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(tmp_path.glob("outputs/multirun/*/*/*/metrics.json"))
    assert [json.loads(p.read_text())[0]["nfe"] for p in jobs] == [5, 9]  # ddim 5 steps, heun 2·5 − 1
    assert (proc.stdout + proc.stderr).count("reusing the checkpoint") == 1
    # the multirun-end callback summarised both jobs; task=report re-reads the folder the same way
    sweep = jobs[0].parents[1]
    with open(sweep / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert sorted(r["sampler"] for r in summary) == ["ddim", "heun"]
    assert (sweep / "summary_nll_vs_nfe.png").is_file() and (sweep / "pareto_nll.csv").is_file()
    (sweep / "summary.csv").unlink()
    proc = run_py(tmp_path, "task=report", f"report_dir={sweep}", name="report")
    assert "summary of 2 rows" in proc.stdout and (sweep / "summary.csv").is_file()


def test_schedules_task_draws_every_schedule_without_training(tmp_path):
    proc = run_py(tmp_path, "task=schedules", name="schedules")
    assert (tmp_path / "schedules" / "schedules.png").is_file()
    with open(tmp_path / "schedules" / "schedules.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1000 and float(rows[0]["linear_beta"]) == pytest.approx(1e-4)
    assert not (tmp_path / "outputs" / "checkpoints").exists() and "schedules in" in proc.stdout


@pytest.mark.parametrize("preset,overrides,steps,sweep", [
    ("steps_study", [], [10, 50, 100, 500], "sampler: ddpm,ddim"),
    ("sampler_comparison", ["sampler=heun"], [5, 10, 25, 50], "sampler: ddim,heun,dpmpp_2m,dpmpp_3m,euler"),
    ("sampler_comparison", ["sampler=dpmpp_3m"], [9, 19, 49, 99], "sampler: ddim,heun,dpmpp_2m,dpmpp_3m,euler"),
    ("schedule_comparison", [], [10, 20, 50, 100], "schedule: linear,cosine,scaled_linear,sigmoid"),
])
def test_experiment_presets_compose_with_their_own_values(tmp_path, preset, overrides, steps, sweep):
    # a preset's values must win over config.yaml's (`_self_` before `experiment` in the defaults list)
    import yaml

    job = run_py(tmp_path, f"experiment={preset}", *overrides, "--cfg", "job", "--resolve", name=None,
                 in_process=True)
    cfg = yaml.safe_load(job.stdout)
    assert cfg["steps"] == steps and cfg["loss"]["prediction"] == "v"
    hydra_cfg = run_py(tmp_path, f"experiment={preset}", "--cfg", "hydra", name=None, in_process=True)
    assert sweep in hydra_cfg.stdout, hydra_cfg.stdout[-2000:]
    assert list(tmp_path.iterdir()) == []  # --cfg prints and runs nothing


def test_objective_adds_its_cost_term():
    from diffsteps.runner.objects import Objective

    row = {"fid": 0.5, "kid_mean": 0.01, "nfe": 19, "seconds_per_sample": 0.002}
    assert Objective("fid", "nfe", 0.01).value(row) == pytest.approx(0.5 + 0.19)
    assert Objective("kid", "seconds", 10.0).value(row) == pytest.approx(0.01 + 0.02)
    # not measured for this row: NaN, which a sweeper records as a failed trial
    assert math.isnan(Objective("mse").value(row))
