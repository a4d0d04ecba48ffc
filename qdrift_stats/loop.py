"""Sampling loops: plain diffusers sampling, optionally Q-Drift-corrected, in the k-diffusion style.

The loop is exactly the one a diffusers pipeline runs,

    x = randn(batch, *sample_shape) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t, **cond)
        x = scheduler.step(out, t, x).prev_sample

with one optional hook after each step: a :class:`Corrector` that moves ``x`` by the Q-Drift
correction, using only the step's own model output (no extra model call).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from qdrift_stats.errors import QDriftError
from qdrift_stats.pair import pair_conditions, pair_device, pair_dtype
from qdrift_stats.schedulers.base import make_scheduler, step_kwargs
from qdrift_stats.schedulers.noise import capture_step_noise

ModelFn = Callable[..., torch.Tensor]
StepCallback = Callable[[dict[str, Any]], torch.Tensor | None]


def scale_model_input(scheduler, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``scheduler.scale_model_input(x, t)``, or ``x`` for schedulers without it (flow matching)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return scale(x, t) if scale is not None else x


def initial_noise(pair: Any, scheduler, batch_size: int, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """The starting state and the conditions of one run.

    One ``torch.Generator`` (CPU, seeded with ``seed``) draws the noise ``(batch, *sample_shape)``
    first, then the pair's conditions, so a seed fixes both. The noise is drawn in float32 on the
    CPU (as diffusers' ``randn_tensor`` does for a CPU generator), then moved to the pair's device
    and dtype and scaled by ``init_noise_sigma``.
    """
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((batch_size, *pair.sample_shape), generator=generator, dtype=torch.float32)
    cond = pair_conditions(pair, batch_size, generator)
    x = noise.to(device=pair_device(pair), dtype=pair_dtype(pair))
    init_sigma = getattr(scheduler, "init_noise_sigma", None)  # flow-matching schedulers have none
    if init_sigma is not None:
        x = x * init_sigma
    return x, cond


def run_sampler(
    model: ModelFn,
    scheduler,
    x: torch.Tensor,
    cond: dict[str, Any] | None = None,
    corrector: Any = None,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run a configured scheduler from state ``x``; return the final state.

    This is the package's only loop over ``scheduler.timesteps``: recording (a second, lock-step
    scheduler advanced in the callback), moment matching, accumulation data and the solver-gain
    probe all drive it.

    Args:
        model: ``model(model_input, timestep, **cond) -> output`` (a pair's ``fp`` or ``q``).
        scheduler: a diffusers scheduler after ``set_timesteps``.
        x: ``(batch, *sample_shape)`` initial state (already scaled by ``init_noise_sigma``).
        corrector: optional Q-Drift correction applied after each step.
        callback: optional, called after each step with ``{"i", "t", "x", "model_input", "output",
            "x_next"}`` (``output`` as the scheduler received it, ``x_next`` after the correction).
            If it returns a tensor, that tensor is the next state instead of ``x_next`` (lock-step
            and probing loops use this; a plain observer returns None).
        generator: passed to ``scheduler.step`` of stochastic samplers (the noise it injects), so a
            seeded generator fixes the run; ignored by deterministic ones.
    """
    cond = cond or {}
    kwargs = stochastic_step_kwargs(scheduler, generator)
    needs_noise = bool(getattr(corrector, "needs_noise", False))
    for i, t in enumerate(scheduler.timesteps):
        model_input = scale_model_input(scheduler, x, t)
        output = model(model_input, t, **cond)
        if corrector is not None:
            output = corrector.correct_output(i, output)
        if needs_noise and corrector.noise_active[i]:
            with capture_step_noise(scheduler) as drawn:
                x_next = scheduler.step(output, t, x, **kwargs, return_dict=False)[0]
            x_next = corrector(i, x, output, x_next, drawn.noise)
        else:
            x_next = scheduler.step(output, t, x, **kwargs, return_dict=False)[0]
            if corrector is not None:
                x_next = corrector(i, x, output, x_next)
        if callback is not None:
            replaced = callback(
                {"i": i, "t": t, "x": x, "model_input": model_input, "output": output, "x_next": x_next}
            )
            if replaced is not None:
                x_next = replaced
        x = x_next
    return x


def stochastic_step_kwargs(scheduler, generator: torch.Generator | None) -> dict[str, Any]:
    """``step_kwargs(scheduler)`` plus ``generator`` where the scheduler's step takes one (stochastic samplers)."""
    kwargs = step_kwargs(scheduler)
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        kwargs["generator"] = generator
    return kwargs


def step_generator(seed: int) -> torch.Generator:
    """The generator of a run's step noise (stochastic samplers): CPU, seeded from the run's seed, a
    stream apart from the initial noise. FP, Q and corrected samplers of one seed draw the same noise."""
    return torch.Generator().manual_seed(int(seed) + 0x5EED)


def prepared_scheduler(pair: Any, scheduler_name: str, steps: int):
    """A fresh scheduler of the given name for the pair, with ``set_timesteps(steps)`` done."""
    if not isinstance(steps, int) or steps < 1:
        raise QDriftError(f"--steps must be a positive integer, got {steps!r}")
    scheduler = make_scheduler(scheduler_name, pair.scheduler_config)
    scheduler.set_timesteps(steps, device=pair_device(pair))
    return scheduler
