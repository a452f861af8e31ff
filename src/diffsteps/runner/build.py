"""Config → objects: the data module, the network (shaped from the data) and the Lightning module (with the
optimiser and LR scheduler as partials)."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig


def build_net(cfg: DictConfig, sample_shape: tuple[int, ...]) -> torch.nn.Module:
    """Instantiate ``cfg.model``, filling the shape arguments left null from the data's sample shape."""
    from hydra.utils import instantiate

    fill: dict[str, Any] = {}
    model_cfg = cfg.model
    if "in_channels" in model_cfg and model_cfg.in_channels is None:
        fill["in_channels"] = sample_shape[0]
    if "image_size" in model_cfg and model_cfg.image_size is None:
        fill["image_size"] = sample_shape[-1]
    if "dim" in model_cfg and model_cfg.dim is None:
        fill["dim"] = math.prod(sample_shape)
    return instantiate(model_cfg, **fill)


def build(cfg: DictConfig, schedule):
    """The data module, and the Lightning module with its network, loss, optimiser and LR-scheduler partials."""
    from hydra.utils import instantiate

    from ..training.module import DiffusionModule
    from .validate import instantiate_checked

    datamodule = instantiate(cfg.data)
    net = build_net(cfg, tuple(datamodule.sample_shape))
    loss = instantiate(cfg.loss)
    module = DiffusionModule(net, schedule, loss, optimizer=instantiate_checked(cfg.optimizer),
                             lr_scheduler=instantiate_checked(cfg.lr_scheduler), compile=cfg.train.compile)
    return datamodule, module
