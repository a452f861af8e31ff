"""``task=policies`` (``python run.py experiment=step_policies``): every way of choosing how many steps a sample gets,
measured on one model, one error target and the same fresh noise, in one table, one figure and a W&B table.

Quality is the per-sample trajectory MSE to the converged probability-flow solution from the same noise (the
evaluation's reference solver, ``eval.mse.reference_*``); a policy meets the target when a fraction ≥ 1 − α of
fresh samples ends within ``policies.error_target``. Each policy's knob is set on calibration noise, never on the
test noise the row reports. Rows:

- **fixed N\\***: the smallest step count of the ladder whose calibration coverage is ≥ 1 − α;
- **optimised schedule**: the smallest cached ``task=optimize_steps`` schedule for this model and sampler meeting it
  (omitted, with a logged line, when there is none);
- **adaptive**: ``sample(..., sampler="adaptive", rtol=..., atol=adaptive_atol_per_rtol · rtol, h_max_noisy=cap,
  resolve_lambda=λ or resolve_spike=s)`` at the loosest rtol meeting it, for each cap of ``adaptive_caps`` with each
  λ of ``adaptive_resolve`` or s of ``adaptive_spike`` the one whose calibration mean NFE is lowest; its NFE each
  sample's own (``nfe_per_sample``);
- **stopping**: :mod:`diffsteps.steps.stopping`, τ calibrated by split-conformal at α;
- **predictor**: :mod:`diffsteps.steps.predictor`, trained on 2/3 of the calibration noises' oracle labels, its
  quantile knob chosen on the other third.

The fresh noise is the evaluation's own (:func:`~diffsteps.evaluation.plan.chunk_noise` for ``eval.noise_seed``, in
chunks of ``eval.batch_size``), and on image data each row's samples get FID/KID from the evaluation's
:class:`~diffsteps.evaluation.quality.SampleQuality` (:func:`~.evaluate.quality_factory`: its reference set,
features and KID subsets), so the fixed-N* row's FID/KID are ``task=eval``'s at N* steps with
``eval.num_samples=policies.test_noises``. A class-conditional model (``data.conditional=true``;
``policies.condition``) samples every row — the teacher too — with the same labels, one per noise, drawn from the
training split's label frequencies; the predictor reads them as one-hot condition vectors.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("diffsteps")

__all__ = ["CONDITIONS", "PolicySettings", "policies_task"]

_F64 = torch.float64
# policies.condition: auto = class labels exactly when the model is class-conditional (data.conditional=true);
# labels = insist on them (an unconditional model is an error); none = insist on an unconditional model (a
# class-conditional one needs a label per sample; sampler.guidance_scale=0 with labels gives its unconditional ε)
CONDITIONS = ("auto", "labels", "none")


@dataclass(frozen=True)
class PolicySettings:
    """conf/policies/default.yaml's keys (documented there)."""

    model: str = "auto"
    error_target: float = 3e-3
    alpha: float = 0.1
    calibration_noises: int = 1536
    test_noises: int = 1024
    noise_seed: int = 777
    ladder: tuple = (2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128)
    stop_steps: int | str = "auto"
    stop_alphas: tuple = (0.4, 0.3, 0.2, 0.1, 0.05, 0.02)
    predictor_quantiles: tuple = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
    predictor_hidden: int = 64
    predictor_epochs: int = 150
    adaptive_rtols: tuple = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
    adaptive_atol_per_rtol: float = 0.156
    adaptive_max_nfe: int = 500
    adaptive_caps: tuple = (0.5, math.inf)
    adaptive_resolve: tuple = (None,)
    adaptive_spike: tuple = (None,)
    batch_size: int = 256
    single_samples: int = 16
    condition: str = "auto"
    save_samples: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> PolicySettings:
        node = cfg.get("policies") or {}
        given = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        names = {f.name for f in fields(cls)} - {"extra"}
        unknown = set(given) - names
        if unknown:
            raise ValueError(f"policies has no key(s) {sorted(unknown)}; its keys: {', '.join(sorted(names))}")
        s = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
        if s.model not in ("auto", "exact", "trained"):
            raise ValueError(f"policies.model must be one of: auto, exact, trained; got {s.model!r}")
        if s.condition not in CONDITIONS:
            raise ValueError(f"policies.condition must be one of: {', '.join(CONDITIONS)}; got {s.condition!r}")
        if not isinstance(s.save_samples, bool):
            raise ValueError(f"policies.save_samples must be true or false, got {s.save_samples!r}")
        if not 0 < s.alpha < 1 or not s.error_target > 0:
            raise ValueError(f"policies.alpha must be in (0, 1) and policies.error_target > 0, got {s.alpha!r} and "
                             f"{s.error_target!r}")
        if list(s.ladder) != sorted(set(s.ladder)) or not s.ladder or s.ladder[0] < 1:
            raise ValueError(f"policies.ladder must be increasing positive step counts, got {list(s.ladder)}")
        if s.calibration_noises < 3 * math.ceil(1 / s.alpha) or s.test_noises < 2:
            raise ValueError(f"policies.calibration_noises={s.calibration_noises} is too few for alpha={s.alpha}: "
                             f"need ≥ {3 * math.ceil(1 / s.alpha)} (a third of them choose the predictor's knob)")
        if s.stop_steps != "auto" and (isinstance(s.stop_steps, bool) or not isinstance(s.stop_steps, int)
                                       or s.stop_steps < 3):
            raise ValueError(f"policies.stop_steps must be auto or an integer ≥ 3, got {s.stop_steps!r}")
        if not s.adaptive_rtols or not all(isinstance(r, (int, float)) and 0 < r < math.inf for r in s.adaptive_rtols):
            raise ValueError(f"policies.adaptive_rtols must be finite tolerances > 0, got {list(s.adaptive_rtols)}")
        if not 0 <= s.adaptive_atol_per_rtol < math.inf:
            raise ValueError(f"policies.adaptive_atol_per_rtol must be ≥ 0, got {s.adaptive_atol_per_rtol!r}")
        if not s.adaptive_caps or not all(isinstance(c, (int, float)) and c > 0 for c in s.adaptive_caps):
            raise ValueError(f"policies.adaptive_caps must be λ-step caps > 0 (no cap: inf on the command line, .inf "
                             f"in YAML), got {list(s.adaptive_caps)}")
        if not s.adaptive_resolve or not all(r is None or (isinstance(r, (int, float)) and not isinstance(r, bool)
                                                          and math.isfinite(r)) for r in s.adaptive_resolve):
            raise ValueError(f"policies.adaptive_resolve must list the adaptive sampler's resolve_lambda values to try "
                             f"(a finite log-SNR λ, or null: no growth probe), got {list(s.adaptive_resolve)}")
        if not s.adaptive_spike or not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        and 1 < v < math.inf) for v in s.adaptive_spike):
            raise ValueError(f"policies.adaptive_spike must list the adaptive sampler's resolve_spike values to try "
                             f"(a finite error estimate > 1 tolerance, or null: none), got {list(s.adaptive_spike)}")
        if isinstance(s.adaptive_max_nfe, bool) or not isinstance(s.adaptive_max_nfe, int) or s.adaptive_max_nfe < 4:
            raise ValueError(f"policies.adaptive_max_nfe must be an integer ≥ 4 (one order-3 step and the final "
                             f"evaluation), got {s.adaptive_max_nfe!r}")
        return s


# -- the model ---------------------------------------------------------------------------------------------------
@dataclass
class _Model:
    net: Callable
    prediction: str
    key: str
    schedule: object
    datamodule: object
    mixture: object | None
    exact: bool


def _classes(s: PolicySettings, data) -> int:
    """How many classes the rows condition on (0: no condition): the data module's ``conditional`` decides whether
    the model is trained (or, exact, built) class-conditional, ``policies.condition`` states what is expected.
    Raises when they disagree: called before any training or model call."""
    conditional = bool(getattr(data, "conditional", False))
    if s.condition == "labels" and not conditional:
        from ..data import DATAMODULES

        labelled = [k for k, cls in DATAMODULES.items() if cls.labelled]
        raise ValueError(f"policies.condition=labels needs a class-conditional model, but the data {data.name} are "
                         f"unconditional (data.conditional=false), so the model takes no labels: set "
                         f"data.conditional=true (labelled data: {', '.join(labelled)}) or policies.condition=auto")
    if s.condition == "none" and conditional:
        raise ValueError(f"policies.condition=none, but the data {data.name} are class-conditional "
                         f"(data.conditional=true), so the model needs a label per sample: set policies.condition="
                         f"auto (labels drawn from the data; sampler.guidance_scale=0 samples its unconditional "
                         f"ε) or data.conditional=false")
    return int(data.spec.num_classes) if conditional else 0


def _model(cfg: DictConfig, s: PolicySettings, data, out_dir: Path, loggers, checkpoint=None) -> _Model:
    """The exact mixture model (``policies.model=exact``, or ``auto`` on data with a known mixture; class-conditional
    when the data are) — no training; its key is a hash of the data and schedule configs — or the trained / reused
    network with its training key (``checkpoint``: ``ckpt_path`` already opened)."""
    from hydra.utils import instantiate

    from ..reference.gaussian_mixture import ExactEpsilon
    from ..reporting.files import save_config
    from .checkpoints import training_key
    from .min_steps import prepare_model

    mixture = getattr(data, "mixture", None)
    exact = s.model == "exact" or (s.model == "auto" and mixture is not None)
    if exact:
        if mixture is None:
            raise ValueError(f"policies.model=exact needs data with a known mixture density (gmm, toy2d with "
                             f"kind=8gaussians); {data.name} has none: use policies.model=trained")
        schedule = instantiate(cfg.schedule)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        blob = json.dumps(OmegaConf.to_container(cfg.data, resolve=True) | {
            "schedule": OmegaConf.to_container(cfg.schedule, resolve=True)}, sort_keys=True, default=str)
        key = "exact-" + hashlib.sha256(blob.encode()).hexdigest()[:12]
        net = ExactEpsilon(mixture, schedule, conditional=bool(getattr(data, "conditional", False)))
        return _Model(net, "epsilon", key, schedule, data, mixture, True)
    schedule, datamodule, module = prepare_model(cfg, [max(s.ladder)], out_dir, loggers, checkpoint)
    net = module.net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return _Model(net, module.prediction, training_key(cfg, datamodule), schedule, datamodule,
                  getattr(datamodule, "mixture", None), False)


# -- measuring a policy ------------------------------------------------------------------------------------------
def _mean_ci(v: torch.Tensor) -> tuple[float, float, float]:
    m = float(v.mean())
    half = 1.96 * float(v.std()) / math.sqrt(len(v)) if len(v) > 1 else math.nan
    return m, m - half, m + half


def _part(cond: dict | None, sl: slice) -> dict | None:
    """The conditioning of the samples ``sl`` (None stays None)."""
    return None if cond is None else {k: v[sl] for k, v in cond.items()}


def _measure(name: str, knob: str, run: Callable, noise: torch.Tensor, teacher: torch.Tensor, s: PolicySettings,
             mixture, one_off: dict, cond: dict | None = None, quality: Callable | None = None,
             keep: dict | None = None) -> dict:
    """Run ``run(noise, cond) -> (x, nfe per sample)`` on the test noise in batches (timed: the large-batch time) and
    on ``single_samples`` noises one at a time (batch 1); every cost of the policy (its predictor, its bookkeeping)
    is inside ``run``. ``cond``: the per-sample conditioning, sliced with the noise. ``quality`` (image data): a
    :func:`~.evaluate.quality_factory`, whose FID/KID of the samples join the row. ``keep``: gets
    ``{name: (samples, nfe)}``."""
    from ..steps.stopping import binomial_interval

    xs, nfes, batch_seconds = [], [], []
    for i in range(0, len(noise), s.batch_size):
        t0 = time.perf_counter()
        x, nfe = run(noise[i:i + s.batch_size], _part(cond, slice(i, i + s.batch_size)))
        batch_seconds.append((time.perf_counter() - t0, len(x)))
        xs.append(x)
        nfes.append(torch.as_tensor(nfe).reshape(-1).expand(len(x)))
    full = [sec for sec, n in batch_seconds if n == s.batch_size] or [batch_seconds[0][0]]
    t0 = time.perf_counter()
    for i in range(min(s.single_samples, len(noise))):
        run(noise[i:i + 1], _part(cond, slice(i, i + 1)))
    single = (time.perf_counter() - t0) / min(s.single_samples, len(noise))
    x, nfe = torch.cat(xs), torch.cat(nfes).double()
    err = (x.to(_F64) - teacher.to(_F64)).pow(2).flatten(1).mean(1)
    met = int((err <= s.error_target).sum())
    m, lo, hi = _mean_ci(err)
    clo, chi = binomial_interval(met, len(err))
    row = {"policy": name, "knob": knob, "mse": m, "mse_ci_lo": lo, "mse_ci_hi": hi, "coverage": met / len(err),
           "coverage_ci_lo": clo, "coverage_ci_hi": chi}
    if mixture is not None:
        flat = x.to(_F64).flatten(1).cpu()
        row["nll"] = float(-(mixture.log_prob(flat) / flat.shape[1]).mean())
    if quality is not None:  # as the evaluation's Quality measure adds a chunk: float samples, global indices
        q = quality()
        q.update(x.float(), torch.arange(len(x)))
        row.update(q.compute())
    if keep is not None:
        keep[name] = (x, nfe)
    row.update({"nfe_mean": float(nfe.mean()), "nfe_p95": float(torch.quantile(nfe, 0.95)),
                "nfe_max": float(nfe.max()), "seconds_batch1": single,
                "seconds_batch": sum(full) / len(full), "oneoff_model_evals": int(one_off.get("evals", 0)),
                "oneoff_seconds": float(one_off.get("seconds", 0.0))})
    log.info("%s (%s): mse %.3g, coverage %.3f, mean NFE %.1f", name, knob, m, met / len(err), row["nfe_mean"])
    return row


def _coverage(err: torch.Tensor, target: float) -> float:
    return float((err <= target).double().mean())


def policies_task(cfg: DictConfig) -> float:
    """Build every policy on calibration noise, measure each on the same fresh noise, write
    ``policies.md``/``.csv``/``.json``, ``policies_quality_vs_nfe.png``, ``policies_samples.pt`` and the W&B table;
    return fixed N*'s NFE."""
    from ..evaluation.plan import DENOISER_OPTIONS
    from ..evaluation.trajectory import trajectory_reference
    from ..sampling.api import sample
    from ..sampling.registry import SAMPLERS
    from ..steps.predictor import (
        condition_vectors,
        ladder_errors,
        load_predictor,
        oracle_labels,
        save_predictor,
        spearman,
        train_predictor,
    )
    from ..steps.search import Target, TargetUnreachable, find_min_steps
    from ..steps.stopping import (
        calibrate_stopping,
        sample_with_stopping,
        stop_outcome,
        stopping_trace,
    )
    from ..steps.teacher import CountingModel
    from .checkpoints import open_checkpoint
    from .evaluate import quality_factory, sampler_options
    from .loggers import make_loggers, print_sync_hint
    from .validate import instantiate_checked

    s = PolicySettings.from_cfg(cfg)
    sampler = instantiate_checked(cfg.sampler)
    if not sampler.deterministic:
        raise ValueError(f"task=policies compares trajectories with the converged ODE solution: it needs a "
                         f"deterministic sampler, not {sampler.name!r} with {sampler.options}")
    if not isinstance(sampler.spacing, str):
        raise ValueError("task=policies varies the step count: give sampler.spacing as a name (the optimised "  # noqa: TRY004
                         "schedules get their own row)")
    # what the rows are measured with, checked before any training or model call; a checkpoint's training config
    # (data.conditional among it) becomes the run's first
    checkpoint = open_checkpoint(cfg) if cfg.get("ckpt_path") and s.model != "exact" else None
    data = instantiate_checked(cfg.data)
    classes = _classes(s, data)
    image = data.spec.modality == "image"
    if image and s.test_noises < max(2, cfg.eval.kid_subset_size):
        raise ValueError(f"policies.test_noises={s.test_noises} is too few for the rows' KID on image data: it "
                         f"needs ≥ eval.kid_subset_size={cfg.eval.kid_subset_size}")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loggers = make_loggers(cfg, out_dir)
    M = _model(cfg, s, data, out_dir, loggers, checkpoint)
    if classes and not getattr(M.net, "num_classes", 0):
        raise ValueError(f"the data are class-conditional (data.conditional=true) but the model ({M.key}) has no "
                         "label table: use a model trained on conditional data, or data.conditional=false")
    quality = q0 = None
    if image:
        quality = quality_factory(cfg, M.datamodule)
        q0 = quality()  # the evaluation's reference statistics (read from its cache, or computed and cached) now
    shape = tuple(M.datamodule.sample_shape)
    # the evaluation's options: the sampler's own, clip_denoised (auto: images), thresholding and guidance
    opts = sampler_options(cfg, M.datamodule)
    denoiser = {k: v for k, v in opts.items() if k in DENOISER_OPTIONS}
    kw = {"schedule": M.schedule, "prediction": M.prediction}
    g = torch.Generator().manual_seed(s.noise_seed)
    dtype = _F64 if M.exact else torch.float32
    cal = torch.randn((s.calibration_noises, *shape), generator=g, dtype=dtype)
    test = _fresh_noise(cfg, s, shape).to(dtype)
    y_cal = y_test = None
    if classes:
        y_cal, y_test = _draw_labels(M.datamodule, s, len(cal), "calibration"), _draw_labels(M.datamodule, s,
                                                                                                len(test), "test")
    cond_cal = None if y_cal is None else {"y": y_cal}
    cond_test = None if y_test is None else {"y": y_test}
    e = cfg.eval.mse

    def teacher(noise, cond, counter):
        return torch.cat([trajectory_reference(counter, noise[i:i + s.batch_size], sampler=e.reference_sampler,
                                               steps=e.reference_steps, spacing=e.reference_spacing,
                                               cond=_part(cond, slice(i, i + s.batch_size)), **kw, **denoiser)[0]
                          for i in range(0, len(noise), s.batch_size)])

    counted = CountingModel(M.net)
    # shown to the sampler, as the evaluator's timed net does: labels are checked and guidance allowed through it
    counted.num_classes = int(getattr(M.net, "num_classes", 0) or 0)
    t0 = time.perf_counter()
    ref_cal = teacher(cal, cond_cal, counted)
    teacher_cost = {"evals": counted.rows, "seconds": time.perf_counter() - t0}
    ref_test = teacher(test, cond_test, M.net)
    log.info("teacher (%s, %d steps) on %d calibration + %d fresh noises: %.1f s", e.reference_sampler,
             e.reference_steps, len(cal), len(test), time.perf_counter() - t0)
    ladder = list(s.ladder)
    counted.rows = 0
    t0 = time.perf_counter()
    err_cal, ladder_nfe = ladder_errors(counted, cal, ref_cal, ladder, sampler=sampler.name, spacing=sampler.spacing,
                                        batch_size=s.batch_size, cond=cond_cal, **kw, **opts)
    ladder_cost = {"evals": counted.rows, "seconds": time.perf_counter() - t0}
    err_test, _ = ladder_errors(M.net, test, ref_test, ladder, sampler=sampler.name, spacing=sampler.spacing,
                                batch_size=s.batch_size, cond=cond_test, **kw, **opts)
    log.info("ladder of %d step counts (%s … %s) on calibration and fresh noise: %.1f s", len(ladder), ladder[0],
             ladder[-1], time.perf_counter() - t0)
    level = 1 - s.alpha
    keep: dict = {}
    measure = dict(cond=cond_test, quality=quality, keep=keep)

    def plus(*costs):
        return {"evals": sum(c["evals"] for c in costs), "seconds": sum(c["seconds"] for c in costs)}

    def fixed(n, spacing=sampler.spacing, net=counted, model_timesteps=None):
        extra = {} if model_timesteps is None else {"model_timesteps": model_timesteps}

        def run(noise, cond):
            res = sample(net, noise, sampler=sampler.name, steps=None if not isinstance(spacing, str) else n,
                         spacing=spacing, cond=cond, return_info=True, **kw, **opts, **extra)
            return res.sample, res.nfe
        return run

    def on_cal(run):  # a run's samples on the whole calibration noise, in chunks
        return torch.cat([run(cal[i:i + s.batch_size], _part(cond_cal, slice(i, i + s.batch_size)))[0]
                          for i in range(0, len(cal), s.batch_size)])

    rows, curves = [], {}
    # fixed N*: the fewest steps whose calibration coverage is ≥ 1 − α, by the quality-threshold search
    curves["fixed"] = [(float(ladder_nfe[r]), float(err_test[r].mean()), _coverage(err_test[r], s.error_target))
                       for r in range(len(ladder))]
    counted.rows = 0
    t0 = time.perf_counter()

    def shortfall(n):  # the fraction of calibration samples missing the target at n steps
        x = on_cal(fixed(n))
        return 1 - _coverage((x.to(_F64) - ref_cal.to(_F64)).pow(2).flatten(1).mean(1), s.error_target)

    try:
        search = find_min_steps(shortfall, Target(absolute=s.alpha), max_steps=ladder[-1])
    except TargetUnreachable as err:
        raise ValueError(f"no step count up to {ladder[-1]} (the largest of policies.ladder) brings "
                         f"{100 * level:g} % of the calibration samples within error_target={s.error_target:g}: the "
                         f"best is {100 * (1 - err.best[1]):.1f} % at {err.best[0]} steps; raise error_target or the "
                         "ladder") from None
    n_star = search.steps
    fixed_cost = plus(teacher_cost, {"evals": counted.rows, "seconds": time.perf_counter() - t0})
    rows.append(_measure("fixed N*", f"N = {n_star} ({search.evaluations} step counts searched)", fixed(n_star, net=M.net),
                         test, ref_test, s, M.mixture, fixed_cost, **measure))

    # optimised schedule: the smallest cached one for this model and sampler meeting the target on calibration noise
    optimised = _optimised_schedules(cfg, M, sampler.name)
    best = None
    for steps_, entry in optimised:
        ts = torch.tensor(entry["timesteps"], dtype=_F64)
        # a decoupled artefact (optimize.decoupled=true) is sampled with its own model-evaluation times
        mts = entry.get("model_timesteps")
        x = on_cal(fixed(steps_, ts, model_timesteps=mts))
        c = _coverage((x.to(_F64) - ref_cal.to(_F64)).pow(2).flatten(1).mean(1), s.error_target)
        if c >= level:
            best = (steps_, ts, entry)
            break
    if best is not None:
        cost = best[2].get("cost", {})
        rows.append(_measure("optimised schedule", f"{best[2].get('method')}, {best[0]} steps",
                             fixed(best[0], best[1], M.net, best[2].get("model_timesteps")),
                             test, ref_test, s, M.mixture,
                             {"evals": cost.get("model_calls", 0), "seconds": cost.get("seconds", 0.0)}, **measure))
    elif optimised:
        log.info("no optimised schedule for this model meets the target on calibration noise: row omitted")
    else:
        log.info("no optimised %s schedule for this model (training key %s): row omitted (make them with "
                 "task=optimize_steps)", sampler.name, M.key)

    # adaptive: the loosest rtol meeting the target on calibration noise (kept behind the registry check so that a
    # build without that sampler still writes the other rows)
    knobs: dict = {"adaptive_rtol": None, "adaptive_cap": None, "adaptive_resolve": None, "adaptive_spike": None}
    if "adaptive" in SAMPLERS:
        rows_a, curves_a = _adaptive_row(M, s, cal, test, ref_cal, ref_test, kw, denoiser, teacher_cost, level,
                                         cond_cal=cond_cal, knobs=knobs, **measure)
        rows += rows_a
        curves.update(curves_a)
    else:
        log.info("adaptive sampler not available")

    # per-sample stopping, on the fine grid (policies.stop_steps; auto: the ladder rungs N* … 4 N*, the one with the
    # lowest calibration mean NFE)
    grids = sorted({n_star} | {n for n in ladder if n_star < n <= 4 * n_star}) if s.stop_steps == "auto" else \
        [int(s.stop_steps)]

    def traces(net, noise, ref, cond, K):
        return _cat_traces([stopping_trace(net, noise[i:i + s.batch_size], ref[i:i + s.batch_size],
                                           sampler=sampler.name, steps=K, spacing=sampler.spacing,
                                           cond=_part(cond, slice(i, i + s.batch_size)), **kw, **opts)
                            for i in range(0, len(noise), s.batch_size)])

    counted.rows = 0
    t0 = time.perf_counter()
    fits = []
    for K in grids:
        tr = traces(counted, cal, ref_cal, cond_cal, K)
        rule_k = calibrate_stopping(tr, error_target=s.error_target, alpha=s.alpha, sampler=sampler.name, steps=K,
                                    spacing=sampler.spacing, options=opts)
        fits.append((float(stop_outcome(tr, rule_k.tau)[1].double().mean()), K, rule_k, tr))
    _, K, rule, trace_cal = min(fits, key=lambda f: f[0])
    stop_cost = plus(teacher_cost, {"evals": counted.rows, "seconds": time.perf_counter() - t0})
    rows.append(_measure("stopping", f"K = {K}, τ = {rule.tau:.3g} (α = {s.alpha:g})",
                         lambda z, c: sample_with_stopping(M.net, z, rule, cond=c, **kw), test, ref_test, s,
                         M.mixture, stop_cost, **measure))
    trace_test = traces(M.net, test, ref_test, cond_test, K)
    curves["stopping"] = []
    for a in s.stop_alphas:
        try:
            r_ = calibrate_stopping(trace_cal, error_target=s.error_target, alpha=a, sampler=sampler.name, steps=K)
        except ValueError:
            continue
        err_, nfe_ = stop_outcome(trace_test, r_.tau)
        curves["stopping"].append((float(nfe_.double().mean()), float(err_.mean()), _coverage(err_, s.error_target)))

    # learned predictor: x_T, and for a conditional model the one-hot of its label (steps.predictor.condition_vectors)
    def vectors(cond):
        return None if cond is None else condition_vectors(labels=cond["y"], num_classes=classes)

    vec_cal, vec_test = vectors(cond_cal), vectors(cond_test)
    labels_cal = oracle_labels(err_cal, s.error_target)
    n_train = 2 * len(cal) // 3
    t0 = time.perf_counter()
    pred = train_predictor(cal[:n_train], labels_cal[:n_train], ladder, hidden=s.predictor_hidden,
                           cond=None if vec_cal is None else vec_cal[:n_train], epochs=s.predictor_epochs,
                           batch_size=s.batch_size, seed=cfg.seed)
    train_seconds = time.perf_counter() - t0
    path = save_predictor(pred, out_dir / "step_predictor.pt", model_key=M.key,
                          meta={"sampler": sampler.name, "spacing": sampler.spacing, "error_target": s.error_target,
                                "num_classes": classes})
    pred = load_predictor(path, model_key=M.key)
    val = slice(n_train, len(cal))

    def predicted(noise_, vec, q, errs):
        idx = pred.budget_index(noise_, q, vec)
        return errs.gather(0, idx[None]).squeeze(0), ladder_nfe[idx]

    q_star, curves["predictor"] = None, []
    for q in s.predictor_quantiles:
        err_v, _ = predicted(cal[val], None if vec_cal is None else vec_cal[val], q, err_cal[:, val])
        if q_star is None and _coverage(err_v, s.error_target) >= level:
            q_star = q
        err_t, nfe_t = predicted(test, vec_test, q, err_test)
        curves["predictor"].append((float(nfe_t.double().mean()), float(err_t.mean()),
                                    _coverage(err_t, s.error_target)))
    q_star = q_star if q_star is not None else s.predictor_quantiles[-1]

    def run_predictor(noise_, cond_):
        idx = pred.budget_index(noise_, q_star, vectors(cond_))
        x = torch.empty_like(noise_)
        for r in idx.unique().tolist():
            at = idx == r
            x[at] = sample(M.net, noise_[at], sampler=sampler.name, steps=ladder[r], spacing=sampler.spacing,
                           cond=None if cond_ is None else {k: v[at] for k, v in cond_.items()}, **kw,
                           **opts).to(x.dtype)
        return x, ladder_nfe[idx]

    rows.append(_measure("predictor", f"q = {q_star:g}", run_predictor, test, ref_test, s, M.mixture,
                         plus(teacher_cost, ladder_cost, {"evals": 0, "seconds": train_seconds}), **measure))
    # the predictor against its oracle on the test noise
    oracle_test = oracle_labels(err_test, s.error_target)
    steps_of = torch.tensor(ladder + [ladder[-1]], dtype=_F64)
    idx = pred.budget_index(test, q_star, vec_test)
    within_ladder = oracle_test < len(ladder)
    cov_pred = _coverage(err_test.gather(0, idx[None]).squeeze(0), s.error_target)
    const = next((r for r in range(len(ladder)) if _coverage(err_test[r], s.error_target) >= cov_pred), len(ladder) - 1)
    diagnostics = {
        "predictor_spearman_test": spearman(pred.expected_steps(test, vec_test)[within_ladder],
                                            steps_of[oracle_test][within_ladder]),
        "predictor_regret_steps": float((steps_of[idx] - steps_of[oracle_test]).mean()),
        "oracle_mean_steps": float(steps_of[oracle_test].mean()),
        "predictor_mean_steps": float(steps_of[idx].mean()),
        "predictor_coverage_test": cov_pred,
        "predictor_q": q_star,
        "constant_budget_same_coverage": ladder[const],
        "oracle_beyond_ladder": int((~within_ladder).sum()),
        "label_counts": torch.bincount(labels_cal, minlength=len(ladder) + 1).tolist(),
        "predictor_train_seconds": train_seconds,
        "adaptive_rtol": knobs["adaptive_rtol"],
        "adaptive_cap": None if knobs["adaptive_cap"] in (None, math.inf) else knobs["adaptive_cap"],  # None: no cap
        "adaptive_resolve": knobs["adaptive_resolve"],  # the growth probe's λ; None: none
        "adaptive_spike": knobs["adaptive_spike"],  # the spike re-solve's threshold; None: none
        "stopping_tau": rule.tau, "stopping_grid": K, "stopping_grids_tried": grids, "stopping_calibration_coverage": rule.calibration_coverage,
        "fixed_n_star": n_star, "model_key": M.key, "exact_model": M.exact,
        "error_target": s.error_target, "alpha": s.alpha, "sampler": sampler.name, "spacing": sampler.spacing,
        "calibration_noises": len(cal), "test_noises": len(test), "test_noise_seed": int(cfg.eval.noise_seed),
        "condition": "labels" if classes else "none", "num_classes": classes,
        "test_class_counts": None if y_test is None else torch.bincount(y_test, minlength=classes).tolist(),
        "quality": None if q0 is None else {"features": q0.features_name, "reference": q0.reference_key,
                                            "kid_subset_size": int(cfg.eval.kid_subset_size)},
    }
    log.info("predictor: held-out Spearman %.3f with the oracle, regret %.2f steps",
             diagnostics["predictor_spearman_test"], diagnostics["predictor_regret_steps"])
    if s.save_samples:
        from ..reporting.files import save_torch

        save_torch({"noise": test, "labels": y_test, "reference": ref_test,
                    "rows": {k: {"samples": x, "nfe": n} for k, (x, n) in keep.items()}},
                   out_dir / "policies_samples.pt")
    _write(rows, curves, diagnostics, s, out_dir, loggers)
    for lg in loggers:
        lg.finalize("success")
    print_sync_hint(loggers)
    print(f"step policies ({len(rows)} rows) in {out_dir / 'policies.md'}")
    print((out_dir / "policies.md").read_text())
    return float(rows[0]["nfe_mean"])


def _fresh_noise(cfg: DictConfig, s: PolicySettings, shape: tuple) -> torch.Tensor:
    """The test noise: the evaluation's x_T for ``eval.noise_seed`` (chunks of ``eval.batch_size``, float32), so
    ``task=eval`` with ``eval.num_samples=policies.test_noises`` samples the same noise."""
    from ..evaluation.plan import EvalPlan, chunk_noise

    plan = EvalPlan(sampler=cfg.sampler.name, steps=(1,), shape=shape, num_samples=s.test_noises,
                    batch_size=cfg.eval.batch_size, noise_seed=cfg.eval.noise_seed)
    return torch.cat([chunk_noise(plan, c) for c in range(plan.num_chunks)])


def _draw_labels(datamodule, s: PolicySettings, n: int, which: str) -> torch.Tensor:
    """``n`` class labels drawn i.i.d. from the training split's label frequencies (so the conditional samples
    follow the data's own class mix, and the marginal NLL of the exact mixture stays the data's), from a stream of
    their own (``policies.noise_seed``, ``which``): the noise draws do not move when labels are added."""
    from ..evaluation.plan import _seed

    train = datamodule.labels("train")
    g = torch.Generator().manual_seed(_seed(s.noise_seed, f"policies-labels-{which}"))
    return train[torch.randint(len(train), (n,), generator=g)].long()


def _cat_traces(traces):
    from ..steps.stopping import StopTrace

    return StopTrace(torch.cat([t.scores for t in traces], 1), torch.cat([t.errors for t in traces], 1),
                     traces[0].nfe)


def _optimised_schedules(cfg: DictConfig, M: _Model, sampler: str) -> list[tuple[int, dict]]:
    """The cached optimised schedules of this model and sampler, fewest steps first and, at one step count, the
    lowest recorded held-out error first (a plain and a decoupled artefact; none for the exact model)."""
    import yaml

    if M.exact:
        return []
    from .optimize import schedule_cache_dir

    found = []
    for p in schedule_cache_dir(cfg).glob(f"{sampler}_nfe*.yaml"):
        entry = yaml.safe_load(p.read_text())
        if entry.get("training_key") == M.key and entry.get("sampler") == sampler:
            found.append((int(entry["steps"]), entry))
    return sorted(found, key=lambda f: (f[0], f[1].get("heldout_error", math.inf)))


def _adaptive_row(M, s, cal, test, ref_cal, ref_test, kw, denoiser, teacher_cost, level, *, cond_cal=None,
                  cond=None, quality=None, keep=None, knobs=None):
    """The adaptive sampler's row. For each λ-step cap of ``policies.adaptive_caps`` (the sampler's
    ``h_max_noisy``) and each growth-probe point of ``policies.adaptive_resolve`` (its ``resolve_lambda``; None: no
    probe) and each spike threshold of ``policies.adaptive_spike`` (its ``resolve_spike``; the two are never combined),
    the loosest ``policies.adaptive_rtols`` entry whose calibration coverage is ≥ 1 − α; of those, the
    (cap, probe, rtol) with the lowest calibration mean NFE — the cap trades a floor on the NFE for fewer mode
    flips, the probe three calls per sample and a re-solve of the few it flags for the same, and which side wins
    depends on the target. Measured on the test noise with each sample's own NFE
    (``SampleResult.nfe_per_sample``; ``nfe`` would be the batch's model calls). Returns ([row] or [], {curve name:
    the (mean NFE, MSE, coverage) curve on the test noise over every rtol}, one per (cap, probe or spike)). atol
    scales with rtol (k-diffusion's default pair 0.05 / 0.0078 is the ratio 0.156): with a fixed atol the absolute floor
    δ ≥ atol takes over below rtol ≈ 0.01 and tighter rtols change nothing. ``cond_cal`` / ``cond``: the
    calibration / test noises' conditioning; ``quality``, ``keep`` go to :func:`_measure`; ``knobs`` gets
    ``adaptive_rtol``, ``adaptive_cap``, ``adaptive_resolve`` and ``adaptive_spike``."""
    from ..sampling.api import sample

    def run_at(rtol, cap, lam, spike):
        def run(noise, c=None):
            res = sample(M.net, noise, sampler="adaptive", rtol=rtol, atol=s.adaptive_atol_per_rtol * rtol,
                         h_max_noisy=cap, resolve_lambda=lam, resolve_spike=spike, max_nfe=s.adaptive_max_nfe,
                         cond=c, return_info=True, **kw, **denoiser)
            return res.sample, res.nfe_per_sample
        return run

    def errors(run, noise, ref, c):
        out = [run(noise[i:i + s.batch_size], _part(c, slice(i, i + s.batch_size)))
               for i in range(0, len(noise), s.batch_size)]
        x, nfe = torch.cat([o[0] for o in out]), torch.cat([torch.as_tensor(o[1]).reshape(-1) for o in out])
        return (x.to(_F64) - ref.to(_F64)).pow(2).flatten(1).mean(1), nfe

    def label(cap, lam, spike):
        return ((f"cap {cap:g}" if cap < math.inf else "no cap") + ("" if lam is None else f", re-solve at λ {lam:g}")
                + ("" if spike is None else f", re-solve on a spike > {spike:g}"))

    curves, best, seconds, evals = {}, None, 0.0, 0  # best: (calibration mean NFE, rtol, cap, λ, spike)
    settings = [(cap, lam, spike) for cap, lam, spike in
                itertools.product(s.adaptive_caps, s.adaptive_resolve, s.adaptive_spike)
                if lam is None or spike is None]
    for cap, lam, spike in settings:
        name = f"adaptive, {label(cap, lam, spike)}"
        curve, chosen = curves.setdefault(name, []), None
        for rtol in sorted(s.adaptive_rtols, reverse=True):  # loosest first: the first meeting the target is chosen
            t0 = time.perf_counter()
            err_c, nfe_c = errors(run_at(rtol, cap, lam, spike), cal, ref_cal, cond_cal)
            seconds += time.perf_counter() - t0
            evals += int(nfe_c.sum())
            err_t, nfe_t = errors(run_at(rtol, cap, lam, spike), test, ref_test, cond)
            curve.append((float(nfe_t.double().mean()), float(err_t.mean()), _coverage(err_t, s.error_target)))
            cov_c = _coverage(err_c, s.error_target)
            log.info("%s, rtol %g: calibration coverage %.3f at mean NFE %.1f (%.1f s so far)", name, rtol, cov_c,
                     float(nfe_c.double().mean()), seconds)
            if chosen is None and cov_c >= level:
                chosen = (float(nfe_c.double().mean()), rtol, cap, lam, spike)
        if chosen is not None and (best is None or chosen[0] < best[0]):
            best = chosen
    if best is None:
        log.info("adaptive: no (cap, probe or spike, rtol) in policies.adaptive_caps × adaptive_resolve / "
                 "adaptive_spike × adaptive_rtols meets the target on calibration noise; row omitted")
        return [], curves
    _, rtol, cap, lam, spike = best
    cost = {"evals": teacher_cost["evals"] + evals, "seconds": teacher_cost["seconds"] + seconds}
    if knobs is not None:
        knobs.update(adaptive_rtol=rtol, adaptive_cap=cap, adaptive_resolve=lam, adaptive_spike=spike)
    return [_measure("adaptive", f"rtol = {rtol:g}, {label(cap, lam, spike)}", run_at(rtol, cap, lam, spike), test,
                     ref_test, s, M.mixture, cost, cond, quality, keep)], curves


_COLUMNS = [("policy", "policy", "{}"), ("knob", "knob", "{}"), ("mse", "MSE", "{:.3g}"),
            ("mse_ci", "MSE 95 % CI", "{}"), ("coverage", "within target", "{:.3f}"), ("nll", "NLL", "{:.4f}"),
            ("fid", "FID", "{:.4g}"), ("kid_mean", "KID", "{:.4g}"),
            ("nfe_mean", "mean NFE", "{:.1f}"), ("nfe_p95", "p95 NFE", "{:.0f}"), ("nfe_max", "max NFE", "{:.0f}"),
            ("seconds_batch1", "s / sample, batch 1", "{:.4f}"), ("seconds_batch", "s / batch", "{:.4f}"),
            ("oneoff", "one-off (model evals, s)", "{}")]


def _write(rows, curves, diagnostics, s, out_dir: Path, loggers) -> None:
    from ..reporting.files import write_csv, write_json
    from .evaluate import best_effort

    for r in rows:
        r["mse_ci"] = f"[{r['mse_ci_lo']:.3g}, {r['mse_ci_hi']:.3g}]"
        r["oneoff"] = f"{r['oneoff_model_evals']}, {r['oneoff_seconds']:.1f}"
    cols = [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[k]) if k in r else "" for k, _, f in cols) + " |")
    head = (f"target: per-sample MSE ≤ {s.error_target:g} for ≥ {100 * (1 - s.alpha):g} % of samples; "
            f"{diagnostics['test_noises']} fresh noises, {diagnostics['calibration_noises']} calibration noises; "
            f"sampler {diagnostics['sampler']} ({diagnostics['spacing']}); s / batch at batch {s.batch_size}")
    if diagnostics.get("condition") == "labels":
        head += (f"; every row conditioned on the same class labels ({diagnostics['num_classes']} classes, drawn "
                 f"from the training split's label frequencies)")
    if diagnostics.get("quality"):
        q = diagnostics["quality"]
        head += (f"; FID/KID in the {q['features']} features against the evaluation's reference {q['reference']} "
                 f"(KID subsets of {q['kid_subset_size']})")
    head += "\n\n"
    (out_dir / "policies.md").write_text(head + "\n".join(lines) + "\n")
    write_csv(out_dir / "policies.csv", [{k: v for k, v in r.items() if k not in ("mse_ci", "oneoff")} for r in rows])
    write_json(out_dir / "policies.json", {"rows": rows, "curves": curves, "diagnostics": diagnostics})
    png = out_dir / "policies_quality_vs_nfe.png"
    best_effort(png, _figure, rows, curves, s, png)
    _log_table(rows, loggers, png)


def _figure(rows, curves, s, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in curves.items():
        if pts:
            pts = sorted(pts)
            a.plot([p[0] for p in pts], [p[1] for p in pts], ".-", label=f"{name} (knob)")
            b.plot([p[0] for p in pts], [p[2] for p in pts], ".-", label=f"{name} (knob)")
    for r in rows:
        a.errorbar(r["nfe_mean"], r["mse"], yerr=[[r["mse"] - r["mse_ci_lo"]], [r["mse_ci_hi"] - r["mse"]]], fmt="o",
                   ms=8, label=f"{r['policy']}: {r['knob']}")
        b.plot(r["nfe_mean"], r["coverage"], "o", ms=8)
    b.axhline(1 - s.alpha, color="k", lw=0.8, ls="--")
    a.set(xscale="log", yscale="log", xlabel="mean NFE per sample", ylabel="trajectory MSE (test noise)",
          title="quality vs mean NFE")
    b.set(xscale="log", xlabel="mean NFE per sample", ylabel=f"fraction with MSE ≤ {s.error_target:g}",
          title=f"target: ≥ {1 - s.alpha:g}")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_table(rows, loggers, png: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    keys = list(dict.fromkeys(k for r in rows for k in r))
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            lg.experiment.log({"policies/table": wandb.Table(columns=keys, data=[[r.get(k) for k in keys]
                                                                                for r in rows])})
            if png.exists():
                lg.log_image(key="policies/quality_vs_nfe", images=[str(png)])
