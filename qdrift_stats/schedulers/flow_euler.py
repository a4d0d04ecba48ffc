"""``flow-euler``: diffusers' ``FlowMatchEulerDiscreteScheduler`` on flow-matching (velocity) models.

States are ``(1 - sigma) x0 + sigma eps``; the model output is the velocity ``eps - x0``.
"""

from __future__ import annotations

from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler

from qdrift_stats.schedulers.base import (
    FLOW_PREDICTION,
    SchedulerAdapter,
    StepGrid,
    register,
    sigmas_of,
    timesteps_of,
)


@register
class FlowEulerAdapter(SchedulerAdapter):
    name = "flow-euler"
    diffusers_classes = (FlowMatchEulerDiscreteScheduler,)
    flow = True

    def build(self, config: dict[str, Any]):
        return FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in config.items() if k != "prediction_type"})

    def grid(self, scheduler) -> StepGrid:
        sigmas = sigmas_of(scheduler, self.name)
        return StepGrid.from_levels(self.name, timesteps_of(scheduler), 1.0 - sigmas, sigmas, FLOW_PREDICTION)
