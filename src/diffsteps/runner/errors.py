"""How a refused run reads on the console. The runner refuses bad input with a ValueError that names the valid
choices, before any expensive work; Hydra would print it under a stack trace of the runner's frames, where the
message is easy to miss. :func:`report_in_one_line` makes it Hydra's compact report instead: the message, where it
was raised, and where the whole traceback went (the run's log file; ``HYDRA_FULL_ERROR=1`` prints it as before).
Other exceptions — a crash rather than a refusal — keep Hydra's full report."""

from __future__ import annotations

import functools
import logging
import traceback
from pathlib import Path
from typing import Callable

from hydra.errors import CompactHydraException

__all__ = ["RefusedInput", "report_in_one_line"]

_PACKAGE = Path(__file__).resolve().parents[1]  # …/diffsteps


class RefusedInput(ValueError, CompactHydraException):
    """A ValueError that Hydra reports by its message alone (``CompactHydraException``); still a ValueError to the
    caller and to a sweeper, which records it as the trial's failure."""


def report_in_one_line(task: Callable) -> Callable:
    """``task`` (the runner's entry, cfg → objective) with its ValueErrors re-raised as :class:`RefusedInput`: the
    message plus one line saying where it was raised and where the traceback is; the traceback itself is written to
    the run's log file (Hydra's job log), so nothing is lost when the refusal comes after hours of work."""

    @functools.wraps(task)
    def run(cfg):
        try:
            return task(cfg)
        except RefusedInput:
            raise
        except ValueError as e:
            raise RefusedInput(f"{e}\n  ({_where(e)}{_log_traceback(e)})") from e

    return run


def _where(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    path = Path(frame.filename).resolve()
    # a path from the package (diffsteps/…) reads the same on every machine — and in a clone itself named diffsteps
    shown = path.relative_to(_PACKAGE.parent).as_posix() if path.is_relative_to(_PACKAGE) else frame.filename
    return f"{type(e).__name__} raised in {shown}:{frame.lineno}, {frame.name}"


def _log_traceback(e: BaseException) -> str:
    """The traceback into the log files of the root logger's file handlers (not the console); where it went."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return ""  # Hydra's report ends by naming HYDRA_FULL_ERROR
    record = logging.LogRecord("diffsteps", logging.ERROR, __file__, 0, "the run stopped: %s", (e,),
                               (type(e), e, e.__traceback__))
    for handler in files:
        handler.handle(record)
    return f"; its traceback is in {files[0].baseFilename}"
