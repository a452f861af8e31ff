"""Gaussian mixtures and their exact noise predictor — a diffusion model with no training error.

If x_0 ~ Σ_k w_k N(μ_k, Σ_k), then x_t = α x_0 + σ ε (α = √ᾱ_t, σ² = 1 − ᾱ_t) is again a mixture,
p_t = Σ_k w_k N(α μ_k, α² Σ_k + σ² I), whose score is known in closed form:
    ∇log p_t(x) = −Σ_k r_k(x) (α² Σ_k + σ² I)^{-1} (x − α μ_k),   r_k = posterior responsibility of component k,
and the optimal ε-predictor (the minimiser of the denoising loss) is ε*(x, t) = −σ ∇log p_t(x)
(Vincent 2011; Song et al. 2021b). Researchers use :class:`ExactEpsilon` to study samplers free of model error;
the tests and benchmarks use it as ground truth.

Class-conditional: taking the component as the class, p(x | y = k) = N(μ_k, Σ_k), whose noised score is the k-th
term above alone, −(α²Σ_k + σ²I)^{-1}(x − α μ_k); ``ExactEpsilon(..., conditional=True)`` is the exact
class-conditional ε with the null label (``num_classes`` = K) meaning the unconditional ε — that of the mixture
itself, or of another density given as ``unconditional`` — i.e. a perfectly trained label-dropout model.
"""

from __future__ import annotations

import math

import torch

from ..core.schedules import Schedule

__all__ = ["GaussianMixture", "ExactEpsilon"]

_F64 = torch.float64


class GaussianMixture:
    """Σ_k w_k N(μ_k, Σ_k) in D dimensions, held in float64.

    ``means``: (K, D); ``covs``: (K, D, D) full, (K, D) diagonal, or a float (isotropic, shared); ``weights``: (K,)
    (default uniform). Full covariances are eigendecomposed once, so every density or score is O(K D²) per point
    (O(K D) for diagonal ones).
    """

    def __init__(self, means, covs=1.0, weights=None):
        self.means = torch.as_tensor(means, dtype=_F64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be (K, D), got shape {tuple(self.means.shape)}")
        K, D = self.means.shape
        w = torch.full((K,), 1.0 / K, dtype=_F64) if weights is None else torch.as_tensor(weights, dtype=_F64)
        if w.shape != (K,) or torch.any(w < 0) or not math.isclose(w.sum().item(), 1.0, rel_tol=1e-9):
            raise ValueError("weights must be K non-negative numbers summing to 1")
        self.weights = w
        covs = torch.as_tensor(covs, dtype=_F64)
        if covs.ndim == 0:
            covs = covs.expand(K, D).clone()
        if covs.shape == (K, D):
            self.eigvals, self.eigvecs = covs, None  # diagonal: the axes are the eigenvectors
        elif covs.shape == (K, D, D):
            covs = 0.5 * (covs + covs.transpose(1, 2))
            self.eigvals, self.eigvecs = torch.linalg.eigh(covs)
        else:
            raise ValueError(f"covs must be a float, (K, D) or (K, D, D); got shape {tuple(covs.shape)}")
        if torch.any(self.eigvals < 0):
            raise ValueError("covariances must be positive semi-definite")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def covs(self) -> torch.Tensor:
        """Full (K, D, D) covariance matrices."""
        if self.eigvecs is None:
            return torch.diag_embed(self.eigvals)
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(1, 2)

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Law of total covariance: Σ_k w_k (Σ_k + μ_k μ_kᵀ) − μ μᵀ."""
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return second - torch.outer(m, m)

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64) * self.eigvals[labels].sqrt()
        if self.eigvecs is not None:
            z = torch.einsum("nij,nj->ni", self.eigvecs[labels], z)
        x = self.means[labels] + z
        return (x, labels) if return_labels else x

    # -- the noised mixture p_t ----------------------------------------------------------------------------------
    def _components(self, x: torch.Tensor, abar: torch.Tensor):
        """Per-component log-densities of p_t at x and the whitened residuals (B, K, D)."""
        dtype = x.dtype
        a = abar.to(x.device, dtype).reshape(-1, 1, 1)  # (B or 1, 1, 1)
        resid = x[:, None, :] - a.sqrt() * self.means.to(x.device, dtype)[None]  # (B, K, D)
        if self.eigvecs is not None:
            resid = torch.einsum("bkd,kde->bke", resid, self.eigvecs.to(x.device, dtype))
        var = a * self.eigvals.to(x.device, dtype)[None] + (1 - a)  # (B or 1, K, D): eigenvalues of α²Σ_k + σ²I
        logp = (torch.log(self.weights.to(x.device, dtype))[None] - 0.5 * (resid.square() / var).sum(-1)
                - 0.5 * torch.log(var).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi))
        return logp, resid, var

    def log_prob(self, x: torch.Tensor, abar: torch.Tensor | float = 1.0) -> torch.Tensor:
        """log p_t(x) for the mixture noised to ᾱ (``abar`` = 1 is the data density itself)."""
        logp, _, _ = self._components(x, torch.as_tensor(abar, dtype=_F64))
        return torch.logsumexp(logp, dim=1)

    def responsibilities(self, x: torch.Tensor, abar: torch.Tensor | float = 1.0) -> torch.Tensor:
        logp, _, _ = self._components(x, torch.as_tensor(abar, dtype=_F64))
        return torch.softmax(logp, dim=1)

    def _scores(self, x: torch.Tensor, abar: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-component log-densities (B, K) and scores ∇log N(x; α μ_k, α²Σ_k + σ²I) (B, K, D)."""
        logp, resid, var = self._components(x, torch.as_tensor(abar, dtype=_F64))
        g = resid / var  # (B, K, D) in the eigenbasis
        if self.eigvecs is not None:
            g = torch.einsum("bke,kde->bkd", g, self.eigvecs.to(x.device, x.dtype))
        return logp, -g

    def score(self, x: torch.Tensor, abar: torch.Tensor | float) -> torch.Tensor:
        """∇_x log p_t(x) = −Σ_k r_k (α²Σ_k + σ²I)^{-1}(x − α μ_k), evaluated in each component's eigenbasis."""
        logp, g = self._scores(x, abar)
        return (torch.softmax(logp, dim=1)[:, :, None] * g).sum(1)

    def component_score(self, x: torch.Tensor, abar: torch.Tensor | float, k: torch.Tensor) -> torch.Tensor:
        """∇_x log p_t(x | component k_b) = −(α²Σ_k + σ²I)^{-1}(x − α μ_k) for each row b, ``k`` (B,) int."""
        _, g = self._scores(x, abar)
        return g[torch.arange(len(x), device=x.device), k.to(x.device)]

    def eps(self, x: torch.Tensor, abar: torch.Tensor | float) -> torch.Tensor:
        """The exact noise predictor ε*(x) = −σ ∇log p_t(x) = E[ε | x_t = x]."""
        abar = torch.as_tensor(abar, dtype=_F64)
        sigma = (1 - abar).sqrt().to(x.dtype).reshape(-1, 1)
        return -sigma * self.score(x, abar)


class ExactEpsilon(torch.nn.Module):
    """``model(x, t)`` for a :class:`GaussianMixture` under ``schedule``: the exact ε-prediction at real-valued
    training time t (ᾱ(t) from the schedule's continuous extension). Accepts x of any shape (B, ...) whose trailing
    dimensions flatten to the mixture's D; computes in x's dtype.

    ``conditional=True``: ``model(x, t, y)`` with class = component, as a class-conditional net: ``num_classes`` = K,
    ``y`` (B,) in 0 … K (K, or y=None, the null label) gives ε of N(μ_y, Σ_y), the null label the unconditional ε:
    that of ``unconditional`` (any :class:`GaussianMixture` of the same dimension) when given, else of the mixture
    itself (the true marginal p(x) = Σ_k w_k p(x | k))."""

    def __init__(self, mixture: GaussianMixture, schedule: Schedule, conditional: bool = False,
                 unconditional: GaussianMixture | None = None):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule
        if unconditional is not None and not conditional:
            raise ValueError("unconditional= is the null label's density: it needs conditional=True")
        if unconditional is not None and unconditional.dim != mixture.dim:
            raise ValueError(f"the unconditional density has dimension {unconditional.dim}, the mixture "
                             f"{mixture.dim}")
        self.conditional = bool(conditional)
        self.unconditional = unconditional if unconditional is not None else mixture
        self.num_classes = len(mixture.means) if conditional else 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None and not self.conditional:
            raise ValueError("this ExactEpsilon is unconditional (conditional=False) and takes no labels y")
        t = t.detach().to("cpu", _F64)
        abar = self.schedule.alpha_bar_at(t[:1] if bool(torch.all(t == t[0])) else t).to(x.device)
        flat = x.reshape(len(x), -1)
        if flat.shape[1] != self.mixture.dim:
            raise ValueError(f"x flattens to {flat.shape[1]} features, the mixture has {self.mixture.dim}")
        if not self.conditional:
            return self.mixture.eps(flat, abar).reshape(x.shape)
        K = self.num_classes
        y = torch.full((len(x),), K, dtype=torch.long) if y is None else torch.as_tensor(y).reshape(-1).long()
        if bool(((y < 0) | (y > K)).any()):
            raise ValueError(f"labels must lie in 0 … {K} ({K}: the null label), got {y.tolist()}")
        y = y.to(x.device)
        out = self.unconditional.eps(flat, abar)
        has = y < K
        if bool(has.any()):
            sigma = (1 - abar).sqrt().to(x.dtype).reshape(-1, 1)
            cond = -sigma * self.mixture.component_score(flat, abar, y.clamp(max=K - 1))
            out = torch.where(has[:, None], cond, out)
        return out.reshape(x.shape)
