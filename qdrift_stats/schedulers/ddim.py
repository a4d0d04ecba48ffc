"""``ddim``: diffusers' ``DDIMScheduler`` with ``eta = 0`` (deterministic) on VP models.

Levels are ``alphas_cumprod`` at the timesteps (``a = sqrt(abar)``, ``b = sqrt(1 - abar)``); the last
step lands on ``final_alpha_cumprod``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from diffusers import DDIMScheduler

from qdrift_stats.schedulers.base import SchedulerAdapter, StepGrid, alphas_cumprod_of, register, timesteps_of, vp_grid


@register
class DDIMAdapter(SchedulerAdapter):
    name = "ddim"
    diffusers_classes = (DDIMScheduler,)

    def build(self, config: dict[str, Any]):
        return DDIMScheduler.from_config(config)

    def step_kwargs(self, scheduler) -> dict[str, Any]:
        return {"eta": 0.0}

    def grid(self, scheduler) -> StepGrid:
        timesteps = timesteps_of(scheduler)
        abar_all = alphas_cumprod_of(scheduler)
        final = float(scheduler.final_alpha_cumprod)
        stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        t_int = timesteps.astype(np.int64)
        prev = t_int - stride
        abar = abar_all[t_int]
        abar_next = np.where(prev >= 0, abar_all[np.clip(prev, 0, None)], final)
        return vp_grid(self.name, timesteps, abar, abar_next, scheduler.config.prediction_type)
