"""The checkpoint cache: one trained model per training-relevant config, and loading weights with clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

# config sections that change the trained weights; sampler, steps and eval never force retraining
TRAINING_KEYS = ("data", "model", "schedule", "loss", "optimizer", "lr_scheduler", "train", "seed")


def training_key(cfg: DictConfig) -> str:
    """A short hash of the training-relevant config: runs that agree on it share one trained checkpoint."""
    sub = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
           for k in TRAINING_KEYS}
    return hashlib.sha256(json.dumps(sub, sort_keys=True, default=str).encode()).hexdigest()[:12]


# -- checkpoints ----------------------------------------------------------------------------------------------------
def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load the (EMA) weights of a diffsteps checkpoint; clear errors for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights-only errors all mean: not a checkpoint we can trust
        raise ValueError(f"checkpoint {path} is corrupt or not a diffsteps checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if state is None:
        raise ValueError(f"checkpoint {path} has no 'state_dict'; is it a Lightning checkpoint of diffsteps?")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path} does not fit this model config: {str(err).splitlines()[0]}") from None
