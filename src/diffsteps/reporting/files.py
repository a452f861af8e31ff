"""Atomic file writes: a result file is either its previous content or its complete new content, never a part.

Every writer here writes a temporary file in the target's own folder (same file system, so the rename cannot turn
into a copy), flushes and fsyncs it, then ``os.replace``\\ s it over the target — atomic on POSIX and Windows. A
process killed mid-write (SIGKILL, out of memory, a cluster's time limit) leaves the old file, or none, plus at most
a stray ``.<name>.<pid>.<random>.tmp``; readers (a sweep summary, a resumed sweeper, a user) never see half a JSON
list or a truncated PNG. The runner writes metrics.json/metrics.csv, config.yaml, sample files and figures
through these; the reporting package its summaries.

Kept free of heavy imports (Hydra builds the multirun callback, which uses it, in every process it starts): torch,
matplotlib and OmegaConf are imported by the functions that need them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_open", "save_config", "save_figure", "save_torch", "symlink", "write_csv", "write_json",
           "write_text"]


def _temporary(path: Path) -> Path:
    # the pid and a random part: two processes (DDP ranks, concurrent runs) writing one target never share a file
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[io.IOBase]:
    """``open`` for writing whose file appears at ``path`` only when the block completes without an exception.
    ``mode`` is ``"w"`` or ``"wb"``; ``kwargs`` go to ``open`` (``newline``, ``encoding``)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = _temporary(path)
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    try:
        # "x": never follow or clobber another file of that name; the umask's permissions, unlike mkstemp's 0600
        with open(tmp, mode.replace("w", "x"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int = 2) -> Path:
    # serialised before the file is opened: an unserialisable value leaves no trace at all
    return write_text(path, json.dumps(data, indent=indent))


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """``rows`` (dicts) under a header of ``columns`` (default: every key of every row, in order of appearance)."""
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    with atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def save_torch(obj: Any, path: str | Path) -> Path:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def save_figure(fig, path: str | Path, **kwargs) -> Path:
    """``fig.savefig`` into ``path``, the format taken from its suffix (the temporary name has another)."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or None)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, **kwargs)
    return path


def save_config(cfg, path: str | Path, resolve: bool = True) -> Path:
    """An OmegaConf config as YAML (``OmegaConf.save``, atomically)."""
    from omegaconf import OmegaConf

    return write_text(path, OmegaConf.to_yaml(cfg, resolve=resolve))


def symlink(target: str | Path, link: str | Path) -> Path:
    """Point ``link`` at ``target``, replacing a link (or file) already there in one step."""
    link = Path(link)
    tmp = _temporary(link)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return link
