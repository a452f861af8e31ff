"""A fork server for the tests' ``python run.py`` runs (``helpers.run_command``): it imports what every run imports —
torch, Lightning (which pulls in torch._dynamo and scipy.signal), torchmetrics, Hydra, matplotlib and the runner,
7–8 s of CPU on the 2-core machine — once, then forks one child per run. A child is a fresh process as far
as the run can tell: its own session (killable as a group), working directory, environment, argv, ``sys.path[0]``
and stdout/stderr files; it runs the script as ``__main__`` (``runpy``) and exits through the interpreter's normal
shutdown with the script's exit code. Nothing has run in this server but imports: no Hydra or Lightning state, no
torch thread pool (OMP_NUM_THREADS is fixed when the server starts), so a fork sees what a new interpreter would.
Not wandb: it makes its media folder when imported and removes it when the process that imported it ends, so every
child imports its own.

Protocol, one JSON object per line: request {argv, env, cwd, stdout, stderr} on stdin; replies {"pid"} at the fork
and {"rc"} when the child has ended, on stdout.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback

import hydra  # noqa: F401
import lightning  # noqa: F401
import lightning.pytorch.loggers  # noqa: F401
import matplotlib.pyplot  # noqa: F401
import torch  # noqa: F401
import torchmetrics  # noqa: F401

import diffsteps.reporting.plots  # noqa: F401
import diffsteps.reporting.trajectory  # noqa: F401
import diffsteps.runner.evaluate  # noqa: F401
import diffsteps.runner.resolvers  # noqa: F401
import diffsteps.runner.run  # noqa: F401
import diffsteps.runner.train  # noqa: F401


def child(req: dict) -> None:
    """Become the run: never returns (SystemExit with the script's exit code)."""
    os.setsid()
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                           (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        new = os.open(path, mode, 0o644)
        os.dup2(new, fd)
        os.close(new)
    sys.argv = list(req["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python <script>` sets it
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, int) and exit_.code is not None:
            print(exit_.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 — what the interpreter would print and exit 1 with
        traceback.print_exc()
        code = 1
    sys.exit(code)


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(req)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
