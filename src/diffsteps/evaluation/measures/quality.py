"""FID and KID of each step count's samples against one reference
(:class:`~diffsteps.evaluation.quality.SampleQuality`)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..plan import EvalPlan
from ..quality import SampleQuality
from .base import Chunk, Measure


class Quality(Measure):
    """``fid``, ``kid_mean``, ``kid_std``. ``quality`` returns a :class:`SampleQuality` with its reference already
    set, called once per step count (share one reference among them: ``SampleQuality.share_reference``). The
    features are gathered in global sample order, so the split of chunks among processes does not matter."""

    def __init__(self, plan: EvalPlan, quality: Callable[[], SampleQuality]):
        self.quality = {n: quality() for n in plan.steps}

    def update(self, steps: int, x: Tensor, chunk: Chunk) -> None:
        self.quality[steps].update(x.float(), chunk.indices)

    def compute(self, steps: int) -> dict:
        return self.quality[steps].compute()
