"""``euler``: diffusers' ``EulerDiscreteScheduler`` on VP models (epsilon / v / sample).

The state is not scaled (``a = 1``, ``b = sigma``); the model sees ``x / sqrt(sigma^2 + 1)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from diffusers import EulerDiscreteScheduler

from qdrift_stats.schedulers.base import SchedulerAdapter, StepGrid, register, sigmas_of, timesteps_of


@register
class EulerAdapter(SchedulerAdapter):
    name = "euler"
    diffusers_classes = (EulerDiscreteScheduler,)

    def build(self, config: dict[str, Any]):
        return EulerDiscreteScheduler.from_config(config)

    def grid(self, scheduler) -> StepGrid:
        sigmas = sigmas_of(scheduler, self.name)
        return StepGrid.from_levels(
            self.name, timesteps_of(scheduler), np.ones_like(sigmas), sigmas, scheduler.config.prediction_type
        )
