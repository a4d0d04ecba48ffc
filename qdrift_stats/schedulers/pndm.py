"""``pndm``: diffusers' ``PNDMScheduler`` with ``skip_prk_steps=True`` (PLMS, pseudo linear multistep) on VP models.

This is Stable Diffusion 1.x's default scheduler. Levels are ``alphas_cumprod`` at the timesteps
(``a = sqrt(abar)``, ``b = sqrt(1 - abar)``, as DDIM's); each step is DDIM's transfer (PNDM's
formula 9) applied to a combination of recent epsilon outputs, so it is multistep: the first step
is a pseudo improved-Euler step that makes two model calls (diffusers lists its landing timestep
twice: ``timesteps = [t_{n-1}, t_{n-2}, t_{n-2}, t_{n-3}, ..., t_0]``, ``n + 1`` entries), the next
ones reuse the last 2, 3, then 4 outputs (Adams-Bashforth weights ``3/2, -1/2``; ``23, -16, 5 / 12``;
``55, -59, 37, -9 / 24``).

As for DPM-Solver++ (``docs/method.md``, "The first-order statistic"), the gain is the first-order
(DDIM) gain of the step: an output's weights over the steps that reuse it sum to 1, so the
first-order statistic counts each output error once. The two-call first step is one step, recorded
and corrected once when it lands, with its effective output (as Heun's,
:func:`~qdrift_stats.schedulers.base.first_order_output`). The Runge-Kutta warm-up
(``skip_prk_steps=False``, four model calls per step for the first three steps) is not supported.

The grid needs each step to land on the next step's level (``t - num_train_timesteps // n`` is the
next timestep): true for ``leading`` spacing, the default; ``linspace`` / ``trailing`` spacings
make diffusers' PLMS skip between levels and are refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from diffusers import PNDMScheduler

from qdrift_stats.errors import QDriftError
from qdrift_stats.schedulers.base import SchedulerAdapter, StepGrid, alphas_cumprod_of, register, timesteps_of, vp_grid


@register
class PNDMAdapter(SchedulerAdapter):
    name = "pndm"
    diffusers_classes = (PNDMScheduler,)
    multistep = True

    @property
    def prediction_types(self) -> tuple[str, ...]:
        return ("epsilon", "v_prediction")  # diffusers' PNDM takes no x0 prediction

    def build(self, config: dict[str, Any]):
        return PNDMScheduler.from_config(config, skip_prk_steps=True)

    def matches(self, scheduler) -> bool:
        return super().matches(scheduler) and bool(scheduler.config.skip_prk_steps)

    def refusal(self, scheduler) -> str | None:
        if not scheduler.config.skip_prk_steps:
            return (
                "PNDMScheduler with skip_prk_steps=False (its Runge-Kutta warm-up) is not supported; "
                "use skip_prk_steps=True (PLMS, Stable Diffusion's setting)"
            )
        return None

    def call_steps(self, scheduler) -> np.ndarray:
        entries = len(scheduler.timesteps)  # n + 1 for n >= 2 steps (the first step's landing twice), 1 for n = 1
        return np.concatenate([[0], np.arange(entries - 1)]) if entries > 1 else np.zeros(1, dtype=np.int64)

    def grid(self, scheduler) -> StepGrid:
        entries = timesteps_of(scheduler)
        steps = int(scheduler.num_inference_steps)
        timesteps = entries if len(entries) == 1 else np.concatenate([entries[:1], entries[2:]])
        if len(timesteps) != steps:
            raise QDriftError(
                f"{self.name}: expected {steps + 1} timesteps, got {len(entries)} (PRK steps are not supported)"
            )
        abar_all = alphas_cumprod_of(scheduler)
        stride = scheduler.config.num_train_timesteps // steps
        t_int = timesteps.astype(np.int64)
        prev = t_int - stride
        abar = abar_all[t_int]
        abar_next = np.where(prev >= 0, abar_all[np.clip(prev, 0, None)], float(scheduler.final_alpha_cumprod))
        if steps > 1 and not np.array_equal(prev[:-1], t_int[1:]):
            raise QDriftError(
                f"{self.name}: with timestep_spacing {scheduler.config.timestep_spacing!r} diffusers' PLMS steps "
                f"from t to t - {stride}, not to the next timestep; use timestep_spacing 'leading'"
            )
        return vp_grid(self.name, timesteps, abar, abar_next, scheduler.config.prediction_type)
