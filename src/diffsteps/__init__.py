"""diffsteps: how noise steps, schedules, samplers and losses trade diffusion-model quality against cost."""

from .core.parameterizations import PREDICTIONS, prediction_target, to_x0_eps
from .core.process import posterior_coefficients, q_posterior, q_sample
from .core.schedules import SCHEDULES, Schedule, make_schedule
from .core.spacings import SPACINGS, make_timesteps
from .evaluation.likelihood import ELBO, elbo, elbo_bpd
from .reference.gaussian_mixture import ExactEpsilon, GaussianMixture
from .sampling.api import SampleResult, StepInfo, plan_sampling, sample
from .sampling.denoiser import Denoiser
from .sampling.registry import SAMPLERS
from .steps import optimize_schedule
from .training.losses import LOSSES, DiffusionLoss, sample_timesteps

__all__ = [
    "sample", "plan_sampling", "SampleResult", "StepInfo", "SAMPLERS", "Denoiser",
    "make_schedule", "Schedule", "SCHEDULES",
    "make_timesteps", "SPACINGS",
    "PREDICTIONS", "to_x0_eps", "prediction_target",
    "q_sample", "q_posterior", "posterior_coefficients",
    "GaussianMixture", "ExactEpsilon",
    "DiffusionLoss", "LOSSES", "sample_timesteps",
    "elbo", "elbo_bpd", "ELBO",
    "optimize_schedule",
]
__version__ = "0.1.0"
