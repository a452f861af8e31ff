"""Training throughput: the Lightning ``DiffusionModule`` against a plain PyTorch loop on the same network and batch.

Both do the same work per step — draw t and ε, noise the batch, the ε-MSE loss, backward, AdamW with gradient
clipping — the plain loop with no framework at all. Each variant runs with and without EMA weight averaging (the
plain loop updates its EMA copy with ``torch._foreach_lerp_``, as the Lightning callback does). Reported: training
samples per second after a warm-up, best of ``--repeats`` interleaved timed windows, and the ratio Lightning / plain
(target ≥ 0.95).

On a GPU (``--device cuda``), also the UNet at 32×32×3 in bf16 autocast: images per second and model FLOP
utilisation, MFU = (FLOPs of one training step, counted by ``torch.utils.flop_counter``) × steps/s ÷ peak
(``--peak-tflops``, default 989: H100 SXM dense bf16).

Run: ``python experiments/train_throughput.py [--steps 60] [--batch 128] [--threads 2] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

import diffsteps as ds
from diffsteps.data import DigitsData
from diffsteps.nets import UNet
from diffsteps.training.ema import ema_callback
from diffsteps.training.losses import DiffusionLoss
from diffsteps.training.module import DiffusionModule, warmup_cosine

warnings.filterwarnings("ignore", message=".*WeightAveraging callback with a model that overrides")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def plain_loop(net, data: torch.Tensor, schedule, steps: int, batch: int, ema: bool, device: str,
               amp: bool = False) -> float:
    """Seconds per step of a hand-written loop, timed after ``steps // 4`` warm-up steps."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    avg = [p.detach().clone() for p in net.parameters()] if ema else None
    g = torch.Generator().manual_seed(0)
    abar = schedule.alphas_cumprod.float().to(device)
    warm = max(steps // 4, 2)
    for i in range(steps + warm):
        if i == warm:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x0 = data[idx].to(device, non_blocking=True)
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=g).to(device)
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, *[1] * (x0.ndim - 1))
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = (net(xt, t.float()) - eps).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if avg is not None:
            torch._foreach_lerp_(avg, [p.detach() for p in net.parameters()], 1 - 0.999)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def lightning_loop(net, datamodule, schedule, steps: int, ema: bool, device: str, precision: str = "32-true") -> float:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    class Clock(Callback):
        def __init__(self, warm):
            self.warm, self.t0, self.t1 = warm, None, None

        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == self.warm:
                if device == "cuda":
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, *args):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t1 = time.perf_counter()

    warm = max(steps // 4, 2)
    clock = Clock(warm)
    module = DiffusionModule(net, schedule, DiffusionLoss("simple"),
                             lr_scheduler=lambda opt, total_steps: warmup_cosine(opt, total_steps, warmup_steps=0))
    callbacks = [clock] + ([ema_callback(0.999)] if ema else [])
    trainer = L.Trainer(accelerator=device, devices=1, max_steps=steps + warm, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0, callbacks=callbacks,
                        precision=precision)
    trainer.fit(module, datamodule=datamodule)
    # on_train_end follows the EMA callback's final copy; that one-off cost is part of the run
    return (clock.t1 - clock.t0) / steps


def cpu_table(args) -> None:
    torch.manual_seed(0)
    schedule = ds.make_schedule("linear", 1000)
    dm = DigitsData(batch_size=args.batch)
    dm.setup("fit")
    data = dm.real_samples(split="train").contiguous()
    base = UNet(in_channels=1, image_size=8)
    print(f"### training throughput, digits UNet ({sum(p.numel() for p in base.parameters()) / 1e6:.2f} M params), "
          f"batch {args.batch}, {torch.get_num_threads()} threads, {args.steps} timed steps, best of {args.repeats}\n")
    print("| EMA | plain PyTorch (samples/s) | Lightning module (samples/s) | ratio |")
    print("|---|---|---|---|")
    for ema in (False, True):
        plain, light = [], []
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits both sides alike
            plain.append(plain_loop(copy.deepcopy(base), data, schedule, args.steps, args.batch, ema, "cpu"))
            light.append(lightning_loop(copy.deepcopy(base), dm, schedule, args.steps, ema, "cpu"))
        plain, light = min(plain), min(light)
        print(f"| {'yes' if ema else 'no'} | {args.batch / plain:.0f} | {args.batch / light:.0f} | "
              f"{plain / light:.3f} |")
    print()


def gpu_table(args) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    schedule = ds.make_schedule("linear", 1000)
    net = UNet(in_channels=3, image_size=32, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
               attention_resolutions=(16,), num_groups=32).cuda()
    data = torch.randn(50_000, 3, 32, 32).clamp(-1, 1)
    x = torch.randn(args.gpu_batch, 3, 32, 32, device="cuda")
    t = torch.rand(args.gpu_batch, device="cuda") * 999
    with FlopCounterMode(display=False) as fc, torch.autocast("cuda", dtype=torch.bfloat16):
        net(x, t).float().square().mean().backward()
    flops = fc.get_total_flops()
    sec = plain_loop(net, data, schedule, args.steps, args.gpu_batch, False, "cuda", amp=True)
    print(f"### GPU {torch.cuda.get_device_name()}: UNet 32×32×3 ({sum(p.numel() for p in net.parameters()) / 1e6:.1f}"
          f" M params), bf16 autocast, batch {args.gpu_batch}\n")
    print(f"images/s {args.gpu_batch / sec:.0f}; {flops / 1e12:.2f} TFLOP per step; "
          f"MFU {flops / sec / (args.peak_tflops * 1e12):.1%} of {args.peak_tflops} TFLOP/s\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--gpu-batch", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        gpu_table(args)
    else:
        cpu_table(args)


if __name__ == "__main__":
    main()
