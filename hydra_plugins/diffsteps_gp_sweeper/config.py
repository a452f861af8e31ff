"""The ``gp`` sweeper's options, registered as ``hydra/sweeper=gp``."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class WandbConf:
    """A W&B summary run of the sweep (results table and plots). The trials themselves already share the W&B group
    the runner derives from the sweep folder; ``group: null`` names the summary run's group the same way."""

    enabled: bool = False
    project: str = "diffsteps"
    group: Optional[str] = None
    mode: Optional[str] = None  # online | offline | disabled; null: WANDB_MODE or wandb's own default


def _default_space() -> Dict[str, Any]:
    # nested rather than dotted keys, so `~hydra.sweeper.params.loss` removes a dimension from the command line
    return {
        "steps": "int(interval(5, 200))",
        "optimizer": {"lr": "tag(log, interval(1e-5, 1e-2))"},
        "loss": {"denoise_weight": "interval(0.1, 1.0)"},  # λ·L_kind + (1 − λ)·L_vlb, every loss but vlb
    }


@dataclass
class GPSweeperConf:
    _target_: str = "hydra_plugins.diffsteps_gp_sweeper.gp_sweeper.GPSweeper"
    n_calls: int = 20  # trials in all, counting those of a resumed sweep
    n_initial_points: int = 5  # random trials before the GP proposes
    acq_func: str = "gp_hedge"  # gp_hedge | EI | LCB | PI
    random_state: Optional[int] = 0
    n_jobs: int = 1  # trials per batch, launched together (in parallel with e.g. hydra/launcher=joblib)
    max_failure_rate: float = 0.5  # stop once more than this share of the trials failed (checked from 5 trials)
    # search space in Hydra's override grammar (nested or dotted keys); sweep overrides on the command line join it
    params: Optional[Dict[str, Any]] = field(default_factory=_default_space)
    wandb: WandbConf = field(default_factory=WandbConf)


ConfigStore.instance().store(group="hydra/sweeper", name="gp", node=GPSweeperConf, provider="diffsteps")
