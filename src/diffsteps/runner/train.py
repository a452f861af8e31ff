"""Training, or reusing / resuming the cached checkpoint of the same training-relevant config."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .checkpoints import TRAINING_KEYS, load_weights, training_key

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


def train(cfg: DictConfig, module, datamodule, loggers, out_dir: Path) -> tuple[Path, int]:
    """Train, or reuse / resume the checkpoint trained with the same training-relevant config. Returns the
    checkpoint and this process's global rank (DDP starts its other processes inside ``fit``)."""
    from hydra.utils import instantiate

    # the module overrides configure_model only to compile in place; it shards nothing, so EMA's warning is moot
    warnings.filterwarnings("ignore", message=".*WeightAveraging callback with a model that overrides")
    ckpt_dir = Path(cfg.paths.checkpoint_dir) / training_key(cfg)
    last, done = ckpt_dir / "last.ckpt", ckpt_dir / "complete.json"
    if done.is_file() and last.is_file():
        log.info("reusing the checkpoint trained with this config: %s (sampler and steps don't retrain)", last)
        load_weights(module, last)
        return last, 0
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # each section resolved where it sits: a detached copy loses interpolations into other sections (data.root)
    (ckpt_dir / "train_config.yaml").write_text(OmegaConf.to_yaml({k: OmegaConf.to_container(cfg[k], resolve=True)
                                                                   if OmegaConf.is_config(cfg[k]) else cfg[k]
                                                                   for k in TRAINING_KEYS}))
    fill = {}
    interval = cfg.trainer.get("val_check_interval")
    if isinstance(interval, int) and cfg.train.max_steps > 0:
        fill["val_check_interval"] = min(interval, cfg.train.max_steps)  # a short run still validates, at its end
    trainer = instantiate(cfg.trainer, callbacks=make_callbacks(cfg, ckpt_dir), logger=loggers or False,
                          default_root_dir=str(out_dir), **fill)
    resume = str(last) if last.is_file() else None
    if resume:
        log.info("resuming unfinished training from %s", resume)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    except FloatingPointError as err:
        kept = f"; the last good checkpoint is {last}" if last.is_file() else ""
        raise type(err)(f"{err}{kept}") from None
    trainer.save_checkpoint(last)  # the final state, EMA weights in state_dict (the callback swaps them in)
    if trainer.is_global_zero:
        done.write_text(json.dumps({"global_step": trainer.global_step, "key": training_key(cfg)}))
    return last, trainer.global_rank
