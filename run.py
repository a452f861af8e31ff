"""diffsteps entry point: `python run.py [group=choice ...] [key=value ...]` (Hydra); see README."""

import os

import hydra
from omegaconf import DictConfig, OmegaConf

# the launch folder, for paths.root_dir: ${hydra:runtime.cwd} is not set yet when a sweeper creates its folder
OmegaConf.register_new_resolver("launch_dir", os.getcwd, replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from diffsteps.runner import run

    return run(cfg)


if __name__ == "__main__":
    main()
