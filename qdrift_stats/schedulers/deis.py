"""``deis``: diffusers' ``DEISMultistepScheduler`` (DEIS, log-rho multistep) on VP models.

Coordinates as DPM-Solver's (``a = 1 / sqrt(sigma^2 + 1)``, ``b = sigma a``); multistep.
"""

from __future__ import annotations

from typing import Any

from diffusers import DEISMultistepScheduler

from qdrift_stats.schedulers.base import SchedulerAdapter, StepGrid, register
from qdrift_stats.schedulers.unipc import vp_grid


@register
class DEISAdapter(SchedulerAdapter):
    name = "deis"
    diffusers_classes = (DEISMultistepScheduler,)
    multistep = True

    def build(self, config: dict[str, Any]):
        return DEISMultistepScheduler.from_config(config)

    def matches(self, scheduler) -> bool:
        return super().matches(scheduler) and not getattr(scheduler.config, "use_flow_sigmas", False)

    def grid(self, scheduler) -> StepGrid:
        return vp_grid(self.name, scheduler)
