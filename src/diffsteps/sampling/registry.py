"""The sampler registry: each sampler's function and what it is (integer steps, stochastic, finite σ at the start)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from .adaptive import sample_adaptive
from .samplers import (
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_euler,
    sample_heun,
    sample_ipndm,
    sample_plms,
    sample_pndm,
    sample_sde_euler,
    sample_unipc,
)


@dataclass(frozen=True)
class SamplerSpec:
    fn: Callable[..., torch.Tensor]
    integer_steps: bool  # visits only integer timesteps (the discrete chain)
    stochastic: bool  # draws fresh noise at every step, whatever its options
    finite_sigma: bool  # needs σ̃ < ∞ at the first level (not ᾱ = 0, i.e. no zero-terminal-SNR start)
    half_steps: bool = False  # also evaluates the model halfway between timesteps (the level table gets them)
    # chooses its own steps: gets only the start and end levels and the schedule (for λ ↔ t), no ``steps``
    adaptive: bool = False

    @property
    def options(self) -> tuple[str, ...]:
        params = inspect.signature(self.fn).parameters.values()
        internal = ("progress", "generator", "callback", "schedule")  # passed by sample() itself, not sampler options
        return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in internal)

    def is_deterministic(self, **options) -> bool:
        """Whether the output is a fixed function of the initial noise (DDIM is, unless η > 0)."""
        return not self.stochastic and not options.get("eta", 0.0)


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, integer_steps=True, stochastic=True, finite_sigma=False),
    "ddim": SamplerSpec(sample_ddim, integer_steps=True, stochastic=False, finite_sigma=False),
    "euler": SamplerSpec(sample_euler, integer_steps=False, stochastic=False, finite_sigma=True),
    "heun": SamplerSpec(sample_heun, integer_steps=False, stochastic=False, finite_sigma=True),
    "sde_euler": SamplerSpec(sample_sde_euler, integer_steps=False, stochastic=True, finite_sigma=True),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, integer_steps=False, stochastic=False, finite_sigma=False),
    "dpmpp_3m": SamplerSpec(sample_dpmpp_3m, integer_steps=False, stochastic=False, finite_sigma=False),
    # UniPC's corrector and UniC coefficients divide by h = ∞ on a step from ᾱ = 0; ipndm, plms step in σ̃
    "unipc": SamplerSpec(sample_unipc, integer_steps=False, stochastic=False, finite_sigma=True),
    "ipndm": SamplerSpec(sample_ipndm, integer_steps=False, stochastic=False, finite_sigma=True),
    "plms": SamplerSpec(sample_plms, integer_steps=False, stochastic=False, finite_sigma=True),
    "pndm": SamplerSpec(sample_pndm, integer_steps=False, stochastic=False, finite_sigma=True, half_steps=True),
    # error-controlled steps in λ, which is −∞ at ᾱ = 0
    "adaptive": SamplerSpec(sample_adaptive, integer_steps=False, stochastic=False, finite_sigma=True,
                            adaptive=True),
}




def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid choices: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
