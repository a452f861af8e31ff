"""The Lightning module that trains a denoiser: loss, logging, optimiser and learning-rate schedule, sampling.

``DiffusionModule(net, schedule, loss, ...)`` takes its three collaborators as objects (Hydra builds each from its own
``_target_``), so one module trains any net under any schedule with any loss of :mod:`diffsteps.training.losses`.

Exponential moving averages of the weights are not done here but by Lightning's
``lightning.pytorch.callbacks.EMAWeightAveraging`` callback, which deep-copies this module. The module therefore holds
no state that cannot be deep-copied and no metrics other than the per-band ``MeanMetric``s (whose states are not part
of ``state_dict``, so checkpoints hold exactly ``net.*``).

Randomness. The timesteps and noise of a training step are drawn from generators seeded from (base seed, rank,
global step, micro-batch), not from the global RNG: Lightning checkpoints do not store RNG states, so with the global
RNG a run resumed from a checkpoint would replay the noise of its first steps instead of continuing the stream. The
base seed is ``torch.initial_seed()`` when ``fit`` starts (i.e. the seed given to ``lightning.seed_everything``)
and is saved in and restored from checkpoints. The network's own randomness (dropout) draws from the global RNG, so
the forward pass of a training step runs with the global RNG forked and seeded from the same words: a resumed run
repeats the dropout masks an uninterrupted one draws, bit for bit. Validation draws from generators seeded by the batch index alone, so
``val/loss`` is the same estimator in every epoch and every run on the same validation data.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterable, Sequence

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric

from ..core.process import q_sample
from ..core.schedules import Schedule
from ..sampling.api import sample
from .losses import DiffusionLoss, sample_timesteps

__all__ = ["PROVENANCE_KEY", "DiffusionModule", "NonFiniteLossError", "lr_factor", "warmup_cosine"]

# Seed-sequence tags, so the training and validation streams can never coincide.
_TRAIN_STREAM, _VAL_STREAM = 0x7EA1, 0x7A11
_VAL_SEED = 20200619  # fixed: validation noise must not depend on the run's seed
_CKPT_KEY = "diffsteps_module"
# where a checkpoint carries what trained it (set by the runner as `module.provenance`): the training config, the
# code version, the cache key; the global step is added when saving
PROVENANCE_KEY = "diffsteps_provenance"



class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or ±∞. Raised before ``backward``, so the weights (and the optimiser state) are
    those of the last finite step and checkpoints written so far are untouched."""


def lr_factor(step: int, *, warmup_steps: int, total_steps: float, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate before optimiser step ``step`` (0-based): linear warm-up from 0,
    ``step / warmup_steps`` for ``step < warmup_steps`` (as ``transformers``' ``get_cosine_schedule_with_warmup``),
    then a half-cosine from 1 to ``min_lr_ratio`` reached at ``total_steps`` and held afterwards (SGDR without
    restarts, Loshchilov & Hutter 2017, eq. 5: η = η_min + ½(η_max − η_min)(1 + cos(π T_cur/T_i)), with
    T_cur = step − warmup_steps and T_i = total_steps − warmup_steps). Without a finite horizon (``total_steps`` ∞,
    e.g. max_steps = −1 and max_epochs = −1) or when the warm-up fills it, there is no decay: the factor stays 1."""
    if step < warmup_steps:
        return step / warmup_steps
    if not math.isfinite(total_steps) or total_steps <= warmup_steps:
        return 1.0
    progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: float = math.inf, *, warmup_steps: int = 100,
                  min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with the factor :func:`lr_factor` (linear warm-up over ``warmup_steps``, then a half-cosine to
    ``min_lr_ratio`` at ``total_steps``), to be stepped once per optimiser step. The ``lr_scheduler`` config group
    holds it as a partial; :class:`DiffusionModule` supplies the optimiser and ``total_steps``."""
    if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if not 0.0 <= float(min_lr_ratio) <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio!r}")
    factor = functools.partial(lr_factor, warmup_steps=int(warmup_steps), total_steps=float(total_steps),
                               min_lr_ratio=float(min_lr_ratio))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# DiffusionModule's defaults when built without optimizer / lr_scheduler (the configs' defaults differ only in
# min_lr_ratio: 0.05 there)
DEFAULT_OPTIMIZER = functools.partial(torch.optim.AdamW, lr=2e-3, betas=(0.9, 0.999), weight_decay=0.0)
DEFAULT_LR_SCHEDULER = functools.partial(warmup_cosine, warmup_steps=100, min_lr_ratio=0.0)


def _build_scheduler(factory: Callable, optimizer: torch.optim.Optimizer, total_steps: float):
    # total_steps only to factories that take it: a partial of e.g. torch's StepLR does not
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes = "total_steps" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return factory(optimizer, total_steps=total_steps) if takes else factory(optimizer)


def _seed(*words: int) -> int:
    # numpy's SeedSequence hashes the words, so neighbouring steps or ranks get unrelated 64-bit seeds (as data.py
    # does for its streams).
    return int(np.random.SeedSequence([int(w) % 2**64 for w in words]).generate_state(1, dtype=np.uint64)[0])


@contextlib.contextmanager
def _seeded_global_rng(device: torch.device, seed: int):
    """The global RNG of the CPU (and of ``device`` if it is an accelerator) seeded with ``seed`` inside the block and
    restored after it (``torch.random.fork_rng``), so modules that draw from it (dropout) get per-step streams."""
    accel = device.type not in ("cpu", "meta")
    devices = [device.index if device.index is not None else 0] if accel else []
    kwargs = {"device_type": device.type} if accel else {}
    with torch.random.fork_rng(devices=devices, **kwargs):
        torch.default_generator.manual_seed(seed)
        backend = getattr(torch, device.type, None) if accel else None
        if hasattr(backend, "manual_seed"):  # torch.cuda / torch.mps: the current device's generator
            backend.manual_seed(seed)
        yield


def _band_edges(num_timesteps: int, bands: int) -> list[tuple[int, int]]:
    """[0, T) cut into ``bands`` contiguous, near-equal integer bands, as inclusive (lo, hi) pairs."""
    starts = [(i * num_timesteps) // bands for i in range(bands + 1)]
    return [(starts[i], starts[i + 1] - 1) for i in range(bands)]


class DiffusionModule(L.LightningModule):
    """Trains ``net`` to denoise under ``schedule`` with the per-sample ``loss`` (a :class:`DiffusionLoss`).

    Training step: Ho et al. 2020, Algorithm 1 — t ~ U{0, …, T−1}, ε ~ N(0, I), x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,
    gradient step on the loss of ``net(x_t, t)`` (whose target — ε, x_0 or v — and weighting are the loss's).

    Class-conditional training: a batch ``(x, y)`` (a conditional data module's) trains ``net(x_t, t, y=y)``, each
    label replaced by the null label ``net.num_classes`` with probability ``p_uncond`` (label dropout, Ho &
    Salimans 2022, Algorithm 1), so one net learns both p(x | y) and p(x) — what classifier-free guidance needs. The
    dropout mask is drawn from the step's seeded generator like t and ε. A bare-tensor batch trains ``net(x_t, t)``.

    Optimiser: ``optimizer(net.parameters())`` and ``lr_scheduler(optimizer, total_steps=…)``, stepped every
    optimiser step, with ``total_steps`` = ``trainer.estimated_stepping_batches`` (∞ without a horizon) for factories
    that take it; both are partials (the ``optimizer`` and ``lr_scheduler`` config groups, ``_partial_: true``).
    Defaults: AdamW (lr 2e-3, betas (0.9, 0.999), no weight decay) on every parameter and :func:`warmup_cosine`
    (100 warm-up steps, cosine to 0). Both are built once on a probe parameter at construction, so a bad value fails
    here rather than when ``fit`` starts.

    Logged: ``train/loss`` (step and epoch), ``train/lr``, ``val/loss`` and, per timestep band,
    ``train/loss_t{lo}-{hi}`` and ``val/loss_t{lo}-{hi}`` (``timestep_bands`` contiguous bands of [0, T), bounds
    inclusive, e.g. ``loss_t0-249`` … ``loss_t750-999`` for T = 1000 and 4 bands; ``band_names`` lists them). A band
    value is the mean of the per-sample losses whose t fell in it over the epoch (a ``MeanMetric``: exact under
    uneven band counts, steps that miss the band and DDP; a band no sample fell in during the epoch logs NaN).

    ``compile=True`` compiles ``net`` in place (``nn.Module.compile``) in ``configure_model``, so parameter names
    and checkpoint keys stay ``net.…``. ``generate`` samples with any sampler of :mod:`diffsteps.sampling`.
    Rebuild from a checkpoint with ``DiffusionModule.load_from_checkpoint(path, net=..., schedule=..., loss=...,
    weights_only=True)``; the runner's checkpoints also carry their provenance (``PROVENANCE_KEY``).
    """

    def __init__(self, net: nn.Module, schedule: Schedule, loss: DiffusionLoss, *,
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
                 lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
                 timestep_bands: int = 4, compile: bool = False, p_uncond: float = 0.1):
        super().__init__()
        if isinstance(p_uncond, bool) or not 0.0 <= float(p_uncond) <= 1.0:
            raise ValueError(f"p_uncond (label dropout) must lie in [0, 1], got {p_uncond!r}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a diffsteps Schedule, got {type(schedule).__name__}")
        if not isinstance(loss, DiffusionLoss):
            raise TypeError(f"loss must be a diffsteps DiffusionLoss, got {type(loss).__name__}")
        self.optimizer_factory = DEFAULT_OPTIMIZER if optimizer is None else optimizer
        self.lr_scheduler_factory = DEFAULT_LR_SCHEDULER if lr_scheduler is None else lr_scheduler
        self._probe_optimizer()
        T = schedule.num_timesteps
        if isinstance(timestep_bands, bool) or int(timestep_bands) != timestep_bands or not 1 <= timestep_bands <= T:
            raise ValueError(f"timestep_bands must be an integer in [1, T={T}], got {timestep_bands!r}")
        # The objects are not hyperparameters: the runner stores the full config that built them. (A partial in the
        # checkpoint's hyper_parameters would also stop it loading with weights_only=True.)
        self.save_hyperparameters(ignore=["net", "schedule", "loss", "optimizer", "lr_scheduler", "p_uncond"])
        self.p_uncond = float(p_uncond)  # like the objects, recorded by the runner's config (train.p_uncond)
        self.net = net
        self.schedule = schedule
        self.loss_fn = loss
        self.prediction = loss.prediction
        self.band_edges = _band_edges(T, int(timestep_bands))
        self.band_names = [f"loss_t{lo}-{hi}" for lo, hi in self.band_edges]
        # First timestep of bands 1…n−1: bucketize(t, these, right=True) is t's band index.
        self._band_starts = torch.tensor([lo for lo, _ in self.band_edges[1:]], dtype=torch.long)
        # nan_strategy="disable": training raises before a NaN could get here, and in validation a NaN must show in
        # the logged value rather than be silently dropped (the default "warn" removes NaNs from the mean).
        self.train_band_metrics = nn.ModuleList(MeanMetric(nan_strategy="disable") for _ in self.band_edges)
        self.val_band_metrics = nn.ModuleList(MeanMetric(nan_strategy="disable") for _ in self.band_edges)
        self._noise_seed = torch.initial_seed()
        self._seed_step, self._micro_batch = -1, 0
        self._net_compiled = False
        # what trained these weights (plain data: it must load with weights_only=True), written into every checkpoint
        self.provenance: dict | None = None

    # -- model ---------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, t) if y is None else self.net(x, t, y=y)

    def configure_model(self) -> None:
        # Idempotent: EMAWeightAveraging.setup calls this hook itself before the Trainer does. nn.Module.compile
        # compiles the call in place, so unlike torch.compile(net) no `_orig_mod.` wrapper enters parameter names;
        # the EMA callback's deep copy of a compiled module comes out uncompiled (torch drops the compiled call).
        if self.hparams.compile and not self._net_compiled:
            self.net.compile()
            self._net_compiled = True

    # -- one loss evaluation ---------------------------------------------------------------------------------------
    def _draw(self, x0: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer timesteps (CPU, long) and noise (x0's device and dtype) from one seed. t stays on the CPU because
        the schedule tables live there (q_sample and the loss look ᾱ_t up on the CPU anyway)."""
        g_cpu = torch.Generator().manual_seed(seed)
        t = sample_timesteps(x0.shape[0], self.schedule, generator=g_cpu)
        g_dev = torch.Generator(device=x0.device).manual_seed(_seed(seed, 1))
        noise = torch.randn(x0.shape, generator=g_dev, device=x0.device, dtype=x0.dtype)
        return t, noise

    def _drop_labels(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        """Each label replaced by the null label (``net.num_classes``) with probability ``p_uncond``."""
        p = self.p_uncond
        if p == 0.0:
            return y
        g = torch.Generator().manual_seed(_seed(seed, 3))
        drop = (torch.rand(y.shape[0], generator=g) < p).to(y.device)
        return torch.where(drop, torch.full_like(y, self._null_label()), y)

    def _null_label(self) -> int:
        k = int(getattr(self.net, "num_classes", 0) or 0)
        if k < 1:
            raise ValueError(f"the batches carry class labels but the net ({type(self.net).__name__}) was built "
                             "without classes; build it with num_classes = the data's spec.num_classes (model=auto "
                             "does this for conditional data)")
        return k

    def _losses(self, x0: torch.Tensor, seed: int, y: torch.Tensor | None = None, drop: bool = True):
        t, noise = self._draw(x0, seed)
        x_t = q_sample(self.schedule, x0, t, noise)
        tt = t.to(x0.device, torch.float32)
        if y is None:
            out = self.net(x_t, tt)
        else:
            self._null_label()  # a clear error for labels fed to an unconditional net
            out = self.net(x_t, tt, y=self._drop_labels(y, seed) if drop else y)
        # float32 for the mean: under bf16 autocast the per-sample losses come back in bf16
        return self.loss_fn(out, x0, noise, t, self.schedule).float(), t, out

    def _update_bands(self, metrics: nn.ModuleList, losses: torch.Tensor, t: torch.Tensor) -> None:
        band = torch.bucketize(t, self._band_starts, right=True).to(losses.device)
        for b, metric in enumerate(metrics):
            metric.update(losses[band == b])  # an empty selection leaves the metric unchanged

    @staticmethod
    def _batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, labels or None): a conditional data module yields ``(x, y)``, an unconditional one the bare tensor
        (a 1-tuple, e.g. from a TensorDataset of x alone, is unconditional too)."""
        if isinstance(batch, (tuple, list)):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        return batch, None

    # -- Lightning hooks ---------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Ho et al. 2020, Algorithm 1 (class docstring), with the per-sample loss of ``loss``."""
        x0, y = self._batch(batch)
        # (global step, micro-batch within the step) names a training batch uniquely, also under gradient
        # accumulation and across a resume (checkpoints are written after optimiser steps, i.e. at micro-batch 0).
        # batch_idx would not do: Lightning restarts it at the resumed position, not at 0, after an epoch-end resume.
        if self.global_step != self._seed_step:
            self._seed_step, self._micro_batch = self.global_step, 0
        seed = _seed(_TRAIN_STREAM, self._noise_seed, self.global_rank, self.global_step, self._micro_batch)
        self._micro_batch += 1
        with _seeded_global_rng(x0.device, _seed(seed, 2)):  # dropout masks: a function of the step too
            losses, t, out = self._losses(x0, seed, y)
        loss = losses.mean()
        local_bad = not bool(torch.isfinite(loss))
        bad = local_bad
        if self._trainer is not None:
            # Under DDP every rank must stop together: a rank that raised alone would leave the others waiting in
            # the gradient all-reduce. (A no-op on one device.)
            bad = self.trainer.strategy.reduce_boolean_decision(local_bad, all=False)
        if bad:
            self._raise_non_finite(loss, losses, x0, out, batch_idx, on_this_rank=local_bad)
        B = x0.shape[0]
        # Not synced across DDP ranks (that would be an all-reduce every step): the step value is this rank's;
        # the band metrics below are synced (at epoch end only).
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=B)
        if self._trainer is not None and self.trainer.optimizers:
            # the learning rate this step's optimiser update uses (the scheduler steps after it)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                     batch_size=B)
        self._update_bands(self.train_band_metrics, losses.detach(), t)
        return loss

    def on_train_epoch_end(self) -> None:
        # logged once per epoch rather than registered every step: each self.log call costs ~1 ms of Lightning
        # bookkeeping, which was a tenth of a CPU training step
        for name, metric in zip(self.band_names, self.train_band_metrics):
            self.log(f"train/{name}", metric, on_step=False, on_epoch=True)

    def _raise_non_finite(self, loss, losses, x0, out, batch_idx, on_this_rank: bool = True) -> None:
        where = f"at global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if on_this_rank:
            B = len(losses)
            n_loss = int((~torch.isfinite(losses)).sum())
            n_out = int((~torch.isfinite(out.reshape(len(out), -1))).any(1).sum())
            n_in = int((~torch.isfinite(x0.reshape(len(x0), -1))).any(1).sum())
            what = (f"non-finite training loss {loss.item()} {where}: {n_loss}/{B} per-sample losses, {n_out}/{B} "
                    f"network outputs and {n_in}/{B} input samples are non-finite")
        else:
            what = (f"non-finite training loss on another rank {where} (this rank {self.global_rank}: "
                    f"{loss.item()})")
        raise NonFiniteLossError(
            f"{what}. Training stopped before backward, so no NaN reached the weights; checkpoints written before "
            f"this step are intact. Lower the learning rate, add warm-up, or check the data.")

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x0, y = self._batch(batch)
        # Seeded by position only: the same (t, ε) for the same validation batch in every epoch and run, so val/loss
        # differences are differences of the model, not of the Monte-Carlo draw.
        # conditional validation loss: the labels as given (no dropout), the quantity conditional sampling uses
        losses, t, _ = self._losses(x0, _seed(_VAL_STREAM, _VAL_SEED, dataloader_idx, batch_idx), y, drop=False)
        loss = losses.mean()
        # batch_size: the last validation batch may be short; Lightning's epoch mean is weighted by it
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x0.shape[0],
                 sync_dist=True)
        self._update_bands(self.val_band_metrics, losses, t)
        for name, metric in zip(self.band_names, self.val_band_metrics):
            self.log(f"val/{name}", metric, on_step=False, on_epoch=True)
        return loss

    def _probe_optimizer(self) -> None:
        """Build optimiser and scheduler once on a probe parameter: bad settings fail at construction."""
        try:
            opt = self.optimizer_factory([nn.Parameter(torch.zeros(1))])
        except (TypeError, ValueError, IndexError) as err:
            raise ValueError(f"the optimizer cannot be built: {err}") from None
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer must build a torch.optim.Optimizer from the parameters, got "
                            f"{type(opt).__name__}")
        lr = opt.param_groups[0]["lr"]
        if not (float(lr) > 0 and math.isfinite(float(lr))):
            raise ValueError(f"the optimizer's lr must be a finite number > 0, got {lr!r}")
        try:
            _build_scheduler(self.lr_scheduler_factory, opt, math.inf)
        except (TypeError, ValueError) as err:
            raise ValueError(f"the lr_scheduler cannot be built: {err}") from None

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.net.parameters())
        try:
            total = float(self.trainer.estimated_stepping_batches)
        except Exception:  # e.g. an iterable data set of unknown length with max_steps = -1: no horizon, no decay
            total = math.inf
        sched = _build_scheduler(self.lr_scheduler_factory, opt, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def setup(self, stage: str) -> None:
        if stage == "fit":
            # The seed in force when fit starts (runners seed just before building the Trainer, possibly after
            # building this module). A resumed fit then overrides it from the checkpoint: Lightning restores
            # checkpoints (on_load_checkpoint) after this hook.
            self._noise_seed = torch.initial_seed()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[_CKPT_KEY] = {"noise_seed": self._noise_seed}
        if self.provenance is not None:
            checkpoint[PROVENANCE_KEY] = {**self.provenance, "global_step": int(self.global_step)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if _CKPT_KEY in checkpoint:
            self._noise_seed = int(checkpoint[_CKPT_KEY]["noise_seed"])

    # -- sampling ------------------------------------------------------------------------------------------------------
    def generate(self, noise: torch.Tensor, *, sampler: str = "ddim", steps: int | None = 50,
                 spacing: str | Sequence[float] | torch.Tensor = "trailing", cond: dict | None = None,
                 callback=None, generator: torch.Generator | None = None,
                 return_info: bool = False, progress: bool = False, **options):
        """Samples from ``noise`` with :func:`diffsteps.sample` (same arguments: ``cond`` for ``net(x, t, **cond)``,
        e.g. ``{"y": labels}``, ``callback`` per step, a (B, K) ``spacing`` for per-sample timesteps; ``options``
        are the sampler's, e.g. ``eta``, ``clip_denoised``, and the wrapper's ``guidance_scale`` /
        ``guidance_interval``), the net in eval mode and restored to its previous mode afterwards."""
        was_training = self.net.training
        self.net.eval()
        try:
            return sample(self.net, noise, schedule=self.schedule, prediction=self.prediction, sampler=sampler,
                          steps=steps, spacing=spacing, cond=cond, callback=callback, generator=generator,
                          return_info=return_info, progress=progress, **options)
        finally:
            self.net.train(was_training)
