"""diffusers' ``UNet2DModel`` as a diffsteps net: ``net(x, t)`` (or ``net(x, t, y)``) instead of
``unet(x, t, class_labels=y).sample``, built new from sizes (``model=diffusers_unet``, trained inside diffsteps) or
loaded from a folder on disk (``model=diffusers``, offline). diffusers is imported only when one is built."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["DiffusersUNet", "new_unet", "load_unet", "diffusers_folder", "UNET_CLASS"]

UNET_CLASS = "UNet2DModel"


def _unet_class():
    try:
        from diffusers import UNet2DModel
    except ImportError as err:
        raise ImportError(f"model=diffusers and model=diffusers_unet need the diffusers package ({err}): "
                          'pip install -e ".[diffusers]"') from None
    return UNet2DModel


class DiffusersUNet(nn.Module):
    """A ``UNet2DModel`` behind diffsteps' net call. ``t`` arrives as float training-time indices (possibly
    fractional, for the samplers that step in σ or λ); UNet2DModel's sinusoidal embedding takes them as they are, and
    for integer t computes exactly what diffusers' schedulers feed it. A class-conditional UNet
    (``num_class_embeds``) takes the labels as ``y`` (diffsteps' ``cond={"y": labels}``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def num_classes(self) -> int | None:
        return self.unet.config.num_class_embeds

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, t.reshape(-1).expand(len(x)), class_labels=y).sample


def new_unet(in_channels: int, image_size: int, block_out_channels: Sequence[int] = (32, 64),
             layers_per_block: int = 1, down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D"),
             up_block_types: Sequence[str] = ("AttnUpBlock2D", "UpBlock2D"), norm_num_groups: int = 8,
             num_class_embeds: int | None = None, **options: Any) -> DiffusersUNet:
    """A fresh ``UNet2DModel`` of these sizes (``sample_size`` and ``in_channels`` = ``out_channels`` from the data;
    ``options``: any other UNet2DModel argument), wrapped. Sizes diffusers cannot build fail here, before training,
    with diffusers' own message."""
    UNet2DModel = _unet_class()
    if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
        raise ValueError(f"model=diffusers_unet: block_out_channels {list(block_out_channels)} has "
                         f"{len(block_out_channels)} levels, so down_block_types and up_block_types need "
                         f"{len(block_out_channels)} entries each; got {list(down_block_types)} and "
                         f"{list(up_block_types)}")
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"model=diffusers_unet: norm_num_groups={norm_num_groups} must divide every "
                         f"block_out_channels entry; {bad} are not multiples of it")
    unet = UNet2DModel(sample_size=int(image_size), in_channels=int(in_channels), out_channels=int(in_channels),
                       block_out_channels=tuple(int(c) for c in block_out_channels),
                       layers_per_block=int(layers_per_block), down_block_types=tuple(down_block_types),
                       up_block_types=tuple(up_block_types), norm_num_groups=int(norm_num_groups),
                       num_class_embeds=num_class_embeds, **options)
    return DiffusersUNet(unet)


def diffusers_folder(path: str | Path) -> tuple[Path, dict, dict | None]:
    """Read a diffusers model folder without loading weights: (the UNet's folder, its config.json, the scheduler
    config or None). ``path`` is a ``UNet2DModel`` folder (``config.json`` + weights) or a pipeline folder with
    ``unet/`` and ``scheduler/``. A folder that does not exist, has no config, or holds another model class
    (config.json's ``_class_name``) raises, naming what it found."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model.path={str(path)!r} is not a folder: give a diffusers UNet2DModel folder "
                         "(config.json + weights) or a pipeline folder with unet/ and scheduler/")
    pipeline = (root / "unet").is_dir()
    unet_dir = root / "unet" if pipeline else root
    config_file = unet_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{root} holds no {'unet/' if pipeline else ''}config.json: not a diffusers "
                         f"{UNET_CLASS} or pipeline folder")
    config = json.loads(config_file.read_text())
    found = config.get("_class_name")
    if found != UNET_CLASS:
        raise ValueError(f"{config_file} is a {found!r}, not a {UNET_CLASS}: model=diffusers loads {UNET_CLASS} "
                         "folders (or pipeline folders whose unet/ holds one)")
    scheduler = None
    sched_file = root / "scheduler" / "scheduler_config.json"
    if pipeline and sched_file.is_file():
        scheduler = json.loads(sched_file.read_text())
    return unet_dir, config, scheduler


def load_unet(path: str | Path) -> DiffusersUNet:
    """The ``UNet2DModel`` of a diffusers folder (:func:`diffusers_folder`), loaded from disk only
    (``local_files_only``: never a download), wrapped."""
    UNet2DModel = _unet_class()
    unet_dir, _, _ = diffusers_folder(path)
    return DiffusersUNet(UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True))
