"""The checkpoint cache: a number in metrics.json is the number the stated weights produced.

One process trains a cache entry at a time (a second run waits and reuses, or fails naming the holder; a killed
holder's lock is free again), a killed run resumes bit for bit at any step, every checkpoint carries its training
config and is checked against the run's when loaded, the cache key covers every setting that changes the weights,
and unusable or half-made entries are handled. In process where a subprocess adds nothing; the run.py subprocesses
are tiny (a 2-D mixture, a 64-wide MLP, tens of steps).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import OmegaConf
from PIL import Image
import helpers

import diffsteps as ds
from diffsteps.data import Toy2DData
from diffsteps.nets import MLP
from diffsteps.runner.checkpoints import (
    CheckpointError,
    _source_text,
    _weight_source_files,
    cache_lock,
    code_version,
    load_weights,
    lock_paths,
    provenance,
    training_key,
    weights_digest,
)
from diffsteps.training.ema import ema_callback
from diffsteps.training.module import PROVENANCE_KEY, DiffusionModule, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
OmegaConf.register_new_resolver("launch_dir", os.getcwd, replace=True)  # as run.py does

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*overrides the configure_model:UserWarning"),
]

# 2-D mixture, 64-wide MLP; 2048 / 256 = 8 batches per epoch
TINY = ["data=toy2d", "data.n_train=2048", "data.n_val=1024", "model=mlp", "model.hidden=64", "model.depth=2",
        "lr_scheduler.warmup_steps=5", "callbacks.progress.every_n_steps=10", "trainer.val_check_interval=1000",
        "logger=csv"]
EVAL = ["steps=5", "objective=nll", "eval.num_samples=128", "eval.batch_size=128", "eval.kid_subset_size=64",
        "eval.mse.num_samples=0", "eval.elbo.num_samples=0"]


def compose_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def env_for(root: Path) -> dict:
    return {**os.environ, "DIFFSTEPS_ROOT": str(root), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def start(root: Path, name: str, *overrides: str) -> subprocess.Popen:
    """``python run.py`` in the background, its output in ``<root>/<name>.log``."""
    with open(root / f"{name}.log", "w") as log_file:  # the child writes to its own copy of the descriptor
        return subprocess.Popen([sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={root}/{name}", *overrides],
                                cwd=ROOT, env=env_for(root), stdout=log_file, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, root: Path, name: str, check: bool = True) -> str:
    proc.wait(timeout=600)
    text = (root / f"{name}.log").read_text()
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {name} failed ({proc.returncode}):\n{text[-5000:]}")
    return text


def run_py(root: Path, name: str, *overrides: str, check: bool = True) -> tuple[int, str]:
    proc = start(root, name, *overrides)
    text = finish(proc, root, name, check=check)
    return proc.returncode, text


def entries(root: Path) -> list[Path]:
    """The cache entries (folders) under a root."""
    base = root / "outputs" / "checkpoints"
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) if base.exists() else []


def cached_digest(ckpt: Path) -> str:
    return weights_digest(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])


def logged_digests(text: str) -> list[str]:
    return re.findall(r"weights sha256 ([0-9a-f]{16})", text)


# -- one trainer per cache entry ---------------------------------------------------------------------------------------
def test_two_concurrent_runs_one_trains_the_other_waits_and_reuses(tmp_path, monkeypatch):
    overrides = [*TINY, *EVAL, "train.max_steps=60", "callbacks.model_checkpoint.every_n_train_steps=10"]
    monkeypatch.setenv("DIFFSTEPS_ROOT", str(tmp_path))
    entry = _key_and_entry(compose_cfg(*overrides))
    # a gate: both runs reach the entry's lock while this test holds it, so both are there when it opens — one takes
    # it and trains, the other waits for that one, however fast the machine or either run is
    with cache_lock(entry, wait=False, run_dir="gate"):
        procs = {name: start(tmp_path, name, *overrides) for name in ("a", "b")}
        deadline = time.monotonic() + 300
        while not all(f"waiting for pid {os.getpid()}" in (tmp_path / f"{n}.log").read_text() for n in procs):
            assert all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline
            time.sleep(0.1)
    logs = {name: finish(p, tmp_path, name) for name, p in procs.items()}
    trained = [n for n, t in logs.items() if "training from step 0" in t]
    reused = [n for n, t in logs.items() if "reusing the checkpoint" in t]
    assert len(trained) == 1 and len(reused) == 1 and trained != reused, {n: t[-2000:] for n, t in logs.items()}
    trainer, waiter = trained[0], reused[0]
    # the waiter says whom it waited for (pid, host, run folder) and took that run's checkpoint
    pid = procs[trainer].pid
    assert re.search(rf"waited [\d.]+ s for pid {pid} on host {re.escape(socket.gethostname())} \(run folder "
                     rf"{re.escape(str(tmp_path / trainer))}, since ", logs[waiter]), logs[waiter][-3000:]
    assert "resuming" not in logs[waiter] and "training from" not in logs[waiter]
    [entry] = entries(tmp_path)
    last = entry / "last.ckpt"
    done = json.loads((entry / "complete.json").read_text())
    # the weights both runs evaluated are the cached ones, which the trainer finished with
    digest = cached_digest(last)
    assert logged_digests(logs[trainer]) == [digest] and logged_digests(logs[waiter]) == [digest]
    assert done["weights_sha256"] == digest and done["global_step"] == 60 and done["pid"] == pid
    for name in ("a", "b"):
        assert (tmp_path / name / "checkpoint.ckpt").resolve() == last.resolve()
    timing = ("sample_seconds", "model_seconds", "seconds_per_sample")
    rows = {n: [{k: v for k, v in r.items() if k not in timing}
                for r in json.loads((tmp_path / n / "metrics.json").read_text())] for n in ("a", "b")}
    assert rows["a"] == rows["b"] and rows["a"][0]["nll"] > 0  # the same weights: the same numbers
    _, holder_file, released_file = lock_paths(entry)
    assert not holder_file.exists() and json.loads(released_file.read_text())["pid"] == procs[waiter].pid


def _key_and_entry(cfg) -> Path:
    return Path(cfg.paths.checkpoint_dir) / training_key(cfg)


def test_wait_for_lock_false_fails_naming_the_holder(tmp_path, monkeypatch):
    from diffsteps.runner import run

    monkeypatch.setenv("DIFFSTEPS_ROOT", str(tmp_path))
    cfg = compose_cfg(*TINY, *EVAL, "train.max_steps=5", "train.wait_for_lock=false",
                      f"paths.output_dir={tmp_path}/run")
    entry = _key_and_entry(cfg)
    with cache_lock(entry, wait=False, run_dir="/somewhere/else/holder-run"), pytest.raises(RuntimeError) as err:
        run(cfg)
    assert re.fullmatch(
        re.escape(f"the checkpoint cache entry {entry} of this training config is being trained by pid {os.getpid()} "
                  f"on host {socket.gethostname()} (run folder /somewhere/else/holder-run, since ")
        + r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
        + re.escape("); train.wait_for_lock=false, so not waiting: run again when it is done (its checkpoint is "
                    "then reused), or set train.wait_for_lock=true to wait for it"), str(err.value)), str(err.value)
    assert not entry.exists()  # the refused run made no entry


_HOLDER = """
import sys, time
from pathlib import Path
from diffsteps.runner.checkpoints import cache_lock
with cache_lock(Path(sys.argv[1]), wait=False, run_dir="killed-run"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_lock_of_a_killed_process_is_free_again(tmp_path):
    import threading

    entry = tmp_path / "checkpoints" / "0123456789ab"

    def holder() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(entry)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.stdout.readline().strip() == "locked"
        return proc

    first = holder()
    try:
        with pytest.raises(RuntimeError, match=rf"being trained by pid {first.pid} on host .* \(run folder "
                                               rf"killed-run, since"), cache_lock(entry, wait=False, run_dir="me"):
            pass
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    lock_file, holder_file, _ = lock_paths(entry)
    assert holder_file.is_file()  # a SIGKILLed process cleans nothing up ...
    # ... but the OS released its lock with it: taken at once, without waiting
    with cache_lock(entry, wait=False, run_dir="me") as waited:
        assert waited is None
        assert json.loads(holder_file.read_text())["pid"] == os.getpid()
    assert not holder_file.exists() and lock_file.exists()
    # a run waiting for a holder that is then killed gets the lock, and says the holder ended without releasing it
    second = holder()
    threading.Timer(0.5, second.send_signal, (signal.SIGKILL,)).start()
    with cache_lock(entry, wait=True, run_dir="me") as waited:
        assert waited["holder"].startswith(f"pid {second.pid} on host ") and waited["holder"].endswith(
            "which ended without releasing it")
    second.wait()


# -- exact resume ------------------------------------------------------------------------------------------------------
class _StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit(schedule, *, stop=None, ckpt_dir=None, ckpt_path=None, seed=0, accumulate=1, val_every=None):
    """16 optimiser steps on Toy2DData (8 batches of 64 per epoch) with dropout, EMA and warm-up + cosine;
    ``stop`` ends it early with a checkpoint there, ``ckpt_path`` resumes one, ``val_every`` validates every that
    many steps (after the checkpoint of the step). Returns the module and the trainer."""
    L.seed_everything(seed, verbose=False)
    dm = Toy2DData(n_train=8 * 64 + 10, n_val=64, batch_size=64, seed=3)
    module = DiffusionModule(MLP(2, hidden=16, depth=1, time_dim=8, dropout=0.2), schedule,
                             ds.DiffusionLoss("simple", "v"),
                             optimizer=functools.partial(torch.optim.AdamW, lr=5e-3),
                             lr_scheduler=functools.partial(warmup_cosine, warmup_steps=3, min_lr_ratio=0.1))
    callbacks = [ema_callback(0.9)]
    if stop is not None:
        callbacks += [_StopAt(stop), ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                                     every_n_train_steps=stop)]
    val = {"limit_val_batches": 0} if val_every is None else {"val_check_interval": val_every,
                                                               "check_val_every_n_epoch": None}
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=stop is not None,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, max_steps=16,
                        accumulate_grad_batches=accumulate, callbacks=callbacks, **val)
    trainer.fit(module, dm, ckpt_path=ckpt_path, weights_only=True)
    return module, trainer


@functools.cache
def _uninterrupted(accumulate: int, val_every: int | None):
    module, trainer = _fit(ds.make_schedule("linear", 1000), accumulate=accumulate, val_every=val_every)
    return module.state_dict(), trainer.optimizers[0].state_dict(), trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.parametrize("accumulate,stop,val_every", [(1, 5, None), (1, 8, None), (2, 5, None), (1, 5, 5)],
                         ids=["mid-epoch", "epoch-end", "mid-epoch-accumulating", "before-a-validation"])
def test_resume_at_any_step_is_bit_exact(tmp_path, accumulate, stop, val_every):
    # 8 batches per epoch: step 5 is mid-epoch, step 8 the epoch's last batch; with 2 micro-batches per step, step 5
    # is batch 2 of epoch 1; a validation at step 5 runs after its checkpoint (Lightning skips it on resume). The
    # resumed process is seeded differently: all it continues with comes from the checkpoint — the data position
    # (ResumableLoader), the EMA average, the optimiser and LR schedule, the noise and dropout streams (per step)
    schedule = ds.make_schedule("linear", 1000)
    _fit(schedule, stop=stop, ckpt_dir=tmp_path, accumulate=accumulate, val_every=val_every)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == stop
    resumed, trainer = _fit(schedule, ckpt_path=str(tmp_path / "last.ckpt"), seed=12345, accumulate=accumulate,
                            val_every=val_every)
    weights, opt, lr = _uninterrupted(accumulate, val_every)
    assert trainer.global_step == 16
    for k, v in weights.items():  # after fit: the EMA average
        assert torch.equal(resumed.state_dict()[k], v), k
    got = trainer.optimizers[0].state_dict()
    for i, state in opt["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got["state"][i][name], state[name]), (i, name)
    assert trainer.optimizers[0].param_groups[0]["lr"] == lr


def test_killed_run_resumes_to_the_same_weights_bit_for_bit(tmp_path):
    # 1408 / 128 = 11 batches per epoch, a checkpoint every 4 steps (4, 8, 12, …: all mid-epoch up to step 40) and
    # a validation every 8 (run after that step's checkpoint is written), dropout on: killed (SIGKILL) right after
    # its first checkpoint appears, then run again
    overrides = [*(o for o in TINY if not o.startswith(("data.n_train", "trainer.val_check_interval"))),
                 "task=train", "data.n_train=1408", "data.batch_size=128", "model.dropout=0.1", "train.max_steps=40",
                 "callbacks.model_checkpoint.every_n_train_steps=4", "trainer.val_check_interval=8"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    run_py(whole, "run", *overrides)
    proc = start(cut, "killed", *overrides)
    deadline = time.monotonic() + 300
    while not list((cut / "outputs" / "checkpoints").glob("*/last.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline, (cut / "killed.log").read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [entry] = entries(cut)
    step = torch.load(entry / "last.ckpt", weights_only=True)["global_step"]
    assert 4 <= step < 40 and step % 11 != 0 and not (entry / "complete.json").exists()
    _, text = run_py(cut, "resumed", *overrides)
    assert f"resuming unfinished training from {entry / 'last.ckpt'}" in text
    a = torch.load(entries(whole)[0] / "last.ckpt", weights_only=True)
    b = torch.load(entry / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 40
    for part in ("state_dict", "current_model_state"):  # the EMA average and the raw weights
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for s, t in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(s["exp_avg"], t["exp_avg"]) and torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])
    assert a["lr_schedulers"] == b["lr_schedulers"]


# -- provenance ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eps_run(tmp_path_factory):
    """An ε-prediction model trained and evaluated by run.py (v is the configs' default)."""
    root = tmp_path_factory.mktemp("eps")
    run_py(root, "train", *TINY, *EVAL, "loss.prediction=epsilon", "train.max_steps=30",
           "callbacks.model_checkpoint.every_n_train_steps=10")
    return root


def test_checkpoint_records_its_training_config(eps_run):
    [entry] = entries(eps_run)
    ckpt = torch.load(entry / "last.ckpt", weights_only=True)
    prov = ckpt[PROVENANCE_KEY]
    assert prov["key"] == entry.name and prov["global_step"] == 30
    cfg = prov["config"]
    assert cfg["loss"]["prediction"] == "epsilon" and cfg["model"]["hidden"] == 64 and cfg["train"]["max_steps"] == 30
    assert cfg["data"]["_target_"] == "diffsteps.data.Toy2DData" and cfg["data_fingerprint"] is None
    assert cfg["optimizer"]["lr"] == 2e-3 and cfg["lr_scheduler"]["warmup_steps"] == 5
    assert cfg["trainer"] == {"precision": "32-true", "accumulate_grad_batches": 1, "limit_train_batches": 1.0,
                              "gradient_clip_algorithm": "norm", "max_epochs": -1, "world_size": 1}
    assert prov["code"] == code_version()
    assert "wait_for_lock" not in cfg["train"]


def test_eval_of_a_checkpoint_uses_its_training_config(eps_run):
    # nothing training-relevant on the command line: the ε-network is evaluated as the ε-network it is, exactly as
    # the run that trained it evaluated it
    link = eps_run / "train" / "checkpoint.ckpt"
    _, text = run_py(eps_run, "eval", "task=eval", f"ckpt_path={link}", *EVAL, "logger=csv")
    assert "loss.prediction=epsilon" in text and "with the config it was trained with" in text
    first = json.loads((eps_run / "train" / "metrics.json").read_text())
    again = json.loads((eps_run / "eval" / "metrics.json").read_text())
    for a, b in zip(first, again):
        for k in ("fid", "kid_mean", "nll"):
            assert a[k] == b[k], k
    config = OmegaConf.load(eps_run / "eval" / "config.yaml")
    assert config.loss.prediction == "epsilon" and config.data._target_ == "diffsteps.data.Toy2DData"
    assert len(entries(eps_run)) == 1  # nothing trained


def test_eval_with_a_disagreeing_override_names_it(eps_run):
    link = eps_run / "train" / "checkpoint.ckpt"
    proc = helpers.run_py(eps_run, "task=eval", f"ckpt_path={link}", "loss.prediction=v", "model.hidden=32", *EVAL,
                          name="eval_v", check=False, in_process=True)  # fails before any work: no interpreter
    rc, text = proc.returncode, proc.stdout + proc.stderr
    assert rc != 0
    assert (f"checkpoint {link} was trained with another config: trained with loss.prediction=epsilon, this run "
            f"has v; trained with model.hidden=64, this run has 32. Those values were set") in text
    assert not (eps_run / "eval_v" / "metrics.json").exists()


def test_other_model_size_names_the_parameter_and_both_shapes(tmp_path, caplog):
    # a checkpoint without provenance (as older ones): loaded with a warning, its shapes checked against the model
    schedule = ds.make_schedule("linear", 1000)
    small = DiffusionModule(MLP(2, hidden=16, depth=1, time_dim=8), schedule, ds.DiffusionLoss("simple", "v"))
    big = DiffusionModule(MLP(2, hidden=32, depth=1, time_dim=8), schedule, ds.DiffusionLoss("simple", "v"))
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": small.state_dict()}, path)
    with caplog.at_level(logging.WARNING, logger="diffsteps"), pytest.raises(CheckpointError) as err:
        load_weights(big, path)
    assert "has no provenance" in caplog.text
    message = str(err.value)
    assert message.startswith(f"checkpoint {path} does not fit this model config: ")
    w = [k for k in small.state_dict() if small.state_dict()[k].shape != big.state_dict()[k].shape]
    first = w[0]
    assert (f"{first}: checkpoint {tuple(small.state_dict()[first].shape)}, this model "
            f"{tuple(big.state_dict()[first].shape)}") in message
    assert f"{len(w)} parameters of another shape" in message
    # the same size loads, with the same warning
    other = DiffusionModule(MLP(2, hidden=16, depth=1, time_dim=8), schedule, ds.DiffusionLoss("simple", "v"))
    assert load_weights(other, path) is None
    assert weights_digest(other.state_dict()) == weights_digest(small.state_dict())


# -- the key covers every setting that changes the weights ------------------------------------------------------------
BASE = [*TINY, "train.max_steps=30"]


@pytest.mark.parametrize("override", [
    "trainer.precision=bf16-mixed", "+trainer.accumulate_grad_batches=2", "+trainer.limit_train_batches=0.5",
    "trainer.devices=2", "+trainer.num_nodes=2", "trainer=ddp", "+trainer.gradient_clip_algorithm=value", "callbacks.ema=null",
    "loss.prediction=epsilon", "data.batch_size=128", "seed=1", "train.max_steps=31",
])
def test_key_changes_with_every_setting_that_changes_the_weights(override):
    assert training_key(compose_cfg(*BASE, override)) != training_key(compose_cfg(*BASE))


@pytest.mark.parametrize("override", [
    "train.wait_for_lock=false", "trainer.precision=32", "callbacks.model_checkpoint.every_n_train_steps=7",
    "callbacks.progress.every_n_steps=3", "trainer.val_check_interval=7", "sampler=heun", "steps=[3,4]",
    "eval.num_samples=512",
])
def test_key_ignores_what_does_not_change_the_weights(override):
    assert training_key(compose_cfg(*BASE, override)) == training_key(compose_cfg(*BASE))


def _pngs(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB").save(folder / f"im{i}.png")
    return folder


def test_changed_image_file_changes_the_key(tmp_path):
    folder = _pngs(tmp_path / "faces")
    cfg = compose_cfg(*(o for o in BASE if not o.startswith(("data", "model"))), "data=image_folder",
                      f"data.root={folder}", "data.image_size=8", "model=unet")

    def key():
        return training_key(cfg)  # a fresh data module each time, as each run has

    before = key()
    assert key() == before
    target = folder / "im3.png"
    # different pixels of the same size, the modification time put back: still a different data set
    im = np.asarray(Image.open(target)).copy()
    im[0, 0] = 255 - im[0, 0]
    stat = target.stat()
    raw = target.read_bytes()
    Image.fromarray(im).save(target)
    changed = key()
    assert changed != before
    target.write_bytes(raw)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert key() == before  # the very same files again
    (folder / "im6.png").write_bytes(raw)
    assert key() not in (before, changed)  # one more image
    (folder / "im6.png").unlink()
    shutil.move(folder / "im5.png", folder / "renamed.png")
    assert key() != before


def test_code_version_hashes_the_code_not_its_comments():
    plain = "def f(x):\n    return x + 1\n"
    noted = '"""Module."""\n\n\ndef f(x):  # why\n    """Add one."""\n    # comment\n    return x + 1\n'
    edited = "def f(x):\n    return x + 2\n"
    assert _source_text_of(plain) == _source_text_of(noted) != _source_text_of(edited)
    package = Path(ds.__file__).parent
    files = {p.relative_to(package).as_posix() for p in _weight_source_files()}
    assert {"training/module.py", "training/losses.py", "nets/mlp.py", "nets/unet.py", "data/base.py",
            "core/schedules.py", "training/ema.py"} <= files
    assert not {"training/progress.py", "training/classifier.py", "runner/train.py"} & files
    assert code_version()["files"] == len(files)


def _source_text_of(text: str) -> str:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"diffsteps-src-{os.getpid()}.py"
    path.write_text(text)
    try:
        return _source_text(path)
    finally:
        path.unlink()


# -- loose ends -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,message", [
    (0, "train.max_steps must be an integer >= 1, the optimiser steps to train; got 0 (0 would train nothing"),
    (-1, "got -1 (-1, Lightning's 'no limit', is not supported"),
    (2.5, "got 2.5"),
])
def test_max_steps_below_one_rejected_before_anything_is_built(tmp_path, monkeypatch, steps, message):
    from diffsteps.runner import run

    monkeypatch.setenv("DIFFSTEPS_ROOT", str(tmp_path))
    cfg = compose_cfg(*TINY, *EVAL, f"train.max_steps={steps}", f"paths.output_dir={tmp_path}/run")
    with pytest.raises(ValueError, match=re.escape(message)):
        run(cfg)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "run").exists()


def test_run_failing_inside_training_leaves_no_cache_entry(tmp_path):
    # the data loader fails when fit starts (batch larger than the train split): the entry made for it is removed
    rc, text = run_py(tmp_path, "run", *TINY, *EVAL, "train.max_steps=5", "data.batch_size=4096", check=False)
    assert rc != 0 and "fewer than batch_size=4096" in text
    assert entries(tmp_path) == []


def test_corrupt_cached_checkpoint_is_moved_aside_and_retrained(eps_run, tmp_path):
    shutil.copytree(eps_run / "outputs", tmp_path / "outputs")
    [entry] = entries(tmp_path)
    last = entry / "last.ckpt"
    good = cached_digest(last)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated, as by a full disk
    _, text = run_py(tmp_path, "again", *TINY, "task=train", "loss.prediction=epsilon", "train.max_steps=30",
                     "callbacks.model_checkpoint.every_n_train_steps=10")
    [aside] = entry.glob("last.ckpt.corrupt-*")
    assert re.search(rf"the cached checkpoint cannot be used: checkpoint {re.escape(str(last))} is corrupt or not a "
                     rf"diffsteps checkpoint \(.*\); moved it to {re.escape(str(aside))} and training this config "
                     rf"again from step 0", text)
    assert "training from step 0" in text
    assert cached_digest(last) == good  # the same config trained again: the same weights
    assert json.loads((entry / "complete.json").read_text())["weights_sha256"] == good


def test_provenance_is_plain_data(eps_run):
    # everything a checkpoint holds loads with weights_only=True (the runner reads nothing else), and the
    # provenance the runner computes for the same config is the recorded one
    [entry] = entries(eps_run)
    ckpt = torch.load(entry / "last.ckpt", weights_only=True)
    cfg = compose_cfg(*TINY, *EVAL, "loss.prediction=epsilon", "train.max_steps=30",
                      "callbacks.model_checkpoint.every_n_train_steps=10")
    expected = provenance(cfg)
    recorded = dict(ckpt[PROVENANCE_KEY])
    assert recorded.pop("global_step") == 30
    assert recorded == expected


def test_unfinished_checkpoint_that_cannot_be_resumed_is_named(eps_run, tmp_path):
    from diffsteps.runner.train import _resume_problem

    [entry] = entries(eps_run)
    cfg = compose_cfg(*TINY, *EVAL, "loss.prediction=epsilon", "train.max_steps=30",
                      "callbacks.model_checkpoint.every_n_train_steps=10")
    mine = provenance(cfg)
    assert _resume_problem(entry / "last.ckpt", mine) is None
    # another config's checkpoint in this entry: named, not resumed
    other = provenance(compose_cfg(*TINY, *EVAL, "train.max_steps=30"))
    assert _resume_problem(entry / "last.ckpt", other) == (
        f"the unfinished checkpoint {entry / 'last.ckpt'} is not this training config's (trained with "
        f"loss.prediction=epsilon, this run has v)")
    garbage = tmp_path / "last.ckpt"
    garbage.write_bytes(b"\x00" * 100)
    assert _resume_problem(garbage, mine).startswith(
        f"the unfinished checkpoint cannot be resumed: checkpoint {garbage} is corrupt or not a diffsteps checkpoint")
    weights_only = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {}}, weights_only)
    assert "lacks the training state" in _resume_problem(weights_only, mine)
