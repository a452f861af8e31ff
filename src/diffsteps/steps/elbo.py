"""ELBO-optimal chains for ancestral samplers (Watson et al. 2021, "Learning to Efficiently Sample from Diffusion
Probabilistic Models"): the K-step bound decomposes into terms that each depend on one pair of neighbouring
timesteps, so the chain τ_1 < … < τ_K minimising it is a shortest path, found for every K by one dynamic programme."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..core.process import posterior_coefficients
from ..core.schedules import Schedule
from ..evaluation.likelihood import check_discrete_data, discretized_gaussian_log_likelihood
from ..sampling.denoiser import Denoiser

__all__ = ["ElboChain", "elbo_chains"]

_F64 = torch.float64


@dataclass
class ElboChain:
    """``timesteps`` the chain τ_1 < … < τ_K (long, increasing, as :func:`~diffsteps.elbo` takes it) and its
    bound ``bpd`` (bits per dimension, mean over the data)."""

    timesteps: torch.Tensor
    bpd: float


@torch.no_grad()
def elbo_chains(model: Callable, data: torch.Tensor, schedule: Schedule, candidates, k_max: int, *,
                prediction: str = "epsilon", variance: str = "posterior", discrete: bool = False,
                levels: int = 256, generator: torch.Generator | None = None) -> tuple[dict[int, ElboChain], int]:
    """The chains over integer ``candidates`` minimising the K-step bound of :func:`~diffsteps.elbo` (``variance``
    ``posterior`` or ``beta``) for every K ≤ ``k_max``; returns ({K: chain}, model calls). The decoder is
    ``elbo``'s: a Gaussian density, or with ``discrete`` the discretised Gaussian on ``levels`` values in [−1, 1]
    (Ho et al. 2020, eq. 13; digits: 17) — the bound on the discrete NLL that the runner reports for such data.

    L = L_prior(τ_K) + Σ_i L(τ_{i−1} | τ_i) + L_dec(τ_1), each term estimated as :func:`~diffsteps.elbo` estimates
    it: L(s | t) = E KL(q(x_s | x_t, x_0) ‖ p(x_s | x_t)) with x_t drawn from q(x_t | x_0). ``elbo`` draws one noise
    per timestep in chain order, noisiest first (draw p for the p-th timestep from the top, the decoder's last),
    so the terms here use the same draws by depth: the transition out of t at depth p and the decoder at depth p
    use draw p of ``generator``. Then the DP over (depth, timestep) is exact for that estimator: for the returned
    chain its value equals ``elbo(..., timesteps=chain, generator=<same seed>)``'s mean to round-off. Cost: one
    model call per candidate and depth, N·k_max in all; the DP is O(k_max N²)."""
    if variance not in ("posterior", "beta"):
        raise ValueError(f"the ELBO DP supports variance 'posterior' or 'beta', got {variance!r}")
    cand = torch.as_tensor(candidates).long().unique()  # increasing
    T = schedule.num_timesteps
    if cand.numel() < 1 or int(cand.min()) < 0 or int(cand.max()) > T - 1:
        raise ValueError(f"ELBO candidates must be integers in [0, {T - 1}]")
    if discrete:
        check_discrete_data(data, levels)
    x0 = data.to(_F64)
    n_data, D = x0.shape[0], x0[0].numel()
    bits = D * math.log(2.0)
    abar = schedule.alphas_cumprod[cand]
    N = len(cand)
    k_max = min(k_max, N)
    aK = abar
    prior = (0.5 * (1 - aK[None] + aK[None] * x0.reshape(n_data, -1, 1).square() - 1 - torch.log1p(-aK)[None])
             ).sum(1).mean(0) / bits  # (N,)
    # d2[p, j]: mean over the data of ‖x_0 − x̂_0‖² at candidate j with draw p; nll[p, j] the discretised
    # decoder's −log P(x_0) there (its variance 1 − ᾱ_j as in elbo), which, unlike the density, is not a function of d2
    d2 = torch.zeros(k_max, N, dtype=_F64)
    nll = torch.zeros(k_max, N, dtype=_F64)
    calls = 0
    denoise = Denoiser(model, prediction)  # as elbo calls the model: x in the model's dtype, t a float tensor
    for p in range(k_max):
        eps = torch.randn(x0.shape, generator=generator, dtype=_F64)
        for j in range(N):
            a = abar[j].item()
            x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
            x0_hat, _ = denoise(x_t, float(cand[j]), math.sqrt(a), math.sqrt(1 - a))
            calls += 1
            d2[p, j] = (x0 - x0_hat).reshape(n_data, -1).square().sum(1).mean()
            if discrete:
                logp = discretized_gaussian_log_likelihood(x0, x0_hat, 1.0 - a, levels)
                nll[p, j] = -logp.reshape(n_data, -1).sum(1).mean()
    # transition t = cand[j] → s = cand[i], i < j
    at, as_ = abar[None, :], abar[:, None]  # [i, j]
    c0, _, post, beta = posterior_coefficients(at, as_)
    var_p = post if variance == "posterior" else beta
    fixed = 0.5 * D * (torch.log(var_p) - torch.log(post) + post / var_p - 1.0)
    lower = torch.tril(torch.ones(N, N, dtype=torch.bool), -1).T  # i < j
    dec_var = 1.0 - abar
    if discrete:
        decoder = nll / bits  # (k, N)
    else:
        decoder = 0.5 * (d2 / dec_var[None] + D * (torch.log(dec_var)[None] + math.log(2 * math.pi))) / bits
    value = prior.numpy().copy()  # depth 1: the top of the chain
    back: list[np.ndarray] = []
    chains: dict[int, ElboChain] = {}
    for depth in range(1, k_max + 1):
        final = value + decoder[depth - 1].numpy()
        j = int(np.argmin(final))
        if np.isfinite(final[j]):
            path = [j]
            for b in reversed(back):
                path.append(int(b[path[-1]]))
            chains[depth] = ElboChain(cand[path], float(final[j]))
        if depth == k_max:
            break
        trans = torch.where(lower, (fixed + 0.5 * c0.square() / var_p * d2[depth - 1][None]) / bits, math.inf)
        total = value[None, :] + trans.numpy()  # [s, t]: reach t at this depth, then t → s
        arg = np.argmin(total, axis=1)
        value = total[np.arange(N), arg]
        back.append(arg)
    return chains, calls
