"""``ddpm``: diffusers' ``DDPMScheduler`` (ancestral sampling, ``fixed_small`` variance) on VP models.

Levels are ``alphas_cumprod`` at the timesteps and at each step's ``previous_timestep`` (1 after
the last step); the step injects the posterior noise ``sqrt(beta~) z``, 0 on the last step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from diffusers import DDPMScheduler

from qdrift_stats.errors import QDriftError
from qdrift_stats.schedulers.base import (
    SchedulerAdapter,
    StepGrid,
    alphas_cumprod_of,
    first_order_gain,
    register,
    timesteps_of,
    vp_grid,
)
from qdrift_stats.schedulers.noise import ancestral_noise_std

_VARIANCES = ("fixed_small", "fixed_small_log")


@register
class DDPMAdapter(SchedulerAdapter):
    name = "ddpm"
    diffusers_classes = (DDPMScheduler,)
    stochastic = True

    def build(self, config: dict[str, Any]):
        return DDPMScheduler.from_config(config)

    def grid(self, scheduler) -> StepGrid:
        variance = scheduler.config.variance_type
        if variance not in _VARIANCES:
            raise QDriftError(f"ddpm: variance_type {variance!r} is not supported; use fixed_small")
        timesteps = timesteps_of(scheduler)
        abar_all = alphas_cumprod_of(scheduler)
        abar = abar_all[timesteps.astype(np.int64)]
        prev = np.array([int(scheduler.previous_timestep(int(t))) for t in timesteps])
        abar_next = np.where(prev >= 0, abar_all[np.clip(prev, 0, None)], 1.0)
        return vp_grid(self.name, timesteps, abar, abar_next, scheduler.config.prediction_type)

    def first_order_gain(self, grid: StepGrid) -> np.ndarray:
        # the posterior mean is a_next x0_hat + sqrt(b_next^2 - s^2) eps_hat (DDIM with eta = 1)
        s = self.noise_std(grid)
        b_det = np.sqrt(np.clip(grid.b_next**2 - s**2, 0.0, None))
        return first_order_gain(grid.prediction_type, grid.a, grid.b, grid.a_next, b_det)

    def noise_std(self, grid: StepGrid) -> np.ndarray:
        return ancestral_noise_std(grid.a, grid.b, grid.a_next, grid.b_next)
