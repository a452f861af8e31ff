"""Nothing lost, nothing silently wrong: every run gets its own folder, results are written atomically and as each
step count is measured (a failing figure or a killed run keeps them), and every evaluation input is checked before
training. Subprocess runs use test_runner's FAST configuration (2-D data, a small MLP, 30 training steps)."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from helpers import run_py
from test_runner import FAST

import diffsteps as ds
from diffsteps.evaluation.evaluator import EvaluationModule, Evaluator
from diffsteps.evaluation.measures import MixtureNLL, TrajectoryError
from diffsteps.evaluation.plan import EvalPlan

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def env_for(tmp: Path) -> dict:
    return {**os.environ, "DIFFSTEPS_ROOT": str(tmp), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(tmp: Path, *overrides: str, run_dir: str | None = None, prelude: str | None = None) -> subprocess.Popen:
    """run.py in a subprocess (not waited for); ``run_dir`` None leaves hydra.run.dir to its default pattern;
    ``prelude``: Python run before run.py in the same process (to break something on purpose)."""
    args = [*overrides] + ([f"hydra.run.dir={run_dir}"] if run_dir else [])
    if prelude is None:
        cmd = [sys.executable, str(ROOT / "run.py"), *args]
    else:
        code = (f"import sys, runpy\n{prelude}\nsys.argv = [{str(ROOT / 'run.py')!r}, *{args!r}]\n"
                f"runpy.run_path({str(ROOT / 'run.py')!r}, run_name='__main__')\n")
        cmd = [sys.executable, "-c", code]
    return subprocess.Popen(cmd, cwd=ROOT, env=env_for(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


# -- run folders -------------------------------------------------------------------------------------------------------
def test_two_runs_started_together_get_a_folder_each(tmp_path):
    # both launched before either is waited for, the default hydra.run.dir: with one-second folder names the two
    # shared a folder and the second one's files replaced the first's
    a = start(tmp_path, *FAST, "logger=csv", "seed=21", "sampler=ddim", "steps=[5]")
    b = start(tmp_path, *FAST, "logger=csv", "seed=22", "sampler=heun", "steps=[5]")
    outs = [finish(a), finish(b)]
    assert a.returncode == 0 and b.returncode == 0, "\n".join(o[-3000:] for o in outs)
    printed = [re.search(r"results in (\S+);", o).group(1) for o in outs]
    assert printed[0] != printed[1]
    runs = sorted(tmp_path.glob("outputs/runs/*/*/metrics.json"))
    assert len(runs) == 2
    for sampler, folder in zip(("ddim", "heun"), printed, strict=True):
        folder = Path(folder)
        assert folder.parent.parent == tmp_path / "outputs" / "runs"
        assert re.fullmatch(r"\d\d-\d\d-\d\d\.\d{6}-\d+-[0-9a-f]{4}", folder.name), folder.name
        rows = json.loads((folder / "metrics.json").read_text())
        assert [r["sampler"] for r in rows] == [sampler]
        cfg = OmegaConf.load(folder / "config.yaml")
        assert cfg.sampler.name == sampler and cfg.seed == {"ddim": 21, "heun": 22}[sampler]
        assert (folder / f"samples_{sampler}_5.pt").is_file() and (folder / ".hydra" / "overrides.yaml").is_file()
        assert f"sampler={sampler}" in (folder / ".hydra" / "overrides.yaml").read_text()


def test_run_stamp_is_unique_and_fixed_once_resolved(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir

    from diffsteps.runner.resolvers import register_resolvers, run_stamp

    stamps = {run_stamp() for _ in range(200)}  # far more than one per microsecond on this machine
    assert len(stamps) == 200
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d\.\d{6}-" + str(os.getpid()) + r"-[0-9a-f]{4}", s)
               for s in stamps)
    register_resolvers()
    monkeypatch.setenv("DIFFSTEPS_ROOT", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        first = compose("config", return_hydra_config=True)
        second = compose("config", return_hydra_config=True)
    run_dir = first.hydra.run.dir
    # cached like Hydra's ${now:}: every read of one config is one folder (Hydra reads it more than once), and
    # sweeps copy the cache into each job's config, so all jobs share the sweep folder
    assert first.hydra.run.dir == run_dir and first.hydra.sweep.dir == first.hydra.sweep.dir
    assert run_dir.startswith(f"{tmp_path}/outputs/runs/") and first.hydra.sweep.dir.startswith(
        f"{tmp_path}/outputs/multirun/")
    assert second.hydra.run.dir != run_dir
    job_sweep = OmegaConf.create({"d": "${run_stamp:%Y-%m-%d/%H-%M-%S}"})
    OmegaConf.copy_cache(from_config=first, to_config=job_sweep)
    assert job_sweep.d == first.hydra.sweep.dir.rsplit("/multirun/", 1)[1]


# -- atomic files ------------------------------------------------------------------------------------------------------
def test_atomic_writes_leave_the_old_file_or_the_whole_new_one(tmp_path):
    from diffsteps.reporting import files

    target = tmp_path / "metrics.json"
    files.write_json(target, [{"steps": 10, "fid": 1.5}])
    with pytest.raises(RuntimeError, match="killed half-way"), files.atomic_open(target) as f:
        f.write('[{"steps": 10, "fid"')
        raise RuntimeError("killed half-way")
    with pytest.raises(TypeError):
        files.write_json(target, [{"steps": object()}])
    assert json.loads(target.read_text()) == [{"steps": 10, "fid": 1.5}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left behind
    files.write_csv(tmp_path / "m.csv", [{"a": 1, "b": 2.5}, {"a": 3, "c": "x"}])
    with open(tmp_path / "m.csv") as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": "2.5", "c": ""}, {"a": "3", "b": "", "c": "x"}]
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(torch.load(files.save_torch(x, tmp_path / "s.pt"), weights_only=True), x)
    import matplotlib.pyplot as plt

    fig = plt.figure()
    files.save_figure(fig, tmp_path / "f.png")  # the format from the final name, not the temporary one
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files.symlink(tmp_path / "s.pt", tmp_path / "link")
    files.symlink(tmp_path / "m.csv", tmp_path / "link")  # replaced in one step
    assert os.readlink(tmp_path / "link") == str(tmp_path / "m.csv")
    assert not list(tmp_path.glob(".*.tmp"))
    assert (tmp_path / "s.pt").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- results as they are measured --------------------------------------------------------------------------------------
def test_each_row_is_handed_over_before_the_next_step_count_starts(mixture, linear):
    # the test loop takes one step count per step: its row reaches on_row while the later step counts have
    # sampled nothing yet, and the rows equal the chunk-major evaluation's
    import lightning as L

    net = ds.ExactEpsilon(mixture, linear)
    plan = EvalPlan("ddim", (3, 6, 12), (2,), num_samples=96, batch_size=40, mse_samples=50, reference_steps=20)

    def measures():
        return [MixtureNLL(plan, mixture), TrajectoryError(plan, linear, "epsilon")]

    ev = Evaluator(plan, linear, "epsilon", measures())
    seen = []

    def on_row(row):
        later = [n for n in plan.steps if n > row["steps"]]
        seen.append((row["steps"], [int(ev.totals[n]._update_count) for n in later]))

    net = _Wrapped(net)
    module = EvaluationModule(net, ev, on_row=on_row)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, verbose=False)
    assert seen == [(3, [0, 0]), (6, [0]), (12, [])]
    chunk_major = Evaluator(plan, linear, "epsilon", measures())
    for c in range(plan.num_chunks):
        chunk_major.run_chunk(net, c, torch.device("cpu"))
    for a, b in zip(module.rows, chunk_major.compute(), strict=True):
        for k in ("nfe", "num_samples", "nll", "mse", "mse_median", "mse_reference_gap"):
            assert a[k] == b[k], k


class _Wrapped(torch.nn.Module):
    """A parameter-free exact model with one parameter, so Lightning has something to place."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.anchor = inner, torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, t):
        return self.inner(x, t)


def test_a_failing_figure_is_a_warning_and_the_results_stay(tmp_path):
    prelude = ("import diffsteps.reporting.plots as p\n"
               "def boom(*a, **k):\n    raise RuntimeError('figure broke')\n"
               "p.save_grid = p.save_steps_grid = p.plot_quality_vs_nfe = boom\n")
    out_dir = tmp_path / "run"
    proc = start(tmp_path, *FAST, "logger=csv", "steps=[5,10]", run_dir=str(out_dir), prelude=prelude)
    text = finish(proc)
    assert proc.returncode == 0, text[-3000:]
    rows = json.loads((out_dir / "metrics.json").read_text())
    assert [r["steps"] for r in rows] == [5, 10] and all(r["nll"] > 0 and "fid" in r for r in rows)
    with open(out_dir / "metrics.csv") as f:
        assert [int(r["steps"]) for r in csv.DictReader(f)] == [5, 10]
    log = (out_dir / "run.log").read_text()
    for what in ("grid_ddim_5.png", "grid_ddim_10.png", "grid_steps_ddim.png", "the quality-vs-NFE plots"):
        assert re.search(rf"WARNING.*could not write \S*{re.escape(what)} \(RuntimeError: figure broke\); the "
                         "metrics are in metrics.json", log), what
    assert not list(out_dir.glob("*.png"))
    assert (out_dir / "samples_ddim_5.pt").is_file() and (out_dir / "samples_ddim_10.pt").is_file()
    assert "results in" in text


@pytest.mark.parametrize("off,absent,present", [
    # vector data: the across-steps figure scatters grid_size samples per step count, so grid_size=0 drops it too
    ("eval.grid_size=0 eval.save_samples=0", ["grid_*.png", "samples_*.pt"], []),
    ("eval.grid_columns=0", ["grid_steps_*.png"], ["grid_ddim_5.png", "grid_ddim_10.png", "samples_ddim_10.pt"]),
])
def test_zero_turns_grids_and_sample_files_off(tmp_path, off, absent, present):
    out_dir = tmp_path / "run"
    proc = start(tmp_path, *FAST, "logger=csv", "steps=[5,10]", *off.split(), run_dir=str(out_dir))
    text = finish(proc)
    assert proc.returncode == 0, text[-3000:]
    assert [r["steps"] for r in json.loads((out_dir / "metrics.json").read_text())] == [5, 10]
    for pattern in absent:
        assert not list(out_dir.glob(pattern)), pattern
    for name in present:
        assert (out_dir / name).is_file(), name
    assert (out_dir / "nll_vs_nfe.png").is_file() and "could not write" not in text


def test_a_run_killed_during_evaluation_keeps_its_finished_step_counts(tmp_path):
    # the later step counts take seconds (2048 samples, up to 1000 steps); SIGKILL as soon as the first row is on
    # disk: no handler runs, so what is there is what was written as the evaluation went
    steps = [2, 600, 800, 1000]
    out_dir = tmp_path / "run"
    proc = start(tmp_path, *FAST, "logger=csv", f"steps=[{','.join(map(str, steps))}]", "eval.num_samples=2048",
                 "eval.batch_size=256", run_dir=str(out_dir))
    metrics = out_dir / "metrics.json"
    deadline = time.monotonic() + 600
    while not metrics.exists():
        assert proc.poll() is None, finish(proc)[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    rows = json.loads(metrics.read_text())
    assert 1 <= len(rows) < len(steps)
    assert [r["steps"] for r in rows] == steps[: len(rows)]
    for r in rows:  # complete rows: every measure and the objective
        assert r["num_samples"] == 2048 and r["nfe"] == r["steps"]
        for k in ("fid", "kid_mean", "nll", "mse", "elbo_bpd", "objective"):
            assert isinstance(r[k], float), k
    with open(out_dir / "metrics.csv") as f:  # written just before metrics.json: never behind it
        assert [int(r["steps"]) for r in csv.DictReader(f)][: len(rows)] == steps[: len(rows)]
    # written before the evaluation began
    assert OmegaConf.load(out_dir / "config.yaml").steps == steps and (out_dir / "checkpoint.ckpt").resolve().is_file()


# -- bad input fails before training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("+foo=1", (r"unknown top-level key\(s\) foo \(from \+foo=1\); the valid top-level keys: callbacks, ckpt_path, "
               r"data, eval, export_dir, logger, loss, lr_scheduler, min_steps, model, objective, optimizer, paths, "
               r"policies, prompts, report_dir, restore, sampler, "
               r"schedule, seed, steps, task, train, trainer\.")),
    ("++num_samples=500", r"unknown top-level key\(s\) num_samples \(from \+\+num_samples=500\)"),
    ("steps=[5,10,5]", r"steps=\[5, 10, 5\] repeats 5: each step count is one row of the results, list each once"),
    ("eval.grid_size=-1", r"eval.grid_size must be an integer ≥ 0 \(0: none\), got -1"),
    ("eval.grid_columns=-2", r"eval.grid_columns must be an integer ≥ 0 \(0: none\), got -2"),
    ("eval.save_samples=-1", r"eval.save_samples must be an integer ≥ 0 \(0: none\), got -1"),
    ("eval.kid_subset_size=0", (r"eval.kid_subset_size must be an integer ≥ 2 \(KID averages over subsets of this "
                               r"size\), got 0")),
    ("eval.kid_subset_size=300", r"eval.num_samples=256 is below the minimum 300"),
    ("eval.reference_split=val data.n_val=50", (r"eval.kid_subset_size=64 exceeds the reference set: 50 samples of "
                                               r"the val split of toy2d-8gaussians")),
    ("eval.num_reference=5000", (r"eval.num_reference=5000 but the train split of toy2d-8gaussians\S+ has 2048 "
                                r"samples: lower it, or null for the whole split")),
    ("eval.num_reference=10", r"eval.num_reference must be an integer ≥ 64"),
    ("eval.elbo.num_samples=2000", (r"eval.elbo.num_samples=2000 but the val split of toy2d\S+ has 1024 samples: "
                                   r"lower it \(0: no ELBO\) or choose eval.elbo.split=train")),
    ("eval.reference_split=test", r"unknown eval.reference_split 'test'; valid choices: train, val"),
    ("eval.elbo.split=test", r"unknown eval.elbo.split 'test'; valid choices: train, val"),
    ("eval.elbo.variance=fixed", r"unknown eval.elbo.variance 'fixed'; valid choices: posterior, beta, learned"),
    ("eval.features=clip", r"unknown eval.features 'clip'; valid choices: auto, digits, inception, identity"),
    ("eval.features=digits", r"eval.features=digits needs the 8×8 digits images"),
    ("eval.mse.reference_sampler=ddpm", (r"eval.mse.reference_sampler must be deterministic .* got 'ddpm'; choose "
                                        r"one of: ddim, euler, heun")),
    ("eval.mse.reference_steps=1", r"eval.mse.reference_steps must be an integer ≥ 2"),
    ("eval.mse.reference_spacing=cosine", (r"the trajectory reference \(eval.mse.reference_sampler=heun, "
                                           r"reference_steps=200, reference_spacing=cosine\): unknown spacing "
                                           r"'cosine'; valid choices: leading, trailing")),
])
def test_bad_evaluation_input_fails_before_training(tmp_path, override, message):
    proc = run_py(tmp_path, *FAST, "logger=csv", *override.split(), check=False, in_process=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(message, text), text[-2000:]
    assert not (tmp_path / "outputs" / "checkpoints").exists()  # nothing trained
    assert not list(tmp_path.rglob("metrics.json")) and not (tmp_path / "run" / "config.yaml").exists()


def test_a_refused_input_is_reported_in_two_lines_with_its_traceback_in_the_log(tmp_path, monkeypatch):
    """Hydra's report of a ValueError is its message and where it was raised, not a stack trace over it; the trace
    goes to the run's log file. A crash (not a ValueError) keeps Hydra's full report."""
    proc = run_py(tmp_path, *FAST, "logger=none", "steps=0", check=False, in_process=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    report = proc.stderr.split("Error executing job with overrides: ")[1].splitlines()[1:3]
    assert report[0] == "steps must be a positive integer, got 0", proc.stderr
    where = re.fullmatch(r"  \(ValueError raised in diffsteps/core/spacings.py:(\d+), make_timesteps; its traceback "
                         r"is in (.*run.log)\)", report[1])
    assert where, report
    line = int(where[1])
    source = (ROOT / "src" / "diffsteps" / "core" / "spacings.py").read_text().splitlines()[line - 1]
    assert 'raise ValueError(f"steps must be a positive integer' in source
    log = Path(where[2]).read_text()
    assert "the run stopped: steps must be a positive integer, got 0\nTraceback (most recent call last):" in log
    assert log.rstrip().endswith("ValueError: steps must be a positive integer, got 0")

    from hydra.errors import CompactHydraException

    from diffsteps.runner.errors import report_in_one_line

    def task(error):
        raise error

    with pytest.raises(RuntimeError, match="^a crash$") as crash:  # not a refusal: unchanged, Hydra's full report
        report_in_one_line(task)(RuntimeError("a crash"))
    assert not isinstance(crash.value, CompactHydraException)
    original = ValueError("bad")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # pytest's own file handler writes to /dev/null
    with pytest.raises(ValueError, match=r"^bad\n  \(ValueError raised in .*, task\)$") as refused:
        report_in_one_line(task)(original)  # no log file here: nothing said about one
    assert isinstance(refused.value, CompactHydraException) and refused.value.__cause__ is original


def test_the_digits_elbo_split_is_checked_before_training(tmp_path):
    # the default data: 1797 digits, 359 of them in the val split the ELBO reads
    proc = run_py(tmp_path, "logger=csv", "train.max_steps=30", "eval.elbo.num_samples=1000", check=False,
                  in_process=True)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and re.search(r"eval.elbo.num_samples=1000 but the val split of digits\S+ has 359 "
                                              r"samples", text), text[-2000:]
    assert not (tmp_path / "outputs" / "checkpoints").exists()


def test_an_experiment_presets_own_keys_are_not_unknown(tmp_path):
    # sampler_comparison adds a top-level sampler_steps; only keys added on the command line are rejected
    proc = start(tmp_path, "experiment=sampler_comparison", *FAST, "logger=csv", "sampler=heun",
                 "eval.num_samples=128", "eval.batch_size=128", "eval.elbo.num_samples=0", "eval.mse.num_samples=0",
                 run_dir=str(tmp_path / "run"))
    text = finish(proc)
    assert proc.returncode == 0, text[-3000:]
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["steps"] for r in rows] == [5, 10, 25, 50]
