"""Config → objects: the data module, the network (shaped from the data) and the Lightning module."""

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
    from hydra.utils import instantiate

    from ..training.module import DiffusionModule

    datamodule = instantiate(cfg.data)
    net = build_net(cfg, tuple(datamodule.sample_shape))
    loss = instantiate(cfg.loss)
    t = cfg.train
    module = DiffusionModule(net, schedule, loss, lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                             min_lr_ratio=t.min_lr_ratio, compile=t.compile)
    return datamodule, module
