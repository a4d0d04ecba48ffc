"""``lcm``: diffusers' ``LCMScheduler`` (latent consistency models, multistep consistency sampling; stochastic).

Each step maps the state to the consistency estimate ``x0`` and re-noises it to the next level,
``x_{i+1} = a_next x0 + b_next z`` (fresh noise, ``s = b_next``); the last step returns ``x0``.
Levels are ``alphas_cumprod`` at the timesteps and at the next timestep.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from diffusers import LCMScheduler

from qdrift_stats.schedulers.base import (
    SchedulerAdapter,
    StepGrid,
    alphas_cumprod_of,
    register,
    timesteps_of,
    vp_grid,
    x0_slope,
)


@register
class LCMAdapter(SchedulerAdapter):
    name = "lcm"
    diffusers_classes = (LCMScheduler,)
    stochastic = True

    def build(self, config: dict[str, Any]):
        return LCMScheduler.from_config(config)

    def grid(self, scheduler) -> StepGrid:
        timesteps = timesteps_of(scheduler)
        abar_all = alphas_cumprod_of(scheduler)
        abar = abar_all[timesteps.astype(np.int64)]
        abar_next = np.append(abar[1:], 1.0)  # the last step returns the consistency estimate
        return vp_grid(self.name, timesteps, abar, abar_next, scheduler.config.prediction_type)

    def first_order_gain(self, grid: StepGrid) -> np.ndarray:
        # x_{i+1} = a_next x0_hat + (fresh noise): the output enters through x0_hat only
        return grid.a_next * x0_slope(grid.prediction_type, grid.a, grid.b)

    def noise_std(self, grid: StepGrid) -> np.ndarray:
        return np.asarray(grid.b_next, dtype=np.float64).copy()
