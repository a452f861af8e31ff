"""``task=export``: what diffsteps trained with ``model=diffusers_unet``, written as a diffusers pipeline folder
that ``DDPMPipeline.from_pretrained`` loads — the UNet2DModel (EMA weights) and a DDPMScheduler config carrying the
exact β table as ``trained_betas`` and the prediction the training loss used."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

# diffsteps' prediction → diffusers' prediction_type (the inverse of core.schedules' mapping)
PREDICTION_TYPES = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}
# spacings diffusers' schedulers know by the same name and rule (core.spacings)
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")
NEW_UNET = "diffsteps.nets.diffusers_unet.new_unet"


def write_pipeline(net, schedule, prediction: str, out_dir: str | Path, *, clip_sample: float | None = 1.0,
                   timestep_spacing: str = "trailing") -> Path:
    """Save ``net`` (a :class:`~diffsteps.nets.diffusers_unet.DiffusersUNet`) and a ``DDPMScheduler`` for
    ``schedule`` as a ``DDPMPipeline`` folder. The scheduler carries ``schedule.betas`` as ``trained_betas`` (JSON
    floats round-trip float64 exactly, so ``Schedule.from_diffusers`` of the saved config is this schedule),
    ``prediction_type`` from ``prediction``, ``clip_sample`` / ``clip_sample_range`` from ``clip_sample`` (None:
    off) and ``timestep_spacing``. Returns the folder."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from ..nets.diffusers_unet import DiffusersUNet

    if not isinstance(net, DiffusersUNet):
        raise ValueError(f"a diffusers pipeline needs diffusers' UNet2DModel; this net is a {type(net).__name__}: "
                         "train with model=diffusers_unet")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction {prediction!r}; valid choices: {', '.join(PREDICTION_TYPES)}")
    if timestep_spacing not in DIFFUSERS_SPACINGS:
        raise ValueError(f"timestep_spacing {timestep_spacing!r} has no diffusers name; valid choices: "
                         f"{', '.join(DIFFUSERS_SPACINGS)}")
    scheduler = DDPMScheduler(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.tolist(),
                              prediction_type=PREDICTION_TYPES[prediction], clip_sample=clip_sample is not None,
                              clip_sample_range=1.0 if clip_sample is None else float(clip_sample),
                              timestep_spacing=timestep_spacing)
    out = Path(out_dir)
    DDPMPipeline(unet=net.unet.eval(), scheduler=scheduler).save_pretrained(str(out))
    return out


def export_task(cfg: DictConfig) -> float:
    """Train (or reuse the cached checkpoint of this training config, or load ``ckpt_path``) and write the pipeline
    to ``export_dir`` (default ``<run folder>/pipeline``). Only ``model=diffusers_unet`` exports; another model
    fails before anything is built."""
    import lightning as L
    from hydra.utils import instantiate

    from .build import build
    from .checkpoints import load_for_eval, open_checkpoint
    from .evaluate import sampler_options
    from .train import train
    from .validate import validate

    checkpoint = open_checkpoint(cfg)  # ckpt_path: its training config (the model included) becomes the run's
    target = cfg.model.get("_target_")
    if target != NEW_UNET:
        model = target or cfg.model.get("name")
        raise ValueError(f"task=export writes a diffusers pipeline, which needs diffusers' own UNet2DModel: train "
                         f"and export with model=diffusers_unet (this run's model is {model})")
    schedule = instantiate(cfg.schedule)
    validate(cfg, schedule)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg, schedule)
    if cfg.ckpt_path:
        load_for_eval(cfg, module, datamodule, checkpoint)
    else:
        _, rank = train(cfg, module, datamodule, [], out_dir)
        if rank != 0:
            return math.nan
    dest = Path(cfg.export_dir) if cfg.get("export_dir") else out_dir / "pipeline"
    spacing = cfg.sampler.spacing if cfg.sampler.spacing in DIFFUSERS_SPACINGS else "trailing"
    write_pipeline(module.net, schedule, module.prediction, dest,
                   clip_sample=sampler_options(cfg, datamodule)["clip_denoised"], timestep_spacing=spacing)
    print(f"diffusers pipeline in {dest}: DDPMPipeline.from_pretrained({str(dest)!r})")
    return math.nan
