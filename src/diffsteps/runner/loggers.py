"""Loggers (W&B offline by default, CSV) and what is logged to them after an evaluation."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


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



def log_results(rows: list[dict], loggers: list, out_dir: Path) -> None:
    """Quality-vs-steps to W&B on their own step axis (each metric defined by exact name: a "*" glob defined
    earlier would win over later globs), a table, line plots of each metric against NFE, the sample grids and
    figures; to the CSV logger the same numbers with the step count as step."""
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from ..reporting.plots import CURVE_METRICS

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



def print_sync_hint(loggers: list) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            run_dir = Path(lg.experiment.dir).parent
            if lg.experiment.settings.mode == "offline":
                print(f"W&B run saved offline; upload it with: wandb sync {run_dir}")
            import wandb

            wandb.finish()
