"""What the network predicts, and the conversions between predictions, in one place.

With x_t = α x_0 + σ ε, α = √ᾱ_t, σ = √(1 − ᾱ_t) (α² + σ² = 1), a network may predict
- ``epsilon``: ε (Ho et al. 2020);
- ``x0``: x_0 directly;
- ``v``: v = α ε − σ x_0 (Salimans & Ho 2022, "Progressive Distillation", eq. in §4).
All three determine the pair (x_0, ε) given x_t; the formulas below are exact inverses of one another.
"""

from __future__ import annotations

import torch

__all__ = ["PREDICTIONS", "check_prediction", "to_x0_eps", "prediction_target"]

PREDICTIONS = ("epsilon", "x0", "v")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid choices: {', '.join(PREDICTIONS)}")
    return prediction


def to_x0_eps(output: torch.Tensor, x_t: torch.Tensor, alpha, sigma, prediction: str):
    """Return (x̂_0, ε̂) from the network ``output`` at x_t:
    ε-prediction: x̂_0 = (x_t − σ ε̂)/α;  x0-prediction: ε̂ = (x_t − α x̂_0)/σ;
    v-prediction: x̂_0 = α x_t − σ v̂, ε̂ = σ x_t + α v̂.
    ``alpha``/``sigma`` are scalars or tensors broadcastable to x_t.
    """
    if prediction == "epsilon":
        return (x_t - sigma * output) / alpha, output
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    if prediction == "v":
        return alpha * x_t - sigma * output, sigma * x_t + alpha * output
    check_prediction(prediction)


def prediction_target(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma, prediction: str) -> torch.Tensor:
    """The regression target for a network of the given ``prediction`` type: ε, x_0 or v = α ε − σ x_0."""
    if prediction == "epsilon":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    check_prediction(prediction)
