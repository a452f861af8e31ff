"""A tiny Hydra app for the gp sweeper's tests: returns a quadratic with its minimum 1.0 at x = 0.3, y = 7, lr = 1e-3.

It raises where x > fail_above and returns NaN where x < nan_below, so the tests can place failures in the space.
"""

import math
import os

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    if cfg.x > cfg.fail_above:
        raise RuntimeError(f"x={cfg.x} is beyond fail_above={cfg.fail_above}")
    if cfg.x < cfg.nan_below:
        return math.nan
    with open("pid.txt", "w") as f:  # the parent of the process that ran the job: the joblib test checks it
        f.write(f"{os.getpid()} {os.getppid()}")
    return 1.0 + (cfg.x - 0.3) ** 2 + ((cfg.y - 7) / 10) ** 2 + 0.1 * math.log10(cfg.lr / 1e-3) ** 2 + cfg.offset


if __name__ == "__main__":
    main()
