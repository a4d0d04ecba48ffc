"""Adapters between diffusers schedulers and the state coordinates Q-Drift needs.

Every supported sampler keeps a state ``x = a * x0 + b * eps``. After ``set_timesteps`` an
adapter reads, for each step ``i``, the coordinates ``(a_i, b_i)`` of the current state and
``(a_{i+1}, b_{i+1})`` of the level the step lands on, and turns a model output into the
clean-sample estimate ``x0_hat``. diffusers does the steps; nothing here re-implements a solver.

Scheduler names (the command line's ``--scheduler``):

============== ==================================================== ==============
name           diffusers class                                      pair kind
============== ==================================================== ==============
euler          ``EulerDiscreteScheduler``                           VP (eps/v/x0)
ddim           ``DDIMScheduler`` (eta 0)                            VP
dpmpp-2m       ``DPMSolverMultistepScheduler`` (2M, dpmsolver++)    VP
flow-euler     ``FlowMatchEulerDiscreteScheduler``                  flow (velocity)
flow-dpmpp-2m  ``DPMSolverMultistepScheduler`` with flow sigmas     flow (velocity)
============== ==================================================== ==============
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from qdrift_stats.errors import QDriftError

SCHEDULER_NAMES: tuple[str, ...] = ("euler", "ddim", "dpmpp-2m", "flow-euler", "flow-dpmpp-2m")
VP_SCHEDULERS: tuple[str, ...] = ("euler", "ddim", "dpmpp-2m")
FLOW_SCHEDULERS: tuple[str, ...] = ("flow-euler", "flow-dpmpp-2m")

FLOW_PREDICTION = "flow_prediction"
_VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def is_flow_config(config: dict[str, Any]) -> bool:
    """Whether a pair's scheduler config describes a flow-matching (velocity) model."""
    return (
        config.get("prediction_type") == FLOW_PREDICTION
        or "FlowMatch" in str(config.get("_class_name", ""))
        or ("shift" in config and "beta_schedule" not in config)
    )


def make_scheduler(name: str, config: dict[str, Any]):
    """Build the diffusers scheduler called ``name`` from a pair's ``scheduler_config``.

    Raises :class:`QDriftError` for an unknown name or a scheduler that does not fit the pair
    (a flow scheduler for an epsilon model, or the reverse).
    """
    if name not in SCHEDULER_NAMES:
        raise QDriftError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    flow = is_flow_config(config)
    if flow and name in VP_SCHEDULERS:
        raise QDriftError(
            f"scheduler {name!r} needs a VP model but the pair is flow-matching; use flow-euler or flow-dpmpp-2m"
        )
    if not flow and name in FLOW_SCHEDULERS:
        raise QDriftError(
            f"scheduler {name!r} needs a flow-matching model but the pair predicts {config.get('prediction_type', 'epsilon')!r}"
        )
    if not flow and config.get("prediction_type", "epsilon") not in _VP_PREDICTIONS:
        raise QDriftError(f"unsupported prediction_type {config.get('prediction_type')!r}")
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpmpp-2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "flow-euler":
        return FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in config.items() if k != "prediction_type"})
    flow_config = {k: v for k, v in config.items() if k not in ("shift", "prediction_type")}
    return DPMSolverMultistepScheduler.from_config(
        flow_config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_flow_sigmas=True,
        prediction_type=FLOW_PREDICTION,
        flow_shift=float(config.get("shift", 1.0)),
    )


def scheduler_name(scheduler) -> str:
    """The name in :data:`SCHEDULER_NAMES` of a configured diffusers scheduler instance."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return "flow-euler"
    if isinstance(scheduler, EulerDiscreteScheduler):
        return "euler"
    if isinstance(scheduler, DDIMScheduler):
        return "ddim"
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        return "flow-dpmpp-2m" if scheduler.config.use_flow_sigmas else "dpmpp-2m"
    raise QDriftError(
        f"unsupported scheduler class {type(scheduler).__name__}; supported: {', '.join(SCHEDULER_NAMES)}"
    )


@dataclass(frozen=True)
class StepGrid:
    """State coordinates of a configured scheduler, float64 numpy arrays of length ``num_steps``.

    ``a[i], b[i]``: the state at the start of step ``i`` is ``a x0 + b eps``;
    ``a_next[i], b_next[i]``: the level step ``i`` lands on (``b_next[-1]`` is 0 for the usual
    final step to the clean sample); ``timesteps[i]``: the scheduler's timestep for step ``i``.
    """

    name: str
    timesteps: np.ndarray
    a: np.ndarray
    b: np.ndarray
    a_next: np.ndarray
    b_next: np.ndarray
    prediction_type: str

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def x0_from_output(self, i: int, x: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """Clean-sample estimate ``x0_hat`` from the model output at step ``i`` and state ``x``.

        ``x`` is the unscaled scheduler state (before ``scale_model_input``). Shapes: any, equal.
        """
        return x0_from_output(self.prediction_type, float(self.a[i]), float(self.b[i]), x, model_output)


def x0_from_output(prediction_type: str, a: float, b: float, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Clean-sample estimate from a model output, for a state ``x = a x0 + b eps``.

    VP predictions assume the model saw ``x / sqrt(a^2 + b^2)`` (the Euler scheduler's input
    scaling; ``a^2 + b^2 = 1`` for DDIM and DPM-Solver). Flow velocity is ``eps - x0``.
    """
    if prediction_type == "epsilon":
        return (x - b * out) / a
    if prediction_type == "v_prediction":
        r2 = a * a + b * b
        return (a / r2) * x - (b / r2**0.5) * out
    if prediction_type == "sample":
        return out
    if prediction_type == FLOW_PREDICTION:
        return x - b * out
    raise QDriftError(f"unsupported prediction_type {prediction_type!r}")


def step_grid(scheduler) -> StepGrid:
    """Read the per-step coordinates of a scheduler on which ``set_timesteps`` has been called."""
    name = scheduler_name(scheduler)
    cfg = scheduler.config
    timesteps = scheduler.timesteps.detach().cpu().double().numpy()
    n = len(timesteps)
    if name in ("euler", "flow-euler", "dpmpp-2m", "flow-dpmpp-2m"):
        sigmas = scheduler.sigmas.detach().cpu().double().numpy()
        if len(sigmas) != n + 1:
            raise QDriftError(f"{name}: expected {n + 1} sigmas, got {len(sigmas)} (unsupported scheduler options)")
        if name == "euler":
            a, b = np.ones_like(sigmas), sigmas
        elif name == "dpmpp-2m":
            a = 1.0 / np.sqrt(sigmas**2 + 1.0)
            b = sigmas * a
        else:
            a, b = 1.0 - sigmas, sigmas
        prediction = FLOW_PREDICTION if name.startswith("flow") else cfg.prediction_type
        return StepGrid(name, timesteps, a[:-1], b[:-1], a[1:], b[1:], prediction)
    # DDIM: levels are alphas_cumprod at the timesteps; the last step lands on final_alpha_cumprod.
    abar_all = scheduler.alphas_cumprod.detach().cpu().double().numpy()
    final = float(scheduler.final_alpha_cumprod)
    stride = cfg.num_train_timesteps // scheduler.num_inference_steps
    t_int = timesteps.astype(np.int64)
    prev = t_int - stride
    abar = abar_all[t_int]
    abar_next = np.where(prev >= 0, abar_all[np.clip(prev, 0, None)], final)
    return StepGrid(
        name,
        timesteps,
        np.sqrt(abar),
        np.sqrt(1.0 - abar),
        np.sqrt(abar_next),
        np.sqrt(np.clip(1.0 - abar_next, 0.0, None)),
        cfg.prediction_type,
    )


def first_order_twin(name: str, config: dict[str, Any]):
    """A first-order scheduler on the same grid: the scheduler itself for one-step solvers, and
    DPM-Solver++ of order 1 (the exponential-integrator form of DDIM) for ``dpmpp-2m`` and
    ``flow-dpmpp-2m``."""
    scheduler = make_scheduler(name, config)
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config, solver_order=1)
    return scheduler


def output_gains(name: str, config: dict[str, Any], steps: int) -> np.ndarray:
    """``(steps,)`` per-step gain ``c_i`` of the first-order step on the model output.

    A first-order step is affine in (state, output): ``x_{i+1} = A_i x_i + c_i m_i``; stepping
    from the state 0 with the output 1 gives ``c_i``. For a one-step solver the lock-step
    perturbation is exactly ``Delta_i = c_i (m_q - m_fp)``; for a multistep solver
    ``c_i^2 E (m_q - m_fp)^2`` is the variance a fresh output error injects at step ``i``
    before the solver's history reuses it (see the first-order statistic in
    :mod:`qdrift_stats.estimators.empirical`).
    """
    scheduler = first_order_twin(name, config)
    scheduler.set_timesteps(steps)
    zero = torch.zeros(1, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    kwargs = step_kwargs(scheduler)
    gains = []
    for t in scheduler.timesteps:
        if hasattr(scheduler, "scale_model_input"):
            scheduler.scale_model_input(zero, t)  # bookkeeping only: the state is 0
        gains.append(float(scheduler.step(one, t, zero, **kwargs, return_dict=False)[0][0]))
    return np.asarray(gains, dtype=np.float64)


def step_kwargs(scheduler) -> dict[str, Any]:
    """Extra keyword arguments for ``scheduler.step`` that make the update deterministic (DDIM: eta 0)."""
    return {"eta": 0.0} if isinstance(scheduler, DDIMScheduler) else {}


def scheduler_identity(scheduler) -> dict[str, Any]:
    """JSON-able description of a configured scheduler: name, class and config.

    diffusers' bookkeeping key ``_use_default_values`` is left out: it is built from a set, so its
    order changes from one process to the next.
    """
    config = {k: _jsonable(v) for k, v in dict(scheduler.config).items() if k != "_use_default_values"}
    return {"name": scheduler_name(scheduler), "class": type(scheduler).__name__, "config": config}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
