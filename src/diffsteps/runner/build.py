"""Config → objects: the data module, the network (chosen for, or checked against, the data's
:class:`~diffsteps.data.DataSpec`) and the Lightning module (with the optimiser and LR scheduler as partials)."""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

if TYPE_CHECKING:  # the data package imports Lightning: not at import time of the runner
    from ..data.base import DataSpec

log = logging.getLogger("diffsteps")

# the nets of conf/model/<name>.yaml: _target_ → (the name to choose it by, the modality it takes)
_NETS = {"diffsteps.nets.UNet": ("unet", "image"), "diffsteps.nets.unet.UNet": ("unet", "image"),
         "diffsteps.nets.MLP": ("mlp", "vector"), "diffsteps.nets.mlp.MLP": ("mlp", "vector"),
         "diffsteps.nets.diffusers_unet.new_unet": ("diffusers_unet", "image"),
         "diffsteps.nets.UNet1D": ("unet1d", "signal"), "diffsteps.nets.unet1d.UNet1D": ("unet1d", "signal")}
# conf/model/diffusers.yaml: a diffusers folder on disk, loaded rather than built (adopt_diffusers, build_net)
DIFFUSERS_LOAD = "diffsteps.nets.diffusers_unet.load_unet"
_FOR_MODALITY = {"image": "unet", "vector": "mlp", "signal": "unet1d"}
# conf/model/auto.yaml's knobs, per chosen net: null leaves the size to the data, a value overrides it
_AUTO_KEYS = {"unet": ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "dropout"),
              "mlp": ("hidden", "depth", "time_dim", "dropout"),
              "unet1d": ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "dropout")}


def auto_unet(image_size: int) -> dict[str, Any]:
    """``model=auto``'s UNet sizes for square images of side ``image_size``.

    Levels: halve while the next resolution is a whole number ≥ 4, at most three levels (8 → 8, 4; 16 → 16, 8, 4;
    32 → 32, 16, 8; 28 → 28, 14, 7; odd sizes get one level); channel_mult (1, 2, 2, …) as DDPM's CIFAR-10 net
    (Ho et al. 2020, App. B) for its first levels; attention at 16×16 where that is below the top level (DDPM's
    choice at 32×32), else at the lowest resolution only; base_channels 16 below 32×32 (the CPU-sized digits net,
    see :class:`~diffsteps.nets.UNet`) and 64 from 32×32 up (its recommendation for CIFAR-10); one residual block
    per level. For 8×8 this is exactly conf/model/unet.yaml (base 16, mult [1, 2], attention [4]).
    """
    resolutions = [int(image_size)]
    while len(resolutions) < 3 and resolutions[-1] % 2 == 0 and resolutions[-1] // 2 >= 4:
        resolutions.append(resolutions[-1] // 2)
    below_top = resolutions[1:]
    return {"base_channels": 16 if image_size < 32 else 64,
            "channel_mult": [1] + [2] * (len(resolutions) - 1),
            "num_res_blocks": 1,
            "attention_resolutions": [16] if 16 in below_top else [resolutions[-1]],
            "dropout": 0.0}


def auto_unet1d(length: int) -> dict[str, Any]:
    """``model=auto``'s 1-D UNet for signals of ``length`` positions: :func:`auto_unet`'s rule along one axis
    (halve while the next length is a whole number ≥ 4, at most three levels; channel_mult (1, 2, 2, …); attention
    at the lowest length) with base_channels 16 (the CPU-sized width of the digits net). For MNIST-1D (length 40)
    this is conf/model/unet1d.yaml (lengths 40, 20, 10, attention at 10)."""
    sizes = auto_unet(length)
    return {"base_channels": 16, "channel_mult": sizes["channel_mult"], "num_res_blocks": 1,
            "attention_lengths": [length // 2 ** (len(sizes["channel_mult"]) - 1)], "dropout": 0.0}


def auto_mlp() -> dict[str, Any]:
    """``model=auto``'s MLP: conf/model/mlp.yaml's sizes; its dim comes from the data."""
    return {"hidden": 256, "depth": 4, "time_dim": 128, "dropout": 0.0}


def resolve_model(model_cfg: DictConfig, spec: DataSpec, data_name: str = "") -> DictConfig:
    """The model config to instantiate for data described by ``spec``.

    ``model=auto`` (``name: auto``) becomes the UNet for image data (:func:`auto_unet`) or the MLP for vector data
    (:func:`auto_mlp`), with auto.yaml's non-null knobs on top and the shape arguments left null (filled from the
    data when instantiated), i.e. the config ``model=unet`` / ``model=mlp`` with those values would be. Signal
    data get the 1-D UNet (:func:`auto_unet1d`; its attention lengths are set by ``attention_resolutions``). An
    explicit UNet, UNet1D or MLP config is returned as it is after checking that it takes the data's modality; other
    ``_target_``\\ s are not checked."""
    from ..data.base import MODALITIES

    data = f"data {data_name} is {spec.describe()}" if data_name else f"the data are {spec.describe()}"
    if model_cfg.get("name") == "auto":
        net = _FOR_MODALITY[spec.modality]
        chosen = {"unet": auto_unet, "unet1d": auto_unet1d}[net](spec.sample_shape[-1]) if net != "mlp" \
            else auto_mlp()
        knobs = {k: v for k, v in model_cfg.items() if k != "name" and v is not None}
        wrong = sorted(set(knobs) - set(_AUTO_KEYS[net]))
        if wrong:
            raise ValueError(f"model=auto chose the {net.upper()} for {spec.modality} data ({data}), which has no "
                             f"{', '.join(wrong)}; its settable sizes: {', '.join(_AUTO_KEYS[net])}")
        knobs = OmegaConf.to_container(OmegaConf.create(knobs), resolve=True)
        if net == "unet1d" and "attention_resolutions" in knobs:
            knobs["attention_lengths"] = knobs.pop("attention_resolutions")
        chosen.update(knobs)
        if net == "unet":
            resolved = {"_target_": "diffsteps.nets.UNet", "in_channels": None, "image_size": None, **chosen}
        elif net == "unet1d":
            resolved = {"_target_": "diffsteps.nets.UNet1D", "in_channels": None, "length": None, **chosen}
        else:
            resolved = {"_target_": "diffsteps.nets.MLP", "dim": None, **chosen}
        return OmegaConf.create(resolved)
    target = model_cfg.get("_target_")
    if target not in _NETS:
        return model_cfg
    name, modality = _NETS[target]
    if spec.modality != modality:
        hint = f"use model={_FOR_MODALITY[spec.modality]} or model=auto"
        raise ValueError(f"model={name} needs {modality} data {MODALITIES[modality]}; {data}: {hint}")
    if name == "unet" and spec.sample_shape[1] != spec.sample_shape[2]:
        raise ValueError(f"model=unet needs square images; {data}")
    return model_cfg


def build_net(cfg: DictConfig, spec: DataSpec, data_name: str = "", conditional: bool = False) -> torch.nn.Module:
    """Instantiate ``cfg.model`` for data described by ``spec`` (:func:`resolve_model`), filling the shape arguments
    left null from the data's sample shape. With ``model=auto``, ``cfg.model`` is replaced by the chosen net's
    config, so config.yaml and the checkpoint key record the network actually trained (on digits that is exactly
    ``model=unet``'s config, so the two share checkpoints). A config the data's size rules out (e.g. a UNet
    attention resolution that is never reached) fails here, before training, saying what fits. ``conditional``
    (the data module's ``conditional``): the net gets ``num_classes`` = ``spec.num_classes``."""
    from hydra.utils import instantiate

    if cfg.model.get("_target_") == DIFFUSERS_LOAD:
        return _load_diffusers(cfg.model.path, spec, data_name)
    model_cfg = resolve_model(cfg.model, spec, data_name)
    if model_cfg is not cfg.model:
        if conditional:
            model_cfg.num_classes = spec.num_classes
        log.info("model=auto for %s: %s", spec.describe(), OmegaConf.to_container(model_cfg))
        with open_dict(cfg):
            cfg.model = model_cfg
        model_cfg = cfg.model
    shape = spec.sample_shape
    fill: dict[str, Any] = {}
    if conditional:
        # a class-conditional net for (x, y) batches: the label table sized from the data (its null row added by
        # the net); an explicit num_classes must agree
        given = model_cfg.get("num_classes")
        if given is None:
            fill["num_classes"] = spec.num_classes
        elif given != spec.num_classes:
            raise ValueError(f"model.num_classes={given} but the conditional data have {spec.num_classes} classes; "
                             "leave model.num_classes unset to take it from the data")
    if "in_channels" in model_cfg and model_cfg.in_channels is None:
        fill["in_channels"] = shape[0]
    if "image_size" in model_cfg and model_cfg.image_size is None:
        fill["image_size"] = shape[-1]
    if "length" in model_cfg and model_cfg.length is None:
        fill["length"] = shape[-1]
    if "dim" in model_cfg and model_cfg.dim is None:
        fill["dim"] = math.prod(shape)
    try:
        return instantiate(model_cfg, **fill)
    except Exception as err:
        name = _NETS.get(model_cfg.get("_target_"), (None,))[0]
        cause = err.__cause__ if isinstance(err.__cause__, ValueError) else None
        if name is None or cause is None:
            raise
        sized = name in ("unet", "unet1d") and any(k in str(cause) for k in ("image_size", "length", "attention_"))
        hint = "; model=auto chooses levels and attention resolutions that exist at this size" if sized else ""
        data = f"data {data_name} ({spec.describe()})" if data_name else spec.describe()
        raise ValueError(f"model={name} cannot be built for {data}: {cause}{hint}") from cause


def is_diffusers_folder_model(cfg: DictConfig) -> bool:
    return cfg.model.get("_target_") == DIFFUSERS_LOAD


def adopt_diffusers(cfg: DictConfig) -> bool:
    """``model=diffusers model.path=<folder>``: check the folder and make its scheduler config the run's, before any
    work. The schedule becomes :meth:`~diffsteps.core.schedules.Schedule.from_diffusers` of it, ``loss.prediction``
    its ``prediction_type``, ``eval.clip_denoised`` / ``eval.dynamic_threshold`` / ``eval.threshold_max`` its
    clipping and thresholding, and ``sampler.spacing`` its ``timestep_spacing`` unless set on the command line. A
    bare UNet folder keeps the config's schedule and ``loss.prediction``. Only ``task=eval`` evaluates such a
    folder; a missing folder, another model class or an unsupported scheduler option fails here, naming it.
    False for every other model."""
    from ..core.schedules import Schedule, diffusers_sampling_options
    from ..nets.diffusers_unet import diffusers_folder
    from .checkpoints import explicit_overrides

    if not is_diffusers_folder_model(cfg):
        return False
    if cfg.task != "eval":
        raise ValueError(f"model=diffusers evaluates a pretrained diffusers folder: use task=eval, not "
                         f"task={cfg.task} (to train diffusers' UNet2DModel inside diffsteps: model=diffusers_unet)")
    if cfg.get("ckpt_path"):
        raise ValueError("model=diffusers takes its weights from model.path; drop ckpt_path")
    if not cfg.model.get("path"):
        raise ValueError("model=diffusers needs model.path=<a UNet2DModel or pipeline folder>")
    unet_dir, unet_cfg, scheduler = diffusers_folder(cfg.model.path)
    if unet_cfg.get("num_class_embeds"):
        raise ValueError(f"{unet_dir} is a class-conditional UNet2DModel (num_class_embeds="
                         f"{unet_cfg['num_class_embeds']}); task=eval generates unconditionally. Sample it through "
                         "diffsteps.sample(..., cond={'y': labels}) instead")
    if scheduler is None:
        log.info("model=diffusers: %s has no scheduler config; using schedule=%s and loss.prediction=%s", unet_dir,
                 cfg.schedule.get("name"), cfg.loss.prediction)
        return True
    opts = diffusers_sampling_options(scheduler)
    node = {"_target_": "diffsteps.core.schedules.Schedule.from_diffusers", "_convert_": "all",
            "config": {k: v for k, v in scheduler.items() if not k.startswith("_")}}
    schedule = Schedule.from_diffusers(node["config"])  # built once here: a bad value fails now, not after loading
    explicit = explicit_overrides() or []
    with open_dict(cfg):
        cfg.schedule = OmegaConf.create(node)
        cfg.loss.prediction = opts["prediction"]
        cfg.eval.clip_denoised = opts["clip_denoised"]
        cfg.eval.dynamic_threshold = opts["dynamic_threshold"]
        cfg.eval.threshold_max = opts["threshold_max"]
        if "sampler.spacing" not in explicit:
            cfg.sampler.spacing = opts["spacing"]
    log.info("model=diffusers: %s with its scheduler config (%s): prediction %s, spacing %s, clip %s",
             unet_dir, schedule, opts["prediction"], cfg.sampler.spacing, opts["clip_denoised"])
    return True


def _load_diffusers(path: str, spec: DataSpec, data_name: str) -> torch.nn.Module:
    """The UNet2DModel of ``path``, after checking that it takes the data's images (its sample_size and
    in_channels against the DataSpec's sample shape)."""
    from ..nets.diffusers_unet import diffusers_folder, load_unet

    unet_dir, config, _ = diffusers_folder(path)
    size = config.get("sample_size")
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    shape = (config.get("in_channels", 3), *size)
    if spec.modality != "image" or tuple(spec.sample_shape) != shape or config.get("out_channels", 3) != shape[0]:
        data = f"data {data_name} is {spec.describe()}" if data_name else f"the data are {spec.describe()}"
        raise ValueError(f"the UNet2DModel in {unet_dir} takes images of shape {shape} (in_channels, sample_size) "
                         f"with out_channels={config.get('out_channels', 3)}; {data}: choose the data it was "
                         "trained on")
    return load_unet(path)


def _has_torch_fidelity() -> bool:
    if "torch_fidelity" in sys.modules:
        return sys.modules["torch_fidelity"] is not None
    try:
        return importlib.util.find_spec("torch_fidelity") is not None
    except (ImportError, ValueError):
        return False


def check_eval_features(cfg: DictConfig, spec: DataSpec, data_name: str = "") -> str | None:
    """The FID/KID feature space of ``eval.features`` for this data (``auto``: ``spec.features``), checked before
    training: a known name, an extractor that takes the data, and torch-fidelity installed for ``inception``.
    None when the run does not evaluate (``task=train``)."""
    from ..data.base import FEATURE_SPACES

    if cfg.get("task") == "train":
        return None
    asked = cfg.eval.features
    name = spec.features if asked == "auto" else asked
    data = f"data {data_name} ({spec.describe()})" if data_name else spec.describe()
    if name not in FEATURE_SPACES:
        raise ValueError(f"unknown eval.features {asked!r}; valid choices: auto, {', '.join(FEATURE_SPACES)}")
    if name == "digits" and spec.sample_shape != (1, 8, 8):
        raise ValueError(f"eval.features=digits needs the 8×8 digits images (1, 8, 8); {data} is not: use "
                         "eval.features=identity or eval.features=auto")
    if name == "mnist1d" and spec.sample_shape != (1, 40):
        raise ValueError(f"eval.features=mnist1d needs MNIST-1D signals (1, 40); {data} is not: use "
                         "eval.features=identity or eval.features=auto")
    if name == "inception":
        if spec.modality != "image":
            raise ValueError(f"eval.features=inception needs image data; {data} is not: use eval.features=identity "
                             "or eval.features=auto")
        if not _has_torch_fidelity():
            how = "eval.features=auto chooses the Inception features" if asked == "auto" else \
                "eval.features=inception asks for the Inception features"
            raise ValueError(
                f"{how} for {data}, and they need torch-fidelity, which is not installed: "
                f'pip install -e ".[inception]" (plus the Inception weights file on an offline machine, see '
                f"README), or set eval.features=identity (FID/KID on the raw pixels: comparable between runs, not "
                f"with published numbers)")
    return name


def build(cfg: DictConfig, schedule):
    """The data module, and the Lightning module with its network, loss, optimiser and LR-scheduler partials."""
    from hydra.utils import instantiate

    from ..training.module import DiffusionModule
    from .validate import instantiate_checked

    datamodule = instantiate(cfg.data)
    check_eval_features(cfg, datamodule.spec, datamodule.name)
    conditional = bool(getattr(datamodule, "conditional", False))
    guidance = OmegaConf.select(cfg, "sampler.guidance_scale")
    if guidance is not None and not conditional:
        raise ValueError(f"sampler.guidance_scale={guidance} needs a class-conditional model: set data.conditional="
                         "true (labelled data), or sampler.guidance_scale=null")
    from .objects import prompt_labels

    prompt_labels(cfg, datamodule.spec, conditional)
    net = build_net(cfg, datamodule.spec, datamodule.name, conditional=conditional)
    loss = instantiate(cfg.loss)
    module = DiffusionModule(net, schedule, loss, optimizer=instantiate_checked(cfg.optimizer),
                             lr_scheduler=instantiate_checked(cfg.lr_scheduler), compile=cfg.train.compile,
                             p_uncond=float(cfg.train.get("p_uncond", 0.1)))
    return datamodule, module
