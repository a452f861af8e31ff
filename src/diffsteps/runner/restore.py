"""``task=restore``: train or reuse the unconditional model, then one restoration study (``restore.task``: inpaint,
superres, anomaly) on held-out images at every step count — metrics.json/.csv, curves (metric against steps; for
anomaly also AUROC against t*) as PNG and in W&B, and a picture grid (input / result / truth / baseline)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RESTORE_TASKS = ("inpaint", "superres", "anomaly")
SR_MODELS = ("ilvr", "sr3")


def check_restore_config(cfg: DictConfig, schedule, steps: list[int], spec) -> None:
    """Every restoration setting against the data and the schedule, before any training."""
    from ..restoration.anomaly import ANOMALIES, check_t_star
    from ..restoration.masks import MASKS

    r = cfg.restore
    if r.task not in RESTORE_TASKS:
        raise ValueError(f"unknown restore.task {r.task!r}; valid choices: {', '.join(RESTORE_TASKS)}")
    if spec.modality != "image":
        raise ValueError(f"task=restore needs image data; {spec.modality} data of shape {spec.sample_shape} has no "
                         "pixels to mask, upsample or corrupt: use data=digits or data=photo_patches")
    if isinstance(r.num_images, bool) or not isinstance(r.num_images, int) or r.num_images < 4:
        raise ValueError(f"restore.num_images must be an integer ≥ 4, got {r.num_images!r}")
    size = spec.sample_shape[-1]
    if r.task == "inpaint":
        if r.mask not in MASKS:
            raise ValueError(f"unknown restore.mask {r.mask!r}; valid choices: {', '.join(MASKS)}")
        if r.method not in ("replacement", "repaint"):
            raise ValueError(f"unknown restore.method {r.method!r}; valid choices: replacement, repaint")
        if isinstance(r.draws, bool) or not isinstance(r.draws, int) or r.draws < 1:
            raise ValueError(f"restore.draws must be a positive integer (completions per image), got {r.draws!r}")
        if r.mask == "file" and not (r.mask_path and Path(r.mask_path).is_file()):
            raise ValueError(f"restore.mask=file needs restore.mask_path=<an existing file>, got {r.mask_path!r}")
    elif r.task == "superres":
        f = r.factor
        if isinstance(f, bool) or not isinstance(f, int) or f < 2 or size % f:
            ok = ", ".join(str(d) for d in range(2, size + 1) if size % d == 0)
            raise ValueError(f"restore.factor={f!r} does not divide the image size {size}; valid factors: {ok}")
        bad = [m for m in r.models if m not in SR_MODELS]
        if bad or not r.models:
            raise ValueError(f"restore.models {list(r.models)} must be a non-empty list of: {', '.join(SR_MODELS)}")
    else:
        for t in [*r.t_stars, r.t_star]:
            check_t_star(schedule, t)
        bad = [k for k in r.kinds if k not in ANOMALIES]
        if bad or not r.kinds:
            raise ValueError(f"restore.kinds {list(r.kinds)} must be a non-empty list of: {', '.join(ANOMALIES)}")
        too_many = [k for k in steps if k > r.t_star + 1]
        if too_many:
            raise ValueError(f"steps {too_many} do not fit between restore.t_star={r.t_star} and the data; use at "
                             f"most {r.t_star + 1}")


def restore_task(cfg: DictConfig) -> float:
    """Run the study; returns its headline score at the last step count (PSNR, or AUROC for anomaly)."""
    import lightning as L
    from hydra.utils import instantiate

    from ..reporting.files import save_config
    from .build import build
    from .checkpoints import load_weights
    from .evaluate import best_effort, sampler_options, write_results
    from .loggers import log_results, make_loggers, print_sync_hint
    from .train import train
    from .validate import validate

    schedule = instantiate(cfg.schedule)
    steps = validate(cfg, schedule)
    datamodule = instantiate(cfg.data)
    check_restore_config(cfg, schedule, steps, datamodule.spec)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg, schedule)
    r = cfg.restore
    n_val = len(datamodule.real_samples(None, split="val"))
    if r.num_images > n_val:
        raise ValueError(f"restore.num_images={r.num_images} exceeds the {n_val} held-out images of "
                         f"{datamodule.name}: lower it")
    loggers = make_loggers(cfg, out_dir)
    if cfg.ckpt_path:
        load_weights(module, cfg.ckpt_path)
    else:
        train(cfg, module, datamodule, loggers, out_dir)
    save_config(cfg, out_dir / "config.yaml")
    net = module.net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    truth = datamodule.real_samples(r.num_images, split="val").double()
    train_x = datamodule.real_samples(None, split="train")
    options = sampler_options(cfg, datamodule)
    options.update(spacing=OmegaConf.to_container(cfg.sampler, resolve=True)["spacing"])
    common = dict(schedule=schedule, steps=steps, sampler=cfg.sampler.name, prediction=module.prediction,
                  seed=cfg.seed, **options)
    features, classifier = _judges(datamodule)
    if r.task == "inpaint":
        rows, pics = _inpaint(cfg, net, truth, train_x, features, classifier, common)
        headline = "psnr"
    elif r.task == "superres":
        rows, pics = _superres(cfg, net, truth, train_x, schedule, module.prediction, features, classifier, common)
        headline = "psnr"
    else:
        from ..restoration.study import anomaly_study

        common.pop("steps")
        common.pop("spacing")  # reconstruct spaces its levels evenly from t* to the data
        rows, pics = anomaly_study(net, truth, train_x, t_stars=list(r.t_stars), steps=steps, t_star=r.t_star,
                                   kinds=tuple(r.kinds), **common)
        headline = "auroc"
    for row in rows:
        row.update(task=r.task, sampler=cfg.sampler.name, sample_seconds=row.get("seconds", math.nan))
    write_results(rows, out_dir)
    best_effort("the restoration curves", _curves, rows, r.task, out_dir)
    best_effort("the restoration grid", _grid, pics, datamodule.spec.modality, r.grid_size, out_dir)
    _print_table(rows, r.task)
    _print_steps_needed(rows, headline)
    log_results([{k: v for k, v in row.items() if k not in ("method", "axis", "task")} for row in rows],
                loggers, out_dir)
    for lg in loggers:
        lg.finalize("success")
    print_sync_hint(loggers)
    last = [row for row in rows if row.get("axis", "steps") == "steps"][-1]
    print(f"results in {out_dir}; {headline} at {last['steps']} steps = {last[headline]:.6g}")
    return float(last[headline])


def _judges(datamodule):
    """FID features and the class-consistency classifier where the data has them (digits)."""
    if datamodule.spec.features != "digits":
        return None, None
    from ..evaluation.features import DigitsFeatures
    from ..reference.digits_classifier import load_digits_classifier

    return DigitsFeatures(), load_digits_classifier().eval()


def _inpaint(cfg, net, truth, train_x, features, classifier, common):
    from ..restoration.masks import make_mask
    from ..restoration.study import inpaint_study

    r = cfg.restore
    mask = make_mask(r.mask, truth.shape[-1], n=len(truth), box=r.box, side=r.side, path=r.mask_path, seed=cfg.seed)
    return inpaint_study(net, truth, mask, train_x, method=r.method, jump_length=r.jump_length,
                         jump_n_sample=r.jump_n_sample, draws=r.draws, features=features, classifier=classifier,
                         **common)


def _superres(cfg, net, truth, train_x, schedule, prediction, features, classifier, common):
    from hydra.utils import instantiate

    from ..nets.sr3 import SR3UNet
    from ..restoration.study import superres_study
    from ..restoration.superres import train_sr3
    from .checkpoints import training_key

    r = cfg.restore
    sr3_net = None
    if "sr3" in r.models:
        C, size = truth.shape[1], truth.shape[-1]
        s = r.sr3
        sr3_net = SR3UNet(C, size, base_channels=s.base_channels, channel_mult=tuple(s.channel_mult),
                          attention_resolutions=tuple(s.attention_resolutions), num_groups=s.num_groups)
        # cached next to the unconditional model's checkpoint: same training config, same SR3 settings → reuse
        key = f"sr3-f{r.factor}-" + "-".join(f"{k}{v}" for k, v in OmegaConf.to_container(s).items())
        path = Path(cfg.paths.checkpoint_dir) / training_key(cfg) / f"{key.replace(' ', '')}.pt"
        if path.is_file():
            sr3_net.load_state_dict(torch.load(path, weights_only=True))
            sr3_net.eval().requires_grad_(False)
            log.info("reusing the SR3 model %s", path)
        else:
            loss = instantiate(cfg.loss)
            sr3_net = train_sr3(sr3_net, train_x, r.factor, schedule=schedule, loss=loss, max_steps=s.max_steps,
                                batch_size=s.batch_size, lr=s.lr, ema_decay=cfg.train.ema_decay, seed=cfg.seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(sr3_net.state_dict(), path)
    uncond = net if "ilvr" in r.models else None
    return superres_study(truth, r.factor, uncond=uncond, sr3_net=sr3_net, features=features,
                          classifier=classifier, **common)


def _curves(rows: list[dict], task: str, out_dir: Path) -> list[Path]:
    """Each metric against steps (a line per method, the baseline dashed); for anomaly also AUROC against t*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..reporting.files import save_figure

    metrics = {"inpaint": ["psnr", "ssim", "fid", "class_consistency"],
               "superres": ["psnr", "ssim", "consistency", "fid", "class_consistency"],
               "anomaly": ["auroc", "repaired_psnr"]}[task]
    paths = []
    for axis in (["steps", "t_star"] if task == "anomaly" else ["steps"]):
        sub = [r for r in rows if r.get("axis", "steps") == axis]
        present = [m for m in metrics if any(m in r for r in sub)]
        fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.2), squeeze=False)
        for ax, m in zip(axes[0], present):
            for method in dict.fromkeys(r.get("method", task) for r in sub):
                pts = sorted((r[axis], r[m]) for r in sub if r.get("method", task) == method and m in r)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
            if f"baseline_{m}" in sub[0]:
                ax.axhline(sub[0][f"baseline_{m}"], ls="--", c="k", label="baseline")
            ax.set_xlabel("t*" if axis == "t_star" else "steps")
            if axis == "steps":
                ax.set_xscale("log")
            ax.set_ylabel(m)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{task}_{'_'.join(present[:1])}_vs_{axis}.png"
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def _grid(pics: dict, modality: str, n: int, out_dir: Path) -> None:
    """Rows: input, the result at each step count (or method), truth, baseline; ``n`` images per row."""
    from ..reporting.plots import save_steps_grid

    order = ["input", *[k for k in pics if k not in ("input", "truth", "baseline")], "truth"]
    order += ["baseline"] if "baseline" in pics else []
    save_steps_grid({k: pics[k][:n].float() for k in order}, out_dir / "grid_restore.png", modality=modality)


def _print_table(rows: list[dict], task: str) -> None:
    keys = [k for k in ("method", "axis", "t_star", "steps", "nfe", "psnr", "psnr_mean_of_draws", "ssim", "fid",
                        "class_consistency", "consistency", "auroc", "repaired_psnr", "baseline_psnr", "baseline_ssim", "baseline_fid",
                        "baseline_consistency", "baseline_auroc") if any(k in r for r in rows)]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |")


def _print_steps_needed(rows: list[dict], metric: str) -> None:
    """How few steps reach 95 % of the best gain over the baseline (PSNR) or over chance (AUROC 0.5)."""
    from ..restoration.study import steps_for_fraction

    for method in dict.fromkeys(r.get("method", "") for r in rows):
        sub = [r for r in rows if r.get("method", "") == method and r.get("axis", "steps") == "steps"]
        ref = 0.5 if metric == "auroc" else sub[0].get(f"baseline_{metric}")
        k = steps_for_fraction(sub, metric, 0.95, baseline=ref)
        than = "chance" if metric == "auroc" else "the baseline"
        print(f"{method or 'result'}: " + (f"{k} steps reach 95 % of the best {metric} gain over {than} ({ref:.4g})"
                                           if k is not None else f"no step count beats {than} ({ref:.4g}) in {metric}"))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
