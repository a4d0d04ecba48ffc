"""``dpmpp-2m-sde``: diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="sde-dpmsolver++"``
(SDE DPM-Solver++ 2M) on VP models: multistep and stochastic.

Coordinates as ``dpmpp-2m``; each step injects ``b_next sqrt(1 - exp(-2 h)) z``
(:func:`qdrift_stats.schedulers.noise.sde_dpmpp_noise_std`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from diffusers import DPMSolverMultistepScheduler

from qdrift_stats.schedulers.base import SchedulerAdapter, StepGrid, register
from qdrift_stats.schedulers.noise import sde_dpmpp_noise_std
from qdrift_stats.schedulers.unipc import vp_grid


@register
class DPMPP2MSDEAdapter(SchedulerAdapter):
    name = "dpmpp-2m-sde"
    diffusers_classes = (DPMSolverMultistepScheduler,)
    multistep = True
    stochastic = True

    def build(self, config: dict[str, Any]):
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++", solver_order=2)

    def matches(self, scheduler) -> bool:
        return (
            super().matches(scheduler)
            and scheduler.config.algorithm_type == "sde-dpmsolver++"
            and not scheduler.config.use_flow_sigmas
        )

    def grid(self, scheduler) -> StepGrid:
        return vp_grid(self.name, scheduler)

    def first_order_gain(self, grid: StepGrid) -> np.ndarray:
        # first-order SDE DPM-Solver++: x_next = (b_next / b) e^{-h} x + a_next (1 - e^{-2h}) x0_hat + noise
        from qdrift_stats.schedulers.base import x0_slope

        with np.errstate(divide="ignore", invalid="ignore"):
            h = np.log(grid.a_next / grid.b_next) - np.log(grid.a / grid.b)
            gain = grid.a_next * (1.0 - np.exp(-2.0 * h)) * x0_slope(grid.prediction_type, grid.a, grid.b)
        # onto b_next = 0 (h infinite) the step lands on a_next x0_hat
        return np.where(grid.b_next > 0, gain, grid.a_next * x0_slope(grid.prediction_type, grid.a, grid.b))

    def noise_std(self, grid: StepGrid) -> np.ndarray:
        return sde_dpmpp_noise_std(grid.a, grid.b, grid.a_next, grid.b_next)
