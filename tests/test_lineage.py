"""W&B lineage and uncertainty over seeds.

The W&B runs are read back from the files W&B writes offline: ``run-<id>.wandb`` is a LevelDB-style log of
protobuf ``Record``s (W&B's own reader moved to its Go core), read here with a few lines of ``struct``. The seed
aggregation is checked against scipy's Student-t interval computed directly from each job's metrics.json.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from helpers import offline_runs
from seed_sweep import SEEDS, STEPS, seed_sweep

import diffsteps.runner.train as train_mod
from diffsteps.runner.resolvers import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
register_resolvers()

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*:UserWarning"),
              pytest.mark.xdist_group("seed_sweep")]  # one worker makes the shared multirun (conftest.py)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return seed_sweep(tmp_path_factory)


# -- uncertainty over seeds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 7])
def test_mean_interval_is_scipys_student_t_interval(n):
    from diffsteps.reporting.report import mean_interval

    x = np.random.default_rng(n).normal(3.0, 0.5, n)
    lo, hi = scipy.stats.t.interval(0.95, n - 1, loc=x.mean(), scale=scipy.stats.sem(x))
    mean, sd, half = mean_interval(x.tolist())
    assert mean == pytest.approx(x.mean(), rel=1e-14) and sd == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    assert (mean - half, mean + half) == pytest.approx((lo, hi), rel=1e-12)
    one = mean_interval([1.5])
    assert one[0] == 1.5 and math.isnan(one[1]) and math.isnan(one[2])


def test_seed_multirun_is_aggregated_into_intervals_of_the_mean(sweep):
    per_job = {}
    for job in (0, 1):
        cfg = OmegaConf.load(sweep / str(job) / "config.yaml")
        # the seed reached the data split, the evaluation noise and KID's subsets
        assert cfg.data.seed == cfg.eval.noise_seed == cfg.eval.kid_seed == cfg.seed == SEEDS[job]
        per_job[job] = {r["steps"]: r for r in json.loads((sweep / str(job) / "metrics.json").read_text())}
    with open(sweep / "summary_seeds.csv") as f:
        table = {int(r["steps"]): r for r in csv.DictReader(f)}
    assert sorted(table) == list(STEPS)
    for steps, row in table.items():
        assert row["n_seeds"] == "2" and row["seeds"] == "0,1"
        for m in ("fid", "kid_mean", "nll"):
            x = np.array([per_job[j][steps][m] for j in (0, 1)])
            assert x[0] != x[1]  # two seeds, two different numbers
            lo, hi = scipy.stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy.stats.sem(x))
            assert float(row[m]) == pytest.approx(x.mean(), rel=1e-12)
            assert float(row[f"{m}_ci"]) == pytest.approx((hi - lo) / 2, rel=1e-12)
        assert float(row["kid_std"]) == pytest.approx(np.mean([per_job[j][steps]["kid_std"] for j in (0, 1)]))
    md = (sweep / "summary_seeds.md").read_text()
    assert f"{float(table[5]['fid']):.4g} ± {float(table[5]['fid_ci']):.4g}" in md


# -- W&B lineage --------------------------------------------------------------------------------------------------
def test_multirun_jobs_are_named_typed_and_log_their_artifacts(sweep):
    for job, seed in enumerate(SEEDS):
        job_dir = sweep / str(job)
        [run] = offline_runs(job_dir)
        r = run["run"]
        assert r.display_name == f"#{job} seed={seed} toy2d-ddim-steps5,10-seed{seed}"
        assert r.job_type == "train" and r.run_group == "-".join(sweep.parts[-2:])
        key = json.loads((job_dir / "checkpoint.ckpt").resolve().with_name("complete.json").read_text())["key"]
        kind, aliases, meta, files = run["artifacts"][f"model-{key}"]
        assert kind == "model" and aliases == {"latest", "step30"} and meta["global_step"] == 30
        # the finished checkpoint is referenced in place (never written again), not copied
        assert files["last.ckpt"] == str((job_dir / "checkpoint.ckpt").resolve())
        kind, _, _, files = run["artifacts"][f"samples-{r.run_id}"]
        assert kind == "samples" and {f"samples_ddim_{n}.pt" for n in STEPS} <= set(files)
        staged = torch.load(files["samples_ddim_5.pt"], weights_only=True)  # the staged copy W&B will upload
        assert torch.equal(staged, torch.load(job_dir / "samples_ddim_5.pt", weights_only=True))
        kind, _, _, files = run["artifacts"][f"results-{r.run_id}"]
        assert kind == "results" and {"metrics.json", "metrics.csv", "config.yaml", "report.html"} <= set(files)
        assert json.loads(Path(files["metrics.json"]).read_text()) == json.loads((job_dir / "metrics.json")
                                                                                 .read_text())


class _PowerCut(Callback):
    """Fails the training at the start of the step after ``at`` (the checkpoint of step ``at`` is on disk)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step >= self.at:
            raise RuntimeError("simulated power cut")


def test_resumed_training_continues_its_run_and_a_reuse_links_to_it(tmp_path, monkeypatch):
    import wandb
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from diffsteps.runner.build import build
    from diffsteps.runner.loggers import RUN_ID_FILE, make_loggers

    from helpers import FAST

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))

    def attempt(name: str, cut: int | None = None):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[*FAST, "logger=wandb", "~logger.csv", f"paths.root_dir={tmp_path}",
                                               f"paths.output_dir={tmp_path / name}",
                                               "trainer.enable_progress_bar=false"])
        schedule = instantiate(cfg.schedule)
        datamodule, module = build(cfg, schedule)
        loggers = make_loggers(cfg, tmp_path / name)
        with monkeypatch.context() as m:
            if cut is not None:
                made = train_mod.make_callbacks
                m.setattr(train_mod, "make_callbacks", lambda *a: [*made(*a), _PowerCut(cut)])
            try:
                return train_mod.train(cfg, module, datamodule, loggers, tmp_path / name)
            finally:
                wandb.finish()

    with pytest.raises(RuntimeError, match="simulated power cut"):
        attempt("cut", cut=15)
    [entry] = (tmp_path / "outputs" / "checkpoints").glob("[!.]*")
    assert torch.load(entry / "last.ckpt", weights_only=True)["global_step"] == 15
    run_id = (entry / RUN_ID_FILE).read_text().strip()
    [cut] = offline_runs(tmp_path / "cut")
    assert cut["run"].run_id == run_id and cut["run"].job_type == "train" and not cut["artifacts"]

    attempt("resumed")  # resumes the cache entry from step 15 …
    [resumed] = offline_runs(tmp_path / "resumed")
    assert resumed["run"].run_id == run_id  # … in the same W&B run, which logs the finished model
    kind, _, meta, files = resumed["artifacts"][f"model-{entry.name}"]
    assert kind == "model" and meta["global_step"] == 30 and files["last.ckpt"] == str(entry / "last.ckpt")

    attempt("reused")  # the same config again: the weights are reused, the run is an evaluation linked to them
    [reused] = offline_runs(tmp_path / "reused")
    assert reused["run"].run_id != run_id and reused["run"].job_type == "eval"
    lineage = reused["config"]["lineage"]
    assert lineage == {"checkpoint": str(entry / "last.ckpt"), "model_artifact": f"model-{entry.name}:latest",
                       "trained_by_run": run_id}


class _Recorder:
    """Stands in for a started W&B run: records what link_model asks of it."""

    def __init__(self, mode: str):
        from types import SimpleNamespace

        self.settings = SimpleNamespace(mode=mode)
        self.used, self.cfg = [], {}
        self.config = SimpleNamespace(update=lambda d, allow_val_change: self.cfg.update(d))

    def use_artifact(self, name, type):  # noqa: A002 (W&B's keyword)
        self.used.append((name, type))


@pytest.mark.parametrize("mode,used", [("online", [("model-abc123-x:latest", "model")]), ("offline", [])])
def test_online_eval_uses_the_model_artifact_by_name(tmp_path, mode, used):
    # the online branch (no W&B server here): the edge is drawn with use_artifact("model-<key>:latest")
    from lightning.pytorch.loggers import WandbLogger

    from diffsteps.runner.loggers import RUN_ID_FILE, link_model

    (tmp_path / RUN_ID_FILE).write_text("trainer1\n")
    run = _Recorder(mode)
    link_model([WandbLogger(experiment=run)], tmp_path / "last.ckpt", "abc123/x")
    assert run.used == used
    assert run.cfg["lineage"] == {"checkpoint": str(tmp_path / "last.ckpt"), "model_artifact": "model-abc123-x:latest",
                                  "trained_by_run": "trainer1"}
