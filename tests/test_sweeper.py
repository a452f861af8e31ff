"""The gp sweeper (hydra/sweeper=gp) as users call it: a subprocess per sweep of tests/sweep_app (a quadratic), one of
run.py. EI rather than the default gp_hedge keeps each GP step under a second on a loaded 2-core machine."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import run_command

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "sweep_app" / "app.py"
SPACE = ["x=interval(-1,1)", "y=int(interval(0,20))"]
FAST_GP = ["hydra.sweeper.acq_func=EI", "hydra.sweeper.random_state=1"]


def sweep(sweep_dir: Path, *overrides: str, check: bool = True, app: Path = APP, env: dict | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, str(app), "-m", "hydra/sweeper=gp", f"hydra.sweep.dir={sweep_dir}", *FAST_GP, *overrides]
    if app == APP:  # a fresh interpreter: the tests read which process ran each trial (pid.txt: pid, parent)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    else:
        proc = run_command(cmd, env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"sweep failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc, proc.stdout + proc.stderr


def results(sweep_dir: Path) -> dict:
    return yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())


def job_dirs(sweep_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in sweep_dir.glob("[0-9]*") if p.is_dir()) if sweep_dir.exists() else []


def test_quadratic_minimum_results_and_plots(tmp_path):
    _, text = sweep(tmp_path, *SPACE, "hydra.sweeper.n_calls=14", "hydra.sweeper.n_initial_points=5")
    res = results(tmp_path)
    assert res["n_trials"] == 14 and res["n_failed"] == 0 and job_dirs(tmp_path) == list(range(14))
    values = [t["value"] for t in res["trials"]]
    best = min(res["trials"], key=lambda t: t["value"])
    assert (res["best_value"], res["best_params"], res["best_job"]) == (best["value"], best["params"], best["job"])
    assert isinstance(res["best_params"]["y"], int) and isinstance(res["best_params"]["x"], float)
    # the minimum is 1 at x = 0.3, y = 7; the 5 random starts are far off it
    assert res["best_value"] < 1.03 and res["best_value"] < statistics.median(values[:5]) - 0.1
    assert abs(res["best_params"]["x"] - 0.3) < 0.15 and abs(res["best_params"]["y"] - 7) < 2
    assert (tmp_path / "convergence.png").stat().st_size > 0 and (tmp_path / "partial_dependence.png").stat().st_size
    assert text.count("Launching 1 jobs locally") == 14  # the basic launcher, one trial a batch, in the sweeper
    assert (tmp_path / "13" / "pid.txt").read_text().split()[1] == str(os.getpid())
    assert re.search(r"trial #13: x=\S+ y=\d+ -> [\d.]+", text) and "best so far" in text


def test_joblib_launches_batches_of_two(tmp_path):
    _, text = sweep(tmp_path, *SPACE, "+extra=choice(a,b)", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                    "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_calls=5", "hydra.sweeper.n_initial_points=2")
    launches = re.findall(r"Joblib\.Parallel\(n_jobs=2,.*\) is launching (\d) jobs", text)
    assert launches == ["2", "2", "1"]  # the last batch holds what is left of n_calls
    for batch in ("#0-#1", "#2-#3", "#4-#4"):
        assert f"batch of jobs {batch} done" in text
    assert job_dirs(tmp_path) == list(range(5))
    # joblib's workers, children of the sweeping process, ran the jobs (the basic launcher runs them in the sweeper,
    # whose parent is this test: see the quadratic test)
    parents = {(tmp_path / str(i) / "pid.txt").read_text().split()[1] for i in range(5)}
    assert len(parents) == 1 and str(os.getpid()) not in parents
    assert {t["params"]["extra"] for t in results(tmp_path)["trials"]} <= {"a", "b"}


def test_failures_are_recorded_and_the_sweep_resumes(tmp_path):
    # x > 0.6 raises, x < −0.6 returns NaN: a third of the space fails
    common = [*SPACE, "fail_above=0.6", "nan_below=-0.6", "hydra.sweeper.n_initial_points=4",
              "hydra.sweeper.max_failure_rate=0.9"]
    sweep(tmp_path, *common, "hydra.sweeper.n_calls=6")
    first = results(tmp_path)
    assert first["n_trials"] == 6 and job_dirs(tmp_path) == list(range(6))
    _, text = sweep(tmp_path, *common, "hydra.sweeper.n_calls=10")
    res = results(tmp_path)
    assert "resuming from 6 trials" in text and job_dirs(tmp_path) == list(range(10))
    assert text.count("Launching 1 jobs locally") == 4  # 4 new jobs, numbered on from 6
    assert res["n_trials"] == 10 and res["trials"][:6] == first["trials"]
    assert [t["job"] for t in res["trials"]] == list(range(10))
    failed = [t for t in res["trials"] if t["status"] == "failed"]
    assert res["n_failed"] == len(failed) >= 1
    for t in failed:
        assert t["value"] is None and t["error"]
        assert ("RuntimeError: x=" in t["error"]) == (t["params"]["x"] > 0.6)
        assert ("not a finite number: nan" in t["error"]) == (t["params"]["x"] < -0.6)
    assert -0.6 <= res["best_params"]["x"] <= 0.6


def test_too_many_failures_stop_the_sweep(tmp_path):
    proc, text = sweep(tmp_path, *SPACE, "fail_above=-5", "hydra.sweeper.n_calls=10",
                       "hydra.sweeper.n_initial_points=5", check=False)
    assert proc.returncode != 0
    assert "GP sweep stopped: 5 of 5 trials failed, more than max_failure_rate=0.5" in text
    res = results(tmp_path)
    assert res["n_trials"] == res["n_failed"] == 5 and res["best_params"] is None


@pytest.mark.parametrize("overrides,message", [
    ("z=interval(0,1)", r"does not fit the config[\s\S]*Could not override 'z'"),
    ("x=interval(1,-1)", r"interval\(1.0, -1.0\) is empty or inverted"),
    ("x=tag(log,interval(0,1))", "needs a positive lower bound"),
    ("hydra.sweeper.n_initial_points=6", "need 1 <= n_initial_points <= n_calls"),
    ("hydra.sweeper.acq_func=UCB", "valid choices: gp_hedge, EI, LCB, PI"),
    ("hydra.sweeper.n_jobs=0", "n_jobs=0: need at least 1"),
    ("y=3", None),  # a fixed override alone is fine: x is still searched
])
def test_bad_input_fails_before_any_job(tmp_path, overrides, message):
    if message is None:  # the control case: the same command runs
        sweep(tmp_path, "x=interval(-1,1)", overrides, "hydra.sweeper.n_calls=1", "hydra.sweeper.n_initial_points=1")
        assert job_dirs(tmp_path) == [0]
        return
    proc, text = sweep(tmp_path / "sweep", "x=interval(-1,1)", overrides, "hydra.sweeper.n_calls=5", check=False)
    assert proc.returncode != 0 and re.search(message, text), text[-3000:]
    assert job_dirs(tmp_path / "sweep") == []


def test_no_sweep_at_all_is_an_error(tmp_path):
    proc, text = sweep(tmp_path, "x=0.5", check=False)
    assert proc.returncode != 0 and "hold no sweep" in text and job_dirs(tmp_path) == []


def test_run_py_sweeps_steps_on_one_training(tmp_path):
    from helpers import FAST

    env = {"DIFFSTEPS_ROOT": str(tmp_path), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = tmp_path / "sweep"
    # the sweep's plumbing, not each trial's pictures and extra measures (about 7 s a trial here)
    lean = ["eval.trajectory_samples=0", "eval.grid_size=0", "eval.save_samples=0", "eval.mse.num_samples=0",
            "eval.elbo.num_samples=0"]
    _, text = sweep(out, "hydra.sweeper.params=null", "steps=int(interval(5,30))", *FAST, *lean,
                    "hydra.sweeper.n_calls=4", "hydra.sweeper.n_initial_points=2", "hydra.sweeper.wandb.enabled=true",
                    "hydra.sweeper.wandb.mode=offline", app=ROOT / "run.py", env=env)
    res = results(out)
    assert res["n_trials"] == 4 and res["n_failed"] == 0 and 5 <= res["best_params"]["steps"] <= 30
    assert len(set(t["params"]["steps"] for t in res["trials"])) == 4  # no step count evaluated twice
    assert text.count("reusing the checkpoint") == 3  # trained once
    assert (out / "convergence.png").is_file() and (out / "partial_dependence.png").is_file()
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # the summary run


def test_space_grammar_maps_to_skopt_dimensions():
    from hydra_plugins.diffsteps_gp_sweeper.core import parse_space

    dims, fixed = parse_space(["a=interval(0,1)", "b=int(interval(5,200))", "c=tag(log,interval(1e-5,1e-2))",
                               "d=int(tag(log,interval(1,64)))", "e=choice(x,y,[1,2])", "f=range(1,4)",
                               "g=range(0,1,0.25)", "h=3", "+i=choice(7)", "a=interval(0,2)", "j=1,2"])
    shown = {d.name: str(d.dimension) for d in dims}
    assert list(shown) == ["b", "c", "d", "e", "f", "g", "a", "j"]  # a later override replaces, and comes last
    assert shown["a"].startswith("Real(low=0.0, high=2.0, prior='uniform'")
    assert shown["b"].startswith("Integer(low=5, high=200, prior='uniform'")
    assert shown["c"].startswith("Real(low=1e-05, high=0.01, prior='log-uniform'")
    assert shown["d"].startswith("Integer(low=1, high=64, prior='log-uniform'")
    assert shown["f"].startswith("Integer(low=1, high=3,")
    assert shown["g"] == "Categorical(categories=('0.0', '0.25', '0.5', '0.75'), prior=None)"
    e = dims[3]
    assert e.value("[1,2]") == [1, 2] and e.override("[1,2]") == "e=[1,2]" and e.value("x") == "x"
    assert fixed == ["h=3", "+i=7"]


def test_failed_trials_wait_for_a_finite_value_then_count_as_worse_than_the_worst():
    from hydra_plugins.diffsteps_gp_sweeper.core import Search, Trial, parse_space

    s = Search(parse_space(["x=interval(0,1)"])[0], n_initial_points=2, acq_func="EI", random_state=0)
    s.tell([Trial(0, [0.1], {"x": 0.1}, None, "failed", "boom")])
    assert s.opt.yi == []
    s.tell([Trial(1, [0.5], {"x": 0.5}, 2.0), Trial(2, [0.9], {"x": 0.9}, 3.0)])
    assert s.opt.yi[:2] == [2.0, 3.0] and s.opt.yi[2] > 3.0 and s.best.number == 1 and s.n_failed == 1
    assert s.ask(1)[0] not in ([0.1], [0.5], [0.9])


def test_run_py_sweeps_spacings_including_an_optimised_schedule(tmp_path):
    """'sampler.spacing=choice(trailing,optimized)': a categorical spacing whose 'optimized' category is the schedule
    cached for this model, sampler and step count (here written by hand into the cache, with the model's training
    key, instead of by a slow task=optimize_steps run). Both categories run, each on its own timesteps; a step count
    the cache lacks is an error before any trial."""
    import json

    from helpers import FAST
    from hydra import compose, initialize_config_dir

    from diffsteps.runner.checkpoints import training_key
    from diffsteps.runner.optimize import schedule_cache_dir
    from diffsteps.runner.resolvers import register_resolvers

    register_resolvers()
    env = {"DIFFSTEPS_ROOT": str(tmp_path), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    fixed = [*FAST, "logger=none", "sampler=dpmpp_2m", "eval.mse.num_samples=0", "eval.elbo.num_samples=0"]
    os.environ["DIFFSTEPS_ROOT"] = str(tmp_path)  # what paths.root_dir reads, as run.py will
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose("config", overrides=fixed, return_hydra_config=False)
            key, cache = training_key(cfg), schedule_cache_dir(cfg)
    finally:
        del os.environ["DIFFSTEPS_ROOT"]
    ours = [999.0, 640.5, 310.25, 120.0, 20.0]
    cache.mkdir(parents=True)
    (cache / "dpmpp_2m_nfe5_refine.yaml").write_text(yaml.safe_dump(
        {"training_key": key, "sampler": "dpmpp_2m", "nfe": 5, "steps": 5, "method": "refine", "timesteps": ours}))
    gp = ["hydra.sweeper.params=null", "hydra.sweeper.n_initial_points=2", "hydra.sweeper.n_calls=2"]

    proc, text = sweep(tmp_path / "bad", *gp, *fixed, "sampler.spacing=choice(trailing,optimized)", "steps=choice(5,7)",
                       app=ROOT / "run.py", env=env, check=False)
    assert proc.returncode != 0 and job_dirs(tmp_path / "bad") == []
    assert "sampler.spacing=optimized with steps=7 cannot be sampled: no optimised dpmpp_2m schedule with 7 steps" \
        in text, text[-3000:]

    out = tmp_path / "sweep"
    sweep(out, *gp, *fixed, "sampler.spacing=choice(trailing,optimized)", "steps=5", app=ROOT / "run.py", env=env)
    res = results(out)
    assert res["n_failed"] == 0 and {t["params"]["sampler.spacing"] for t in res["trials"]} == {"trailing", "optimized"}
    spacing = {t["params"]["sampler.spacing"]: json.loads((out / str(t["job"]) / "metrics.json").read_text())[0]
               ["spacing"] for t in res["trials"]}
    assert spacing["optimized"] == ours and spacing["trailing"] == "trailing"
