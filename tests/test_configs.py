"""The Hydra configs compose into objects (each group by its `_target_`), one `seed` reaches every random stream,
the optimiser and LR schedule built from config train bit-for-bit as the hand-built ones did, and keys that follow
`train.*` cannot be set inconsistently. In-process (Hydra's compose API): no run.py subprocess."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import diffsteps as ds
from diffsteps.evaluation.plan import EvalPlan, chunk_noise
from diffsteps.evaluation.quality import SampleQuality
from diffsteps.nets import MLP
from diffsteps.runner.build import build, build_net
from diffsteps.runner.loggers import check_loggers, make_loggers
from diffsteps.runner.objects import Objective, SamplerChoice
from diffsteps.runner.train import make_callbacks
from diffsteps.runner.validate import check_follows_train, instantiate_checked
from diffsteps.training.module import DiffusionModule, lr_factor
from diffsteps.training.progress import ProgressLog

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*overrides the configure_model:UserWarning"),
]

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL = ["data=toy2d", "data.n_train=1024", "data.n_val=256", "data.batch_size=64", "model=mlp", "model.hidden=32",
         "model.depth=1", "model.time_dim=16"]
OmegaConf.register_new_resolver("launch_dir", os.getcwd, replace=True)  # as run.py does


def config(*overrides: str, tmp: Path | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        paths = [f"paths.output_dir={tmp}", f"paths.root_dir={tmp}"] if tmp else []
        return compose("config", overrides=[*paths, *overrides])


# -- one seed ----------------------------------------------------------------------------------------------------------
def _split(cfg) -> torch.Tensor:
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return dm.real_samples(split="val")


def _noise(cfg) -> torch.Tensor:
    plan = EvalPlan(sampler="ddim", steps=(5,), shape=(2,), num_samples=64, batch_size=64,
                    noise_seed=cfg.eval.noise_seed)
    return chunk_noise(plan, 0)


def _kid(cfg) -> float:
    # the identity features on 2-D points, 80 real vs 80 shifted by 1, subsets of 20: the draw moves KID visibly
    g = torch.Generator().manual_seed(5)
    real, fake = torch.randn(80, 2, generator=g), 1.0 + torch.randn(80, 2, generator=g)
    q = SampleQuality("identity", kid_subset_size=20, kid_subsets=5, kid_seed=cfg.eval.kid_seed)
    q.set_reference(real)
    q.update(fake)
    return q.compute()["kid_mean"]


def test_seed_reaches_data_split_eval_noise_and_kid_subsets():
    # the default data (digits: a stratified split drawn from data.seed) and toy2d (generated from it)
    for data in (["data=digits"], ["data=toy2d", "data.n_train=512", "data.n_val=128"]):
        zero, one = config(*data, "seed=0"), config(*data, "seed=1")
        assert (zero.data.seed, zero.eval.noise_seed, zero.eval.kid_seed) == (0, 0, 0)
        assert (one.data.seed, one.eval.noise_seed, one.eval.kid_seed) == (1, 1, 1)
        a, b = _split(zero), _split(one)
        assert a.shape == b.shape and not torch.equal(a, b)
        # an explicit sub-seed wins over `seed`
        pinned = config(*data, "seed=1", "data.seed=0")
        assert torch.equal(_split(pinned), a)
    zero, one = config("seed=0"), config("seed=1")
    assert not torch.equal(_noise(zero), _noise(one))
    assert torch.equal(_noise(config("seed=1", "eval.noise_seed=0")), _noise(zero))
    assert torch.equal(_noise(config("eval.noise_seed=1234")), _noise(config("seed=5", "eval.noise_seed=1234")))
    kid0, kid1 = _kid(zero), _kid(one)
    assert kid0 != kid1 and min(kid0, kid1) > 0  # both see the shift; different subsets, different estimates
    assert _kid(config("seed=1", "eval.kid_seed=0")) == kid0


# -- max_steps and the other keys that follow train.* ------------------------------------------------------------------
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
def test_trainer_follows_train_and_rejects_a_different_value(trainer):
    cfg = config(f"trainer={trainer}", "train.max_steps=77", "train.gradient_clip_val=0.5", "train.ema_decay=0.9")
    assert cfg.trainer.max_steps == 77 and cfg.trainer.gradient_clip_val == 0.5 and cfg.callbacks.ema.decay == 0.9
    check_follows_train(cfg)
    check_follows_train(config(f"trainer={trainer}", "trainer.max_steps=1500"))  # the same value: allowed
    for override, message in [("trainer.max_steps=10", "trainer.max_steps is 10 but train.max_steps is 1500"),
                              ("trainer.gradient_clip_val=5", "set train.gradient_clip_val instead"),
                              ("callbacks.ema.decay=0.9", "callbacks.ema.decay is 0.9 but train.ema_decay is 0.995"),
                              ("~callbacks.ema", "callbacks.ema.decay is absent")]:
        with pytest.raises(ValueError, match=message):
            check_follows_train(config(f"trainer={trainer}", override))


# -- optimiser and LR schedule: the same numbers as the hand-built ones --------------------------------------------------
class _OldWay(DiffusionModule):
    """configure_optimizers as DiffusionModule had it before the optimizer / lr_scheduler groups: AdamW and a
    LambdaLR of lr_factor, from the numbers that were train.lr, train.weight_decay, train.warmup_steps and
    train.min_lr_ratio (2e-3, 0, 100, 0.05)."""

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=2e-3, betas=(0.9, 0.999), weight_decay=0.0)
        factor = functools.partial(lr_factor, warmup_steps=100, total_steps=float(self.trainer.estimated_stepping_batches),
                                   min_lr_ratio=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


class _RecordLR(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(cfg, module, datamodule) -> tuple[dict, list[float]]:
    rec = _RecordLR()
    ema = instantiate(cfg.callbacks.ema)
    trainer = instantiate(cfg.trainer, callbacks=[ema, rec], logger=False, enable_progress_bar=False,
                          enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, rec.lrs


def test_default_optimizer_and_schedule_reproduce_the_hand_built_ones_bit_for_bit(tmp_path):
    # 130 steps: through the 100-step warm-up into the cosine; gradient clipping and EMA as configured
    cfg = config(*SMALL, "train.max_steps=130", tmp=tmp_path)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, list(cfg.optimizer.betas)) == (2e-3, 0.0, [0.9, 0.999])
    assert (cfg.lr_scheduler.warmup_steps, cfg.lr_scheduler.min_lr_ratio) == (100, 0.05)
    schedule = instantiate(cfg.schedule)

    L.seed_everything(cfg.seed, verbose=False)
    dm_new, new = build(cfg, schedule)  # the runner's path: optimizer and lr_scheduler partials from the config
    init = {k: v.clone() for k, v in new.state_dict().items()}
    w_new, lr_new = _fit(cfg, new, dm_new)

    L.seed_everything(cfg.seed, verbose=False)
    dm_old = instantiate(cfg.data)
    net = build_net(cfg, dm_old.spec, dm_old.name)
    old = _OldWay(net, schedule, instantiate(cfg.loss), compile=cfg.train.compile)
    assert all(torch.equal(init[k], v) for k, v in old.state_dict().items())  # the same start
    w_old, lr_old = _fit(cfg, old, dm_old)

    assert lr_new == lr_old and len(lr_new) == 130
    assert lr_new[:3] == pytest.approx([0.0, 2e-5, 4e-5], rel=1e-12) and lr_new[100] == pytest.approx(2e-3)
    assert lr_new[-1] == pytest.approx(2e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 29 / 30))), rel=1e-12)
    assert list(w_new) == list(w_old)
    for k in w_new:
        assert torch.equal(w_new[k], w_old[k]), k
    assert any(not torch.equal(w_new[k], init[k]) for k in w_new)  # it trained


def test_optimizer_and_scheduler_groups_are_partials_checked_at_construction(linear):
    cfg = config("optimizer.lr=5e-4", "optimizer.weight_decay=0.01", "optimizer.betas=[0.8,0.99]",
                 "lr_scheduler.warmup_steps=3", "lr_scheduler.min_lr_ratio=0.2")
    opt_factory, sched_factory = instantiate(cfg.optimizer), instantiate(cfg.lr_scheduler)
    assert isinstance(opt_factory, functools.partial) and isinstance(sched_factory, functools.partial)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = opt_factory([p])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 5e-4
    assert opt.defaults["weight_decay"] == 0.01 and list(opt.defaults["betas"]) == [0.8, 0.99]
    sched = sched_factory(opt, total_steps=13)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [5e-4 * lr_factor(s, warmup_steps=3, total_steps=13, min_lr_ratio=0.2) for s in range(14)]
    assert lrs == pytest.approx(want, rel=1e-12, abs=0) and lrs[-1] == pytest.approx(1e-4)
    loss = ds.DiffusionLoss("simple")
    for bad, message in [("optimizer.lr=0", "lr must be a finite number > 0"),
                         ("optimizer.weight_decay=-1", "Invalid weight_decay"),
                         ("lr_scheduler.warmup_steps=-2", "warmup_steps must be an integer >= 0"),
                         ("lr_scheduler.min_lr_ratio=1.5", r"min_lr_ratio must lie in \[0, 1\]")]:
        c = config(bad)
        with pytest.raises(ValueError, match=message):
            DiffusionModule(MLP(2, hidden=8, depth=1, time_dim=8), linear, loss,
                            optimizer=instantiate(c.optimizer), lr_scheduler=instantiate(c.lr_scheduler))
    # a torch scheduler that takes no total_steps works too
    module = DiffusionModule(MLP(2, hidden=8, depth=1, time_dim=8), linear, loss,
                             lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=10))
    assert module.lr_scheduler_factory.func is torch.optim.lr_scheduler.StepLR


@pytest.fixture(scope="module")
def linear():
    return ds.make_schedule("linear", 1000)


# -- sampler and objective objects -------------------------------------------------------------------------------------
def test_sampler_and_objective_groups_build_checked_objects():
    for name in ("ddim", "ddpm", "heun", "euler", "dpmpp_2m", "dpmpp_3m", "sde_euler"):
        s = instantiate_checked(config(f"sampler={name}").sampler)
        assert isinstance(s, SamplerChoice) and s.name == name and isinstance(s.options, dict)
    assert instantiate_checked(config("sampler=ddim").sampler).deterministic
    assert not instantiate_checked(config("sampler=ddim", "sampler.options.eta=0.5").sampler).deterministic
    for override, message in [("sampler.name=dpm_fast", "unknown sampler 'dpm_fast'; valid choices: ddpm, ddim"),
                              ("+sampler.options.gamma=1", r"has no option\(s\) \['gamma'\]; its options: eta"),
                              ("sampler.spacing=cosine", "valid choices: leading, trailing"),
                              ("sampler.options.eta=2.0", r"eta in \[0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            instantiate_checked(config(override).sampler)
    row = {"fid": 0.5, "kid_mean": 0.01, "nll": 1.5, "nfe": 19, "seconds_per_sample": 0.002}
    for name, value in [("fid", 0.5), ("kid", 0.01), ("nll", 1.5)]:
        o = instantiate_checked(config(f"objective={name}").objective)
        assert isinstance(o, Objective) and o.value(row) == value
    o = instantiate_checked(config("objective=fid", "objective.cost_weight=0.01").objective)
    assert o.value(row) == pytest.approx(0.5 + 0.19)
    with pytest.raises(ValueError, match="valid choices: nfe, seconds"):
        instantiate_checked(config("objective.cost=joules").objective)
    with pytest.raises(ValueError, match="cost_weight must be a finite number"):
        instantiate_checked(config("objective.cost_weight=.nan").objective)


# -- loggers and callbacks ---------------------------------------------------------------------------------------------
def test_logger_group_builds_its_targets(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert make_loggers(config("logger=none", tmp=tmp_path), tmp_path) == []
    (csv,) = make_loggers(config("logger=csv", tmp=tmp_path), tmp_path)
    assert isinstance(csv, CSVLogger) and Path(csv.log_dir) == tmp_path / "csv"
    cfg = config("logger=wandb", "logger.wandb.tags=[a,b]", tmp=tmp_path)
    loggers = make_loggers(cfg, tmp_path)
    assert [type(lg) for lg in loggers] == [CSVLogger, WandbLogger]
    init = loggers[1]._wandb_init  # what wandb.init will get (no run is started here)
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path) and init["tags"] == ["a", "b"]
    assert init["project"] == "diffsteps" and init["config"]["optimizer"]["lr"] == 2e-3
    assert type(init["tags"]) is list  # a plain list, not a ListConfig
    assert "anonymous" not in init  # Lightning's None makes wandb warn on every run
    assert make_loggers(config("logger=wandb", "+logger.wandb.anonymous=true", tmp=tmp_path),
                        tmp_path)[1]._wandb_init["anonymous"] == "allow"
    assert [type(lg) for lg in make_loggers(config("logger=wandb", "logger.wandb=null", tmp=tmp_path), tmp_path)] == [
        CSVLogger]
    with pytest.raises(ValueError, match="must be a config node with a _target_"):
        make_loggers(config("logger=csv", "logger.csv=true", tmp=tmp_path), tmp_path)


def test_tensorboard_without_its_package_fails_with_the_install_hint(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("tensorboard", "tensorboardX") else real(name, *a))
    for choice in ("logger=tensorboard", "logger=[wandb,tensorboard]"):
        with pytest.raises(ValueError, match="needs the tensorboard package: pip install tensorboard"):
            check_loggers(config(choice, tmp=tmp_path))
    check_loggers(config("logger=wandb", tmp=tmp_path))


def test_callbacks_group_builds_ema_checkpoint_and_progress(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    cfg = config("train.ema_decay=0.9", "callbacks.model_checkpoint.every_n_train_steps=7",
                 "callbacks.progress.every_n_steps=3")
    ema, ckpt, progress = make_callbacks(cfg, tmp_path)
    assert isinstance(ema, EMAWeightAveraging)
    avg, new = [torch.zeros(2)], [torch.ones(2)]
    ema._kwargs["multi_avg_fn"](avg, new, torch.tensor(1))  # ema ← ema + (1 − decay)(θ − ema)
    assert torch.allclose(avg[0], torch.full((2,), 0.1), rtol=0, atol=1e-7)
    assert isinstance(ckpt, ModelCheckpoint) and Path(ckpt.dirpath) == tmp_path and ckpt._every_n_train_steps == 7
    assert isinstance(progress, ProgressLog) and progress.every_n_steps == 3
    assert [type(c) for c in make_callbacks(config("callbacks.progress=null"), tmp_path)] == [EMAWeightAveraging,
                                                                                            ModelCheckpoint]
    with pytest.raises(ValueError, match=r"EMA decay must be a number in \[0, 1\)"):
        make_callbacks(config("train.ema_decay=1.0"), tmp_path)
