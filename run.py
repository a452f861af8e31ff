"""diffsteps entry point: `python run.py [group=choice ...] [key=value ...]` (Hydra); see README."""

import hydra
from omegaconf import DictConfig

from diffsteps.runner.resolvers import register_resolvers

# before Hydra composes: ${launch_dir:} (paths.root_dir) and ${run_stamp:...} (unique run and sweep folders)
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from diffsteps.runner import run
    from diffsteps.runner.errors import report_in_one_line

    return report_in_one_line(run)(cfg)  # a refused input: its message, not a stack trace above it


if __name__ == "__main__":
    main()
