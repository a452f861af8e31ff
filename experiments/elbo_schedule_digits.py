"""ELBO-optimal chains (Watson et al. 2021) for the ancestral sampler on a trained digits model, against evenly
spaced chains: bits/dim of held-out digits.

The model is the default ``python run.py`` digits UNet, loaded from ``--ckpt`` (a diffsteps checkpoint, e.g.
``outputs/checkpoints/<key>/last.ckpt``). :func:`diffsteps.optimize_schedule` with ``method="elbo"`` finds, by one
dynamic programme over ``--candidates`` integer timesteps, the K-step chain minimising the bound on ``--train``
training digits — once with the Gaussian decoder (a density: "dp-gauss", the "continuous" column) and once with the
discretised decoder on the digits' 17 grey levels that ``python run.py`` reports (a bound on the discrete NLL:
"dp-17"). Each chain — both optimised ones and the evenly spaced trailing (DDIM's, what the run's ELBO column uses)
and linspace ones — is then scored on the held-out digits by :func:`diffsteps.elbo_bpd` with both decoders.

Run: ``python experiments/elbo_schedule_digits.py --ckpt PATH [--k 10 20] [--candidates 200] [--train 256]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import diffsteps as ds
from diffsteps.core.spacings import make_timesteps, to_integer_timesteps

ROOT = Path(__file__).resolve().parents[1]


def load(ckpt: str):
    """The default run's config, network and data module, with the checkpoint's (EMA) weights."""
    from hydra import compose, initialize_config_dir

    from diffsteps.runner.build import build
    from diffsteps.runner.checkpoints import load_weights
    from diffsteps.runner.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none"])
    schedule = ds.make_schedule("linear", 1000)
    datamodule, module = build(cfg, schedule)
    load_weights(module, ckpt)
    datamodule.setup()
    return module.net.eval(), module.prediction, schedule, datamodule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--k", type=int, nargs="+", default=[10, 20])
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    net, prediction, schedule, dm = load(a.ckpt)
    train = dm.real_samples(a.train, split="train")
    held = dm.real_samples(None, split="val")
    runs = {}  # decoder → the DP's chains; "dp-gauss" minimises the density bound, "dp-17" the 17-level one
    for name, discrete in (("dp-gauss", False), ("dp-17", True)):
        t0 = time.perf_counter()
        runs[name] = ds.optimize_schedule(net, schedule, sampler="ddpm", nfe=a.k, noise=None, method="elbo",
                                          data=train, prediction=prediction, candidates=a.candidates, seed=a.seed,
                                          discrete=discrete, levels=17)
        cost = runs[name][0][1]["cost"]
        print(f"# ELBO DP ({name}): {a.candidates} candidates, {len(train)} training digits, "
              f"{cost['model_calls']} model calls (batches of {len(train)}), {time.perf_counter() - t0:.1f} s")
    print(f"# scored on {len(held)} held-out digits")

    def score(chain: torch.Tensor, discrete: bool) -> tuple[float, float]:
        out = ds.elbo_bpd(net, held, schedule, timesteps=chain, prediction=prediction, discrete=discrete,
                          levels=17, generator=torch.Generator().manual_seed(a.seed), batch_size=len(held))
        return out["elbo_bpd"], out["elbo_bpd_stderr"]

    print(f"{'K':>3} {'chain':<10} {'continuous bits/dim':>20} {'17-level bits/dim':>18}  timesteps")
    for i, k in enumerate(a.k):
        chains = {name: res[i][0].flip(0).long() for name, res in runs.items()}
        for name in ("trailing", "linspace"):
            chains[name] = torch.unique(to_integer_timesteps(make_timesteps(name, k, schedule)))
        for name, chain in chains.items():
            (c, cs), (d, dse) = score(chain, False), score(chain, True)
            shown = chain.tolist() if k <= 10 else chain.tolist()[:6] + ["…"] + chain.tolist()[-3:]
            print(f"{k:>3} {name:<10} {c:13.3f} ± {cs:.3f} {d:11.3f} ± {dse:.3f}  {shown}", flush=True)
        print(f"{k:>3} (the DPs' own estimates on the training digits: "
              + ", ".join(f"{name} {res[i][1]['elbo_bpd']:.3f}" for name, res in runs.items()) + ")")


if __name__ == "__main__":
    main()
