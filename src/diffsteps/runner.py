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
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .samplers import plan_sampling

log = logging.getLogger("diffsteps")

# objective name → the metrics.json key it reads
OBJECTIVES = {"fid": "fid", "kid": "kid_mean", "mse": "mse", "nll": "nll", "elbo": "elbo_bpd"}
OBJECTIVE_COSTS = {"nfe": "nfe", "seconds": "seconds_per_sample"}
TASKS = ("train_eval", "train", "eval", "schedules", "report")
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
    o = cfg.objective
    if o.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {o.name!r}; valid choices: {', '.join(OBJECTIVES)}")
    if o.cost not in OBJECTIVE_COSTS:
        raise ValueError(f"unknown objective.cost {o.cost!r}; valid choices: {', '.join(OBJECTIVE_COSTS)}")
    if not (isinstance(o.cost_weight, (int, float)) and math.isfinite(o.cost_weight)):
        raise ValueError(f"objective.cost_weight must be a finite number, got {o.cost_weight!r}")
    steps = steps_list(cfg)
    options = OmegaConf.to_container(cfg.sampler.options, resolve=True) or {}
    spec = None
    for n in steps:
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"steps must be integers, got {n!r}")
        spec, _, _ = plan_sampling(schedule, cfg.sampler.name, n, cfg.sampler.spacing, **options)
    e = cfg.eval
    if e.batch_size < 1:
        raise ValueError(f"eval.batch_size must be ≥ 1, got {e.batch_size}")
    least = max(2, e.kid_subset_size)
    if e.num_samples < least:
        raise ValueError(f"eval.num_samples={e.num_samples} is below the minimum {least}: FID needs ≥ 2 samples and "
                         f"KID ≥ eval.kid_subset_size={e.kid_subset_size}; raise num_samples or lower "
                         "kid_subset_size")
    if o.name == "mse" and not (spec.is_deterministic(**options) and e.mse.num_samples > 0):
        raise ValueError(f"objective=mse needs a deterministic sampler (not {cfg.sampler.name!r} with {options}) "
                         f"and eval.mse.num_samples > 0")
    if o.name == "elbo" and not e.elbo.num_samples > 0:
        raise ValueError("objective=elbo needs eval.elbo.num_samples > 0")
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


def sampler_options(cfg: DictConfig, datamodule) -> dict:
    options = OmegaConf.to_container(cfg.sampler.options, resolve=True) or {}
    # images live in [−1, 1]: clipping x̂_0 there keeps an ε-network's errors at high noise (amplified by σ/α ≈ 157
    # at t = T−1 on the linear schedule) from compounding; vector data has no such bound
    clip = cfg.eval.get("clip_denoised", "auto")
    options["clip_denoised"] = (1.0 if datamodule.is_image else None) if clip == "auto" else clip
    return options


def evaluate(cfg: DictConfig, module, datamodule, schedule, steps: list[int],
             out_dir: Path) -> tuple[list[dict] | None, int]:
    """Sample at every step count from the same noise, in chunks, on every process of the trainer (DDP: each its
    share of the chunks), and measure. Returns (rows, rank); rows only on rank zero, which also writes the grids
    and sample files."""
    from hydra.utils import instantiate

    from .evaluation import EvalPlan, EvaluationModule, Evaluator
    from .metrics import SampleQuality, make_features

    e = cfg.eval
    features = feature_name(cfg, datamodule)
    plan = EvalPlan(sampler=cfg.sampler.name, steps=tuple(steps), shape=tuple(datamodule.sample_shape),
                    num_samples=e.num_samples, batch_size=e.batch_size, spacing=cfg.sampler.spacing,
                    options=sampler_options(cfg, datamodule), noise_seed=e.noise_seed,
                    mse_samples=e.mse.num_samples, reference_sampler=e.mse.reference_sampler,
                    reference_steps=e.mse.reference_steps, reference_spacing=e.mse.reference_spacing,
                    keep_samples=max(e.grid_size, e.grid_columns, e.save_samples))
    real = datamodule.real_samples(e.num_reference, split=e.reference_split)
    key = f"{datamodule.name}-{e.reference_split}-{len(real)}"

    # one extractor and one reference for all step counts: loaded (Inception: ~100 MB) and hashed once
    extractor = make_features(features)
    first: list[SampleQuality] = []

    def quality() -> SampleQuality:
        q = SampleQuality(features=extractor, kid_subset_size=e.kid_subset_size, cache_dir=cfg.paths.cache_dir)
        if first:
            q.share_reference(first[0])
        else:
            q.set_reference(real, key=key)  # computed once, then read from the cache by later runs
            first.append(q)
        return q

    evaluator = Evaluator(plan, schedule, module.prediction, quality=quality,
                          mixture=getattr(datamodule, "mixture", None), classifier=features == "digits")
    # the chunk loader runs in the main process (no workers), where its per-rank __len__ is exact
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined")
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                          default_root_dir=str(out_dir))
    runner = EvaluationModule(module.net, evaluator)
    log.info("evaluating %s at %s steps: %d samples in chunks of %d", plan.sampler, list(steps), plan.num_samples,
             plan.batch_size)
    trainer.test(runner, verbose=False)
    if trainer.global_rank != 0:
        return None, trainer.global_rank
    rows = runner.rows
    if e.elbo.num_samples > 0:
        elbo_at = _elbo(cfg, module, datamodule, schedule)
        for row in rows:
            row.update(elbo_at(row["steps"]))
    _save_samples(evaluator, rows, plan, e, out_dir)
    for row in rows:
        log.info("%s %d steps: %s", row["sampler"], row["steps"],
                 {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items() if k != "sampler"})
    return rows, 0


def _elbo(cfg: DictConfig, module, datamodule, schedule):
    """A function of the step count n: the negative ELBO (bits/dim) of held-out data over the integer timesteps the
    sampler's spacing visits at n steps (a K-step chain), and with ``eval.elbo.full`` over all T."""
    from .likelihood import elbo_bpd
    from .spacings import make_timesteps, to_integer_timesteps

    e = cfg.eval.elbo
    data = datamodule.real_samples(e.num_samples, split=e.split)
    device = next(module.net.parameters()).device
    # discrete data (images: 256 levels, digits: 17) get the discretised decoder (Ho et al. §3.3): a probability,
    # so the bound is one on the discrete NLL; a density on discrete data would be unbounded below
    levels = getattr(datamodule, "levels", None)
    if levels is not None:
        k = (data.double() + 1) * (levels - 1) / 2
        if not torch.allclose(k, k.round(), atol=1e-3):  # e.g. images resized with interpolation
            log.warning("the ELBO data are not on %d levels: using a continuous decoder (a density, not a "
                        "probability: it can be negative)", levels)
            levels = None
    kw = dict(prediction=module.prediction, variance=e.variance, batch_size=cfg.eval.batch_size, device=device,
              discrete=levels is not None, levels=levels or 256)

    def bound(timesteps, **extra) -> dict:
        # reseeded for each step count: a row's ELBO does not depend on which step counts came before it
        g = torch.Generator(device=device).manual_seed(cfg.eval.noise_seed)
        with torch.no_grad():
            return elbo_bpd(module.net, data, schedule, timesteps=timesteps, generator=g, **extra, **kw)

    full = bound(None, progress=True)["elbo_bpd"] if e.full else None

    def at(n_steps: int) -> dict:
        ts = torch.unique(to_integer_timesteps(make_timesteps(cfg.sampler.spacing, n_steps, schedule)))
        out = {k: v for k, v in bound(ts).items() if k != "elbo_num_samples"}
        if full is not None:
            out["elbo_full_bpd"] = full
        return out

    return at


def _save_samples(evaluator, rows: list[dict], plan, e: DictConfig, out_dir: Path) -> None:
    from .plots import save_grid, save_steps_grid

    by_steps = {}
    for row in rows:
        n = row["steps"]
        x = evaluator.samples(n)
        torch.save(x[: e.save_samples].clone(), out_dir / f"samples_{plan.sampler}_{n}.pt")
        save_grid(x[: e.grid_size], out_dir / f"grid_{plan.sampler}_{n}.png",
                  title=f"{plan.sampler}, {n} steps (NFE {row['nfe']})")
        by_steps[f"{n} steps (NFE {row['nfe']})"] = x[: e.grid_columns] if x.ndim == 4 else x[: e.grid_size]
    save_steps_grid(by_steps, out_dir / f"grid_steps_{plan.sampler}.png",
                    title=f"{plan.sampler}: the same noise at each step count")


def write_results(rows: list[dict], out_dir: Path) -> None:
    (out_dir / "metrics.json").write_text(json.dumps(rows, indent=2))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def log_results(rows: list[dict], loggers: list, out_dir: Path) -> None:
    """Quality-vs-steps to W&B on their own step axis (each metric defined by exact name: a "*" glob defined
    earlier would win over later globs), a table, line plots of each metric against NFE, the sample grids and
    figures; to the CSV logger the same numbers with the step count as step."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from .plots import CURVE_METRICS

    keys = list(dict.fromkeys(k for r in rows for k in r))
    numeric = [k for k in keys if k != "steps" and all(isinstance(r.get(k), (int, float)) for r in rows)]
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            run = lg.experiment
            run.define_metric("eval/steps")
            for k in numeric:
                run.define_metric(f"eval/{k}", step_metric="eval/steps")
            for r in rows:
                run.log({"eval/steps": r["steps"], **{f"eval/{k}": r[k] for k in numeric}})
            table = wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows])
            curves = {f"curves/{k}_vs_nfe": wandb.plot.line(table, "nfe", k, title=f"{k} vs NFE")
                      for k in CURVE_METRICS if k in numeric}
            run.log({"eval/table": table, **curves})
            for png in sorted(out_dir.glob("grid_*.png")):
                lg.log_image(key=f"samples/{png.stem}", images=[str(png)])
            for png in sorted(out_dir.glob("*_vs_*.png")):
                lg.log_image(key=f"plots/{png.stem}", images=[str(png)])
        elif isinstance(lg, CSVLogger):
            for r in rows:
                lg.log_metrics({f"eval/{k}": r[k] for k in numeric}, step=r["steps"])
            lg.save()


# -- entry point ----------------------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> float:
    """Train (or reuse), evaluate at each of ``cfg.steps``, write results; return the objective at the last."""
    from hydra.utils import instantiate

    from .plots import plot_quality_vs_nfe

    if cfg.task in ("schedules", "report"):
        return _figure_task(cfg)
    schedule = instantiate(cfg.schedule)
    steps = validate(cfg, schedule)  # seconds, before any training
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import lightning as L

    L.seed_everything(cfg.seed, workers=True)  # before build: the network's initialisation follows the seed
    datamodule, module = build(cfg, schedule)
    if cfg.objective.name == "nll" and getattr(datamodule, "mixture", None) is None:
        raise ValueError(f"objective=nll needs data with a known density (toy2d with kind=8gaussians, gmm); "
                         f"{datamodule.name} has none: choose objective=fid, kid, mse or elbo")
    loggers = make_loggers(cfg, out_dir)
    rank = 0
    if cfg.ckpt_path:
        load_weights(module, cfg.ckpt_path)
        ckpt = Path(cfg.ckpt_path)
    elif cfg.task == "eval":
        raise ValueError("task=eval needs ckpt_path=<a checkpoint>")
    else:
        ckpt, rank = train(cfg, module, datamodule, loggers, out_dir)
    rows = None
    if cfg.task != "train":
        rows, rank = evaluate(cfg, module, datamodule, schedule, steps, out_dir)  # every rank takes part
    if rank != 0:
        return math.nan  # rank zero writes the results
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    link = out_dir / "checkpoint.ckpt"
    if not link.exists():
        link.symlink_to(Path(ckpt).resolve())
    if rows is None:
        return math.nan
    for row in rows:
        row["objective"] = objective_value(cfg, row)
    write_results(rows, out_dir)
    plot_quality_vs_nfe(rows, out_dir)
    log_results(rows, loggers, out_dir)
    for lg in loggers:
        lg.finalize("success")
    _print_sync_hint(loggers)
    print(f"results in {out_dir}; objective {cfg.objective.name} = {rows[-1]['objective']:.6g}")
    return rows[-1]["objective"]


def objective_value(cfg: DictConfig, row: dict) -> float:
    """``cfg.objective.name``'s metric in ``row`` (one step count) + ``cost_weight`` × its cost (NFE or seconds per
    sample). ``run`` returns it at the last step count."""
    o = cfg.objective
    value = float(row.get(OBJECTIVES[o.name], math.nan))  # validate() rejected objectives this run cannot measure
    return value + float(o.cost_weight) * float(row[OBJECTIVE_COSTS[o.cost]]) if o.cost_weight else value


def _figure_task(cfg: DictConfig) -> float:
    """``task=schedules``: every noise schedule in one figure; ``task=report``: a finished sweep's summary."""
    from .report import schedule_figure, summarize

    out = Path(cfg.paths.output_dir)
    if cfg.task == "schedules":
        png = schedule_figure(out, num_timesteps=cfg.schedule.num_timesteps)
        print(f"schedules in {png} and {out / 'schedules.csv'}")
    else:
        if not cfg.get("report_dir"):
            raise ValueError("task=report needs report_dir=<a multirun folder>")
        result = summarize(cfg.report_dir)
        print(f"summary of {result['rows']} rows in {Path(cfg.report_dir) / 'summary.md'}")
    return math.nan


def _print_sync_hint(loggers: list) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            run_dir = Path(lg.experiment.dir).parent
            if lg.experiment.settings.mode == "offline":
                print(f"W&B run saved offline; upload it with: wandb sync {run_dir}")
            import wandb

            wandb.finish()
