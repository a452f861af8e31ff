"""Training progress as log lines, for logs that are not a terminal: a bar's carriage-return updates become
thousands of lines (megabytes) in a sweep's job log, one line every few hundred steps does not."""

from __future__ import annotations

import logging
import math
import re
import time

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("diffsteps")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressLog(Callback):
    """One ``diffsteps`` log line every ``every_n_steps`` optimiser steps or ``every_seconds`` seconds, whichever
    comes first, and at the last step — ``step 300/1500 (20%): loss 0.1234, 12.3 steps/s, ETA 1m37s`` (loss and
    rate over the steps since the previous line) — and one line per validation (``val/loss``). Silent while the
    Trainer shows a progress bar, so it can stay in the callbacks on a terminal; rank zero only."""

    def __init__(self, every_n_steps: int = 100, every_seconds: float = 60.0):
        if isinstance(every_n_steps, bool) or int(every_n_steps) != every_n_steps or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if not float(every_seconds) > 0:
            raise ValueError(f"every_seconds must be > 0, got {every_seconds!r}")
        self.every_n_steps, self.every_seconds = int(every_n_steps), float(every_seconds)
        self._active = False

    def _reset_window(self, step: int) -> None:
        self._t, self._step, self._loss_sum, self._loss_n = time.monotonic(), step, None, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._active = trainer.is_global_zero and trainer.progress_bar_callback is None
        self._start = time.monotonic()
        self._reset_window(trainer.global_step)
        if self._active:
            log.info("training from step %d to %s", trainer.global_step, self._total(trainer))

    @staticmethod
    def _total(trainer) -> int | str:
        total = trainer.max_steps if trainer.max_steps >= 0 else trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) else "?"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            # summed on the device: one host sync per line, not per step
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_n += 1
        step, total = trainer.global_step, self._total(trainer)
        now = time.monotonic()
        if (step % self.every_n_steps == 0 or now - self._t >= self.every_seconds or step == total) \
                and step > self._step:
            rate = (step - self._step) / max(now - self._t, 1e-9)
            loss_text = f"loss {float(self._loss_sum) / self._loss_n:.4g}" if self._loss_n else "loss ?"
            if isinstance(total, int):
                eta = (total - step) / rate
                log.info("step %d/%d (%d%%): %s, %.3g steps/s, ETA %s", step, total, 100 * step // max(total, 1),
                         loss_text, rate, _duration(eta))
            else:
                log.info("step %d: %s, %.3g steps/s", step, loss_text, rate)
            self._reset_window(step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._active or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        # val/loss and the like; the per-band val/loss_t<lo>-<hi> stay in the loggers
        shown = ", ".join(f"{k} {float(v):.4g}" for k, v in metrics.items()
                          if k.startswith("val/") and not re.search(r"_t\d", k)) or "no val/ metrics"
        log.info("validation at step %d: %s", trainer.global_step, shown)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._active:
            log.info("training done: step %d in %s", trainer.global_step, _duration(time.monotonic() - self._start))
