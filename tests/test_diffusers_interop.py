"""diffusers models in and out (issue 15, parts 1, 2 and 7).

In: ``Schedule.from_diffusers`` against the β / ᾱ tables diffusers' own schedulers build from the same config, the
sampling options a scheduler config implies, the errors for folders and options diffsteps cannot take. Out: a
pipeline folder written by ``write_pipeline`` loads in ``DDPMPipeline.from_pretrained``, and diffusers'
DDIMScheduler and diffsteps' ``ddim`` carry the same noise to the same images. End to end: a ``debug=fast``
training of ``model=diffusers_unet`` (which must leave the shared checkpoint cache untouched), exported, evaluated
as ``model=diffusers`` gives the same FID-versus-steps rows as the native evaluation of the same weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from helpers import ROOT, run_py
from hydra.utils import instantiate
from PIL import Image

import diffsteps as ds
from diffsteps.core.schedules import diffusers_sampling_options
from diffsteps.nets.diffusers_unet import DiffusersUNet, diffusers_folder, load_unet
from diffsteps.runner.export import write_pipeline

RTOL32 = 2e-4  # diffusers' float32 ᾱ table and step coefficients vs our float64 ones (test_diffusers_agreement)


def tiny_unet(**extra) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, **extra).eval()


# -- in: scheduler configs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_from_diffusers_matches_diffusers_tables(beta_schedule, zero_snr):
    sched = DDPMScheduler(num_train_timesteps=500, beta_schedule=beta_schedule, beta_start=0.0002, beta_end=0.03,
                          rescale_betas_zero_snr=zero_snr)
    s = ds.Schedule.from_diffusers(dict(sched.config))
    assert s.num_timesteps == 500
    # diffusers' tables are float32: agreement to float32 rounding, and a one-index shift would be far off
    torch.testing.assert_close(s.alphas_cumprod.float(), sched.alphas_cumprod, rtol=2e-6, atol=3e-7)
    assert (s.alphas_cumprod[1:] - s.alphas_cumprod[:-1]).abs().max() > 1e-4
    assert s.zero_terminal_snr == zero_snr


def test_trained_betas_are_taken_exactly_and_options_mapped():
    betas = ds.make_schedule("cosine", 200).betas
    config = json.loads(json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 200,
                                    "trained_betas": betas.tolist(), "beta_schedule": "linear",
                                    "prediction_type": "sample", "timestep_spacing": "linspace", "clip_sample": True,
                                    "clip_sample_range": 2.5, "thresholding": True,
                                    "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0}))
    assert torch.equal(ds.Schedule.from_diffusers(config).betas, betas)  # JSON round trip, float64 exact
    assert diffusers_sampling_options(config) == {"prediction": "x0", "spacing": "linspace", "clip_denoised": 2.5,
                                                  "dynamic_threshold": 0.9, "threshold_max": 3.0}
    # diffusers' DDPM/DDIM defaults for what a config leaves out
    assert diffusers_sampling_options({}) == {"prediction": "epsilon", "spacing": "leading", "clip_denoised": 1.0,
                                              "dynamic_threshold": None, "threshold_max": None}
    opts = diffusers_sampling_options({"prediction_type": "v_prediction", "clip_sample": False,
                                       "use_karras_sigmas": True})
    assert (opts["prediction"], opts["spacing"], opts["clip_denoised"]) == ("v", "karras", None)


@pytest.mark.parametrize("key, value", [("prediction_type", "flow_prediction"), ("beta_schedule", "exp"),
                                        ("timestep_spacing", "random"), ("steps_offset", 1),
                                        ("variance_type", "learned_range"), ("use_exponential_sigmas", True)])
def test_unsupported_scheduler_option_is_named(key, value):
    with pytest.raises(ValueError, match=f"unsupported {key}"):
        ds.Schedule.from_diffusers({key: value})


# -- the net wrapper ----------------------------------------------------------------------------------------------
def test_wrapper_calls_the_unet_and_passes_class_labels():
    unet = tiny_unet(num_class_embeds=3)
    net = DiffusersUNet(unet)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([999.0, 500.0, 10.0, 0.0]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), unet(x, t, class_labels=y).sample, rtol=0, atol=0)
        other = net(x, t, torch.tensor([1, 2, 0, 0]))
    assert (other - net(x, t, y)).abs().max() > 1e-3  # the labels reach the network
    # through diffsteps.sample: cond={"y": labels}; two DDIM steps by hand from the same noise
    s = ds.make_schedule("linear", 1000)
    out = ds.sample(net, x, schedule=s, sampler="ddim", steps=2, spacing="trailing", cond={"y": y})
    a = s.alphas_cumprod.to(torch.float32)
    h = x
    with torch.no_grad():
        for t0, t1 in ((999, 499), (499, -1)):
            eps = unet(h, torch.full((4,), float(t0)), class_labels=y).sample
            x0 = (h - (1 - a[t0]).sqrt() * eps) / a[t0].sqrt()
            h = x0 if t1 < 0 else a[t1].sqrt() * x0 + (1 - a[t1]).sqrt() * eps
    torch.testing.assert_close(out, h, rtol=RTOL32, atol=1e-4)


def test_diffusers_unet_sizes_are_checked_before_training():
    from diffsteps.nets.diffusers_unet import new_unet

    net = new_unet(1, 8, block_out_channels=[8, 16], norm_num_groups=4, down_block_types=["DownBlock2D"] * 2,
                   up_block_types=["UpBlock2D"] * 2)
    assert net.unet.config.sample_size == 8 and net(torch.zeros(2, 1, 8, 8), torch.tensor([3.0, 7.0])).shape == (
        2, 1, 8, 8)
    with pytest.raises(ValueError, match="norm_num_groups=4 must divide every block_out_channels entry; \\[6\\]"):
        new_unet(1, 8, block_out_channels=[6, 16], norm_num_groups=4)
    with pytest.raises(ValueError, match="need 2 entries each"):
        new_unet(1, 8, block_out_channels=[8, 16], norm_num_groups=4, down_block_types=["DownBlock2D"])


# -- out: export, load in diffusers, sample on both sides ----------------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_exported_pipeline_samples_like_diffsteps_ddim(tmp_path, prediction):
    unet = tiny_unet()
    schedule = ds.make_schedule("cosine", 1000)
    out = write_pipeline(DiffusersUNet(unet), schedule, prediction, tmp_path / "pipe", clip_sample=1.0)
    pipe = DDPMPipeline.from_pretrained(str(out), local_files_only=True)
    for a, b in zip(pipe.unet.state_dict().values(), unet.state_dict().values()):
        assert torch.equal(a, b)
    loaded = ds.Schedule.from_diffusers(dict(pipe.scheduler.config))
    assert torch.equal(loaded.betas, schedule.betas)
    opts = diffusers_sampling_options(dict(pipe.scheduler.config))
    assert opts["prediction"] == prediction and opts["spacing"] == "trailing" and opts["clip_denoised"] == 1.0

    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(10)
    x = noise
    with torch.no_grad():
        for t in ddim.timesteps:
            # ε re-derived from the clipped x̂_0, as diffsteps' Denoiser does (test_diffusers_agreement)
            x = ddim.step(pipe.unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    ours = ds.sample(load_unet(out), noise, schedule=loaded, sampler="ddim", steps=10, spacing=opts["spacing"],
                     prediction=opts["prediction"], clip_denoised=opts["clip_denoised"])
    scale = x.abs().max()
    assert (ours - x).abs().max() / scale < RTOL32
    # not trivially equal: one step fewer on our side lands elsewhere
    fewer = ds.sample(load_unet(out), noise, schedule=loaded, sampler="ddim", steps=9, spacing="trailing",
                      prediction=prediction, clip_denoised=1.0)
    assert (fewer - x).abs().max() / scale > 100 * RTOL32


def test_folder_errors_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        diffusers_folder(tmp_path / "nope")
    other = tmp_path / "vae"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="is a 'AutoencoderKL', not a UNet2DModel"):
        diffusers_folder(other)
    pipe = tmp_path / "pipe"
    write_pipeline(DiffusersUNet(tiny_unet()), ds.make_schedule("linear", 100), "v", pipe)
    unet_dir, config, scheduler = diffusers_folder(pipe)
    assert unet_dir == pipe / "unet" and config["sample_size"] == 8 and scheduler["prediction_type"] == "v_prediction"
    bad = json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())
    bad["prediction_type"] = "flow_prediction"
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(bad))
    # what run.py checks first, on the composed config: the error names the option before anything is built
    from hydra import compose, initialize_config_dir

    from diffsteps.runner.build import adopt_diffusers

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["task=eval", "model=diffusers", f"model.path={pipe}"])
        with pytest.raises(ValueError, match="unsupported prediction_type 'flow_prediction'"):
            adopt_diffusers(cfg)
        bad["prediction_type"] = "sample"
        (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(bad))
        assert adopt_diffusers(cfg)  # now taken: the folder's schedule and prediction become the run's
        assert cfg.loss.prediction == "x0" and cfg.sampler.spacing == "trailing" and cfg.eval.clip_denoised == 1.0
        assert torch.equal(instantiate(cfg.schedule).betas, ds.make_schedule("linear", 100).betas)
        for overrides, match in ((["model=diffusers", "model.path=/nonexistent"], "is not a folder"),
                                 (["task=train_eval", "model=diffusers", f"model.path={pipe}"], "use task=eval")):
            with pytest.raises(ValueError, match=match):
                adopt_diffusers(compose("config", overrides=["task=eval", *overrides]))


# -- end to end: debug=fast training, export, evaluation of the folder ----------------------------------------------
TINY = ["model=diffusers_unet", "model.block_out_channels=[8,16]", "model.norm_num_groups=4",
        "model.down_block_types=[DownBlock2D,DownBlock2D]", "model.up_block_types=[UpBlock2D,UpBlock2D]",
        "eval.mse.num_samples=0", "eval.elbo.num_samples=0", "steps=[2,5]", "eval.grid_size=0", "eval.grid_columns=0"]


def test_diffusers_folder_evaluates_like_the_native_checkpoint(tmp_path):
    shared = tmp_path / "outputs"  # DIFFSTEPS_ROOT/outputs: the shared checkpoint and reference caches
    run_py(tmp_path, "debug=fast", *TINY, name="native")
    native = tmp_path / "native"
    assert not shared.exists(), "debug=fast wrote into the shared cache"
    assert list((native / "debug_cache" / "checkpoints").glob("*/last.ckpt"))
    with Image.open(native / "trajectory" / "ddim_2.gif") as gif:  # the runner's trajectory pictures, fewest steps
        assert gif.n_frames == 2
    # task=export in-process (what `run.py task=export ckpt_path=…` runs, without another process; outside Hydra
    # every key counts as set, so the model is named as trained): the checkpoint's EMA weights, checked against its
    # training config, written with the schedule's exact betas
    from hydra import compose, initialize_config_dir

    from diffsteps.runner.export import export_task

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["debug=fast", "task=export", f"ckpt_path={native / 'checkpoint.ckpt'}",
                                           f"export_dir={tmp_path / 'pipe'}", f"paths.root_dir={tmp_path}",
                                           f"paths.output_dir={tmp_path / 'export'}", "logger=none", *TINY[:5]])
    export_task(cfg)
    state = torch.load(native / "checkpoint.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    exported = UNet2DModel.from_pretrained(str(tmp_path / "pipe" / "unet"), local_files_only=True).state_dict()
    assert all(torch.equal(v, state[f"net.unet.{k}"]) for k, v in exported.items())

    run_py(tmp_path, "debug=fast", "task=eval", "model=diffusers", f"model.path={tmp_path / 'pipe'}",
           "eval.mse.num_samples=0", "eval.elbo.num_samples=0", "steps=[2,5]", "eval.grid_size=0",
           "eval.grid_columns=0", "eval.trajectory_samples=0", name="folder")
    rows = [json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("native", "folder")]
    assert [r["steps"] for r in rows[1]] == [2, 5]
    for a, b in zip(*rows):
        assert (a["steps"], a["nfe"], a["spacing"]) == (b["steps"], b["nfe"], b["spacing"])
        for key in ("fid", "kid_mean", "classifier_confidence"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert rows[0][0]["fid"] != pytest.approx(rows[0][1]["fid"], rel=1e-3)  # the two step counts differ
    assert not shared.exists()
