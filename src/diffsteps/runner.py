"""The experiment runner behind ``run.py``: config → objects → training (or a reused checkpoint) → sampling at every
step count → metrics, files, plots and logs. Returns the objective so Hydra sweepers can minimise it.

Data flows one way: this module builds and calls the others; nothing imports it back.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .samplers import plan_sampling

log = logging.getLogger("diffsteps")

OBJECTIVES = ("fid", "kid", "nll")
TASKS = ("train_eval", "train", "eval")
# config sections that change the trained weights; sampler, steps and eval never force retraining
TRAINING_KEYS = ("data", "model", "schedule", "loss", "train", "seed")


# -- validation -----------------------------------------------------------------------------------------------------
def steps_list(cfg: DictConfig) -> list[int]:
    steps = cfg.steps
    steps = list(steps) if OmegaConf.is_list(steps) or isinstance(steps, (list, tuple)) else [steps]
    if not steps:
        raise ValueError("steps is empty; give one int or a list, e.g. steps=20 or steps=[10,20,50]")
    return steps


def validate(cfg: DictConfig, schedule) -> list[int]:
    """Check everything that would otherwise fail after training: task, objective, sampler, spacing, steps and
    sampler options (each against the schedule), evaluation sizes. Returns the step counts."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; valid choices: {', '.join(TASKS)}")
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}; valid choices: {', '.join(OBJECTIVES)}")
    steps = steps_list(cfg)
    options = OmegaConf.to_container(cfg.sampler.options, resolve=True) or {}
    for n in steps:
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"steps must be integers, got {n!r}")
        plan_sampling(schedule, cfg.sampler.name, n, cfg.sampler.spacing, **options)
    if cfg.eval.num_samples < 2 or cfg.eval.batch_size < 1:
        raise ValueError("eval.num_samples must be ≥ 2 and eval.batch_size ≥ 1")
    return steps


# -- building objects -----------------------------------------------------------------------------------------------
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

    from .module import DiffusionModule

    datamodule = instantiate(cfg.data)
    net = build_net(cfg, tuple(datamodule.sample_shape))
    loss = instantiate(cfg.loss)
    t = cfg.train
    module = DiffusionModule(net, schedule, loss, lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                             min_lr_ratio=t.min_lr_ratio, compile=t.compile)
    return datamodule, module


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


def wandb_mode(requested: str | None) -> str:
    """``requested`` if given, else $WANDB_MODE, else online when an API key is configured, else offline."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def make_loggers(cfg: DictConfig, out_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = []
    if "wandb" in cfg.logger and cfg.logger.wandb is not None:
        w = cfg.logger.wandb
        group = w.group or _sweep_group()
        mode = wandb_mode(w.mode)
        loggers.append(WandbLogger(project=w.project, entity=w.entity, group=group, tags=list(w.tags),
                                   save_dir=str(out_dir), mode=mode,
                                   config=OmegaConf.to_container(cfg, resolve=True)))
    if cfg.logger.get("csv", False):
        loggers.append(CSVLogger(save_dir=str(out_dir), name="csv", version=""))
    return loggers


def _sweep_group() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return "-".join(Path(hc.sweep.dir).parts[-2:])
    except ValueError:  # not running under Hydra
        pass
    return None


def train(cfg: DictConfig, module, datamodule, loggers, out_dir: Path) -> tuple[Path, int]:
    """Train, or reuse / resume the checkpoint trained with the same training-relevant config. Returns the
    checkpoint and this process's global rank (DDP starts its other processes inside ``fit``)."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .module import ema_callback

    # the module overrides configure_model only to compile in place; it shards nothing, so EMA's warning is moot
    warnings.filterwarnings("ignore", message=".*WeightAveraging callback with a model that overrides")
    ckpt_dir = Path(cfg.paths.checkpoint_dir) / training_key(cfg)
    last, done = ckpt_dir / "last.ckpt", ckpt_dir / "complete.json"
    if done.is_file() and last.is_file():
        log.info("reusing the checkpoint trained with this config: %s (sampler and steps don't retrain)", last)
        load_weights(module, last)
        return last, 0
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "train_config.yaml").write_text(OmegaConf.to_yaml({k: cfg[k] for k in TRAINING_KEYS}, resolve=True))
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


# -- evaluation -----------------------------------------------------------------------------------------------------
def feature_name(cfg: DictConfig, datamodule) -> str:
    if cfg.eval.features != "auto":
        return cfg.eval.features
    if not datamodule.is_image:
        return "identity"
    return "digits" if tuple(datamodule.sample_shape) == (1, 8, 8) else "inception"


def evaluate(cfg: DictConfig, module, datamodule, schedule, steps: list[int], out_dir: Path) -> list[dict]:
    """Sample at every step count from the same noise (common random numbers), in chunks, and measure."""
    from tqdm.auto import tqdm

    from .metrics import SampleQuality, classifier_confidence
    from .plots import save_grid

    e = cfg.eval
    shape = tuple(datamodule.sample_shape)
    features = feature_name(cfg, datamodule)
    # rank zero evaluates alone (the other ranks have returned), so the metric must not wait for them to sync
    quality = SampleQuality(features=features, kid_subset_size=min(e.kid_subset_size, e.num_samples),
                            cache_dir=cfg.paths.cache_dir, metric_kwargs={"sync_on_compute": False})
    real = datamodule.real_samples(e.num_reference, split=e.reference_split)
    quality.set_reference(real, key=f"{datamodule.name}-{e.reference_split}-{len(real)}")
    mixture = getattr(datamodule, "mixture", None)
    options = OmegaConf.to_container(cfg.sampler.options, resolve=True) or {}
    # images live in [−1, 1]: clipping x̂_0 there keeps an ε-network's errors at high noise (amplified by σ/α ≈ 157
    # at t = T−1 on the linear schedule) from compounding; vector data has no such bound
    clip = e.get("clip_denoised", "auto")
    options["clip_denoised"] = (1.0 if datamodule.is_image else None) if clip == "auto" else clip
    sampler, spacing = cfg.sampler.name, cfg.sampler.spacing
    rows = []
    module.eval()
    for n_steps in tqdm(steps, desc=f"evaluating {sampler}", unit="step count"):
        gen = torch.Generator().manual_seed(e.noise_seed)
        chunks, nfe, t0 = [], 0, time.perf_counter()
        quality.reset()
        for start in range(0, e.num_samples, e.batch_size):
            b = min(e.batch_size, e.num_samples - start)
            noise = torch.randn((b, *shape), generator=gen)
            res = module.generate(noise.to(module.device), sampler=sampler, steps=n_steps, spacing=spacing,
                                  generator=gen, return_info=True, **options)
            x = res.sample.float().cpu()
            nfe = res.nfe
            quality.update(x)
            chunks.append(x)
        seconds = time.perf_counter() - t0
        samples = torch.cat(chunks)
        row = {"sampler": sampler, "spacing": spacing, "steps": n_steps, "nfe": nfe,
               "sample_seconds": seconds, "seconds_per_sample": seconds / e.num_samples, **quality.compute()}
        if features == "digits":
            row.update({f"classifier_{k}": v for k, v in classifier_confidence(samples).items()
                        if isinstance(v, (int, float))})
        if mixture is not None:
            flat = samples.reshape(len(samples), -1).double()
            row["nll"] = -mixture.log_prob(flat).mean().item() / flat.shape[1]  # nats per dimension
        rows.append({k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in row.items()})
        torch.save(samples, out_dir / f"samples_{sampler}_{n_steps}.pt")
        save_grid(samples[: e.grid_size], out_dir / f"grid_{sampler}_{n_steps}.png",
                  title=f"{sampler}, {n_steps} steps (NFE {nfe})")
        log.info("%s %d steps: %s", sampler, n_steps, {k: v for k, v in rows[-1].items() if k not in ("sampler",)})
    return rows


def write_results(rows: list[dict], out_dir: Path) -> None:
    (out_dir / "metrics.json").write_text(json.dumps(rows, indent=2))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def log_results(rows: list[dict], loggers: list, out_dir: Path) -> None:
    """Quality-vs-steps to W&B on their own step axis (each metric defined by exact name: a "*" glob defined
    earlier would win over later globs), plus a table and the sample grids."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    numeric = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and k != "steps"]
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            run = lg.experiment
            run.define_metric("eval/steps")
            for k in numeric:
                run.define_metric(f"eval/{k}", step_metric="eval/steps")
            for r in rows:
                run.log({"eval/steps": r["steps"], **{f"eval/{k}": r[k] for k in numeric}})
            import wandb

            run.log({"eval/table": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
            for r in rows:
                grid = out_dir / f"grid_{r['sampler']}_{r['steps']}.png"
                if grid.is_file():
                    lg.log_image(key=f"samples/{r['sampler']}", images=[str(grid)], caption=[f"{r['steps']} steps"])
            for png in sorted(out_dir.glob("*_vs_*.png")):
                lg.log_image(key=f"plots/{png.stem}", images=[str(png)])
        elif isinstance(lg, CSVLogger):
            for r in rows:
                lg.log_metrics({f"eval/{k}": r[k] for k in numeric}, step=r["steps"])
            lg.save()


# -- entry point ----------------------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> float:
    """Train (or reuse), evaluate at each of ``cfg.steps``, write results; return ``cfg.objective`` at the last."""
    from hydra.utils import instantiate

    from .plots import plot_quality_vs_nfe

    schedule = instantiate(cfg.schedule)
    steps = validate(cfg, schedule)  # seconds, before any training
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import lightning as L

    L.seed_everything(cfg.seed, workers=True)  # before build: the network's initialisation follows the seed
    datamodule, module = build(cfg, schedule)
    loggers = make_loggers(cfg, out_dir)
    rank = 0
    if cfg.ckpt_path:
        load_weights(module, cfg.ckpt_path)
        ckpt = Path(cfg.ckpt_path)
    elif cfg.task == "eval":
        raise ValueError("task=eval needs ckpt_path=<a checkpoint>")
    else:
        ckpt, rank = train(cfg, module, datamodule, loggers, out_dir)
    if rank != 0:
        return math.nan  # only rank zero evaluates and writes (issue: distributed evaluation comes later)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    link = out_dir / "checkpoint.ckpt"
    if not link.exists():
        link.symlink_to(Path(ckpt).resolve())
    if cfg.task == "train":
        return math.nan
    rows = evaluate(cfg, module, datamodule, schedule, steps, out_dir)
    write_results(rows, out_dir)
    plot_quality_vs_nfe(rows, out_dir)
    log_results(rows, loggers, out_dir)
    for lg in loggers:
        lg.finalize("success")
    _print_sync_hint(loggers)
    value = rows[-1].get(cfg.objective)
    if value is None:
        raise ValueError(f"objective {cfg.objective!r} was not measured for this data; measured: "
                         f"{', '.join(k for k, v in rows[-1].items() if isinstance(v, float))}")
    print(f"results in {out_dir}")
    return float(value)


def _print_sync_hint(loggers: list) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            run_dir = Path(lg.experiment.dir).parent
            if lg.experiment.settings.mode == "offline":
                print(f"W&B run saved offline; upload it with: wandb sync {run_dir}")
            import wandb

            wandb.finish()
