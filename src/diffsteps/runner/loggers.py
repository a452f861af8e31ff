"""The ``logger`` group (W&B offline by default, CSV, TensorBoard), built from its ``_target_``s, and what is logged
to them after an evaluation."""

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


def _logger_nodes(cfg: DictConfig) -> dict[str, DictConfig]:
    """The ``logger`` group's entries, each a node with a ``_target_`` (``logger.<name>=null`` removes one)."""
    nodes = cfg.get("logger") or {}
    out = {}
    for name, node in nodes.items():
        if node is None:
            continue
        if not OmegaConf.is_dict(node) or "_target_" not in node:
            raise ValueError(f"logger.{name} must be a config node with a _target_ (e.g. "
                             f"lightning.pytorch.loggers.CSVLogger), got {node!r}; choose logger=wandb, csv, "
                             "tensorboard or none")
        out[name] = node
    return out


def _logger_class(name: str, node: DictConfig) -> type:
    from hydra.utils import get_class

    try:
        return get_class(node._target_)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"logger.{name}: cannot import _target_ {node._target_!r} ({err})") from None


def check_loggers(cfg: DictConfig) -> None:
    """Fail before training when a chosen logger cannot work: an unimportable ``_target_``, or TensorBoard without
    its package (Lightning would only notice at the first logged value)."""
    import importlib.util

    from lightning.pytorch.loggers import TensorBoardLogger

    for name, node in _logger_nodes(cfg).items():
        cls = _logger_class(name, node)
        if issubclass(cls, TensorBoardLogger) and not any(importlib.util.find_spec(m) for m in
                                                          ("tensorboard", "tensorboardX")):
            raise ValueError(f"logger.{name} ({cls.__name__}) needs the tensorboard package: pip install tensorboard "
                             "(or choose logger=csv, wandb or none)")


def make_loggers(cfg: DictConfig, out_dir: Path) -> list:
    """The ``logger`` group's loggers, filling at run time what only the run knows: ``save_dir`` (when null: the
    run's folder) and, for W&B, the group (null: the sweep folder's name), the mode (:func:`wandb_mode`) and the
    resolved config."""
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import WandbLogger

    loggers = []
    for name, node in _logger_nodes(cfg).items():
        cls = _logger_class(name, node)
        fill, extra = {}, {}
        if node.get("save_dir", None) is None:
            fill["save_dir"] = str(out_dir)
        if issubclass(cls, WandbLogger):
            fill.update(group=node.get("group") or _sweep_group(), mode=wandb_mode(node.get("mode")))
            # passed to the built partial, not merged into the node: instantiate would build its _target_s
            extra["config"] = OmegaConf.to_container(cfg, resolve=True)
        loggers.append(instantiate(node, _partial_=True, **fill)(**extra))
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
    figures; to any other logger (CSV, TensorBoard) the same numbers with the step count as step."""
    from lightning.pytorch.loggers import WandbLogger

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
            for png in sorted([*out_dir.glob("*_vs_*.png"), *out_dir.glob("spectra_*.png")]):
                lg.log_image(key=f"plots/{png.stem}", images=[str(png)])
        else:  # CSV, TensorBoard, …: the same numbers with the step count as step
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
