"""One multirun that several test files read (each run of run.py costs seconds): ``-m seed=0,1`` of the FAST toy
run through submitit's local executor (``hydra/launcher=submitit_local``, each job its own process), logged to W&B
offline. test_submitit checks how it ran, test_lineage its W&B runs and the seed aggregation, test_html_report its
report.html files. Made once per test session, on first use."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from helpers import FAST, ROOT, run_command

SEEDS = (0, 1)
STEPS = (5, 10)
# FAST without the two most expensive measures: the sweep's point is the plumbing, not the numbers
OVERRIDES = [*FAST, f"steps=[{','.join(map(str, STEPS))}]", "eval.mse.num_samples=0", "eval.elbo.num_samples=0",
             "logger=wandb", "hydra/launcher=submitit_local", f"seed={','.join(map(str, SEEDS))}"]
_made: dict[str, Path] = {}


def env_for(root: Path) -> dict:
    return {**os.environ, "DIFFSTEPS_ROOT": str(root), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_DATA_DIR": str(root / "wandb-data"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def seed_sweep(tmp_path_factory) -> Path:
    """The multirun's sweep folder (jobs 0 and 1 under it, the summary and report.html beside them)."""
    if "sweep" not in _made:
        root = tmp_path_factory.mktemp("seed_sweep")
        sweep = root / "sweep"
        cmd = [sys.executable, str(ROOT / "run.py"), "-m", f"hydra.sweep.dir={sweep}", *OVERRIDES]
        proc = run_command(cmd, env_for(root))
        if proc.returncode != 0 or not (sweep / "report.html").is_file():
            raise AssertionError(f"the seed multirun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-6000:]}")
        (sweep / "launcher.log").write_text(proc.stdout + proc.stderr)
        _made["sweep"] = sweep
    return _made["sweep"]
