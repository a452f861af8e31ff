"""How far replacement inpainting and RePaint are from the exact conditional p(x_unknown | x_known), in closed form.

On a 3-D Gaussian with strong correlations (the one tests/test_restoration.py samples) every DDPM step with
replacement, and every RePaint climb, is linear-Gaussian, so the law of the completions is a Gaussian whose moments
propagate exactly (tests/test_restoration.py checks that the sampled completions follow it). The table is
KL(law ‖ exact conditional) against the number of levels, with the NFE each method spends. No sampling: exact.

    PYTHONPATH=src:tests python experiments/inpaint_gaussian.py
"""

import itertools

import numpy as np
import torch
from test_restoration import (  # the tests' closed form
    KNOWN,
    chain_law,
    exact_conditional,
    gauss_kl,
)

import diffsteps as ds
from diffsteps.restoration.inpaint import repaint_path

torch.set_num_threads(1)


def main() -> None:
    mu = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
    corr = torch.tensor([[1.0, 0.9, -0.8], [0.9, 1.0, -0.75], [-0.8, -0.75, 1.0]], dtype=torch.float64)
    sd = torch.tensor([1.0, 0.8, 1.2], dtype=torch.float64)
    g = ds.GaussianMixture(mu[None], (corr * sd[:, None] * sd[None, :])[None])
    linear = ds.make_schedule("linear", 1000)
    mc, Cc = exact_conditional(g)
    u = ~KNOWN
    settings = [("replacement", 1, 1), ("RePaint j=1, r=10", 1, 10), ("RePaint j=10, r=10", 10, 10)]
    print("KL(completion law ‖ exact conditional), DDPM on trailing levels of the linear schedule; (NFE)")
    print("| levels | " + " | ".join(s[0] for s in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for steps in (20, 50, 100, 250, 1000):
        _, _, ts = ds.plan_sampling(linear, "ddpm", steps, "trailing")
        abars = np.append(linear.alphas_cumprod[ts.long()].numpy(), 1.0)
        cells = []
        for _, jl, jn in settings:
            path = repaint_path(steps, jl, jn)
            m, C = chain_law(g, abars, path)
            nfe = sum(b > a for a, b in itertools.pairwise(path))
            cells.append(f"{gauss_kl(m[u], C[np.ix_(u, u)], mc, Cc):.3f} ({nfe})")
        print(f"| {steps} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
