"""Quality versus steps for the runner: the evaluation plan and the list of measures from the config, the results
files (written row by row as step counts finish), then sample files and grids."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("diffsteps")


def feature_name(cfg: DictConfig, datamodule) -> str:
    if cfg.eval.features != "auto":
        return cfg.eval.features
    return datamodule.spec.features


def sampler_options(cfg: DictConfig, datamodule) -> dict:
    options = OmegaConf.to_container(cfg.sampler.options, resolve=True) or {}
    # images live in [−1, 1]: clipping x̂_0 there keeps an ε-network's errors at high noise (amplified by σ/α ≈ 157
    # at t = T−1 on the linear schedule) from compounding; vector data has no such bound
    clip = cfg.eval.get("clip_denoised", "auto")
    options["clip_denoised"] = (1.0 if datamodule.spec.modality == "image" else None) if clip == "auto" else clip
    # set by a diffusers scheduler config's thresholding (runner.build.adopt_diffusers)
    for key in ("dynamic_threshold", "threshold_max"):
        if cfg.eval.get(key) is not None:
            options[key] = cfg.eval[key]
    # classifier-free guidance is the model wrapper's option, for any sampler (diffsteps.sampling.guidance)
    for key in ("guidance_scale", "guidance_interval"):
        value = OmegaConf.select(cfg, f"sampler.{key}")
        if value is not None:
            options[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if OmegaConf.select(cfg, "sampler.fuse"):  # sample()'s own option, for any sampler (diffsteps.sampling.arith)
        options["fuse"] = True
    # decoupled model times of an optimised schedule (runner.optimize.resolve_spacing): the run's sampler only, so
    # not a denoiser option (the trajectory reference and the policies' teacher must not get them)
    model_times = OmegaConf.select(cfg, "sampler.model_timesteps")
    if model_times is not None:
        options["model_timesteps"] = [float(v) for v in model_times]
    return options


def make_plan(cfg: DictConfig, datamodule, steps: list[int]):
    """The :class:`~diffsteps.evaluation.plan.EvalPlan` of ``cfg.eval`` for this data (cheap: built once before
    training to check it, and again to evaluate)."""
    from ..evaluation.plan import EvalPlan

    e = cfg.eval
    return EvalPlan(sampler=cfg.sampler.name, steps=tuple(steps), shape=tuple(datamodule.sample_shape),
                    num_samples=e.num_samples, batch_size=e.batch_size,
                    spacing=OmegaConf.to_container(cfg.sampler, resolve=True)["spacing"],  # a plain list
                    options=sampler_options(cfg, datamodule), noise_seed=e.noise_seed,
                    mse_samples=e.mse.num_samples, reference_sampler=e.mse.reference_sampler,
                    reference_steps=e.mse.reference_steps, reference_spacing=e.mse.reference_spacing,
                    keep_samples=min(max(e.grid_size, e.grid_columns, e.save_samples), e.num_samples),
                    num_classes=(datamodule.spec.num_classes or 0) if getattr(datamodule, "conditional", False)
                    else 0)


class ResultsFile:
    """metrics.json and metrics.csv of a run, rewritten (atomically) with every row added, so they always hold
    the step counts measured so far: a run stopped part-way keeps them, and a reader never sees half a file.
    ``objective`` (an :class:`~diffsteps.runner.objects.Objective`) adds each row's ``objective`` entry."""

    def __init__(self, out_dir: Path, objective=None):
        self.out_dir, self.objective = Path(out_dir), objective
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        if self.objective is not None:
            row["objective"] = self.objective.value(row)
        self.rows.append(row)
        write_results(self.rows, self.out_dir)
        log.info("%s %d steps: %s", row["sampler"], row["steps"],
                 {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items() if k != "sampler"})


def quality_factory(cfg: DictConfig, datamodule, extractor=None, real=None) -> Callable:
    """A function returning a fresh :class:`~diffsteps.evaluation.quality.SampleQuality` against the evaluation's
    reference set (``eval.num_reference`` samples of ``eval.reference_split``, cached under ``paths.cache_dir``), in
    its feature space (``eval.features``), with its KID subset size and seed: the FID/KID of every ``task=eval`` row.
    Anything else that reports FID/KID next to it builds its metric here, so equal samples give equal numbers. The
    reference is read (or computed and cached) at the first call and shared by later ones; ``extractor`` and
    ``real`` may be given when the caller already holds them."""
    from ..evaluation.features import make_features
    from ..evaluation.quality import SampleQuality

    e = cfg.eval
    if real is None:
        real = datamodule.real_samples(e.num_reference, split=e.reference_split)
    key = f"{datamodule.name}-{e.reference_split}-{len(real)}"
    # one extractor and one reference for all metrics: loaded (Inception: ~100 MB) and hashed once
    extractor = extractor if extractor is not None else make_features(feature_name(cfg, datamodule))
    first: list[SampleQuality] = []

    def quality() -> SampleQuality:
        q = SampleQuality(features=extractor, kid_subset_size=e.kid_subset_size, kid_seed=e.kid_seed,
                          cache_dir=cfg.paths.cache_dir)
        if first:
            q.share_reference(first[0])
        else:
            q.set_reference(real, key=key)  # computed once, then read from the cache by later runs
            first.append(q)
        return q

    return quality


def evaluate(cfg: DictConfig, module, datamodule, schedule, steps: list[int], out_dir: Path,
             on_row: Callable[[dict], None] | None = None) -> tuple[list[dict] | None, int]:
    """Sample at every step count from the same noise, one step count after another, in chunks, on every process
    of the trainer (DDP: each its share of the chunks), and measure. Each step count's row goes to ``on_row`` on
    rank zero as soon as it is measured (the runner's :class:`ResultsFile`). Then rank zero writes the sample
    files and grids; one that fails is a warning, not a lost evaluation. Returns (rows, rank); rows only on rank
    zero."""
    from hydra.utils import instantiate

    from ..evaluation.evaluator import EvaluationModule, Evaluator
    from ..evaluation.features import make_features
    from ..evaluation.measures import (
        MixtureNLL,
        Quality,
        SpectralDistance,
        TrajectoryError,
    )

    e = cfg.eval
    plan = make_plan(cfg, datamodule, steps)
    real = datamodule.real_samples(e.num_reference, split=e.reference_split)
    extractor = make_features(feature_name(cfg, datamodule))
    quality = quality_factory(cfg, datamodule, extractor, real)

    mixture = datamodule.mixture if datamodule.spec.has_density else None
    # one line per measure; a row holds their entries in this order
    measures = [m for m in (
        Quality(plan, quality),
        MixtureNLL(plan, mixture) if mixture is not None else None,
        _classifier_measure(plan, datamodule.spec.features, extractor),
        SpectralDistance(plan, real) if datamodule.spec.modality == "signal" else None,
        TrajectoryError(plan, schedule, module.prediction) if plan.mse_samples > 0 else None,
        _elbo(cfg, module, datamodule, schedule, plan) if e.elbo.num_samples > 0 else None,
    ) if m is not None]
    evaluator = Evaluator(plan, schedule, module.prediction, measures)
    # the step-count loader runs in the main process (no workers), where its __len__ is exact
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined")
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                          default_root_dir=str(out_dir))
    runner = EvaluationModule(module.net, evaluator, on_row=on_row)
    log.info("evaluating %s at %s steps: %d samples in chunks of %d", plan.sampler, list(steps), plan.num_samples,
             plan.batch_size)
    trainer.test(runner, verbose=False)
    if trainer.global_rank != 0:
        return None, trainer.global_rank
    rows = runner.rows
    _save_samples(evaluator, rows, plan, e, out_dir, datamodule.spec.modality,
                  real=real if datamodule.spec.modality == "signal" else None)
    if OmegaConf.select(cfg, "prompts"):
        path = out_dir / f"prompts_{plan.sampler}.png"
        best_effort(path, _prompt_grid, cfg, module, datamodule, schedule, plan, path)
    return rows, 0


def _classifier_measure(plan, data_features: str, extractor):
    """The shipped classifier's confidence (and, conditional, agreement) for data that have one — chosen by the
    data's own feature space, not by ``eval.features``, so that the digits classifier never sees signals (nor the
    MNIST-1D one images) whatever space FID is computed in; None for other data."""
    from ..evaluation.features import MNIST1DFeatures
    from ..evaluation.measures import ClassifierConfidence
    from ..reference.mnist1d_classifier import load_mnist1d_classifier

    if data_features == "digits":
        return ClassifierConfidence(plan)
    if data_features == "mnist1d":
        # the FID extractor already holds the checksummed classifier when FID is in its features
        net = extractor.net if isinstance(extractor, MNIST1DFeatures) else load_mnist1d_classifier()
        return ClassifierConfidence(plan, net)
    return None


def _prompt_grid(cfg: DictConfig, module, datamodule, schedule, plan, path: Path) -> None:
    """``eval.grid_columns`` samples per prompt of ``cfg.prompts`` (read by ``cfg.encoder``) at the largest step
    count, one row per prompt, from the evaluation's first noise (so every prompt row starts from the same noise)."""
    import torch

    from ..evaluation.plan import chunk_noise
    from ..reporting.plots import save_steps_grid
    from ..sampling.api import sample
    from .objects import prompt_labels

    prompts = [str(p) for p in cfg.prompts]
    labels = prompt_labels(cfg, datamodule.spec, True)
    n = max(1, min(cfg.eval.grid_columns, plan.num_samples))
    device = next(module.net.parameters()).device
    x_T = chunk_noise(plan, 0, device)[:n]
    rows = {}
    for prompt, y in zip(prompts, labels.tolist()):
        rows[prompt] = sample(module.net.eval(), x_T, schedule=schedule, prediction=module.prediction,
                              sampler=plan.sampler, steps=max(plan.steps), spacing=plan.spacing,
                              cond={"y": torch.full((len(x_T),), y, device=device)}, **plan.options).float().cpu()
    w = plan.options.get("guidance_scale")
    save_steps_grid(rows, path, title=f"{plan.sampler}, {max(plan.steps)} steps, guidance scale "
                    f"{1.0 if w is None else w:g}: one row per prompt", modality=datamodule.spec.modality)


def _elbo(cfg: DictConfig, module, datamodule, schedule, plan):
    """The ELBO measure: the negative ELBO (bits/dim) of held-out data over the integer timesteps the sampler's
    spacing visits at each step count (a K-step chain), and with ``eval.elbo.full`` over all T. Discrete data
    (images: 256 levels, digits: 17) get the discretised decoder."""
    from ..evaluation.measures import ChainELBO

    e = cfg.eval.elbo
    return ChainELBO(plan, schedule, module.prediction, datamodule.real_samples(e.num_samples, split=e.split),
                     variance=e.variance, levels=datamodule.spec.levels, full=e.full,
                     progress=bool(cfg.trainer.get("enable_progress_bar", True)))


def best_effort(what: Path | str, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, or a logged warning if it raises: for the files made after the metrics are written
    (sample files, grids, plots), whose failure must not lose — or fail — a finished evaluation."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 (any failure of a figure or file: the results are already on disk)
        log.warning("could not write %s (%s: %s); the metrics are in metrics.json and metrics.csv", what,
                    type(err).__name__, err)
        return None


def _save_samples(evaluator, rows: list[dict], plan, e: DictConfig, out_dir: Path, modality: str,
                  real=None) -> None:
    """Per step count samples_<sampler>_<n>.pt (``eval.save_samples``; 0: none) and grid_<sampler>_<n>.png
    (``eval.grid_size``; 0: none), and grid_steps_<sampler>.png (``eval.grid_columns``; 0: none). With ``real``
    reference samples (signals), the across-steps grid starts with a row of them, and spectra_<sampler>.png
    compares the mean power spectra of real and generated signals at every step count. In a conditional evaluation
    each signal panel is captioned with the class it was generated for."""
    from ..evaluation.plan import eval_labels
    from ..reporting.files import save_torch
    from ..reporting.plots import save_grid, save_spectra, save_steps_grid

    # the requested class of sample i is the same at every step count (and scale): one caption per column / panel
    labels = ([f"requested {y}" for y in eval_labels(plan).tolist()] if plan.num_classes > 0 and modality == "signal"
              else None)

    by_steps = {} if real is None else {"real data": real[: e.grid_columns]}
    for row in rows:
        n = row["steps"]
        x = evaluator.samples(n)
        if e.save_samples > 0:
            path = out_dir / f"samples_{plan.sampler}_{n}.pt"
            best_effort(path, save_torch, x[: e.save_samples].clone(), path)
        if e.grid_size > 0:
            path = out_dir / f"grid_{plan.sampler}_{n}.png"
            best_effort(path, save_grid, x[: e.grid_size], path, title=f"{plan.sampler}, {n} steps (NFE {row['nfe']})",
                        modality=modality, labels=labels)
        # images and signals: one row of samples per step count; vectors: one scatter of the whole grid per count
        by_steps[f"{n} steps (NFE {row['nfe']})"] = x[: e.grid_size if modality == "vector" else e.grid_columns]
    if e.grid_columns > 0 and any(len(x) for x in by_steps.values()):
        path = out_dir / f"grid_steps_{plan.sampler}.png"
        best_effort(path, save_steps_grid, by_steps, path,
                    title=f"{plan.sampler}: the same noise at each step count", modality=modality,
                    column_labels=labels)
    generated = {f"{r['steps']} steps": evaluator.samples(r["steps"]) for r in rows} if real is not None else {}
    if any(len(x) for x in generated.values()):
        path = out_dir / f"spectra_{plan.sampler}.png"
        best_effort(path, save_spectra, real, generated, path, title=f"{plan.sampler}: mean power spectra")


def write_results(rows: list[dict], out_dir: Path) -> None:
    """metrics.csv (one line per row, every key a column) and metrics.json (the rows), each replaced atomically;
    metrics.json last, so it never holds a row that metrics.csv lacks."""
    from ..reporting.files import write_csv, write_json

    write_csv(out_dir / "metrics.csv", rows)
    write_json(out_dir / "metrics.json", rows)
