"""Sampling loops: plain diffusers sampling, optionally Q-Drift-corrected, in the k-diffusion style.

The loop is exactly the one a diffusers pipeline runs,

    x = randn(batch, *sample_shape) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t, **cond)
        x = scheduler.step(out, t, x).prev_sample

with one optional hook after each step: a :class:`Corrector` that moves ``x`` by the Q-Drift
correction, using only the step's own model output (no extra model call). A solver that calls the
model twice per step (Heun) runs two entries of ``scheduler.timesteps`` per step; the hook runs
once, when the step lands.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from qdrift_stats.errors import QDriftError
from qdrift_stats.pair import pair_conditions, pair_device, pair_dtype
from qdrift_stats.schedulers.base import first_order_output, make_scheduler, step_calls, step_grid, step_kwargs
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
    probe all drive it. The entries of ``scheduler.timesteps`` are taken step by step
    (:func:`~qdrift_stats.schedulers.base.step_calls`): one model call per entry, one step per
    landing on a new level (Heun makes two calls per step, see :func:`advance_step`); the
    correction and the callback run once per step, after it lands.

    Args:
        model: ``model(model_input, timestep, **cond) -> output`` (a pair's ``fp`` or ``q``).
        scheduler: a diffusers scheduler after ``set_timesteps``.
        x: ``(batch, *sample_shape)`` initial state (already scaled by ``init_noise_sigma``).
        corrector: optional Q-Drift correction applied after each step.
        callback: optional, called after each step with ``{"i", "t", "x", "model_input", "output",
            "x_next"}`` (``t`` and ``model_input`` of the step's first call, ``output`` as the scheduler
            received it, or the step's effective output for a two-call step; ``x_next`` after the
            correction). If it returns a tensor, that tensor is the next state instead of ``x_next``
            (lock-step and probing loops use this; a plain observer returns None).
        generator: passed to ``scheduler.step`` of stochastic samplers (the noise it injects), so a
            seeded generator fixes the run; ignored by deterministic ones.
    """
    cond = cond or {}
    kwargs = stochastic_step_kwargs(scheduler, generator)
    needs_noise = bool(getattr(corrector, "needs_noise", False))
    plan = step_calls(scheduler)
    grid = step_grid(scheduler) if len(plan) != len(scheduler.timesteps) else None  # two-call steps only
    for i, calls in enumerate(plan):
        correct_output = None if corrector is None else functools.partial(corrector.correct_output, i)
        capture = needs_noise and corrector.noise_active[i]
        x_next, output, model_input, noise = advance_step(
            model, scheduler, x, calls, cond, kwargs, i=i, grid=grid, correct_output=correct_output, capture=capture
        )
        if capture:
            x_next = corrector(i, x, output, x_next, noise)
        elif corrector is not None:
            x_next = corrector(i, x, output, x_next)
        if callback is not None:
            t = scheduler.timesteps[calls[0]]
            replaced = callback(
                {"i": i, "t": t, "x": x, "model_input": model_input, "output": output, "x_next": x_next}
            )
            if replaced is not None:
                x_next = replaced
        x = x_next
    return x


def advance_step(
    model: ModelFn,
    scheduler,
    x: torch.Tensor,
    calls: list[int],
    cond: dict[str, Any],
    kwargs: dict[str, Any],
    *,
    i: int = 0,
    grid: Any = None,
    correct_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    capture: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The model calls and scheduler steps of step ``i`` from state ``x``: ``(x_next, output, model_input, noise)``.

    ``calls``: the step's entries of ``scheduler.timesteps`` (one for most solvers; Heun's predictor
    and corrector). Each call is ``scale_model_input``, ``model``, optional ``correct_output(output, state)`` (``state``
    the call's scheduler sample, for a state-aware output map) and ``scheduler.step`` from the state the previous call
    left (the predicted state for Heun's corrector).
    ``output`` is the model output for a one-call step and otherwise the step's effective output
    (:func:`~qdrift_stats.schedulers.base.first_order_output` on ``grid``, the scheduler's step grid);
    ``model_input`` is the first call's. ``capture``: record the noise the landing call draws
    (``noise``, else None). Used by :func:`run_sampler` and by loops that step a second scheduler in
    lock-step from the same state (recording, moment matching).
    """
    state, first_input, noise = x, None, None
    for n, k in enumerate(calls):
        t = scheduler.timesteps[k]
        model_input = scale_model_input(scheduler, state, t)
        first_input = model_input if first_input is None else first_input
        output = model(model_input, t, **cond)
        if correct_output is not None:
            output = correct_output(output, state)
        if capture and n == len(calls) - 1:
            with capture_step_noise(scheduler) as drawn:
                state = scheduler.step(output, t, state, **kwargs, return_dict=False)[0]
            noise = drawn.noise
        else:
            state = scheduler.step(output, t, state, **kwargs, return_dict=False)[0]
    if len(calls) > 1:
        if grid is None:
            raise QDriftError("a step with more than one model call needs the scheduler's step grid")
        output = first_order_output(grid, i, x, state)
    return state, output, first_input, noise


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
