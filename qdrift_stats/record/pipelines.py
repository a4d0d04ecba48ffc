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
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qdrift_stats.correct.diffusers import SchedulerProxy, mirrors_wrapped_signature, prev_sample_of, with_prev_sample
from qdrift_stats.errors import QDriftError
from qdrift_stats.record.store import (
    SCHEMA,
    SCHEMA_VERSION,
    STORAGE_DTYPES,
    append_run,
    check_compatible,
    package_version,
    repair_store,
    run_dataset,
    store_attrs,
)
from qdrift_stats.schedulers.base import scheduler_identity, step_grid

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

    @property
    def num_steps(self) -> int:
        return len(self.outputs)

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
    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        output = self.scheduler.step(model_output, timestep, sample, *args, **kwargs)
        log = self.log
        log.states.append(sample.detach().clone())
        log.outputs.append(model_output.detach().clone())
        log.next_states.append(prev_sample_of(output).detach().clone())
        log.timesteps.append(_as_float(timestep))
        log.close_step()
        return output


class _ReplayingScheduler(SchedulerProxy):
    """The Q scheduler in lock-step: steps from the FP state with the Q output, returns the FP next state."""

    _proxy_attributes = SchedulerProxy._proxy_attributes | frozenset({"log", "fp_log"})

    def __init__(self, scheduler: Any, log: PassLog, fp_log: PassLog):
        super().__init__(scheduler)
        self.log = log
        self.fp_log = fp_log

    @mirrors_wrapped_signature
    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        i, fp = self.log.num_steps, self.fp_log
        if i >= fp.num_steps:
            raise QDriftError(
                f"the quantized pipeline made more scheduler steps than the full-precision one ({fp.num_steps})"
            )
        if abs(_as_float(timestep) - fp.timesteps[i]) > 1e-6 * max(1.0, abs(fp.timesteps[i])):
            raise QDriftError(
                f"step {i}: the quantized pipeline is at timestep {_as_float(timestep):g}, the full-precision one was at {fp.timesteps[i]:g}"
            )
        state = fp.states[i].to(device=sample.device, dtype=sample.dtype)
        output = self.scheduler.step(model_output, timestep, state, *args, **kwargs)
        self.log.states.append(state)
        self.log.outputs.append(model_output.detach().clone())
        self.log.next_states.append(prev_sample_of(output).detach().clone())
        self.log.timesteps.append(_as_float(timestep))
        self.log.close_step()
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
        log.pending_inputs.append(_latent_input(args, kwargs)[1].detach().clone())

    return hook


def _replace_inputs_hook(log: PassLog, fp_log: PassLog) -> Callable:
    """Pre-hook for the Q denoiser: the ``j``-th call before step ``i`` gets the FP pass's latent input."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        i, j = log.num_steps, len(log.pending_inputs)
        if i >= fp_log.num_steps or j >= len(fp_log.denoiser_inputs[i]):
            raise QDriftError(
                f"the quantized pipeline called its denoiser more often than the full-precision one before step {i}"
            )
        where, latent = _latent_input(args, kwargs)
        replacement = fp_log.denoiser_inputs[i][j]
        if replacement.shape != latent.shape:
            raise QDriftError(
                f"step {i}: the quantized denoiser input has shape {tuple(latent.shape)}, the full-precision one {tuple(replacement.shape)}"
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
    """A new scheduler of the same class and config (no shared state)."""
    return type(scheduler).from_config(dict(scheduler.config))


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
                        f"the scheduler steps a batch of {batch} for {images} images whose copies differ; cannot record it"
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
        The store path. Store variables are ``(run, step, sample, channel, height, width)`` over the
        latents the scheduler steps.
    """
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
    call, conditions, images = _pipeline_call(
        fp_pipe, prompts, class_labels, num_inference_steps, guidance_scale, pipeline_kwargs
    )

    # The grid the pipelines will run: the same set_timesteps on a copy of the FP scheduler.
    probe = _fresh_copy(fp_scheduler)
    probe.set_timesteps(num_inference_steps)
    grid = step_grid(probe)
    identity = scheduler_identity(fp_scheduler)
    if model_id is None:
        model_id = str(getattr(fp_pipe, "name_or_path", None) or "") or None
    out = Path(out)
    identity_attrs = {  # batch_size and sample_shape are known after the first run
        "qdrift_schema": SCHEMA,
        "qdrift_schema_version": SCHEMA_VERSION,
        "pair": pair_name or describe_pipelines(fp_pipe, q_pipe, conditions, guidance_scale, recipe),
        "scheduler": identity["name"],
        "scheduler_class": identity["class"],
        "scheduler_config": json.dumps(identity["config"], sort_keys=True),
        "steps": num_inference_steps,
        "prediction_type": grid.prediction_type,
        "dtype": dtype,
        "trajectories": bool(trajectories),
        "package": "qdrift-stats",
        "package_version": package_version(),
        "pipeline": type(fp_pipe).__name__,
        "denoiser": denoiser_name,
        "guidance_scale": "default" if guidance_scale is None else float(guidance_scale),
        "conditions": json.dumps(conditions, sort_keys=True, default=str),
        "model_id": model_id or "",
        "recipe": recipe or "",
    }
    done_seeds: set[int] = set()
    run_index = 0
    if out.exists():
        if overwrite:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        else:
            existing = store_attrs(out)
            check_compatible(existing, {**existing, **identity_attrs}, out)
            run_index = repair_store(out)
            import zarr

            done_seeds = {int(s) for s in zarr.open_group(out, mode="r")["seed"][:run_index]}
    coords = {"timestep": grid.timesteps, "a": grid.a, "b": grid.b, "a_next": grid.a_next, "b_next": grid.b_next}
    todo = [s for s in seeds if s not in done_seeds]
    for seed in progress(todo) if progress else todo:
        fp_log = run_fp_pass(fp_pipe, call, seed)
        if fp_log.num_steps != grid.num_steps or not np.allclose(fp_log.timesteps, grid.timesteps, rtol=0, atol=1e-6):
            raise QDriftError(
                f"{type(fp_pipe).__name__} ran {fp_log.num_steps} steps at other timesteps than "
                f"{identity['name']}.set_timesteps({num_inference_steps}); pipelines that pass custom timesteps or sigmas are not supported"
            )
        q_log = run_q_pass(q_pipe, fp_scheduler, fp_log, call, seed)
        free_log = run_free_q_pass(q_pipe, fp_scheduler, call, seed) if trajectories else None
        arrays = paired_run_arrays(fp_log, q_log, images, free_log)
        attrs = {
            **identity_attrs,
            "batch_size": int(arrays["delta_x"].shape[1]),
            "sample_shape": list(arrays["delta_x"].shape[2:]),
        }
        if out.exists():
            check_compatible(store_attrs(out), attrs, out)
        arrays = {k: v.astype(STORAGE_DTYPES[dtype]) for k, v in arrays.items()}
        append_run(out, run_dataset(arrays, seed, run_index, coords, attrs))
        run_index += 1
    return out


__all__ = [
    "PassLog",
    "calibrate_pipeline",
    "describe_pipelines",
    "paired_run_arrays",
    "pipeline_denoiser",
    "run_fp_pass",
    "run_q_pass",
]
