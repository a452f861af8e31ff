"""Training, or reusing / resuming the cached checkpoint of the same training-relevant config."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .checkpoints import TRAINING_KEYS, load_weights, training_key

log = logging.getLogger("diffsteps")


def train(cfg: DictConfig, module, datamodule, loggers, out_dir: Path) -> tuple[Path, int]:
    """Train, or reuse / resume the checkpoint trained with the same training-relevant config. Returns the
    checkpoint and this process's global rank (DDP starts its other processes inside ``fit``)."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ..training.ema import ema_callback

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
    callbacks = [ema_callback(cfg.train.ema_decay),
                 ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                 every_n_train_steps=cfg.train.ckpt_every_n_steps)]
    trainer = instantiate(cfg.trainer, max_steps=cfg.train.max_steps, callbacks=callbacks, logger=loggers or False,
                          gradient_clip_val=cfg.train.gradient_clip_val, default_root_dir=str(out_dir),
                          val_check_interval=min(cfg.train.val_check_interval, cfg.train.max_steps),
                          check_val_every_n_epoch=None)
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
