"""The cluster path (hydra-submitit-launcher) run here through submitit's local executor: a plain multirun of run.py
(the shared seed multirun) and a GP sweep whose batches are submitit jobs, which resumes exactly like one run
through the basic launcher; the SLURM presets compose into submitit's SLURM launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from seed_sweep import SEEDS, seed_sweep

from diffsteps.runner.resolvers import register_resolvers

pytestmark = pytest.mark.xdist_group("seed_sweep")  # one worker makes the shared multirun (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "sweep_app" / "app.py"
SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher"


def test_multirun_jobs_ran_as_submitit_jobs(tmp_path_factory):
    sweep = seed_sweep(tmp_path_factory)
    launched = OmegaConf.load(sweep / "multirun.yaml").hydra.launcher
    assert launched._target_ == f"{SUBMITIT}.LocalLauncher"
    folders = {p.name: p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()}
    assert len(folders) == len(SEEDS)
    for job in range(len(SEEDS)):
        job_id = str(OmegaConf.load(sweep / str(job) / ".hydra" / "hydra.yaml").hydra.job.id)
        # submitit's local job id is the pid of the process that ran the job: not the launcher's
        out = folders[job_id] / f"{job_id}_0_log.out"
        assert out.is_file() and (folders[job_id] / f"{job_id}_0_result.pkl").is_file()
        assert (sweep / str(job) / "metrics.json").is_file()
    assert "Submitit 'local' sweep output dir" in (sweep / "launcher.log").read_text()


def gp_sweep(sweep_dir: Path, n_calls: int, *launcher: str) -> subprocess.Popen:
    """The quadratic of tests/sweep_app in batches of 2 (EI, seeded), in the background."""
    cmd = [sys.executable, str(APP), "-m", "hydra/sweeper=gp", f"hydra.sweep.dir={sweep_dir}",
           "hydra.sweeper.acq_func=EI", "hydra.sweeper.random_state=1", "x=interval(-1,1)", "y=int(interval(0,20))",
           "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_initial_points=2", f"hydra.sweeper.n_calls={n_calls}",
           *launcher]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(sweep_dir.parent / f"{sweep_dir.name}-{n_calls}.log", "w")  # noqa: SIM115 (closed by the child's end)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finished(proc: subprocess.Popen, sweep_dir: Path, n_calls: int) -> str:
    proc.wait(timeout=300)
    text = (sweep_dir.parent / f"{sweep_dir.name}-{n_calls}.log").read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def test_gp_sweep_through_submitit_resumes_like_the_basic_launcher(tmp_path):
    # both chains at once (wall time of one): 2 random trials, then the same command with n_calls=4 resumes
    local, basic = tmp_path / "local", tmp_path / "basic"
    chains = {local: ["hydra/launcher=submitit_local"], basic: []}
    logs: dict[Path, list[str]] = {d: [] for d in chains}
    for n_calls in (2, 4):
        procs = {d: gp_sweep(d, n_calls, *launcher) for d, launcher in chains.items()}
        for d, proc in procs.items():
            logs[d].append(finished(proc, d, n_calls))
    results = {d: yaml.safe_load((d / "optimization_results.yaml").read_text()) for d in chains}
    # the same trials, values and best point: the GP saw the same results in the same order
    assert results[local]["trials"] == results[basic]["trials"]
    assert results[local]["n_trials"] == 4 and results[local]["best_value"] == results[basic]["best_value"]
    for d in chains:
        assert "resuming from 2 trials" in logs[d][1] and sorted(int(p.name) for p in d.glob("[0-9]*")) == [0, 1, 2, 3]
    # the local chain's 4 jobs were submitit jobs (2 per invocation), numbered on across the resume
    assert len([p for p in (local / ".submitit").iterdir() if p.name.isdigit()]) == 4
    assert all("Submitit 'local' sweep output dir" in t for t in logs[local])
    assert not (basic / ".submitit").exists()


@pytest.mark.parametrize("preset,gpus", [("slurm_gpu", 1), ("slurm_ddp", 4)])
def test_slurm_presets_compose_into_submitits_slurm_launcher(preset, gpus):
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={preset}", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == f"{SUBMITIT}.SlurmLauncher" and launcher.partition == "gpu"
    # one process per GPU, each seeing all the job's GPUs (Lightning's SLURM environment assigns the ranks)
    assert launcher.tasks_per_node == launcher.gpus_per_node == gpus and launcher.gpus_per_task is None
    assert launcher.nodes == 1 and launcher.timeout_min >= 60 and launcher.submitit_folder.endswith(".submitit/%j")
