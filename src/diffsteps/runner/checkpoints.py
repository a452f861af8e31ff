"""The checkpoint cache and checkpoint provenance.

- :func:`training_key`: one cache entry per *training config* (:func:`training_config`: every setting that changes
  the trained weights — the config groups, the trainer settings that change the effective batch or the arithmetic,
  the callbacks that change what is trained, a content fingerprint of file-based data) and per version of the code
  that defines the weights (:func:`code_version`);
- :func:`cache_lock`: one process trains an entry at a time; others wait for it (and reuse its weights) or fail;
- :func:`provenance`: what every checkpoint carries (``DiffusionModule.on_save_checkpoint``), checked when it is
  loaded (:func:`load_weights`) and, for ``task=eval ckpt_path=…``, adopted as the run's config where the command
  line does not say otherwise (:func:`adopt_checkpoint_config`).

Every checkpoint is read with ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("diffsteps")

# config sections that change the trained weights; sampler, steps and eval never force retraining
TRAINING_KEYS = ("data", "model", "schedule", "loss", "optimizer", "lr_scheduler", "train", "seed")
# keys inside those sections that change nothing trained
NOT_WEIGHTS = ("train.wait_for_lock",)
# Trainer arguments that change the trained weights, with the value Lightning takes when they are absent or None:
# the effective batch (accumulate_grad_batches, and the world size below), the arithmetic (precision), what an epoch
# is (limit_train_batches) and where training stops or how gradients are clipped
TRAINER_WEIGHT_KEYS = {"precision": "32-true", "accumulate_grad_batches": 1, "limit_train_batches": 1.0,
                       "gradient_clip_algorithm": "norm", "max_epochs": -1}
# callbacks that change nothing trained (checkpoint writing — resume is exact — and progress lines); every other
# callback of the `callbacks` group (EMA, or one a user adds) is part of the training config
NON_WEIGHT_CALLBACKS = ("lightning.pytorch.callbacks.ModelCheckpoint", "diffsteps.training.progress.ProgressLog")
# the sources that define the weights: the data, the nets, the schedule/process, the loss and training step, EMA
# (and the mixture the toy data sample from); progress lines and the digits classifier change nothing trained
WEIGHT_SOURCES = ("core", "nets", "data", "training", "reference/gaussian_mixture.py")
NOT_WEIGHT_SOURCES = ("training/progress.py", "training/classifier.py", "training/mnist1d_classifier.py")
# evaluating a checkpoint (ckpt_path=): settings that may differ from the training run's without making its numbers
# those of other weights — where the data live, how they were loaded, how the training ran (trainer, callbacks) —
# are neither compared nor adopted; the data's content fingerprint and the code version are compared with a warning
EVAL_IGNORED = ("data.root", "data.download", "data.num_workers", "train.compile", "trainer", "callbacks",
                # the run's seed draws the evaluation noise and KID subsets; the data split it trained on is data.seed
                "seed")
EVAL_WARN_ONLY = ("data_fingerprint",)
_PKG = Path(__file__).resolve().parents[1]
_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here: unreadable, not a diffsteps checkpoint, or trained with another
    config. The message names the file and what is wrong."""


# -- what changes the weights -----------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """Resolved, JSON-shaped (lists, not tuples): two configs compare equal exactly when their JSON does."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _section(cfg: DictConfig, name: str) -> Any:
    # each section resolved where it sits: a detached copy loses interpolations into other sections (data.root)
    return _plain(cfg.get(name))


def _world_size(trainer: DictConfig) -> int | str:
    """devices × num_nodes as the Trainer will resolve them (``devices: auto`` / −1: every device of the
    accelerator); the raw value where the accelerator is unknown here."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.accelerators import (
        CPUAccelerator,
        CUDAAccelerator,
        MPSAccelerator,
    )

    accelerator = str(trainer.get("accelerator", "auto")).lower()
    devices = trainer.get("devices", "auto")
    devices = OmegaConf.to_container(devices) if OmegaConf.is_config(devices) else devices
    nodes = int(trainer.get("num_nodes", 1) or 1)
    available = [c for c in (CUDAAccelerator, MPSAccelerator) if c.is_available()]
    cls = {"cpu": CPUAccelerator, "cuda": CUDAAccelerator, "mps": MPSAccelerator,
           "gpu": (available or [CUDAAccelerator])[0], "auto": (available or [CPUAccelerator])[0]}.get(accelerator)
    if cls is None:  # an accelerator not known here (tpu, an object): keep what was asked for
        return f"{devices}x{nodes}"
    try:
        if devices in ("auto", -1, "-1"):
            n = cls.auto_device_count()
        else:
            n = len(cls.get_parallel_devices(cls.parse_devices(devices)))
    except (MisconfigurationException, ValueError, TypeError, RuntimeError):  # devices this machine lacks
        return f"{devices}x{nodes}"
    return n * nodes


def trainer_weight_settings(cfg: DictConfig) -> dict[str, Any]:
    """The Trainer settings that change the trained weights (:data:`TRAINER_WEIGHT_KEYS`, normalised as Lightning
    reads them: ``precision=32`` is ``32-true``) and the world size (devices × num_nodes: the effective batch)."""
    from lightning.fabric.connector import _convert_precision_to_unified_args

    trainer = cfg.get("trainer") or OmegaConf.create({})
    out: dict[str, Any] = {}
    for key, default in TRAINER_WEIGHT_KEYS.items():
        value = _plain(trainer.get(key))
        out[key] = default if value is None else value
    if out["max_epochs"] is None or out["max_epochs"] == -1:
        out["max_epochs"] = -1
    with warnings.catch_warnings():  # "precision=16 is supported for historical reasons"
        warnings.simplefilter("ignore")
        try:
            out["precision"] = str(_convert_precision_to_unified_args(out["precision"]))
        except (ValueError, TypeError):
            out["precision"] = str(out["precision"])  # Lightning rejects it when the Trainer is built
    out["world_size"] = _world_size(trainer)
    return out


def weight_callbacks(cfg: DictConfig) -> dict[str, Any]:
    """The ``callbacks`` group without the ones that change nothing trained (:data:`NON_WEIGHT_CALLBACKS`); a
    dropped one (``callbacks.ema=null``) stays as None, so dropping EMA is a different training config."""
    out = {}
    for name, node in (cfg.get("callbacks") or {}).items():
        if OmegaConf.is_dict(node) and node.get("_target_") in NON_WEIGHT_CALLBACKS:
            continue
        out[name] = _plain(node)
    return out


def training_config(cfg: DictConfig, datamodule=None) -> dict[str, Any]:
    """Every setting that changes the trained weights, resolved: the sections of :data:`TRAINING_KEYS` (without
    :data:`NOT_WEIGHTS`), ``trainer`` (:func:`trainer_weight_settings`), ``callbacks`` (:func:`weight_callbacks`)
    and ``data_fingerprint`` (``datamodule.fingerprint()``: the content of file-based data; None for generated
    data, which their arguments in ``data`` identify). ``datamodule`` defaults to ``cfg.data`` instantiated."""
    out = {k: _section(cfg, k) for k in TRAINING_KEYS}
    for dotted in NOT_WEIGHTS:
        section, key = dotted.split(".", 1)
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    out["trainer"] = trainer_weight_settings(cfg)
    out["callbacks"] = weight_callbacks(cfg)
    if datamodule is None:
        from hydra.utils import instantiate

        datamodule = instantiate(cfg.data)
    fingerprint = getattr(datamodule, "fingerprint", None)
    out["data_fingerprint"] = fingerprint() if callable(fingerprint) else None
    return out


def _source_text(path: Path) -> str:
    """The code of one file without its comments and docstrings (its AST): editing those retrains nothing."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _weight_source_files() -> list[Path]:
    files = []
    for entry in WEIGHT_SOURCES:
        path = _PKG / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return [f for f in files if f.relative_to(_PKG).as_posix() not in NOT_WEIGHT_SOURCES]


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The diffsteps package version and ``source``: a SHA-256 over the code (AST, without comments and docstrings)
    of the files that define the weights (:data:`WEIGHT_SOURCES`). A code change there gives a new training key —
    the cache never hands out weights the current code would not have trained."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("diffsteps")
    except PackageNotFoundError:  # not installed: run from a checkout
        package = "unknown"
    h = hashlib.sha256()
    files = _weight_source_files()
    for f in files:
        h.update(f.relative_to(_PKG).as_posix().encode() + b"\0" + _source_text(f).encode() + b"\0")
    return {"package": package, "source": h.hexdigest()[:16], "files": len(files)}


def _key(config: dict, source: str) -> str:
    blob = {"config": config, "code": source}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_key(cfg: DictConfig, datamodule=None) -> str:
    """A short hash of :func:`training_config` and the code version's ``source``: runs that agree on both share
    one trained checkpoint."""
    return _key(training_config(cfg, datamodule), code_version()["source"])


def provenance(cfg: DictConfig, datamodule=None) -> dict[str, Any]:
    """What a checkpoint records about the weights it holds (``DiffusionModule.provenance``; the module adds the
    global step when saving): the training config, the code version, the cache key, torch and Lightning versions."""
    import lightning

    config, code = training_config(cfg, datamodule), code_version()
    return {"format": _FORMAT, "key": _key(config, code["source"]), "config": config, "code": code,
            "versions": {"torch": str(torch.__version__), "lightning": str(lightning.__version__)}}


# -- comparing configs ----------------------------------------------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return value if isinstance(value, str) else json.dumps(value)


_ABSENT = object()


def _covered(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def disagreements(trained: dict, run: dict, ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """(key, trained value, this run's value) for every leaf of two training configs that differs, in key order;
    keys under a prefix in ``ignore`` are skipped."""
    ignore = tuple(ignore)
    a, b = _flatten(_plain(trained)), _flatten(_plain(run))
    out = []
    for key in sorted(set(a) | set(b)):
        if _covered(key, ignore):
            continue
        x, y = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if x != y:
            out.append((key, x, y))
    return out


def describe(diffs: list[tuple[str, Any, Any]]) -> str:
    """``trained with loss.prediction=epsilon, this run has v; …``."""
    return "; ".join(f"trained with {k}={_show(x)}, this run has {_show(y)}" for k, x, y in diffs)


# -- reading and loading checkpoints -------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint of diffsteps, read with ``weights_only=True``; :class:`CheckpointError` (or
    FileNotFoundError) naming the file when it is missing, unreadable, or has no ``state_dict``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — pickle, zip, weights-only errors: not a checkpoint we can trust
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} is corrupt or not a diffsteps checkpoint ({type(err).__name__}: "
                              f"{first})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} has no 'state_dict'; is it a Lightning checkpoint of diffsteps?")
    return ckpt


def checkpoint_provenance(ckpt: dict) -> dict | None:
    from ..training.module import PROVENANCE_KEY

    prov = ckpt.get(PROVENANCE_KEY)
    return prov if isinstance(prov, dict) and isinstance(prov.get("config"), dict) else None


def _check_shapes(module: torch.nn.Module, state: dict, path: Path) -> None:
    """Name what does not fit: parameters of another shape (both shapes), missing and unexpected ones."""
    own = module.state_dict()
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, this model {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    problems = []
    for what, items in (("parameters of another shape", shapes), ("missing from the checkpoint", missing),
                        ("in the checkpoint but not in this model", extra)):
        if items:
            shown = ", ".join(items[:4]) + (f" (and {len(items) - 4} more)" if len(items) > 4 else "")
            problems.append(f"{len(items)} {what}: {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this model config: {'; '.join(problems)}")


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (16 hex digits) over the names, dtypes, shapes and bytes of a state dict: the identity of the weights
    a run evaluates, logged by the runner and recorded in the cache entry's complete.json."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_weights(module: torch.nn.Module, path: str | Path, expected: dict | None = None, *,
                 ignore: Iterable[str] = (), warn_only: Iterable[str] = (), ckpt: dict | None = None,
                 hint: str = "") -> dict | None:
    """Load the (EMA) weights of a diffsteps checkpoint into ``module``, checked first: a missing or corrupt file, a
    training config other than ``expected`` (a :func:`provenance`; each disagreement named, keys under ``ignore``
    skipped, those under ``warn_only`` and a different code version logged as warnings) and parameters of other
    shapes (each named with both shapes) raise :class:`CheckpointError`. A checkpoint without provenance (written
    before diffsteps recorded it) loads with a warning. Returns the checkpoint's provenance (None without)."""
    path = Path(path)
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    prov = checkpoint_provenance(ckpt)
    if prov is None:
        log.warning("checkpoint %s has no provenance (written before diffsteps recorded what trained it): its "
                    "training config cannot be checked against this run's; loading it as this run's model", path)
    elif expected is not None:
        warn_only = tuple(warn_only)
        diffs = disagreements(prov["config"], expected["config"], ignore)
        hard = [d for d in diffs if not _covered(d[0], warn_only)]
        for key, x, y in (d for d in diffs if _covered(d[0], warn_only)):
            log.warning("checkpoint %s was trained on data with %s=%s, this run's data have %s (the files changed "
                        "or were copied since)", path, key, _show(x), _show(y))
        if hard:
            raise CheckpointError(f"checkpoint {path} was trained with another config: {describe(hard)}{hint}")
        code = prov.get("code", {}).get("source")
        if code != expected["code"]["source"]:
            log.warning("checkpoint %s was trained by other diffsteps code (weight-defining sources %s, package %s; "
                        "this is %s, %s): its weights are loaded as they were trained then", path, code,
                        prov.get("code", {}).get("package"), expected["code"]["source"], expected["code"]["package"])
    _check_shapes(module, ckpt["state_dict"], path)
    module.load_state_dict(ckpt["state_dict"])
    return prov


# -- task=eval ckpt_path=…: the checkpoint's own config ----------------------------------------------------------------
def explicit_overrides() -> list[str] | None:
    """The config keys set on the command line (``loss.prediction=epsilon`` → ``loss.prediction``; a group choice
    ``loss=snr`` → ``loss``), from Hydra; None when not run by Hydra (then every key counts as explicit)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError, AttributeError):  # not run by Hydra (or a config without its node)
        return None
    keys = []
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~").split("@", 1)[0].strip()
        if key and not key.startswith("hydra"):
            keys.append(key)
    return keys


def _explicit_prefixes(explicit: list[str] | None) -> tuple[str, ...]:
    if explicit is None:
        return TRAINING_KEYS
    # a preset (experiment=…) sets training sections itself: all of them count as asked for
    return TRAINING_KEYS if "experiment" in explicit else tuple(explicit)


def adopt_checkpoint_config(cfg: DictConfig, ckpt: dict, path: str | Path, explicit: list[str] | None) -> dict | None:
    """``task=eval ckpt_path=…``: make the run's training sections the checkpoint's where the command line does not
    set them (``explicit``: :func:`explicit_overrides`), so evaluating an ε-checkpoint without saying so builds the
    ε-model it is. The model section is taken whole (the checkpoint's resolved network) unless a model key is
    explicit; :data:`EVAL_IGNORED` keys (where the data live, how training ran) keep this run's values. Explicit
    values that disagree stay and are reported by :func:`load_weights` after the build. Returns the provenance."""
    prov = checkpoint_provenance(ckpt)
    if prov is None:
        return None
    trained = prov["config"]
    prefixes = _explicit_prefixes(explicit)
    run = {k: _section(cfg, k) for k in TRAINING_KEYS}
    adopted = []
    with open_dict(cfg):
        for section in TRAINING_KEYS:
            if section not in trained:
                continue
            if section == "model":
                # the checkpoint's resolved network, with the model keys the command line sets on top where the
                # network has them (model.hidden=32 on an MLP); a group choice (model=unet) or a key it lacks keeps
                # this run's model, compared after the build
                leaves = [p[len("model."):] for p in prefixes if p.startswith("model.")]
                if not _covered("model", prefixes) and all(
                        OmegaConf.select(OmegaConf.create(trained["model"]), k, default=_ABSENT) is not _ABSENT
                        for k in leaves):
                    model = OmegaConf.create(trained["model"])
                    for k in leaves:
                        OmegaConf.update(model, k, OmegaConf.select(cfg.model, k), merge=False)
                    if _plain(model) != run["model"]:
                        cfg.model = model
                        adopted.append(f"model={json.dumps(trained['model'])}")
                continue
            if section == "seed":
                if not _covered("seed", prefixes) and trained["seed"] != run["seed"]:
                    cfg.seed = trained["seed"]
                    adopted.append(f"seed={trained['seed']}")
                continue
            for key, x, y in disagreements({section: trained[section]}, {section: run[section]},
                                           EVAL_IGNORED + NOT_WEIGHTS):
                if _covered(key, prefixes):
                    continue
                if x is _ABSENT:  # a key this run has and the checkpoint's config had not: drop it
                    parent, _, leaf = key.rpartition(".")
                    node = OmegaConf.select(cfg, parent)
                    if OmegaConf.is_dict(node):
                        node.pop(leaf, None)
                    adopted.append(f"no {key}")
                    continue
                if y is _ABSENT:
                    OmegaConf.update(cfg, key, x, force_add=True)
                else:
                    OmegaConf.update(cfg, key, x, merge=False)
                adopted.append(f"{key}={_show(x)}")
    if adopted:
        log.info("evaluating checkpoint %s with the config it was trained with: %s", path, ", ".join(adopted))
    return prov


def open_checkpoint(cfg: DictConfig) -> dict | None:
    """``ckpt_path=…``: read the checkpoint (a missing or corrupt file fails here, before anything is built) and
    make the run's training config the checkpoint's where the command line does not set it
    (:func:`adopt_checkpoint_config`). None without ``ckpt_path``."""
    if not cfg.get("ckpt_path"):
        return None
    ckpt = read_checkpoint(cfg.ckpt_path)
    adopt_checkpoint_config(cfg, ckpt, cfg.ckpt_path, explicit_overrides())
    return ckpt


def load_for_eval(cfg: DictConfig, module: torch.nn.Module, datamodule, ckpt: dict) -> Path:
    """Load ``cfg.ckpt_path`` (read by :func:`open_checkpoint`) into the built module after checking it against the
    run's training config: what an explicit override set differently is named (``checkpoint … was trained with
    another config: trained with loss.prediction=epsilon, this run has v``); where the data live and how training
    ran are not compared (:data:`EVAL_IGNORED`), the data's content fingerprint only with a warning."""
    path = Path(cfg.ckpt_path)
    load_weights(module, path, provenance(cfg, datamodule), ignore=EVAL_IGNORED, warn_only=EVAL_WARN_ONLY, ckpt=ckpt,
                 hint=". Those values were set on the command line (or by a preset): drop them to evaluate the "
                      "checkpoint with the config it was trained with")
    log.info("evaluating checkpoint %s: weights sha256 %s", path, weights_digest(module.state_dict()))
    return path


# -- the cache entry's lock ---------------------------------------------------------------------------------------------
def launched_rank() -> int:
    """This process's rank as set by a launcher (Lightning's DDP subprocess launcher, torchrun, SLURM): non-zero
    for every process of a run but its first. Only that one takes the cache lock: the others are started by it,
    inside ``fit``, while it holds the lock — waiting for the lock there would deadlock the run with itself."""
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.strip().lstrip("-").isdigit() and int(value) != 0:
            return int(value)
    return 0


def lock_paths(entry: Path) -> tuple[Path, Path, Path]:
    """The lock file of a cache entry and its side files, beside the entry (not in it: a run that fails before
    writing a checkpoint leaves no entry): ``<checkpoint_dir>/.locks/<key>.lock``, ``<key>.holder.json`` (who holds
    it now) and ``<key>.released.json`` (who held it last)."""
    locks = entry.parent / ".locks"
    return (locks / f"{entry.name}.lock", locks / f"{entry.name}.holder.json",
            locks / f"{entry.name}.released.json")


def read_holder(path: Path) -> str | None:
    """``pid … on host … (run folder …, since …)`` from a holder file; None when there is none."""
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on host {h['host']} (run folder {h['run_dir']}, since {h['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def cache_lock(entry: Path, *, wait: bool, run_dir: str | Path, poll_log_s: float = 300.0) -> Iterator[dict | None]:
    """Hold the cache entry ``entry`` exclusively while training it: an OS file lock (``filelock``: ``flock`` on
    POSIX, ``LockFileEx`` on Windows), so a second run of the same training config waits for the first and then
    finds its finished checkpoint, or with ``wait=False`` fails at once naming the holder (pid, host, run folder,
    from the holder file it writes). The OS releases the lock when its process ends, however it ends (SIGKILL, an
    out-of-memory kill, a crash): a lock is never stale, and a killed run's unfinished entry is resumed by the next
    run. (On NFS, flock goes through the server's lock manager, which releases a crashed client's locks when it
    notices.) Yields None, or ``{"holder": …, "seconds": …}`` when it had to wait: the holder is the process that
    released the lock last, i.e. the one whose checkpoint this run will find."""
    from filelock import FileLock, Timeout

    lock_file, holder_file, released_file = lock_paths(entry)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file))
    waited = None
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = read_holder(holder_file) or "another process (its holder file is not written yet)"
        if not wait:
            raise RuntimeError(f"the checkpoint cache entry {entry} of this training config is being trained by "
                               f"{holder}; train.wait_for_lock=false, so not waiting: run again when it is done "
                               f"(its checkpoint is then reused), or set train.wait_for_lock=true to wait for it"
                               ) from None
        log.info("waiting for %s, which is training this config (checkpoint cache entry %s); its checkpoint is "
                 "reused when it finishes", holder, entry)
        start = time.monotonic()
        while True:
            try:
                lock.acquire(timeout=poll_log_s)
                break
            except Timeout:
                log.info("still waiting for %s (%.0f s so far)", read_holder(holder_file) or holder,
                         time.monotonic() - start)
        # a holder file still there is a holder that never released: killed; else whoever released last
        last = read_holder(holder_file)
        last = f"{last}, which ended without releasing it" if last else read_holder(released_file) or holder
        waited = {"holder": last, "seconds": time.monotonic() - start}
    try:
        tmp = holder_file.with_name(f".{holder_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_dir": str(run_dir),
                                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        os.replace(tmp, holder_file)
        yield waited
    finally:
        with contextlib.suppress(OSError):
            os.replace(holder_file, released_file)
        lock.release()


def set_aside(path: Path, reason: str) -> Path:
    """Rename an unusable cached file to ``<name>.corrupt-<time>`` (kept for inspection) and say so."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = aside.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(path, aside)
    log.warning("%s; moved it to %s and training this config again from step 0", reason, aside)
    return aside
