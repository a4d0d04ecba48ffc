"""Paired calibration through real diffusers pipelines: :func:`calibrate_pipeline`.

It writes the same calibration store as ``qdrift record`` (:mod:`qdrift_stats.record.store`), from a
full-precision pipeline and its quantized twin (e.g. the same pipeline with its ``unet`` /
``transformer`` replaced by ``qdrift_stats.quantize.quantize(...)``)::

    q_pipe = DiTPipeline.from_pipe(fp_pipe, transformer=quantize(fp_pipe.transformer, "w4a4"))
    calibrate_pipeline(fp_pipe, q_pipe, out="calib.zarr", class_labels=[1, 2, 3, 4],
                       seeds=range(5), num_inference_steps=25, guidance_scale=4.0, recipe="w4a4")

Design: two passes per run, and no knowledge of any pipeline's internals. Whatever a pipeline does
between its denoiser and its scheduler (classifier-free guidance with either batch order, guidance
rescale, a learned-sigma channel split) is done by the pipeline's own code, so the recorded outputs
are exactly the *guided* outputs the scheduler sees.

1. **FP pass.** ``fp_pipe`` runs as usual; its output is not changed. A recording proxy on its
   scheduler stores, per step ``i``, the state the scheduler receives ``x_i``, the guided output
   ``m_fp(x_i)`` and the new state ``x_{i+1}^fp``; a forward pre-hook on its denoiser stores the
   latent input of every denoiser call.
2. **Q pass.** ``q_pipe`` runs with the same arguments and seed. A forward pre-hook on its denoiser
   replaces the latent input of every call by the FP pass's, so the Q denoiser sees exactly the FP
   states (through the Q pipeline's own conditioning and guidance code). Its scheduler is a fresh
   copy of the FP one (same class and config) behind a replaying proxy that steps from ``x_i`` with
   the guided Q output, ``x_{i+1}^q = S_q(x_i, m_q(x_i))`` (a multistep solver keeps its own Q
   history), and hands ``x_{i+1}^fp`` back, so the Q pipeline follows the FP trajectory.

Per step, ``delta_x = x_{i+1}^q - x_{i+1}^fp``, ``delta_out = m_q - m_fp`` and ``out_fp = m_fp`` are
the lock-step quantities of :mod:`qdrift_stats.record.lockstep` (see ``shared/method.md``). A pipeline that
steps a batch holding the same samples twice (``DiTPipeline`` steps the conditional and the
unconditional copy of each latent) is recorded once per image. Optional trajectories add a third,
free-running Q pass (``traj_q``). Each finished run is appended to the store; an existing store of the
same configuration is resumed (only missing seeds are recorded).

Cost per run: two pipeline calls (three with trajectories), i.e. the text encoders and the VAE decode
run twice, the denoisers once each per step, as in ``qdrift record``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qdrift_stats.correct.diffusers import SchedulerProxy, mirrors_wrapped_signature, prev_sample_of, with_prev_sample
from qdrift_stats.errors import QDriftError
from qdrift_stats.record.fingerprint import check_denoiser, fingerprint, probe_spec
from qdrift_stats.record.store import STORAGE_DTYPES, StoreWriter, check_compatible, grid_coordinates, identity_attrs
from qdrift_stats.schedulers.base import StepGrid, call_steps, first_order_output, scheduler_name, step_grid

DENOISER_NAMES: tuple[str, ...] = ("unet", "transformer")
_LATENT_KWARGS: tuple[str, ...] = ("sample", "hidden_states", "x")


# --------------------------------------------------------------------------------------------------
# what one pass records


@dataclass
class PassLog:
    """What one pipeline call showed its scheduler and denoiser, step by step.

    ``states[i]``, ``outputs[i]``, ``next_states[i]``: the ``sample`` and ``model_output`` the
    scheduler's step ``i`` received and the state it returned, each ``(batch, *latent_shape)``;
    ``timesteps[i]``: the step's timestep (host float); ``denoiser_inputs[i]``: the latent inputs of
    the denoiser calls made before step ``i`` (usually one, of batch ``2 * batch`` under guidance).
    """

    states: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    next_states: list[torch.Tensor] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    denoiser_inputs: list[list[torch.Tensor]] = field(default_factory=list)
    pending_inputs: list[torch.Tensor] = field(default_factory=list)
    set_timesteps_call: tuple[tuple, dict] | None = None
    full_grid: StepGrid | None = None
    begin_index: int | None = None
    probe: dict[str, Any] | None = None
    probe_recorded: bool = False
    call_steps: list[int] | None = None
    next_entry: int = 0
    step_start: tuple[torch.Tensor, float] | None = None

    @property
    def num_steps(self) -> int:
        return len(self.outputs)

    @property
    def in_step(self) -> bool:
        """Whether a two-call step (Heun) has made its first call and not landed yet."""
        return self.step_start is not None

    def timesteps_set(self, scheduler: Any) -> None:
        """After ``set_timesteps``: the grid, and which step each timestep entry (model call) belongs to."""
        self.full_grid = step_grid(scheduler)
        self.call_steps = [int(i) for i in call_steps(scheduler)]
        self.begin_index = None
        self.step_start = None
        self.next_entry = 0

    def before_call(self, sample: torch.Tensor, timestep: Any) -> None:
        """Before a ``scheduler.step`` call: the first call of a step keeps the state and timestep it starts at."""
        if self.step_start is None:
            self.step_start = (sample, _as_float(timestep))
        self.next_entry += 1

    def after_call(self, scheduler: Any) -> tuple[int, bool]:
        """After a ``scheduler.step`` call: ``(step of the full grid, whether the step landed)``.

        Every call lands for one-call solvers; for a two-call solver (Heun, PLMS' first step) the call's
        entry of ``timesteps`` is the scheduler's own ``step_index`` where it has one (it follows img2img
        begin indices), else the count of calls since ``set_timesteps`` / ``set_begin_index``."""
        steps = self.call_steps
        if steps is None or len(set(steps)) == len(steps):
            return -1, True
        inner = getattr(scheduler, "_step_index", None)
        k = inner - 1 if isinstance(inner, int) else self.next_entry - 1
        if not 0 <= k < len(steps):
            raise QDriftError(f"scheduler step {k} is outside the {len(steps)} timesteps set by set_timesteps")
        return steps[k], k + 1 == len(steps) or steps[k + 1] != steps[k]

    def land(self, i: int, output: torch.Tensor, next_state: torch.Tensor) -> None:
        """Log one step that landed: the state it started at, its (effective) output and its new state."""
        sample, t = self.step_start
        if i >= 0:  # a two-call step: the output a first-order step from its start would need
            output = first_order_output(self.full_grid, i, sample, next_state)
        self.step_start = None
        self.states.append(sample.detach().clone())
        self.outputs.append(output.detach().clone())
        self.next_states.append(next_state.detach().clone())
        self.timesteps.append(t)
        self.close_step()

    def close_step(self) -> None:
        self.denoiser_inputs.append(self.pending_inputs)
        self.pending_inputs = []


def _as_float(timestep: Any) -> float:
    return float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)


class _RecordingScheduler(SchedulerProxy):
    """Forwards every call; ``step`` also logs its inputs and its new state (the output is unchanged)."""

    _proxy_attributes = SchedulerProxy._proxy_attributes | frozenset({"log"})

    def __init__(self, scheduler: Any, log: PassLog):
        super().__init__(scheduler)
        self.log = log

    @mirrors_wrapped_signature
    def set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped ``set_timesteps``; the call (``mu``, ``sigmas``, ``timesteps``, ...) and its grid are logged."""
        result = self.scheduler.set_timesteps(*args, **kwargs)
        self.log.set_timesteps_call = (tuple(args), dict(kwargs))
        self.log.timesteps_set(self.scheduler)
        return result

    def set_begin_index(self, begin_index: int = 0) -> None:
        """img2img pipelines start at step ``begin_index`` of the grid (logged)."""
        inner = getattr(self.scheduler, "set_begin_index", None)
        if inner is not None:
            inner(begin_index)
        steps = self.log.call_steps  # an entry of timesteps; the grid's step (Heun: entry 2i is step i)
        self.log.next_entry = int(begin_index)
        self.log.begin_index = steps[begin_index] if steps and 0 <= begin_index < len(steps) else int(begin_index)

    @mirrors_wrapped_signature
    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        log = self.log
        log.before_call(sample, timestep)
        output = self.scheduler.step(model_output, timestep, sample, *args, **kwargs)
        i, landed = log.after_call(self.scheduler)
        if landed:
            log.land(i, model_output, prev_sample_of(output))
        return output


class _ReplayingScheduler(SchedulerProxy):
    """The Q scheduler in lock-step: steps from the FP state with the Q output, returns the FP next state."""

    _proxy_attributes = SchedulerProxy._proxy_attributes | frozenset({"log", "fp_log"})

    def __init__(self, scheduler: Any, log: PassLog, fp_log: PassLog):
        super().__init__(scheduler)
        self.log = log
        self.fp_log = fp_log

    @mirrors_wrapped_signature
    def set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
        result = self.scheduler.set_timesteps(*args, **kwargs)
        self.log.timesteps_set(self.scheduler)
        return result

    @mirrors_wrapped_signature
    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """A step's first call steps from the FP state; a two-call step's later calls (Heun's corrector)
        continue from the state the Q scheduler itself predicted, so the Q step is the quantized
        sampler's whole step from ``x_i``; the landing hands the FP state back."""
        i, fp, log = self.log.num_steps, self.fp_log, self.log
        if i >= fp.num_steps:
            raise QDriftError(
                f"the quantized pipeline made more scheduler steps than the full-precision one ({fp.num_steps})"
            )
        if not log.in_step:
            if abs(_as_float(timestep) - fp.timesteps[i]) > 1e-6 * max(1.0, abs(fp.timesteps[i])):
                raise QDriftError(
                    f"step {i}: the quantized pipeline is at timestep {_as_float(timestep):g}, the "
                    f"full-precision one was at {fp.timesteps[i]:g}"
                )
            sample = fp.states[i].to(device=sample.device, dtype=sample.dtype)
        log.before_call(sample, timestep)
        output = self.scheduler.step(model_output, timestep, sample, *args, **kwargs)
        k, landed = log.after_call(self.scheduler)
        if not landed:
            return output  # Heun's predictor: the pipeline evaluates the Q model at the Q prediction
        log.land(k, model_output, prev_sample_of(output))
        fp_next = fp.next_states[i].to(device=sample.device, dtype=sample.dtype).clone()
        return with_prev_sample(output, fp_next)


# --------------------------------------------------------------------------------------------------
# denoiser hooks


def pipeline_denoiser(pipe: Any) -> tuple[str, nn.Module]:
    """``(name, module)`` of a pipeline's denoiser: its ``unet`` or ``transformer``."""
    for name in DENOISER_NAMES:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise QDriftError(f"{type(pipe).__name__} has no 'unet' or 'transformer' module to calibrate")


def _latent_input(args: tuple, kwargs: dict) -> tuple[str | int, torch.Tensor]:
    """Where the latent sits in a denoiser call: positional 0, or ``sample`` / ``hidden_states``."""
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    for name in _LATENT_KWARGS:
        if isinstance(kwargs.get(name), torch.Tensor):
            return name, kwargs[name]
    raise QDriftError(
        "cannot find the latent input of the denoiser call (expected it first, or as sample= / hidden_states=)"
    )


def _record_inputs_hook(log: PassLog) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not log.probe_recorded:  # the structure of the first denoiser call, for the fingerprint probe
            log.probe, log.probe_recorded = probe_spec(tuple(args), dict(kwargs)), True
        log.pending_inputs.append(_latent_input(args, kwargs)[1].detach().clone())

    return hook


def _replace_inputs_hook(log: PassLog, fp_log: PassLog) -> Callable:
    """Pre-hook for the Q denoiser: the ``j``-th call before step ``i`` gets the FP pass's latent input."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        i, j = log.num_steps, len(log.pending_inputs)
        if log.in_step:  # a two-call step's later call (Heun's corrector): at the Q sampler's own prediction
            log.pending_inputs.append(_latent_input(args, kwargs)[1].detach().clone())
            return None
        if i >= fp_log.num_steps or j >= len(fp_log.denoiser_inputs[i]):
            raise QDriftError(
                f"the quantized pipeline called its denoiser more often than the full-precision one before step {i}"
            )
        where, latent = _latent_input(args, kwargs)
        replacement = fp_log.denoiser_inputs[i][j]
        if replacement.shape != latent.shape:
            raise QDriftError(
                f"step {i}: the quantized denoiser input has shape {tuple(latent.shape)}, the "
                f"full-precision one {tuple(replacement.shape)}"
            )
        replacement = replacement.to(device=latent.device, dtype=latent.dtype)
        log.pending_inputs.append(replacement)
        if where == 0:
            return (replacement,) + tuple(args[1:]), kwargs
        return args, {**kwargs, where: replacement}

    return hook


# --------------------------------------------------------------------------------------------------
# running the passes


def _call_pipeline(pipe: Any, call: dict[str, Any], seed: int) -> None:
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        pipe(**call, generator=generator)


def _fresh_copy(scheduler: Any) -> Any:
    """A new scheduler of the same class and config (no shared state).

    diffusers' ``_use_default_values`` is dropped: ``from_config`` resets the keys it lists to their
    defaults, which undoes a pipeline's in-place config patches (Stable Diffusion sets
    ``steps_offset=1`` on a scheduler created without it)."""
    config = {k: v for k, v in dict(scheduler.config).items() if k != "_use_default_values"}
    return type(scheduler).from_config(config)


def run_fp_pass(fp_pipe: Any, call: dict[str, Any], seed: int) -> PassLog:
    """Run the full-precision pipeline once, recording what its scheduler and denoiser see."""
    log = PassLog()
    _, denoiser = pipeline_denoiser(fp_pipe)
    scheduler = fp_pipe.scheduler
    handle = denoiser.register_forward_pre_hook(_record_inputs_hook(log), with_kwargs=True)
    fp_pipe.scheduler = _RecordingScheduler(scheduler, log)
    try:
        _call_pipeline(fp_pipe, call, seed)
    finally:
        fp_pipe.scheduler = scheduler
        handle.remove()
    return log


def run_q_pass(q_pipe: Any, fp_scheduler: Any, fp_log: PassLog, call: dict[str, Any], seed: int) -> PassLog:
    """Run the quantized pipeline in lock-step along a recorded FP pass (see the module docstring)."""
    log = PassLog()
    _, denoiser = pipeline_denoiser(q_pipe)
    scheduler = q_pipe.scheduler
    handle = denoiser.register_forward_pre_hook(_replace_inputs_hook(log, fp_log), with_kwargs=True)
    q_pipe.scheduler = _ReplayingScheduler(_fresh_copy(fp_scheduler), log, fp_log)
    try:
        _call_pipeline(q_pipe, call, seed)
    finally:
        q_pipe.scheduler = scheduler
        handle.remove()
    if log.num_steps != fp_log.num_steps:
        raise QDriftError(
            f"the quantized pipeline made {log.num_steps} scheduler steps, the full-precision one {fp_log.num_steps}"
        )
    return log


def run_free_q_pass(q_pipe: Any, fp_scheduler: Any, call: dict[str, Any], seed: int) -> PassLog:
    """Run the quantized pipeline on its own trajectory (for ``traj_q``), with a copy of the FP scheduler."""
    log = PassLog()
    scheduler = q_pipe.scheduler
    q_pipe.scheduler = _RecordingScheduler(_fresh_copy(fp_scheduler), log)
    try:
        _call_pipeline(q_pipe, call, seed)
    finally:
        q_pipe.scheduler = scheduler
    return log


def _rows_per_image(batch: int, images: int | None, logs: Sequence[PassLog]) -> slice:
    """The rows of the stepped batch that hold distinct samples (a pipeline may step duplicates)."""
    if images is None or batch == images:
        return slice(None)
    if images < 1 or batch % images:
        raise QDriftError(f"the scheduler steps a batch of {batch} for {images} images; cannot tell the samples apart")
    copies = batch // images
    for log in logs:
        for tensors in (log.states, log.outputs, log.next_states):
            for t in tensors:
                blocks = t.reshape(copies, images, -1)
                if not all(torch.equal(blocks[0], blocks[k]) for k in range(1, copies)):
                    raise QDriftError(
                        f"the scheduler steps a batch of {batch} for {images} images whose copies "
                        "differ; cannot record it"
                    )
    return slice(0, images)


def paired_run_arrays(
    fp_log: PassLog, q_log: PassLog, images: int | None, free_q_log: PassLog | None = None
) -> dict[str, np.ndarray]:
    """Store arrays of one run, float32 ``(steps, batch, *latent_shape)``.

    Raises:
        QDriftError: if either pipeline produced a non-finite value.
    """
    rows = _rows_per_image(fp_log.states[0].shape[0], images, [fp_log, q_log])

    def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([t[rows].detach().float().cpu() for t in tensors])

    x_fp, x_q = stack(fp_log.next_states), stack(q_log.next_states)
    m_fp, m_q = stack(fp_log.outputs), stack(q_log.outputs)
    for name, value in (("m_fp", m_fp), ("m_q", m_q), ("x_fp", x_fp), ("x_q", x_q)):
        if not bool(torch.isfinite(value).all()):
            step = int(torch.nonzero(~torch.isfinite(value.reshape(len(value), -1)).all(dim=1))[0])
            raise QDriftError(f"non-finite {name} at step {step}; nothing was written for this run")
    arrays = {"delta_x": (x_q - x_fp).numpy(), "delta_out": (m_q - m_fp).numpy(), "out_fp": m_fp.numpy()}
    if free_q_log is not None:
        arrays["traj_fp"] = x_fp.numpy()
        arrays["traj_q"] = stack(free_q_log.next_states).numpy()
    return arrays


# --------------------------------------------------------------------------------------------------
# the grid a pipeline ran: its own set_timesteps call, replayed


@dataclass(frozen=True)
class ReplayedGrid:
    """The steps a pipeline ran: a contiguous part of the grid its own ``set_timesteps`` call gave.

    ``grid``: the per-step coordinates of the steps run; ``begin_index``: where they start in the
    full grid of ``full_steps`` steps (img2img / inpaint skip the first ``begin_index``);
    ``call``: the ``set_timesteps`` arguments (JSON-able: ``num_inference_steps``, ``mu``,
    ``sigmas``, ``timesteps``, ...; the device left out).
    """

    grid: StepGrid
    begin_index: int
    full_steps: int
    call: dict[str, Any]

    def coordinates(self) -> dict[str, np.ndarray]:
        """The store's per-step coordinates on the replayed grid
        (:func:`qdrift_stats.record.store.grid_coordinates`)."""
        return grid_coordinates(self.grid)

    def same_as(self, other: ReplayedGrid) -> bool:
        return (
            self.begin_index == other.begin_index
            and self.grid.num_steps == other.grid.num_steps
            and np.allclose(self.grid.timesteps, other.grid.timesteps, rtol=0, atol=1e-6)
            and np.allclose(self.grid.b_next, other.grid.b_next, rtol=1e-6, atol=1e-9)
        )


def _json_arg(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    if isinstance(value, np.ndarray):
        return [float(v) for v in value.reshape(-1)]
    if isinstance(value, (list, tuple)):
        return [_json_arg(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def replayed_grid(fp_log: PassLog, name: str) -> ReplayedGrid:
    """The grid of an FP pass: the logged ``set_timesteps`` call's grid, from the step the pipeline began at."""
    full = fp_log.full_grid
    if full is None or fp_log.set_timesteps_call is None:
        raise QDriftError("the pipeline never called scheduler.set_timesteps; cannot tell the step grid")
    n = fp_log.num_steps
    logged = np.asarray(fp_log.timesteps, dtype=np.float64)

    def matches(k: int) -> bool:
        return 0 <= k and k + n <= full.num_steps and np.allclose(full.timesteps[k : k + n], logged, rtol=0, atol=1e-6)

    begin = fp_log.begin_index
    if begin is None or not matches(begin):
        begin = next((k for k in range(full.num_steps - n + 1) if matches(k)), None)
    if begin is None:
        raise QDriftError(
            f"the pipeline ran {n} steps at timesteps {_short(logged)} that are not a contiguous part of the "
            f"{full.num_steps}-step grid its set_timesteps call gave ({_short(full.timesteps)})"
        )
    sl = slice(begin, begin + n)
    grid = StepGrid(
        name, full.timesteps[sl], full.a[sl], full.b[sl], full.a_next[sl], full.b_next[sl], full.prediction_type
    )
    args, kwargs = fp_log.set_timesteps_call
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    args = tuple(a for a in args if not isinstance(a, (torch.device, str)))  # set_timesteps(n, device)
    call = {"args": _json_arg(list(args)), **{k: _json_arg(v) for k, v in sorted(kwargs.items())}}
    return ReplayedGrid(grid, int(begin), full.num_steps, call)


def _short(values: np.ndarray) -> str:
    values = [f"{v:g}" for v in np.asarray(values).reshape(-1)]
    return "[" + ", ".join(values if len(values) <= 6 else values[:3] + ["..."] + values[-2:]) + "]"


def latent_dims(latent_shape: Sequence[int]) -> tuple[str, ...]:
    """Names of the dims of the latents a pipeline's scheduler steps (without the batch).

    ``(channel, height, width)`` for image latents; ``(token, channel)`` for packed token latents
    (Flux, and any pipeline that steps ``(batch, tokens, channels)``), so that per-channel
    statistics use the real channels; ``(channel, frame, height, width)`` for video latents.
    """
    if len(latent_shape) == 2:
        return ("token", "channel")
    if len(latent_shape) == 3:
        return ("channel", "height", "width")
    if len(latent_shape) == 4:
        return ("channel", "frame", "height", "width")
    return ("channel",) + tuple(f"dim_{k}" for k in range(1, len(latent_shape)))


@dataclass
class PipelineRun:
    """One recorded run: the store arrays ``(steps, batch, *latent)`` and the grid it ran on."""

    arrays: dict[str, np.ndarray]
    replay: ReplayedGrid
    probe: dict[str, Any] | None


def record_pipeline_run(
    fp_pipe: Any,
    q_pipe: Any,
    call: dict[str, Any],
    seed: int,
    images: int | None,
    trajectories: bool = False,
    dtype: str = "float32",
) -> PipelineRun:
    """One paired run (FP pass, lock-step Q pass, optional free Q pass) of one seed."""
    fp_scheduler = fp_pipe.scheduler
    fp_log = run_fp_pass(fp_pipe, call, seed)
    replay = replayed_grid(fp_log, scheduler_name(fp_scheduler))
    q_log = run_q_pass(q_pipe, fp_scheduler, fp_log, call, seed)
    free_log = run_free_q_pass(q_pipe, fp_scheduler, call, seed) if trajectories else None
    arrays = paired_run_arrays(fp_log, q_log, images, free_log)
    arrays = {k: v.astype(STORAGE_DTYPES[dtype]) for k, v in arrays.items()}
    return PipelineRun(arrays, replay, fp_log.probe)


# --------------------------------------------------------------------------------------------------
# the public entry point


def describe_pipelines(
    fp_pipe: Any, q_pipe: Any, conditions: dict[str, Any], guidance_scale: float | None, recipe: str | None
) -> str:
    """The store's ``pair`` attribute: pipeline, denoisers, recipe, guidance and a digest of the conditions."""
    fp_name, fp_model = pipeline_denoiser(fp_pipe)
    _, q_model = pipeline_denoiser(q_pipe)
    digest = hashlib.sha1(json.dumps(conditions, sort_keys=True, default=str).encode()).hexdigest()[:10]
    source = str(getattr(fp_pipe, "name_or_path", None) or "local")
    return (
        f"{type(fp_pipe).__name__}({source}): {fp_name} {type(fp_model).__name__} fp vs {type(q_model).__name__} "
        f"{recipe or 'quantized'}; guidance {guidance_scale}; conditions sha1:{digest}"
    )


def _accepts(pipe: Any, name: str) -> bool:
    params = inspect.signature(pipe.__call__).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _pipeline_call(
    pipe: Any,
    prompts: Sequence[str] | None,
    class_labels: Sequence[int] | None,
    num_inference_steps: int,
    guidance_scale: float | None,
    pipeline_kwargs: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """``(call kwargs, conditions, images per run)``."""
    extra = dict(pipeline_kwargs or {})
    if "generator" in extra or "latents" in extra:
        raise QDriftError("calibrate_pipeline draws each run's noise from its seed; do not pass generator= or latents=")
    if prompts is not None and class_labels is not None:
        raise QDriftError("give prompts or class_labels, not both")
    conditions: dict[str, Any] = {}
    images: int | None = None
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        conditions["prompt"] = prompts
        images = len(prompts) * int(extra.get("num_images_per_prompt", 1) or 1)
    if class_labels is not None:
        conditions["class_labels"] = [int(c) for c in class_labels]
        images = len(conditions["class_labels"])
    if images is not None and images < 1:
        raise QDriftError("prompts / class_labels must not be empty")
    call = {**extra, **conditions, "num_inference_steps": int(num_inference_steps)}
    if guidance_scale is not None:
        if not _accepts(pipe, "guidance_scale"):
            raise QDriftError(f"{type(pipe).__name__} takes no guidance_scale")
        call["guidance_scale"] = float(guidance_scale)
    if _accepts(pipe, "output_type"):
        call.setdefault("output_type", "latent")  # the images themselves are not needed
    recorded = {
        **conditions,
        **{k: f"tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else v for k, v in extra.items()},
    }
    return call, recorded, images


def calibrate_pipeline(
    fp_pipe: Any,
    q_pipe: Any,
    *,
    out: str | Path,
    seeds: Iterable[int],
    num_inference_steps: int,
    guidance_scale: float | None = None,
    prompts: Sequence[str] | str | None = None,
    class_labels: Sequence[int] | None = None,
    pipeline_kwargs: dict[str, Any] | None = None,
    pair_name: str | None = None,
    model_id: str | None = None,
    recipe: str | None = None,
    trajectories: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: Callable[[Iterable], Iterator] | None = None,
) -> Path:
    """Record paired FP / quantized runs through two diffusers pipelines into a calibration store.

    Args:
        fp_pipe, q_pipe: pipelines of the same kind whose denoisers (``unet`` / ``transformer``)
            are the full-precision model and its quantized twin. ``fp_pipe.scheduler`` (a supported
            scheduler: :data:`qdrift_stats.schedulers.base.SCHEDULER_NAMES`) drives both; ``q_pipe``'s own
            scheduler is not used. Neither pipeline is changed.
        out: the store (zarr v3). An existing store of the same configuration is resumed.
        seeds: one run per seed; a run is one pipeline call with every prompt / class label, its
            noise drawn by ``torch.Generator("cpu").manual_seed(seed)``.
        num_inference_steps, guidance_scale: passed to both pipelines (``guidance_scale=None``: the
            pipeline's default).
        prompts / class_labels: the conditions of every run (text-to-image / class-conditional).
        pipeline_kwargs: further keyword arguments for both pipeline calls (``negative_prompt``,
            ``num_images_per_prompt``, ``height``, ...; not ``generator`` or ``latents``).
        pair_name: the store's ``pair`` attribute (default: :func:`describe_pipelines`).
        model_id, recipe: identifiers of the FP model and the PTQ recipe, kept in the store and in
            estimator files fitted from it (``model_id`` defaults to ``fp_pipe.name_or_path``).
        trajectories: also record ``traj_fp`` and a free-running ``traj_q`` (one more Q call per run).
        dtype: ``"float32"`` or ``"float16"`` storage.

    Returns:
        The store path. Store variables are ``(run, step, sample, *latent dims)`` over the latents the
        scheduler steps: ``channel, height, width`` for image latents, ``token, channel`` for packed
        token latents (Flux); see :func:`latent_dims`. The step grid is the one the pipeline's own
        ``set_timesteps`` call gave (custom ``sigmas`` / ``timesteps``, ``mu`` of a resolution-dependent
        shift), from the step it began at (img2img ``strength``): see :class:`ReplayedGrid`.
    """
    plan = calibration_plan(
        fp_pipe,
        q_pipe,
        seeds=seeds,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        prompts=prompts,
        class_labels=class_labels,
        pipeline_kwargs=pipeline_kwargs,
        pair_name=pair_name,
        model_id=model_id,
        recipe=recipe,
        trajectories=trajectories,
        dtype=dtype,
    )
    with PipelineStoreWriter(out, plan, overwrite) as writer:
        for seed in progress(writer.todo) if progress else writer.todo:
            run = record_pipeline_run(fp_pipe, q_pipe, plan.call, seed, plan.images, trajectories, dtype)
            fingerprint_json = writer.fingerprint_of(run, fp_pipe, q_pipe) if writer.needs_fingerprint else None
            writer.commit(seed, run, fingerprint_json)
    return Path(out)


@dataclass
class CalibrationPlan:
    """What every run of a pipeline calibration shares: the pipeline call, the images per call, the
    seeds and the store attributes known before the first run."""

    call: dict[str, Any]
    images: int | None
    seeds: list[int]
    identity_attrs: dict[str, Any]


def calibration_plan(
    fp_pipe: Any,
    q_pipe: Any,
    *,
    seeds: Iterable[int],
    num_inference_steps: int,
    guidance_scale: float | None = None,
    prompts: Sequence[str] | str | None = None,
    class_labels: Sequence[int] | None = None,
    pipeline_kwargs: dict[str, Any] | None = None,
    pair_name: str | None = None,
    model_id: str | None = None,
    recipe: str | None = None,
    trajectories: bool = False,
    dtype: str = "float32",
) -> CalibrationPlan:
    """Check the arguments of :func:`calibrate_pipeline` (one-line :class:`QDriftError`) and plan the runs."""
    if dtype not in STORAGE_DTYPES:
        raise QDriftError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise QDriftError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise QDriftError("seeds must be a non-empty list of distinct integers")
    if type(fp_pipe) is not type(q_pipe):
        raise QDriftError(f"the pipelines differ: {type(fp_pipe).__name__} and {type(q_pipe).__name__}")
    denoiser_name, fp_denoiser = pipeline_denoiser(fp_pipe)
    if pipeline_denoiser(q_pipe)[1] is fp_denoiser:
        raise QDriftError("fp_pipe and q_pipe share the same denoiser; give q_pipe the quantized one")
    fp_scheduler = fp_pipe.scheduler
    if isinstance(fp_scheduler, SchedulerProxy):
        raise QDriftError(
            f"fp_pipe.scheduler is a {type(fp_scheduler).__name__}; calibrate with the plain diffusers scheduler"
        )
    scheduler_name(fp_scheduler)  # an unsupported scheduler is refused before any pipeline call
    call, conditions, images = _pipeline_call(
        fp_pipe, prompts, class_labels, num_inference_steps, guidance_scale, pipeline_kwargs
    )
    if model_id is None:
        model_id = str(getattr(fp_pipe, "name_or_path", None) or "") or None
    identity = identity_attrs(  # the grid, batch_size and sample_shape are known after the first run
        pair_name or describe_pipelines(fp_pipe, q_pipe, conditions, guidance_scale, recipe),
        fp_scheduler,
        dtype=dtype,
        trajectories=trajectories,
        extra={
            "num_inference_steps": num_inference_steps,
            "pipeline": type(fp_pipe).__name__,
            "denoiser": denoiser_name,
            "guidance_scale": "default" if guidance_scale is None else float(guidance_scale),
            "conditions": json.dumps(conditions, sort_keys=True, default=str),
            "model_id": model_id or "",
            "recipe": recipe or "",
        },
    )
    return CalibrationPlan(call, images, seeds, identity)


class PipelineStoreWriter:
    """The store writer of a pipeline calibration: :class:`~qdrift_stats.record.store.StoreWriter` (lock,
    resume, commit point) plus what the first run fixes (the grid, the latent layout, the fingerprint).

    ``with PipelineStoreWriter(out, plan, overwrite) as w:`` lists the seeds still to record in
    ``w.todo``; ``w.commit(seed, run, fingerprint_json)`` appends one run (later runs must run the
    first one's grid). Used by :func:`calibrate_pipeline` and by the distributed calibration, so both
    write the same store.
    """

    def __init__(self, out: str | Path, plan: CalibrationPlan, overwrite: bool = False):
        self.out = Path(out)
        self.plan = plan
        self.writer = StoreWriter(self.out, plan.identity_attrs, overwrite=overwrite)
        self.existing: dict[str, Any] | None = None
        self.todo: list[int] = []
        self.first: PipelineRun | None = None
        self.first_seed = -1

    def __enter__(self) -> PipelineStoreWriter:
        self.writer.__enter__()
        self.existing = self.writer.existing
        self.todo = self.writer.todo(self.plan.seeds)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.writer.__exit__(*exc)

    @property
    def needs_fingerprint(self) -> bool:
        """Whether the next committed run is the first (it fixes the store's fingerprint)."""
        return self.first is None

    def fingerprint_of(self, run: PipelineRun, fp_pipe: Any, q_pipe: Any) -> str:
        """The ``q_fingerprint`` attribute for the first run (see :func:`fingerprint_attr`)."""
        return fingerprint_attr(run, fp_pipe, q_pipe, self.existing)

    def commit(self, seed: int, run: PipelineRun, fingerprint_json: str | None = None) -> int:
        """Append one run; returns the store's run count."""
        w = self.writer
        if self.first is None:
            self.first, self.first_seed = run, seed
            w.attrs = pipeline_run_attrs(self.plan.identity_attrs, run, fingerprint_json or "")
            w.coords = run.replay.coordinates()
            w.dims = run_attrs_dims(w.attrs)
            if self.existing is not None:
                check_same_pipeline_store(self.out, self.existing, w.attrs, w.coords)
        elif not run.replay.same_as(self.first.replay):
            raise QDriftError(
                f"seed {seed}: the pipeline ran another step grid than for seed {self.first_seed}; "
                "calibrate runs of one grid per store"
            )
        return w.append(seed, run.arrays)


def run_attrs_dims(attrs: dict[str, Any]) -> tuple[str, ...]:
    return tuple(json.loads(attrs["sample_dims"]))


def fingerprint_attr(run: PipelineRun, fp_pipe: Any, q_pipe: Any, existing: dict[str, Any] | None = None) -> str:
    """The ``q_fingerprint`` store attribute (JSON, see :mod:`qdrift_stats.record.fingerprint`; empty if
    the denoiser call cannot be probed). When runs are appended to an ``existing`` store with a
    fingerprint of the same probe, only the quantized denoiser is probed again, and refused if it differs."""
    old = json.loads(existing["q_fingerprint"]) if existing and existing.get("q_fingerprint") else None
    if old is not None and old.get("probe") == run.probe:
        check_denoiser(pipeline_denoiser(q_pipe)[1], old, "the store")  # refuses another quantized model
        return str(existing["q_fingerprint"])
    if run.probe is None:
        return ""
    recorded = fingerprint(pipeline_denoiser(fp_pipe)[1], pipeline_denoiser(q_pipe)[1], run.probe)
    return json.dumps(recorded, sort_keys=True) if recorded is not None else ""


def pipeline_run_attrs(identity_attrs: dict[str, Any], run: PipelineRun, fingerprint_json: str) -> dict[str, Any]:
    """The store attributes once the first run has shown the grid, the batch and the latent layout.

    Besides the record store's attributes: ``set_timesteps`` (the pipeline's own call, JSON),
    ``begin_index`` and ``grid_steps`` (img2img runs the last ``steps`` of ``grid_steps``),
    ``sample_dims`` (JSON list, see :func:`latent_dims`) and ``q_fingerprint`` (:func:`fingerprint_attr`).
    """
    shape = run.arrays["delta_x"].shape
    replay = run.replay
    return {
        **identity_attrs,
        "steps": int(replay.grid.num_steps),
        "grid_steps": int(replay.full_steps),
        "begin_index": int(replay.begin_index),
        "set_timesteps": json.dumps(replay.call, sort_keys=True),
        "prediction_type": replay.grid.prediction_type,
        "batch_size": int(shape[1]),
        "sample_shape": list(shape[2:]),
        "sample_dims": json.dumps(list(latent_dims(shape[2:]))),
        "q_fingerprint": fingerprint_json,
    }


def check_same_pipeline_store(out: Path, existing: dict[str, Any], attrs: dict[str, Any], coords: dict) -> None:
    """Refuse to append runs of another grid or latent layout to an existing store."""
    check_compatible(existing, attrs, out)
    import zarr

    group = zarr.open_group(out, mode="r")
    timesteps = np.asarray(group["timestep"][:], dtype=np.float64)
    b_next = np.asarray(group["b_next"][:], dtype=np.float64)
    if len(timesteps) != len(coords["timestep"]) or not (
        np.allclose(timesteps, coords["timestep"], rtol=0, atol=1e-6)
        and np.allclose(b_next, coords["b_next"], rtol=1e-6, atol=1e-9)
    ):
        raise QDriftError(
            f"{out} was recorded on the step grid {_short(timesteps)}, this pipeline runs "
            f"{_short(coords['timestep'])}; "
            "choose another --out or pass --overwrite"
        )
    if existing.get("sample_dims") and existing.get("sample_dims") != attrs.get("sample_dims"):
        raise QDriftError(f"{out} was recorded with latent dims {existing['sample_dims']}, not {attrs['sample_dims']}")


__all__ = [
    "CalibrationPlan",
    "PassLog",
    "PipelineStoreWriter",
    "calibration_plan",
    "fingerprint_attr",
    "PipelineRun",
    "ReplayedGrid",
    "latent_dims",
    "record_pipeline_run",
    "replayed_grid",
    "calibrate_pipeline",
    "describe_pipelines",
    "paired_run_arrays",
    "pipeline_denoiser",
    "run_fp_pass",
    "run_q_pass",
]
