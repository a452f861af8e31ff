"""The ``sampler`` and ``objective`` config groups as objects (their ``_target_``s): checked when built, so a bad
name or option fails with the valid choices before any data is loaded; and the ``encoder`` group's reading of
``prompts`` (:func:`prompt_labels`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..core.spacings import SPACINGS
from ..sampling.registry import SAMPLERS, get_sampler

# objective name → the metrics.json key it reads
OBJECTIVES = {"fid": "fid", "kid": "kid_mean", "mse": "mse", "nll": "nll", "elbo": "elbo_bpd"}
OBJECTIVE_COSTS = {"nfe": "nfe", "seconds": "seconds_per_sample"}
# the least value a metric can take, where it has one (KID's unbiased estimate, an NLL and bits per dimension of
# continuous data can be negative): a target below it is met by no step count
OBJECTIVE_FLOORS = {"fid": (0.0, "a squared Fréchet distance"), "mse": (0.0, "a mean of squared errors")}


@dataclass(frozen=True)
class SamplerChoice:
    """A sampler of :data:`diffsteps.sampling.registry.SAMPLERS`, its timestep spacing (a name in ``SPACINGS`` or an
    explicit decreasing list) and its options (e.g. ``eta`` for ddim). The name, the option names and the option
    values are checked here; steps against the schedule by :func:`diffsteps.plan_sampling` in the runner.
    ``guidance_scale`` / ``guidance_interval``: classifier-free guidance of a class-conditional model (any
    sampler; :mod:`diffsteps.sampling.guidance`), None for none. ``fuse``: :func:`diffsteps.sample`'s ``fuse``.
    ``model_timesteps``: :func:`diffsteps.sample`'s decoupled model-evaluation times, next to an explicit
    ``spacing`` (set from a decoupled schedule artefact by :func:`~diffsteps.runner.optimize.resolve_spacing`)."""

    name: str
    spacing: Any = "trailing"
    options: Mapping[str, Any] = field(default_factory=dict)
    guidance_scale: float | None = None
    guidance_interval: Any = None
    fuse: bool = False  # the sampler's arithmetic as torch.compile'd loops (diffsteps.sampling.arith)
    model_timesteps: Any = None

    def __post_init__(self):
        options = OmegaConf.to_container(self.options, resolve=True) if OmegaConf.is_config(self.options) else dict(
            self.options or {})
        object.__setattr__(self, "options", options)
        if OmegaConf.is_config(self.spacing):
            object.__setattr__(self, "spacing", OmegaConf.to_container(self.spacing, resolve=True))
        spec = get_sampler(self.name)  # unknown name: valid choices in the message
        unknown = sorted(set(options) - set(spec.options))
        if unknown:
            raise ValueError(f"sampler {self.name!r} has no option(s) {unknown}; its options: "
                             f"{', '.join(spec.options) or 'none'}")
        if self.model_timesteps is not None:
            self._check_model_timesteps()
        if isinstance(self.spacing, str) and self.spacing not in SPACINGS:
            raise ValueError(f"unknown sampler.spacing {self.spacing!r}; valid choices: {', '.join(SPACINGS)} or a "
                             "list of timesteps")
        from ..sampling.levels import Levels

        spec.fn(None, None, Levels((), ()), **options)  # a pass over zero steps: the sampler's own value checks
        if OmegaConf.is_config(self.guidance_interval):
            object.__setattr__(self, "guidance_interval", OmegaConf.to_container(self.guidance_interval))
        from ..sampling.guidance import check_guidance_options

        scale, interval = check_guidance_options(self.guidance_scale, self.guidance_interval)
        object.__setattr__(self, "guidance_scale", scale)
        object.__setattr__(self, "guidance_interval", None if interval is None else list(interval))

    def _check_model_timesteps(self) -> None:
        from ..sampling.api import ONE_CALL_PER_LEVEL

        mt = self.model_timesteps
        mt = OmegaConf.to_container(mt, resolve=True) if OmegaConf.is_config(mt) else mt
        object.__setattr__(self, "model_timesteps", [float(v) for v in mt])
        if self.name not in ONE_CALL_PER_LEVEL:
            raise ValueError(f"sampler.model_timesteps needs a sampler that calls the model once per level "
                             f"({', '.join(ONE_CALL_PER_LEVEL)}), got {self.name!r}")
        # one model call per timestep (the last step's call is the one into the data)
        if not isinstance(self.spacing, list) or len(self.spacing) != len(self.model_timesteps):
            raise ValueError(f"sampler.model_timesteps ({len(self.model_timesteps)} times) needs an explicit "
                             f"sampler.spacing list of as many timesteps, got {self.spacing!r}")

    @property
    def deterministic(self) -> bool:
        """Whether the samples are a fixed function of the initial noise (DDIM is unless η > 0)."""
        return SAMPLERS[self.name].is_deterministic(**self.options)


@dataclass(frozen=True)
class Objective:
    """What ``run.py`` returns for sweepers: metric ``name`` (a key of :data:`OBJECTIVES`) of one step count's row
    plus ``cost_weight`` × its cost (``nfe``: model evaluations per sample; ``seconds``: sampling seconds per sample),
    the quality/speed trade-off a sweep minimises."""

    name: str
    cost: str = "nfe"
    cost_weight: float = 0.0

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; valid choices: {', '.join(OBJECTIVES)}")
        if self.cost not in OBJECTIVE_COSTS:
            raise ValueError(f"unknown objective.cost {self.cost!r}; valid choices: {', '.join(OBJECTIVE_COSTS)}")
        w = self.cost_weight
        if isinstance(w, bool) or not (isinstance(w, (int, float)) and math.isfinite(w)):
            raise ValueError(f"objective.cost_weight must be a finite number, got {w!r}")

    @property
    def metric(self) -> str:
        """The metrics.json key the objective reads."""
        return OBJECTIVES[self.name]

    def value(self, row: Mapping[str, Any]) -> float:
        """The metric in ``row`` + ``cost_weight`` × its cost; NaN (a failed trial to a sweeper) when the row lacks
        the metric."""
        value = float(row.get(self.metric, math.nan))
        return value + float(self.cost_weight) * float(row[OBJECTIVE_COSTS[self.cost]]) if self.cost_weight else value


def prompt_labels(cfg: DictConfig, spec, conditional: bool):
    # spec: the data's DataSpec (not imported here: the data package imports Lightning)
    """``cfg.prompts`` read by the ``encoder`` (``_target_``) as class labels (B,), checked against the data; None
    without prompts. Called before training, so a prompt the encoder cannot read fails in seconds."""
    prompts = OmegaConf.select(cfg, "prompts")
    if not prompts:
        return None
    from hydra.utils import instantiate

    if OmegaConf.select(cfg, "encoder") is None:
        raise ValueError("prompts need a conditioning encoder: add encoder=digits (the shipped digit-prompt reader) "
                         "or encoder=sentence_transformers encoder.path=<local folder>")
    if not conditional:
        raise ValueError("prompts need a class-conditional model: set data.conditional=true (labelled data)")
    encoder = instantiate(cfg.encoder)
    if encoder.num_classes != spec.num_classes:
        raise ValueError(f"the encoder reads {encoder.num_classes} classes, the data have {spec.num_classes}")
    return encoder.labels([str(p) for p in prompts])
