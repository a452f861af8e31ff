"""What several test files share that is not a fixture: noise, a call-counting model wrapper, the closed-form
probability-flow solution for Gaussian data, and how to start ``run.py`` as a user does (tiny settings)."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffsteps import GaussianMixture
from diffsteps.data import DataSpec
from diffsteps.data.base import _InMemoryData

ROOT = Path(__file__).resolve().parents[1]

# a run.py configuration that trains and evaluates in seconds (toy 2-D data, a small MLP)
FAST = ["data=toy2d", "data.n_train=2048", "data.n_val=1024", "model=mlp", "model.hidden=64", "model.depth=2",
        "train.max_steps=30", "trainer.val_check_interval=15", "callbacks.model_checkpoint.every_n_train_steps=15",
        "lr_scheduler.warmup_steps=5", "callbacks.progress.every_n_steps=10", "eval.num_samples=256",
        "eval.batch_size=128", "eval.kid_subset_size=64", "objective=nll"]


RUN_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_py(tmp: Path, *overrides: str, name: str | None = "run", check: bool = True,
           in_process: bool = False) -> subprocess.CompletedProcess:
    """``python run.py hydra.run.dir=<tmp>/<name> *overrides`` with ``DIFFSTEPS_ROOT=<tmp>`` (``name`` None: Hydra's
    own run folder): a subprocess, or with ``in_process`` run.py's ``main()`` here (:func:`run_py_in_process`)."""
    argv = [str(ROOT / "run.py"), *(() if name is None else (f"hydra.run.dir={tmp}/{name}",)), *overrides]
    if in_process:
        proc = run_py_in_process(tmp, argv)
    else:
        proc = run_command([sys.executable, *argv], env={**os.environ, "DIFFSTEPS_ROOT": str(tmp), **RUN_ENV})
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


_SERVER: dict = {}


def run_command(cmd: list[str], env: dict, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``; a ``python
    <script> …`` command whose environment fixes OMP_NUM_THREADS=1 is forked from this worker's fork server
    (tests/forkserver.py: the imports every run.py run pays, 9–10 s of CPU here, paid once), with the same argv,
    environment, working directory and output. ``DIFFSTEPS_TEST_FORK=0`` turns the server off."""
    served = (cmd[0] == sys.executable and len(cmd) > 1 and cmd[1].endswith(".py") and hasattr(os, "fork")
              and env.get("OMP_NUM_THREADS") == "1" and os.environ.get("DIFFSTEPS_TEST_FORK", "1") != "0")
    server = _fork_server() if served else None
    if server is None:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    import select
    import signal
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out, err = Path(d, "stdout"), Path(d, "stderr")
        try:
            server.stdin.write(json.dumps({"argv": cmd[1:], "env": dict(env), "cwd": str(cwd), "stdout": str(out),
                                           "stderr": str(err)}).encode() + b"\n")
            if not select.select([server.stdout], [], [], 300)[0]:  # its imports take seconds, not minutes
                raise OSError("the fork server does not answer")
            pid = json.loads(server.stdout.readline())["pid"]
        except (OSError, ValueError):  # the server is gone (it printed why on this worker's stderr): no fork
            server.kill()
            return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if not select.select([server.stdout], [], [], timeout)[0]:
            os.killpg(pid, signal.SIGKILL)
            server.stdout.readline()  # the server reaps it and reports
            raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
        rc = json.loads(server.stdout.readline())["rc"]
        return subprocess.CompletedProcess(cmd, rc, out.read_text(), err.read_text())


def _fork_server():
    """This worker's fork server, started on first use (None where it cannot start: runs fall back to a fresh
    interpreter)."""
    if "proc" not in _SERVER:
        import atexit

        env = {**os.environ, **RUN_ENV}
        # unbuffered bytes: a reply read is never read ahead of, so select() sees the next one
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py")], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        atexit.register(proc.kill)
        _SERVER["proc"] = proc
    proc = _SERVER["proc"]
    return proc if proc.poll() is None else None


def run_py_in_process(tmp: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """run.py's ``main()`` called here with ``sys.argv = argv``: Hydra's whole command-line path (parsing, composing,
    the run, its one-line error report and exit code) without a fresh interpreter's imports (torch, and Lightning
    once the data is built: 3–10 s each on 2 cores). For runs that fail before training and for ``--cfg``; a run
    that trains belongs in a subprocess (Lightning and Hydra leave process-wide state). stdout/stderr are captured;
    Hydra's global state, the logging handlers it installs, ``sys.argv`` and the environment are restored
    afterwards."""
    import contextlib
    import io
    import logging
    import runpy

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    env = {"DIFFSTEPS_ROOT": str(tmp), **RUN_ENV}
    saved_env = {k: os.environ.get(k) for k in [*env, "HYDRA_FULL_ERROR"]}
    saved_argv, root, lightning = sys.argv, logging.getLogger(), logging.getLogger("lightning")
    saved_log = (list(root.handlers), root.level)
    saved_lightning = (list(lightning.handlers), lightning.propagate)  # the runner's tidy_console changes both
    out, err, code = io.StringIO(), io.StringIO(), 0
    os.environ.update(env)
    os.environ.pop("HYDRA_FULL_ERROR", None)  # Hydra's one-line report, as a user sees it
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved_argv
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for h in root.handlers[:]:
            if h not in saved_log[0]:
                root.removeHandler(h)
                h.close()
        for h in saved_log[0]:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(saved_log[1])
        lightning.handlers[:], lightning.propagate = saved_lightning
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def compose_run(tmp: Path, monkeypatch, *overrides: str):
    """run.py's config composed with Hydra's compose API in this process (``DIFFSTEPS_ROOT=<tmp>``, outputs in
    ``<tmp>/run``), for calling ``diffsteps.runner.run`` or a task function directly."""
    from hydra import compose, initialize_config_dir

    from diffsteps.runner.resolvers import register_resolvers

    monkeypatch.setenv("DIFFSTEPS_ROOT", str(tmp))
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={tmp}/run", *overrides])


# -- offline W&B runs, read back ------------------------------------------------------------------------------
def wandb_records(path: Path):
    """The protobuf records of an offline W&B run file: a 7-byte header (":W&B", magic, version), then 32 KiB
    blocks of chunks, each (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) + data; a block's tail shorter
    than a chunk header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    i, buf = 7, b""
    while i + 7 <= len(data):
        if 32768 - i % 32768 < 7:
            i += 32768 - i % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[i:i + 7])
        if n == 0 and kind == 0:
            break
        buf += data[i + 7:i + 7 + n]
        i += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def read_run(run_file: Path) -> dict:
    """The run record, the artifacts (name → (type, aliases, metadata, {file: local path})), their files' MD5
    digests (name → {file: base64 MD5}) and the config. W&B's
    writer is a process of its own that may still be flushing when ``wandb.finish`` returns: the file is read once
    it holds the run's ``exit`` record."""
    deadline = time.monotonic() + 60
    while True:
        records = list(wandb_records(run_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    out = {"artifacts": {}, "digests": {}, "config": {}}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "artifact":
            a = r.artifact
            out["artifacts"][a.name] = (a.type, set(a.aliases), json.loads(a.metadata or "{}"),
                                        {e.path: e.local_path for e in a.manifest.contents})
            out["digests"][a.name] = {e.path: e.digest for e in a.manifest.contents}
    return out


def offline_runs(folder: Path) -> list[dict]:
    files = sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))
    return [read_run(f) for f in files]


def noise(n, d, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class CountingModel(torch.nn.Module):
    """Wraps a model, counts calls and records the t it was given."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.ts = inner, 0, []

    def forward(self, x, t):
        self.calls += 1
        self.ts.append(t.clone())
        return self.inner(x, t)


def exact_flow(gauss, schedule, x_T):
    """The probability-flow ODE solution for Gaussian data, in closed form. In x̃ = x/√ᾱ each eigen-direction of Σ
    (eigenvalue e) scales as √(e + σ̃²), so x̃(0) − μ = U diag(√(e/(e + σ̃_T²))) Uᵀ (x̃_T − μ) (Karras et al. 2022,
    eq. 4 with p_t = N(μ, Σ + σ̃² I))."""
    mu, cov = gauss.means[0].numpy(), gauss.covs[0].numpy()
    e, U = np.linalg.eigh(cov)
    s2 = schedule.sigmas[-1].item() ** 2
    xt = x_T.numpy() / math.sqrt(schedule.alphas_cumprod[-1].item())
    return torch.from_numpy(mu + ((xt - mu) @ U) * np.sqrt(e / (e + s2)) @ U.T)


# -- data made here ----------------------------------------------------------------------------------------------
TRAIN_SIZES = (3, 4, 5, 6, 7)  # unequal, so a wrong concatenation order shows
TEST_SIZE = 5


def write_fake_cifar(root, numpy1_style: bool = True):
    """The official python-version layout: pickled dicts with bytes keys, b"data" uint8 (N, 3072), b"labels" list."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in [*((f"data_batch_{i + 1}", s) for i, s in enumerate(TRAIN_SIZES)), ("test_batch", TEST_SIZE)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        d = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        raw = pickle.dumps(d, protocol=2)
        if numpy1_style:  # the official files name numpy 1's module
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(raw)
        written[name] = (data, labels)
    return written


class SineSignals(_InMemoryData):
    """A tiny signal data set (C, L), standing in for MNIST-1D until it lands: a sine per channel, random phase."""

    def __init__(self, channels: int = 2, length: int = 40, n: int = 16, batch_size: int = 4):
        super().__init__(batch_size=batch_size)
        self.channels, self.length, self.n = channels, length, n

    @property
    def sample_shape(self):
        return (self.channels, self.length)

    @property
    def spec(self):
        return DataSpec("signal", self.sample_shape)

    @property
    def name(self):
        return f"sines-c{self.channels}-l{self.length}"

    def _load(self):
        g = torch.Generator().manual_seed(0)
        phase = 2 * math.pi * torch.rand(self.n, self.channels, 1, generator=g)
        x = torch.sin(torch.linspace(0, 4 * math.pi, self.length) + phase)
        k = self.n * 3 // 4
        return {"train": x[:k], "val": x[k:]}, None


def agreement_mixture():
    """A 16-D, 3-component mixture with full covariances: the model diffusers' schedulers are compared on."""
    g = torch.Generator().manual_seed(0)
    K, D = 3, 16
    # means 3.6 … 4.8 apart, component standard deviations 0.7 … 2.0: multimodal, so ε* is far from linear (at
    # ᾱ = 0.5 29% of noised points have no component with responsibility ≥ 0.9), yet overlapping enough that no
    # sampling trajectory sits on a knife-edge between modes and amplifies float32 rounding into the max-norm
    means = 0.7 * torch.randn(K, D, generator=g, dtype=torch.float64)
    A = torch.randn(K, D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    covs = A @ A.transpose(1, 2) + 0.5 * torch.eye(D, dtype=torch.float64)
    covs[2] = torch.diag(0.5 + torch.rand(D, generator=g, dtype=torch.float64))
    return GaussianMixture(means, covs, weights=[0.5, 0.3, 0.2])
