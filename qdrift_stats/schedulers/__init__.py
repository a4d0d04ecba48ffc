"""Scheduler adapters: the state coordinates ``(a, b)``, ``x0_hat`` and step gains of each supported
diffusers scheduler (see :mod:`qdrift_stats.schedulers.base`)."""

from qdrift_stats.schedulers.base import *  # noqa: F401,F403
from qdrift_stats.schedulers.base import (  # noqa: F401
    FLOW_PREDICTION,
    FLOW_SCHEDULERS,
    SCHEDULER_NAMES,
    VP_SCHEDULERS,
    StepGrid,
    _jsonable,  # noqa: F401  (moved module; made public by the adapters work)
    first_order_twin,
    is_flow_config,
    make_scheduler,
    output_gains,
    scheduler_identity,
    scheduler_name,
    step_grid,
    step_kwargs,
    x0_from_output,
)
