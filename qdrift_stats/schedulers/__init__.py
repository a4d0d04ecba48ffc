"""Scheduler adapters: the state coordinates ``(a, b)``, ``x0_hat`` and first-order gain of each
supported diffusers scheduler, one module per family, registered by name (see
:mod:`qdrift_stats.schedulers.base`).

============== ==================================================== ============== ==========
name           diffusers class                                      pair kind      module
============== ==================================================== ============== ==========
euler          ``EulerDiscreteScheduler``                           VP (eps/v/x0)  ``euler``
ddim           ``DDIMScheduler`` (eta 0)                            VP             ``ddim``
dpmpp-2m       ``DPMSolverMultistepScheduler`` (2M, dpmsolver++)    VP             ``dpmpp``
flow-euler     ``FlowMatchEulerDiscreteScheduler``                  flow (velocity) ``flow_euler``
flow-dpmpp-2m  ``DPMSolverMultistepScheduler`` with flow sigmas     flow (velocity) ``dpmpp``
euler-ancestral ``EulerAncestralDiscreteScheduler`` (stochastic)     VP             ``euler_ancestral``
ddpm           ``DDPMScheduler`` (fixed_small variance; stochastic) VP             ``ddpm``
lcm            ``LCMScheduler`` (stochastic re-noising)             VP             ``lcm``
unipc          ``UniPCMultistepScheduler`` (multistep)              VP             ``unipc``
deis           ``DEISMultistepScheduler`` (multistep)               VP             ``deis``
dpmpp-2m-sde   ``DPMSolverMultistepScheduler`` sde-dpmsolver++      VP             ``dpmpp_sde``
heun           ``HeunDiscreteScheduler`` (two model calls per step) VP             ``heun``
pndm           ``PNDMScheduler`` skip_prk_steps (PLMS, multistep)   VP             ``pndm``
============== ==================================================== ============== ==========

Stochastic adapters also give the std of the noise each step injects (``noise_std``); the
correction lowers it by the quantization variance (:mod:`qdrift_stats.schedulers.noise`).

A new scheduler: one module here with a registered :class:`~qdrift_stats.schedulers.base.SchedulerAdapter`
subclass, and its import line below.
"""

from typing import Any

# Importing a family module registers its adapters; SCHEDULER_NAMES lists the VP ones, then the flow ones,
# each in import order.
# isort: off
from qdrift_stats.schedulers import euler, ddim, flow_euler, dpmpp  # noqa: F401
from qdrift_stats.schedulers import euler_ancestral, ddpm, lcm, unipc, deis, dpmpp_sde  # noqa: F401
from qdrift_stats.schedulers import heun, pndm  # noqa: F401

# isort: on
from qdrift_stats.schedulers.base import (
    FLOW_PREDICTION,
    SchedulerAdapter,
    StepGrid,
    adapter_for,
    call_steps,
    find_adapter,
    first_order_gain,
    first_order_output,
    gain_on,
    get_adapter,
    is_flow_config,
    is_multistep,
    jsonable,
    make_scheduler,
    output_gains,
    register,
    scheduler_from_identity,
    scheduler_identity,
    scheduler_name,
    scheduler_names,
    step_calls,
    step_grid,
    step_kwargs,
    unregister,
    x0_from_output,
)

__all__ = [
    "FLOW_PREDICTION",
    "SCHEDULER_NAMES",
    "SchedulerAdapter",
    "StepGrid",
    "adapter_for",
    "call_steps",
    "find_adapter",
    "first_order_gain",
    "first_order_output",
    "gain_on",
    "get_adapter",
    "is_flow_config",
    "is_multistep",
    "jsonable",
    "make_scheduler",
    "output_gains",
    "register",
    "scheduler_from_identity",
    "scheduler_identity",
    "scheduler_name",
    "scheduler_names",
    "step_calls",
    "step_grid",
    "step_kwargs",
    "unregister",
    "x0_from_output",
]


def __getattr__(name: str) -> Any:
    if name in ("SCHEDULER_NAMES", "VP_SCHEDULERS", "FLOW_SCHEDULERS"):  # follow the registry
        from qdrift_stats.schedulers import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
