"""OmegaConf resolvers the configs use, registered wherever configs are composed: ``run.py`` at import, and tests
that compose with Hydra's compose API (``register_resolvers()``, idempotent).

- ``${launch_dir:}``: the folder ``run.py`` was started from (``paths.root_dir``'s default); ``${hydra:runtime.cwd}``
  is not set yet when a sweeper creates its folder.
- ``${run_stamp:PATTERN}``: a folder name for one run or sweep (``hydra.run.dir``, ``hydra.sweep.dir``): the time
  in ``strftime`` PATTERN to the microsecond, then this process's id and four random hex digits, e.g.
  ``2026-12-02/04-28-07.123456-4242-9f3a``. Hydra's ``${now:%H-%M-%S}`` has one-second resolution, so two runs
  started in the same second shared a folder and the second overwrote the first's results; the pid separates
  processes on one machine, the random part runs on several machines writing to one file system (or a reused
  pid). Cached like ``now``: every reference to the same PATTERN in one config — and in the jobs a sweep composes
  from it (Hydra copies the cache) — is the same folder.
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime

from omegaconf import OmegaConf

__all__ = ["register_resolvers", "run_stamp"]

DEFAULT_PATTERN = "%Y-%m-%d/%H-%M-%S"


def run_stamp(pattern: str = DEFAULT_PATTERN) -> str:
    """``now.strftime(pattern)``, then ``.<microseconds>-<pid>-<4 random hex digits>``: unique per call."""
    now = datetime.now()
    return f"{now.strftime(pattern)}.{now.microsecond:06d}-{os.getpid()}-{secrets.token_hex(2)}"


def register_resolvers() -> None:
    """Register ``launch_dir`` and ``run_stamp`` (replacing earlier registrations: safe to call again)."""
    OmegaConf.register_new_resolver("launch_dir", os.getcwd, replace=True)
    # use_cache: the value is fixed the first time a config resolves it (as Hydra's own `now`)
    OmegaConf.register_new_resolver("run_stamp", lambda pattern=DEFAULT_PATTERN: run_stamp(str(pattern)),
                                    use_cache=True, replace=True)
