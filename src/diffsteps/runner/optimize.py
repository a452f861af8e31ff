"""``task=optimize_steps``: train or reuse the model, fit step schedules to it for the chosen sampler and every
budget in ``steps`` (NFE), compare them with every fixed spacing on held-out noise, and write one YAML artefact per
(model, sampler, NFE, method) — in the run folder and in a cache next to the checkpoint, where
``sampler.spacing=optimized`` finds it — plus a figure. Also :func:`resolve_spacing`, which turns
``sampler.spacing=optimized`` or ``=path/to/schedule.yaml`` into explicit timesteps (and, from a decoupled
artefact, ``sampler.model_timesteps``) before anything else runs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from .checkpoints import load_weights, training_key
from .validate import group_settings

__all__ = ["OptimizeSettings", "model_key", "optimize_task", "resolve_spacing", "schedule_cache_dir"]


@dataclass(frozen=True)
class OptimizeSettings:
    """conf/optimize/default.yaml's keys, with the same defaults (the group is optional: ``+optimize=default``)."""

    method: str = "refine"
    candidates: int = 48
    grid: str = "logsnr"
    teacher_solver: str = "dpmpp_3m"
    teacher_substeps: int = 8
    noises: int = 768
    holdout: float = 1 / 3
    iterations: int = 150
    patience: int = 6
    decoupled: bool = False

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> OptimizeSettings:
        s = group_settings(cls, cfg, "optimize")
        if s.method not in ("dp", "refine", "dmn"):
            raise ValueError(f"optimize.method must be one of: dp, refine, dmn (elbo: call "
                             f"diffsteps.optimize_schedule with sampler='ddpm'); got {s.method!r}")
        if not isinstance(s.decoupled, bool):
            raise ValueError(f"optimize.decoupled must be true or false, got {s.decoupled!r}")
        return s


def model_key(cfg: DictConfig) -> str:
    """The training key the model of ``cfg`` is filed under. Training resolves ``model=auto`` for the data
    (:func:`~.build.build_net`) before it keys the checkpoint, so the key of the unresolved ``auto`` config names
    no model: resolve it the same way here (on a copy; ``cfg`` is left as it is)."""
    if cfg.model.get("name") != "auto":
        return training_key(cfg)
    from hydra.utils import instantiate

    from .build import resolve_model

    datamodule = instantiate(cfg.data)
    resolved = cfg.copy()
    with open_dict(resolved):
        resolved.model = resolve_model(cfg.model, datamodule.spec, datamodule.name)
    return training_key(resolved, datamodule)


def schedule_cache_dir(cfg: DictConfig, key: str | None = None) -> Path:
    return Path(cfg.paths.checkpoint_dir) / (key or model_key(cfg)) / "schedules"


def _file_name(sampler: str, nfe: int, method: str) -> str:
    return f"{sampler}_nfe{nfe}_{method}.yaml"


def _is_decoupled(entry: dict) -> bool:
    return entry.get("model_timesteps") is not None


def _choose(match: list[tuple[Path, dict]]) -> tuple[Path, dict]:
    """Of the artefacts for one budget: refine over the others (refine starts from the DP path and keeps it unless
    the held-out noises say otherwise), else the lower recorded held-out error of dp and dmn; a decoupled one only
    where its recorded held-out error is lower than that."""
    plain = [m for m in match if not _is_decoupled(m[1])]
    decoupled = [m for m in match if _is_decoupled(m[1])]
    best = min(plain, key=lambda m: (m[1].get("method") != "refine", m[1].get("heldout_error", math.inf))) \
        if plain else None
    if decoupled:
        d = min(decoupled, key=lambda m: m[1].get("heldout_error", math.inf))
        if best is None or d[1].get("heldout_error", math.inf) < best[1].get("heldout_error", math.inf):
            return d
    return best


RESTORATION_TASKS = ("restore",)  # their samplers (RePaint, guided SR) step on their own levels: no decoupled times


def resolve_spacing(cfg: DictConfig, model_times: bool | None = None) -> None:
    """``sampler.spacing=optimized`` → the cached schedule for this model (training key), sampler and step count;
    ``sampler.spacing=<file>.yaml`` → that file's timesteps, checked against the model key and sampler. Replaces
    the spacing with the explicit list in place, and sets ``sampler.model_timesteps`` from a decoupled artefact
    (``optimize.decoupled=true``; LD3's separate model-evaluation times, which every ``diffsteps.sample`` of the run
    then gets as ``model_timesteps=``). For ``optimized``, a budget with both a plain and a decoupled artefact uses
    the decoupled one only if its recorded held-out error is lower. ``model_times=False`` (a task whose samplers
    take no decoupled times; None: decided by ``cfg.task``, False for :data:`RESTORATION_TASKS` — so a sweep's
    pre-check of one trial's config decides as the trial will) ignores decoupled artefacts and refuses a decoupled
    file. Errors name the command that makes the missing schedule."""
    if model_times is None:
        model_times = cfg.get("task") not in RESTORATION_TASKS
    spacing = cfg.sampler.get("spacing")
    if not isinstance(spacing, str) or not (spacing == "optimized" or spacing.endswith((".yaml", ".yml"))):
        return
    key, sampler = model_key(cfg), cfg.sampler.name
    steps = list(cfg.steps) if OmegaConf.is_list(cfg.steps) else [cfg.steps]
    if len(steps) != 1:
        raise ValueError(f"sampler.spacing={spacing} holds one schedule, so it needs one step count (steps=K), got "
                         f"steps={steps}")
    if spacing == "optimized":
        found = sorted(schedule_cache_dir(cfg, key).glob(f"{sampler}_nfe*.yaml"))
        entries = [(p, yaml.safe_load(p.read_text())) for p in found]
        match = [(p, e) for p, e in entries if e.get("steps") == steps[0] and (model_times or not _is_decoupled(e))]
        if not match:
            raise ValueError(f"no optimised {sampler} schedule with {steps[0]} steps for this model (training key "
                             f"{key}) in {schedule_cache_dir(cfg, key)}; make it with: python run.py "
                             f"task=optimize_steps sampler={sampler} steps=<the NFE> (and the same "
                             f"data/model/schedule/loss/train overrides)")
        path, entry = _choose(match)
    else:
        path = Path(spacing)
        if not path.is_file():
            raise FileNotFoundError(f"schedule file not found: {path}")
        entry = yaml.safe_load(path.read_text())
        if entry.get("training_key") != key:
            raise ValueError(f"{path} was optimised for the model with training key {entry.get('training_key')!r}, "
                             f"this run's model has {key!r}")
        if entry.get("sampler") != sampler:
            raise ValueError(f"{path} was optimised for sampler {entry.get('sampler')!r}, not {sampler!r}")
        if entry.get("steps") != steps[0]:
            raise ValueError(f"{path} holds {entry.get('steps')} timesteps but steps={steps[0]}")
        if _is_decoupled(entry) and not model_times:
            raise ValueError(f"{path} holds decoupled model times (optimize.decoupled=true), which task={cfg.task} "
                             "cannot use; give the plain schedule (method refine or dp) instead")
    with open_dict(cfg.sampler):
        cfg.sampler.spacing = [float(v) for v in entry["timesteps"]]
        cfg.sampler.model_timesteps = [float(v) for v in entry["model_timesteps"]] if _is_decoupled(entry) else None


def optimize_task(cfg: DictConfig) -> float:
    """Train or reuse, optimise for every NFE in ``steps``, evaluate, write YAMLs and a figure; returns the
    held-out error ratio (optimised / best fixed) at the last budget."""
    import lightning as L
    from hydra.utils import instantiate

    from ..sampling.api import ONE_CALL_PER_LEVEL
    from ..steps.differentiable import DIFFERENTIABLE, check_differentiable_options
    from ..steps.dmn import DMN_SAMPLERS
    from ..steps.optimize import MIN_HELDOUT, MIN_TRAIN, optimize_schedule
    from ..steps.teacher import check_request
    from .build import build
    from .loggers import check_loggers, log_artifact, make_loggers, print_sync_hint
    from .train import train
    from .validate import instantiate_checked, steps_list

    schedule = instantiate(cfg.schedule)
    sampler = instantiate_checked(cfg.sampler)
    settings = OptimizeSettings.from_cfg(cfg)
    budgets = steps_list(cfg)
    # every check before any training: reachable budgets, a deterministic sampler, refine's samplers, noise count
    check_request(schedule, sampler.name, budgets, **sampler.options)
    if not sampler.deterministic:
        raise ValueError(f"task=optimize_steps needs a deterministic sampler; {sampler.name!r} with "
                         f"{sampler.options} is stochastic")
    if settings.method == "refine" and sampler.name not in DIFFERENTIABLE:
        raise ValueError(f"optimize.method=refine supports samplers {', '.join(DIFFERENTIABLE)}; use "
                         f"optimize.method=dp for {sampler.name!r}")
    if settings.method == "refine":
        check_differentiable_options(sampler.name, dict(sampler.options))
    if settings.method == "dmn" and sampler.name not in DMN_SAMPLERS:
        raise ValueError(f"optimize.method=dmn bounds a multistep data-prediction solver's error; valid samplers: "
                         f"{', '.join(DMN_SAMPLERS)}, got {sampler.name!r}")
    if settings.decoupled and (settings.method != "refine" or sampler.name not in ONE_CALL_PER_LEVEL):
        raise ValueError(f"optimize.decoupled=true (LD3's separate model-evaluation times) needs "
                         f"optimize.method=refine and one of the samplers {', '.join(ONE_CALL_PER_LEVEL)}; got "
                         f"method {settings.method!r}, sampler {sampler.name!r}")
    n_held = round(settings.holdout * settings.noises)
    if settings.noises - n_held < MIN_TRAIN or n_held < MIN_HELDOUT:
        raise ValueError(f"too few teacher noises: optimize.noises={settings.noises} with holdout "
                         f"{settings.holdout:g}; need at least {MIN_TRAIN} train and {MIN_HELDOUT} held out")
    check_loggers(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg, schedule)
    loggers = make_loggers(cfg, out_dir)
    if cfg.ckpt_path:
        load_weights(module, cfg.ckpt_path)
    else:
        train(cfg, module, datamodule, loggers, out_dir)
    net = module.net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    shape = tuple(datamodule.sample_shape)
    noise = torch.randn((settings.noises, *shape), generator=torch.Generator().manual_seed(cfg.seed),
                        dtype=torch.float64)
    results = optimize_schedule(net, schedule, sampler=sampler.name, nfe=budgets, noise=noise,
                                method=settings.method, prediction=module.prediction, candidates=settings.candidates,
                                grid=settings.grid, teacher_solver=settings.teacher_solver,
                                teacher_substeps=settings.teacher_substeps, holdout=settings.holdout,
                                iterations=settings.iterations, patience=settings.patience,
                                decoupled=settings.decoupled, sampler_options=dict(sampler.options))
    key = training_key(cfg)
    cache = schedule_cache_dir(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    (out_dir / "schedules").mkdir(exist_ok=True)
    for ts, rep in results:
        # its own method name, so a decoupled artefact is cached beside the plain one of the same budget
        method = f"{rep['method']}_decoupled" if "model_timesteps" in rep else rep["method"]
        entry = {"training_key": key, "sampler": sampler.name, "sampler_options": dict(sampler.options),
                 "nfe": rep["nfe"], "steps": rep["steps"], "method": method,
                 "timesteps": [float(v) for v in ts],
                 **({"model_timesteps": rep["model_timesteps"]} if "model_timesteps" in rep else {}),
                 "prediction": module.prediction,
                 "teacher": rep["teacher"], "train_error": rep["train_error"], "heldout_error": rep["heldout_error"],
                 "heldout_median": rep["heldout_median"], "best_fixed": rep["best_fixed"],
                 "ratio": rep.get("ratio"), "median_ratio": rep.get("median_ratio"), "fixed": rep["fixed"],
                 "cost": rep["cost"], "settings": asdict(settings), **({"dmn": rep["dmn"]} if "dmn" in rep else {})}
        text = yaml.safe_dump(entry, sort_keys=False)
        name = _file_name(sampler.name, rep["nfe"], method)
        (out_dir / "schedules" / name).write_text(text)
        (cache / name).write_text(text)
        log_artifact(loggers, f"schedule-{key}-{Path(name).stem}", "schedule", [out_dir / "schedules" / name],
                     metadata={k: entry[k] for k in ("training_key", "sampler", "nfe", "method", "heldout_error",
                                                     "ratio")})
        print(f"NFE {rep['nfe']}: held-out RMS {rep['heldout_error']:.4g} vs best fixed ({rep['best_fixed']}) "
              f"{rep['fixed'][rep['best_fixed']]['heldout']:.4g}, ratio {rep.get('ratio', math.nan):.3f}; "
              f"{name} in {out_dir / 'schedules'} and {cache}")
    _figure(results, schedule, out_dir / "optimized_schedules.png")
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    for lg in loggers:
        lg.finalize("success")
    print_sync_hint(loggers)
    return float(results[-1][1].get("ratio", math.nan))


def _figure(results, schedule, path: Path) -> None:
    """Left: the chosen timesteps (largest budget) against trailing/karras/logsnr; right: error vs NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.spacings import make_timesteps

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ts, rep = results[-1]
    k = rep["steps"]
    a.plot(range(k), ts.tolist(), "o-", label=f"optimised ({rep['method']})")
    for name in ("trailing", "karras", "logsnr"):
        try:
            a.plot(range(k), make_timesteps(name, k, schedule).tolist(), ".--", label=name)
        except ValueError:
            continue
    a.set(xlabel="step", ylabel="timestep t", title=f"{rep['sampler']}, {k} steps")
    a.legend()
    nfes = [r["nfe"] for _, r in results]
    b.plot(nfes, [r["heldout_error"] for _, r in results], "o-", label="optimised")
    for name in results[0][1]["fixed"]:
        vals = [r["fixed"][name].get("heldout", math.nan) for _, r in results]
        b.plot(nfes, vals, ".--", label=name)
    b.set(xlabel="NFE", ylabel="held-out RMS error vs teacher", xscale="log", yscale="log",
          title="fixed vs optimised")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
