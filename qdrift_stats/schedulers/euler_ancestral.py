"""``euler-ancestral``: diffusers' ``EulerAncestralDiscreteScheduler`` on VP models (stochastic).

Coordinates as Euler's (``a = 1``, ``b = sigma``); each step goes deterministically to
``sigma_down`` and injects ``sigma_up z`` (``sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from diffusers import EulerAncestralDiscreteScheduler

from qdrift_stats.schedulers.base import SchedulerAdapter, StepGrid, register, sigmas_of, timesteps_of
from qdrift_stats.schedulers.noise import ancestral_noise_std


@register
class EulerAncestralAdapter(SchedulerAdapter):
    name = "euler-ancestral"
    diffusers_classes = (EulerAncestralDiscreteScheduler,)
    stochastic = True

    def build(self, config: dict[str, Any]):
        return EulerAncestralDiscreteScheduler.from_config(config)

    def grid(self, scheduler) -> StepGrid:
        sigmas = sigmas_of(scheduler, self.name)
        return StepGrid.from_levels(
            self.name, timesteps_of(scheduler), np.ones_like(sigmas), sigmas, scheduler.config.prediction_type
        )

    def first_order_gain(self, grid: StepGrid) -> np.ndarray:
        # the deterministic part lands on sigma_down (Euler from sigma to sigma_down): gain sigma_down - sigma
        s = self.noise_std(grid)
        sigma_down = np.sqrt(np.clip(grid.b_next**2 - s**2, 0.0, None))
        return sigma_down - grid.b if grid.prediction_type == "epsilon" else super().first_order_gain(grid)

    def noise_std(self, grid: StepGrid) -> np.ndarray:
        return ancestral_noise_std(grid.a, grid.b, grid.a_next, grid.b_next)
