"""``unipc``: diffusers' ``UniPCMultistepScheduler`` (UniPC, bh2, predictor-corrector multistep) on VP models.

Coordinates as DPM-Solver's (``a = 1 / sqrt(sigma^2 + 1)``, ``b = sigma a``). Multistep: a step
corrects the state with the current output (UniC) and predicts with the recent outputs (UniP).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from diffusers import UniPCMultistepScheduler

from qdrift_stats.errors import QDriftError
from qdrift_stats.schedulers.base import SchedulerAdapter, StepGrid, register, sigmas_of, timesteps_of


def vp_grid(name: str, scheduler) -> StepGrid:
    """The grid of a VP sigma-based multistep scheduler (DPM-Solver family)."""
    if getattr(scheduler.config, "use_flow_sigmas", False):
        raise QDriftError(f"{name}: flow sigmas are not supported by this adapter")
    sigmas = sigmas_of(scheduler, name)
    a = 1.0 / np.sqrt(sigmas**2 + 1.0)
    return StepGrid.from_levels(name, timesteps_of(scheduler), a, sigmas * a, scheduler.config.prediction_type)


@register
class UniPCAdapter(SchedulerAdapter):
    name = "unipc"
    diffusers_classes = (UniPCMultistepScheduler,)
    multistep = True

    def build(self, config: dict[str, Any]):
        return UniPCMultistepScheduler.from_config(config)

    def matches(self, scheduler) -> bool:
        return super().matches(scheduler) and not getattr(scheduler.config, "use_flow_sigmas", False)

    def grid(self, scheduler) -> StepGrid:
        return vp_grid(self.name, scheduler)
