"""The experiment runner behind ``run.py``: config → objects → training (or a reused checkpoint) → sampling at every
step count → metrics, files, plots and logs. Returns the objective so Hydra sweepers can minimise it.

Data flows one way: this module builds and calls the others; nothing imports it back.
"""


from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from .build import adopt_diffusers, build
from .checkpoints import checkpoint_provenance, load_for_eval, open_checkpoint
from .evaluate import ResultsFile, best_effort, evaluate, feature_name, make_plan
from .loggers import link_model, log_results, make_loggers, print_sync_hint, tidy_console
from .train import default_progress_bar, train
from .validate import (
    check_eval_config,
    check_eval_data,
    check_top_level_keys,
    instantiate_checked,
    validate,
)


def run(cfg: DictConfig) -> float:
    """Train (or reuse), evaluate at each of ``cfg.steps``, write results; return the objective at the last."""
    from hydra.utils import instantiate

    from ..reporting.files import save_config, symlink
    from ..reporting.report import run_report
    from ..reporting.plots import plot_quality_vs_nfe

    check_top_level_keys(cfg)
    tidy_console()
    if cfg.task in ("schedules", "report"):
        return _figure_task(cfg)
    from .optimize import optimize_task, resolve_spacing

    if cfg.task == "optimize_steps":
        return optimize_task(cfg)
    if cfg.task == "export":
        from .export import export_task

        return export_task(cfg)
    if cfg.task == "min_steps":
        from .min_steps import min_steps_task

        return min_steps_task(cfg)
    if cfg.task == "policies":
        from .policies import policies_task

        return policies_task(cfg)
    pretrained = adopt_diffusers(cfg)  # model=diffusers: its folder and scheduler config, checked before any work
    # sampler.spacing=optimized or a schedule file → explicit timesteps (and decoupled model times, which the
    # restoration samplers do not take)
    resolve_spacing(cfg)
    if cfg.task == "restore":
        from .restore import restore_task

        return restore_task(cfg)
    checkpoint = open_checkpoint(cfg)  # ckpt_path: read now; its training config becomes the run's unless overridden
    schedule = instantiate(cfg.schedule)
    steps = validate(cfg, schedule)  # seconds, before any training
    check_eval_config(cfg, schedule, steps)
    objective = instantiate_checked(cfg.objective)
    default_progress_bar(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import lightning as L

    L.seed_everything(cfg.seed, workers=True)  # before build: the network's initialisation follows the seed
    datamodule, module = build(cfg, schedule)
    if objective.name == "nll" and not datamodule.spec.has_density:
        raise ValueError(f"objective=nll needs data with a known density (toy2d with kind=8gaussians, gmm); "
                         f"{datamodule.name} has none: choose objective=fid, kid, mse or elbo")
    check_eval_data(cfg, datamodule, steps)  # the sizes against the splits: loads the data (training would)
    loggers = make_loggers(cfg, out_dir)
    rank = 0
    if cfg.ckpt_path:
        ckpt = load_for_eval(cfg, module, datamodule, checkpoint)
        link_model(loggers, ckpt, (checkpoint_provenance(checkpoint) or {}).get("key"))
    elif pretrained:
        ckpt = Path(cfg.model.path)  # build loaded its weights
    elif cfg.task == "eval":
        raise ValueError("task=eval needs ckpt_path=<a checkpoint>")
    else:
        ckpt, rank = train(cfg, module, datamodule, loggers, out_dir)
    if rank == 0:  # before evaluating: a run stopped during its evaluation still records what it evaluated
        save_config(cfg, out_dir / "config.yaml")
        symlink(Path(ckpt).resolve(), out_dir / ("diffusers_model" if pretrained else "checkpoint.ckpt"))
    rows = None
    if cfg.task != "train":
        results = ResultsFile(out_dir, objective)  # metrics.json/.csv, rewritten as each step count finishes
        rows, rank = evaluate(cfg, module, datamodule, schedule, steps, out_dir, on_row=results.add)
    if rank != 0 or rows is None:
        return math.nan  # rank zero writes the results
    best_effort("the quality-vs-NFE plots", plot_quality_vs_nfe, rows, out_dir, feature_name(cfg, datamodule))
    best_effort("the trajectory pictures", trajectory_pictures, cfg, module, datamodule, schedule, steps, out_dir,
                loggers)
    best_effort(out_dir / "report.html", run_report, out_dir)
    log_results(rows, loggers, out_dir)
    for lg in loggers:
        lg.finalize("success")
    print_sync_hint(loggers)
    print(f"results in {out_dir}; objective {objective.name} = {rows[-1]['objective']:.6g}")
    return rows[-1]["objective"]



def trajectory_pictures(cfg: DictConfig, module, datamodule, schedule, steps: list[int], out_dir: Path,
                        loggers=()) -> list[Path]:
    """The sampler step by step at the run's fewest steps, on the first ``eval.trajectory_samples`` samples of the
    evaluation's own noise (chunk 0: the same in every run of a multirun, so the report's sampler grid compares
    like with like): ``trajectory/<sampler>_<steps>.png`` / ``.gif`` / ``.pt`` (an adaptive sampler, which picks its
    own steps: ``trajectory/adaptive.*``), and on W&B as an image and a video."""
    import torch

    from ..evaluation.plan import chunk_noise
    from ..reporting.trajectory import capture, save_trajectory
    from ..sampling.registry import get_sampler

    n = int(cfg.eval.get("trajectory_samples", 0) or 0)
    if n <= 0 or datamodule.spec.modality not in ("image", "vector"):
        return []
    plan = make_plan(cfg, datamodule, steps)
    # an adaptive sampler picks its own steps: its trajectory is the one the evaluation drew (steps ignored there)
    adaptive = get_sampler(plan.sampler).adaptive
    k = None if adaptive else min(steps)
    name = plan.sampler if adaptive else f"{plan.sampler}_{k}"
    device = next(module.net.parameters()).device
    noise = chunk_noise(plan, 0, device=device)[:n]
    was_training = module.net.training
    module.net.eval()
    try:
        traj = capture(module.net, noise, label=plan.sampler if adaptive else f"{plan.sampler} {k} steps",
                       schedule=schedule,
                       sampler=plan.sampler, steps=k, spacing=plan.spacing, prediction=module.prediction,
                       generator=torch.Generator(device=device).manual_seed(plan.noise_seed),
                       **plan.denoiser_options, **plan.sampler_options)
    finally:
        module.net.train(was_training)
    folder = out_dir / "trajectory"  # beside, not among, the evaluation's own figures
    folder.mkdir(exist_ok=True)
    files = save_trajectory(traj, folder, name, modality=datamodule.spec.modality)
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            lg.experiment.log({"trajectory/strip": wandb.Image(str(files[0])),
                               "trajectory/animation": wandb.Video(str(files[1]), format="gif")})
    return files


def _figure_task(cfg: DictConfig) -> float:
    """``task=schedules``: every noise schedule in one figure; ``task=report``: a finished sweep's summary."""
    from ..reporting.report import schedule_figure, summarize

    out = Path(cfg.paths.output_dir)
    if cfg.task == "schedules":
        png = schedule_figure(out, num_timesteps=cfg.schedule.num_timesteps)
        print(f"schedules in {png} and {out / 'schedules.csv'}")
    else:
        if not cfg.get("report_dir"):
            raise ValueError("task=report needs report_dir=<a multirun folder>")
        from .loggers import log_artifact

        result = summarize(cfg.report_dir)
        files = [Path(f) for f in result["files"]]
        if result.get("html"):
            files.append(Path(result["html"]))
        loggers = make_loggers(cfg, out)
        log_artifact(loggers, f"summary-{Path(cfg.report_dir).name}", "results", files)
        print_sync_hint(loggers)
        print(f"summary of {result['rows']} rows in {Path(cfg.report_dir) / 'summary.md'} and report.html")
    return math.nan
