"""Training, or reusing / resuming the cached checkpoint of the same training config (:mod:`.checkpoints`).

A cache entry ``<paths.checkpoint_dir>/<training key>/`` holds ``last.ckpt`` (resumed while unfinished),
``train_config.yaml`` (its provenance) and, once training finished, ``complete.json`` (global step, key, the weights'
digest, who trained it). One process trains an entry at a time (:func:`~.checkpoints.cache_lock`); a complete
entry is never written again, so the weights a run evaluated stay the ones its ``checkpoint.ckpt`` link points at.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .checkpoints import (
    CheckpointError,
    cache_lock,
    checkpoint_provenance,
    describe,
    disagreements,
    launched_rank,
    load_weights,
    provenance,
    read_checkpoint,
    set_aside,
    weights_digest,
)
from .loggers import continue_training_run, link_model, log_model

log = logging.getLogger("diffsteps")


def make_callbacks(cfg: DictConfig, ckpt_dir: Path) -> list:
    """The ``callbacks`` group, in config order (``callbacks.<name>=null`` drops one); a null ``dirpath`` (the
    model checkpoint's) is filled with the checkpoint cache folder of this training config."""
    from .validate import instantiate_checked

    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if not OmegaConf.is_dict(node) or "_target_" not in node:
            raise ValueError(f"callbacks.{name} must be a config node with a _target_, got {node!r}")
        fill = {"dirpath": str(ckpt_dir)} if "dirpath" in node and node.dirpath is None else {}
        callbacks.append(instantiate_checked(node, **fill))
    return callbacks


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cached_problem(last: Path, done: Path, prov: dict, module) -> str | None:
    """Load a complete entry's weights into ``module``; what is wrong with it (None: loaded and verified)."""
    try:
        ckpt = read_checkpoint(last)
        load_weights(module, last, prov, ckpt=ckpt)
    except (CheckpointError, FileNotFoundError) as err:
        return f"the cached checkpoint cannot be used: {err}"
    try:
        recorded = json.loads(done.read_text()).get("weights_sha256")
    except (OSError, ValueError) as err:
        return f"its {done.name} cannot be read ({err})"
    found = weights_digest(ckpt["state_dict"])
    if recorded is not None and recorded != found:
        return (f"the cached checkpoint {last} holds other weights than the ones training finished with "
                f"(sha256 {found}, {done.name} recorded {recorded}): it was overwritten after training")
    return None


def _resume_problem(last: Path, prov: dict) -> str | None:
    """Whether an unfinished entry's ``last.ckpt`` can be resumed; what is wrong with it otherwise."""
    try:
        ckpt = read_checkpoint(last)
    except CheckpointError as err:
        return f"the unfinished checkpoint cannot be resumed: {err}"
    if not all(k in ckpt for k in ("loops", "optimizer_states", "global_step")):
        return f"the unfinished checkpoint {last} lacks the training state (loops, optimizer) to resume from"
    trained = checkpoint_provenance(ckpt)
    if trained is not None:
        diffs = disagreements(trained["config"], prov["config"])
        if diffs or trained.get("key") != prov["key"]:
            why = describe(diffs) or f"code {trained.get('code', {}).get('source')}, this is {prov['code']['source']}"
            return f"the unfinished checkpoint {last} is not this training config's ({why})"
    return None


def _make_trainer(cfg: DictConfig, ckpt_dir: Path, loggers, out_dir: Path):
    from hydra.utils import instantiate

    fill = {}
    interval = cfg.trainer.get("val_check_interval")
    if isinstance(interval, int):
        fill["val_check_interval"] = min(interval, cfg.train.max_steps)  # a short run still validates, at its end
    return instantiate(cfg.trainer, callbacks=make_callbacks(cfg, ckpt_dir), logger=loggers or False,
                       default_root_dir=str(out_dir), **fill)


def default_progress_bar(cfg: DictConfig) -> None:
    """``trainer.enable_progress_bar`` unset: a bar on a terminal; in a log file its carriage-return updates pile
    up, so there the ProgressLog callback writes lines instead (and evaluation shows no bar)."""
    if cfg.trainer.get("enable_progress_bar") is None:
        with open_dict(cfg.trainer):
            cfg.trainer.enable_progress_bar = sys.stderr.isatty()


def train(cfg: DictConfig, module, datamodule, loggers, out_dir: Path) -> tuple[Path, int]:
    """Train, or reuse / resume the checkpoint trained with the same training config. Returns the checkpoint and
    this process's global rank (DDP starts its other processes inside ``fit``).

    Order: a complete entry is reused (its weights checked against its provenance and its recorded digest); else
    the Trainer and callbacks are built (a bad setting fails here, before the entry exists), the entry's lock is
    taken (waiting for another run of this config, which then has finished it: reused), an unusable ``last.ckpt``
    is moved aside, and training starts or resumes. A run that fails before its first checkpoint leaves no entry."""
    # the module overrides configure_model only to compile in place; it shards nothing, so EMA's warning is moot
    warnings.filterwarnings("ignore", message=".*WeightAveraging callback with a model that overrides")
    prov = provenance(cfg, datamodule)
    module.provenance = prov
    ckpt_dir = Path(cfg.paths.checkpoint_dir) / prov["key"]
    last, done = ckpt_dir / "last.ckpt", ckpt_dir / "complete.json"
    first_rank = launched_rank() == 0
    if done.is_file() and last.is_file() and _cached_problem(last, done, prov, module) is None:
        return _reused(last, module, loggers, prov), 0
    trainer = _make_trainer(cfg, ckpt_dir, loggers, out_dir)
    if not first_rank:
        # a DDP process started by rank zero inside fit: rank zero holds the lock and readied the entry
        return _fit(cfg, trainer, module, datamodule, last, done, prov, first_rank=False)
    with cache_lock(ckpt_dir, wait=bool(cfg.train.get("wait_for_lock", True)), run_dir=out_dir) as waited:
        if waited:
            log.info("waited %.1f s for %s", waited["seconds"], waited["holder"])
        if done.is_file() and last.is_file():
            problem = _cached_problem(last, done, prov, module)
            if problem is None:
                return _reused(last, module, loggers, prov), 0
            set_aside(last, problem)
        done.unlink(missing_ok=True)  # a complete.json without its checkpoint, or of the checkpoint set aside
        if last.is_file():
            problem = _resume_problem(last, prov)
            if problem is not None:
                set_aside(last, problem)
        created = not ckpt_dir.exists()
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(ckpt_dir / "train_config.yaml", OmegaConf.to_yaml(OmegaConf.create(prov)))
            continue_training_run(loggers, ckpt_dir, resuming=last.is_file())
            return _fit(cfg, trainer, module, datamodule, last, done, prov, first_rank=True)
        except BaseException:
            if created and not any(ckpt_dir.glob("*.ckpt*")):
                # nothing trained: no entry (a half-made one would only say "train_config.yaml" and nothing else)
                (ckpt_dir / "train_config.yaml").unlink(missing_ok=True)
                try:
                    ckpt_dir.rmdir()
                except OSError:
                    pass
            raise


def _reused(last: Path, module, loggers, prov: dict) -> Path:
    link_model(loggers, last, prov["key"])
    log.info("reusing the checkpoint trained with this config: %s (sampler and steps don't retrain); weights "
             "sha256 %s", last, weights_digest(module.state_dict()))
    return last


def _fit(cfg: DictConfig, trainer, module, datamodule, last: Path, done: Path, prov: dict, *,
         first_rank: bool) -> tuple[Path, int]:
    resume = str(last) if last.is_file() else None
    if resume and first_rank:
        log.info("resuming unfinished training from %s", resume)
    try:
        # weights_only: the checkpoint is data (tensors, numbers, strings); torch < 2.6 would otherwise unpickle code
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except FloatingPointError as err:
        kept = f"; the last good checkpoint is {last}" if last.is_file() else ""
        raise type(err)(f"{err}{kept}") from None
    if trainer.interrupted:
        raise RuntimeError(f"training was interrupted at step {trainer.global_step}; the cache entry {last.parent} "
                           f"stays unfinished and the next run of this config resumes it")
    # the final state, EMA weights in state_dict (the callback swaps them in); the module now holds them too
    trainer.save_checkpoint(last, weights_only=False)
    digest = weights_digest(module.state_dict())
    if trainer.is_global_zero:
        _write_atomic(done, json.dumps({"global_step": trainer.global_step, "key": prov["key"],
                                        "weights_sha256": digest, "pid": os.getpid(), "host": socket.gethostname(),
                                        "run_dir": str(trainer.default_root_dir)}, indent=2))
        log.info("trained %s to step %d; weights sha256 %s", last, trainer.global_step, digest)
        log_model(trainer.loggers, last.parent, prov["key"], trainer.global_step, digest)
    return last, trainer.global_rank
