"""``dpmpp-2m`` and ``flow-dpmpp-2m``: diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M).

``dpmpp-2m`` samples VP models (``a = 1 / sqrt(sigma^2 + 1)``, ``b = sigma a``); ``flow-dpmpp-2m``
samples flow-matching models with flow sigmas (``a = 1 - sigma``, ``b = sigma``, velocity output).
Both are multistep: a step reuses the previous step's model output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from diffusers import DPMSolverMultistepScheduler

from qdrift_stats.schedulers.base import (
    FLOW_PREDICTION,
    SchedulerAdapter,
    StepGrid,
    register,
    sigmas_of,
    timesteps_of,
)


@register
class DPMPP2MAdapter(SchedulerAdapter):
    name = "dpmpp-2m"
    diffusers_classes = (DPMSolverMultistepScheduler,)
    multistep = True

    def build(self, config: dict[str, Any]):
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)

    def matches(self, scheduler) -> bool:  # the SDE variant is dpmpp-2m-sde; other algorithm types are not supported
        return (
            super().matches(scheduler)
            and not scheduler.config.use_flow_sigmas
            and scheduler.config.algorithm_type == "dpmsolver++"
        )

    def grid(self, scheduler) -> StepGrid:
        sigmas = sigmas_of(scheduler, self.name)
        a = 1.0 / np.sqrt(sigmas**2 + 1.0)
        return StepGrid.from_levels(self.name, timesteps_of(scheduler), a, sigmas * a, scheduler.config.prediction_type)


@register
class FlowDPMPP2MAdapter(SchedulerAdapter):
    name = "flow-dpmpp-2m"
    diffusers_classes = (DPMSolverMultistepScheduler,)
    flow = True
    multistep = True

    def build(self, config: dict[str, Any]):
        flow_config = {k: v for k, v in config.items() if k not in ("shift", "prediction_type")}
        return DPMSolverMultistepScheduler.from_config(
            flow_config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            use_flow_sigmas=True,
            prediction_type=FLOW_PREDICTION,
            flow_shift=float(config.get("shift", 1.0)),
        )

    def matches(self, scheduler) -> bool:
        return (
            super().matches(scheduler)
            and bool(scheduler.config.use_flow_sigmas)
            and scheduler.config.algorithm_type == "dpmsolver++"
        )

    def grid(self, scheduler) -> StepGrid:
        sigmas = sigmas_of(scheduler, self.name)
        return StepGrid.from_levels(self.name, timesteps_of(scheduler), 1.0 - sigmas, sigmas, FLOW_PREDICTION)
