"""``heun``: diffusers' ``HeunDiscreteScheduler`` (Heun's second-order method, Karras et al.) on VP models.

Coordinates as Euler's (``a = 1``, ``b = sigma``; the model sees ``x / sqrt(sigma^2 + 1)``). A step
from ``sigma_i`` to ``sigma_{i+1}`` makes two model calls: a predictor (an Euler step to
``sigma_{i+1}``) and a corrector at the predicted state, which averages the two derivatives and lands
on ``sigma_{i+1}``; the last step (to ``sigma = 0``) is a single Euler call. diffusers writes this as
``timesteps = [t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}]`` (``2n - 1`` entries, each inner timestep twice)
and ``sigmas = [s_0, s_1, s_1, ..., s_{n-1}, s_{n-1}, 0]``, with ``scheduler.step`` called once per
entry (``state_in_first_order`` tells the two calls apart).

For Q-Drift a *step* is one landing on a new sigma (``n`` steps, :meth:`HeunAdapter.call_steps`): the
grid has one entry per landing, the recorded output of a step is its effective output (the output a
first-order step from ``x_i`` would need to land where Heun landed,
:func:`~qdrift_stats.schedulers.base.first_order_output`; the mean of the two calls' outputs on
epsilon) and its gain is the first-order one, ``sigma_{i+1} - sigma_i`` on epsilon. The predictor
call's error is part of that effective output; the correction is applied once per landing, never
after the predictor half-step (``docs/method.md``, "Two-call solvers: Heun").
"""

from __future__ import annotations

from typing import Any

import numpy as np
from diffusers import HeunDiscreteScheduler

from qdrift_stats.errors import QDriftError
from qdrift_stats.schedulers.base import SchedulerAdapter, StepGrid, register, timesteps_of


@register
class HeunAdapter(SchedulerAdapter):
    name = "heun"
    diffusers_classes = (HeunDiscreteScheduler,)

    def build(self, config: dict[str, Any]):
        return HeunDiscreteScheduler.from_config(config)

    def call_steps(self, scheduler) -> np.ndarray:
        # entries 2i (predictor) and 2i + 1 (corrector) are step i; the last entry, 2n - 2, is the final Euler step
        return np.arange(len(scheduler.timesteps)) // 2

    def grid(self, scheduler) -> StepGrid:
        entries = len(scheduler.timesteps)
        sigmas = scheduler.sigmas.detach().cpu().double().numpy()
        if entries % 2 != 1 or len(sigmas) != entries + 1:
            raise QDriftError(
                f"{self.name}: expected 2n - 1 timesteps and 2n sigmas, got {entries} and {len(sigmas)} "
                "(unsupported scheduler options)"
            )
        levels = np.append(sigmas[0::2], sigmas[-1])  # s_0, s_1, ..., s_{n-1}, then 0
        return StepGrid.from_levels(
            self.name, timesteps_of(scheduler)[0::2], np.ones_like(levels), levels, scheduler.config.prediction_type
        )
