"""The ``logger`` group (W&B offline by default, CSV, TensorBoard), built from its ``_target_``s, and what is logged
to them after an evaluation."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Lightning's console lines that tell a user nothing about the run: an advertisement shown on every Trainer, a
# deprecation inside Lightning's own code (torch 2.13), and the logging-interval warning, moot here because
# Lightning counts the interval in optimiser steps across epochs (the runner's data modules have few batches each)
_ADVERT = "💡 Tip:"
_MOOT_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated", r".*smaller than the logging interval")


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERT)


def tidy_console() -> None:
    """Each Lightning line once, on the console and in the run's log file. Lightning's package logger prints through
    a console handler of its own (added when it is imported) and passes the line on to Hydra's, which prints it
    again: it stops passing it on, and writes to the run's log file directly instead. (Its subpackages, when
    imported before logging was configured, print through handlers of their own and pass nothing on: they pass it
    on again.) Without importing Lightning (a config error stays fast)."""
    root, lightning = logging.getLogger(), logging.getLogger("lightning")
    if not root.handlers:  # no Hydra: Lightning's lines go where its own and the caller's settings send them
        return
    for name in ("lightning.pytorch", "lightning.fabric"):
        # imported before logging was configured, each gave itself a console handler and stopped passing lines on
        sub = logging.Logger.manager.loggerDict.get(name)
        if isinstance(sub, logging.Logger) and not sub.propagate:
            for handler in sub.handlers[:]:
                if type(handler) is logging.StreamHandler:
                    sub.removeHandler(handler)
            sub.propagate = True
    lightning.propagate = False
    for handler in lightning.handlers[:]:
        if isinstance(handler, logging.FileHandler):  # an earlier run's, in this process (a joblib launcher)
            lightning.removeHandler(handler)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            lightning.addHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdverts())
    for message in _MOOT_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


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
    run's folder) and, for W&B, the group (null: the sweep folder's name), the mode (:func:`wandb_mode`), the run's
    name (null: :func:`run_name`), its ``job_type`` (null: :func:`job_type`) and the resolved config. The W&B run
    itself starts at its first use, so training can still choose its id (:func:`continue_training_run`)."""
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import WandbLogger

    loggers = []
    for name, node in _logger_nodes(cfg).items():
        cls = _logger_class(name, node)
        fill, extra = {}, {}
        if node.get("save_dir", None) is None:
            fill["save_dir"] = str(out_dir)
        if issubclass(cls, WandbLogger):
            kind = node.get("job_type") or job_type(cfg)
            fill.update(group=node.get("group") or _sweep_group(), mode=wandb_mode(node.get("mode")),
                        job_type=kind, name=node.get("name") or run_name(cfg, kind))
            # passed to the built partial, not merged into the node: instantiate would build its _target_s
            extra["config"] = OmegaConf.to_container(cfg, resolve=True)
        loggers.append(instantiate(node, _partial_=True, **fill)(**extra))
        if issubclass(cls, WandbLogger) and loggers[-1]._wandb_init.get("anonymous") is None:
            # Lightning passes anonymous=None, which wandb (0.31 here) answers on every run with "The anonymous setting
            # has no effect": leave it unset unless the config asks for it
            loggers[-1]._wandb_init.pop("anonymous", None)
    return loggers


# -- W&B lineage: run names and job types, the training run's id next to its checkpoint, artifacts -----------------
JOB_TYPES = {"train": "train", "train_eval": "train", "eval": "eval", "optimize_steps": "optimize",
             "report": "sweep"}
RUN_ID_FILE = "wandb_run_id"  # in the checkpoint cache entry: the W&B run that trains (and trained) it


def job_type(cfg: DictConfig) -> str:
    """``train`` / ``eval`` / ``optimize`` / ``sweep`` from the task; a run given a checkpoint only evaluates (a
    ``train_eval`` run that finds its training cached turns into ``eval`` when it reuses it: :func:`link_model`)."""
    if cfg.get("ckpt_path") and cfg.task in ("train_eval", "eval"):
        return "eval"
    return JOB_TYPES.get(cfg.task, str(cfg.task))


def run_name(cfg: DictConfig, kind: str) -> str:
    """What tells this run apart (its ``job_type`` is shown beside it): the data, the sampler, the step counts and
    the seed (a training-only run: the model instead of sampler and steps); in a multirun or sweep, the job (trial)
    number and its swept values first. ``optimize`` and ``sweep`` runs say so."""
    choices = _hydra_choices()
    data = choices.get("data") or str(OmegaConf.select(cfg, "data._target_", default="data")).rsplit(".", 1)[-1]
    steps = cfg.steps if not OmegaConf.is_list(cfg.steps) else ",".join(str(s) for s in cfg.steps)
    if cfg.task == "train":
        what = [data, choices.get("model") or "", f"seed{cfg.seed}"]
    elif kind == "sweep":
        what = ["summary", Path(str(cfg.get("report_dir") or "")).name]
    else:
        what = [kind if kind == "optimize" else "", data, str(OmegaConf.select(cfg, "sampler.name", default="")),
                f"steps{steps}", f"seed{cfg.seed}"]
    name = "-".join(p for p in what if p)
    trial = _trial()
    return " ".join(p for p in (f"#{trial[0]}", trial[1], name) if p) if trial else name


def _hydra_choices() -> dict:
    try:
        from hydra.core.hydra_config import HydraConfig

        return dict(HydraConfig.get().runtime.choices)
    except ValueError:  # not running under Hydra
        return {}


def _trial() -> tuple[int, str] | None:
    """(job number, this job's values of the swept settings) in a multirun or sweep, else None. The swept keys are
    read from the sweep's ``multirun.yaml`` (written before any job starts): the command line's sweep overrides
    (``a,b``, ``choice(…)``, ``interval(…)``, … as Hydra parses them) and ``hydra.sweeper.params``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
    except ValueError:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept: set[str] = set()
    try:
        sweep = OmegaConf.load(Path(hc.sweep.dir) / "multirun.yaml").hydra
        parsed = OverridesParser.create().parse_overrides([str(o) for o in sweep.overrides.task])
        swept.update(o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override())
        swept.update(str(k) for k in (OmegaConf.select(sweep, "sweeper.params") or {}))
    except Exception:  # noqa: BLE001 (no or an unreadable multirun.yaml: the number alone names the job)
        pass
    mine = [str(o) for o in hc.overrides.task if str(o).partition("=")[0].lstrip("+~") in swept]
    return int(hc.job.num), " ".join(mine)


def wandb_loggers(loggers: list) -> list:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def _before_start(loggers: list, **init) -> None:
    """Set ``wandb.init`` arguments of W&B loggers whose run has not started yet (Lightning keeps them in
    ``_wandb_init`` until the first use of ``experiment``); a started run keeps its own."""
    for lg in wandb_loggers(loggers):
        if lg._experiment is None:
            lg._wandb_init.update(init)
            if "id" in init:
                lg._id = init["id"]


def continue_training_run(loggers: list, ckpt_dir: Path, resuming: bool) -> None:
    """Training resumed from an unfinished cache entry continues the W&B run that started it (``id`` stored in
    the entry, ``resume="allow"``); a fresh training gets a new id, stored there for the next resume and for
    evaluations to name the run that trained the weights."""
    if not wandb_loggers(loggers):
        return
    import secrets
    import string

    path = ckpt_dir / RUN_ID_FILE
    stored = path.read_text().strip() if resuming and path.is_file() else ""
    # W&B's own id alphabet and length
    run_id = stored or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if not stored:
        path.write_text(run_id + "\n")
    _before_start(loggers, id=run_id, resume="allow", job_type="train")


def log_artifact(loggers: list, name: str, kind: str, files: list[Path], *, metadata: dict | None = None,
                 aliases: list[str] | None = None, immutable: bool = False) -> None:
    """``files`` (those that exist) as one W&B artifact of type ``kind`` (model / samples / schedule / results).
    ``immutable``: referenced in place instead of copied to W&B's staging folder (a finished checkpoint is never
    written again); offline runs keep the artifact for ``wandb sync``."""
    files = [Path(f) for f in files if Path(f).is_file()]
    if not files:
        return
    import wandb

    for lg in wandb_loggers(loggers):
        art = wandb.Artifact(_artifact_name(name), type=kind, metadata=metadata or {})
        for f in files:
            art.add_file(str(f), name=f.name, policy="immutable" if immutable else "mutable")
        lg.experiment.log_artifact(art, aliases=aliases or ["latest"])


def _artifact_name(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def log_model(loggers: list, ckpt_dir: Path, key: str, global_step: int, digest: str) -> None:
    """The finished checkpoint of cache entry ``key`` as artifact ``model-<key>`` (aliases latest, step<N>)."""
    log_artifact(loggers, f"model-{key}", "model",
                 [ckpt_dir / "last.ckpt", ckpt_dir / "complete.json", ckpt_dir / "train_config.yaml"],
                 metadata={"training_key": key, "global_step": global_step, "weights_sha256": digest},
                 aliases=["latest", f"step{global_step}"], immutable=True)


def link_model(loggers: list, ckpt: Path, key: str | None) -> None:
    """An evaluation of existing weights: the run becomes ``job_type=eval`` (unless started) and links to the
    weights and the run that trained them. Online, ``use_artifact("model-<key>:latest")`` draws the edge in W&B's
    lineage graph; offline W&B cannot use artifacts, so the run's config records ``lineage.model_artifact`` and
    ``lineage.trained_by_run`` (the id stored in the cache entry), which the synced run shows."""
    from .checkpoints import launched_rank

    found = wandb_loggers(loggers)
    if not found or launched_rank() != 0:  # a DDP process past rank zero has no run (Lightning's dummy)
        return
    _before_start(loggers, job_type="eval")
    id_file = Path(ckpt).resolve().parent / RUN_ID_FILE
    lineage = {"checkpoint": str(Path(ckpt).resolve()),
               "model_artifact": _artifact_name(f"model-{key}") + ":latest" if key else None,
               "trained_by_run": id_file.read_text().strip() if id_file.is_file() else None}
    for lg in found:
        run = lg.experiment
        run.config.update({"lineage": lineage}, allow_val_change=True)
        if key and run.settings.mode != "offline":
            try:
                run.use_artifact(lineage["model_artifact"], type="model")
            except Exception as err:  # noqa: BLE001 (not logged by any run yet: lineage stays in the config)
                import logging

                logging.getLogger("diffsteps").warning("W&B: model-%s not found (%s); the lineage is in the run's "
                                                       "config only", key, err)


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
            log_artifact([lg], f"samples-{run.id}", "samples",
                         sorted(out_dir.glob("samples_*.pt")) + sorted(out_dir.glob("grid_*.png")))
            log_artifact([lg], f"results-{run.id}", "results",
                         [out_dir / n for n in ("metrics.json", "metrics.csv", "config.yaml", "report.html")])
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
