"""Scheduler adapters: what Q-Drift needs to know about a diffusers scheduler, in one class per family.

Every supported sampler keeps a state ``x = a * x0 + b * eps``. After ``set_timesteps`` an
adapter reads, for each step ``i``, the coordinates ``(a_i, b_i)`` of the current state and
``(a_{i+1}, b_{i+1})`` of the level the step lands on (a :class:`StepGrid`), and turns a model
output into the clean-sample estimate ``x0_hat``. diffusers does the steps; nothing here
re-implements a solver.

An adapter (a subclass of :class:`SchedulerAdapter`, registered with :func:`register`) declares:

- ``name``: the command line's ``--scheduler`` name; ``diffusers_classes``: the classes it drives;
- ``flow``: whether it samples flow-matching (velocity) pairs (else VP pairs: epsilon / v / sample);
- ``multistep`` (the step reuses earlier model outputs) and ``stochastic`` (the step injects noise);
- :meth:`~SchedulerAdapter.build`: the scheduler from a pair's ``scheduler_config``;
- :meth:`~SchedulerAdapter.grid`: the per-step coordinates of a configured scheduler;
- :meth:`~SchedulerAdapter.x0_hat` per prediction type and :meth:`~SchedulerAdapter.first_order_gain`
  (both have defaults that follow from the coordinates; see :func:`x0_from_output`, :func:`first_order_gain`);
- :meth:`~SchedulerAdapter.step_kwargs`: keyword arguments that make ``scheduler.step`` deterministic;
- :meth:`~SchedulerAdapter.call_steps`: which step each entry of ``scheduler.timesteps`` belongs to
  (one model call per entry; a two-call solver such as Heun runs two entries per step);
- optionally :meth:`~SchedulerAdapter.refusal`: the one-line reason a configuration of its class is refused.

A new scheduler is one module in this package holding its adapter class, decorated with
:func:`register`, plus one import line in ``qdrift_stats/schedulers/__init__.py``. The registered
names are :func:`scheduler_names` (also ``SCHEDULER_NAMES``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from qdrift_stats.errors import QDriftError

FLOW_PREDICTION = "flow_prediction"
VP_PREDICTIONS: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


# --------------------------------------------------------------------------------------------------
# coordinates


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

    @classmethod
    def from_levels(
        cls, name: str, timesteps: np.ndarray, a: np.ndarray, b: np.ndarray, prediction_type: str
    ) -> StepGrid:
        """A grid from ``steps + 1`` levels ``(a, b)``: step ``i`` goes from level ``i`` to level ``i + 1``."""
        return cls(name, timesteps, a[:-1], b[:-1], a[1:], b[1:], prediction_type)


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


def x0_slope(prediction_type: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``d x0_hat / d output`` of :func:`x0_from_output` (it is affine in the output), per step.

    ``-b / a`` (epsilon), ``-b / sqrt(a^2 + b^2)`` (v), ``1`` (sample), ``-b`` (flow velocity).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if prediction_type == "epsilon":
        return -b / a
    if prediction_type == "v_prediction":
        return -b / np.sqrt(a * a + b * b)
    if prediction_type == "sample":
        return np.ones_like(b)
    if prediction_type == FLOW_PREDICTION:
        return -b
    raise QDriftError(f"unsupported prediction_type {prediction_type!r}")


def first_order_gain(
    prediction_type: str, a: np.ndarray, b: np.ndarray, a_next: np.ndarray, b_next: np.ndarray
) -> np.ndarray:
    """``d x_next / d model_output`` of a first-order step (Euler = DDIM = DPM-Solver 1), per step.

    The step is ``x_next = a_next x0_hat + b_next eps_hat`` with ``eps_hat = (x - a x0_hat) / b``,
    so the gain is ``(a_next - b_next a / b) * d x0_hat / d output`` (:func:`x0_slope`). For a
    one-step solver the lock-step perturbation is exactly ``Delta_i = c_i (m_q - m_fp)``; for a
    multistep solver ``c_i^2 E (m_q - m_fp)^2`` is the variance a fresh output error injects at
    step ``i`` before the solver's history reuses it (the first-order statistic of
    :mod:`qdrift_stats.estimators.empirical`). Arrays ``(steps,)``, float64.
    """
    a, b, a_next, b_next = (np.asarray(v, dtype=np.float64) for v in (a, b, a_next, b_next))
    return (a_next - b_next * a / b) * x0_slope(prediction_type, a, b)


def state_coefficients(prediction_type: str, a, b, a_next, b_next) -> np.ndarray:
    """``(steps,)`` the first-order step's coefficient ``A_i`` on the state, the model output held fixed.

    The first-order step is ``x_{i+1} = a_{i+1} x0_hat + b_{i+1} eps_hat`` with ``eps_hat = (x - a x0_hat) / b``;
    with ``d = d x0_hat / d x`` at fixed output (``1/a`` epsilon, ``a / (a^2 + b^2)`` v, ``0`` sample,
    ``1`` flow velocity; :func:`qdrift_stats.schedulers.base.x0_from_output`),
    ``A = a_{i+1} d + b_{i+1} (1 - a d) / b``: ``a_{i+1} / a_i`` for epsilon (1 for Euler's VE
    coordinates), 1 for flow matching.
    """
    a, b, a_next, b_next = (np.asarray(v, dtype=np.float64) for v in (a, b, a_next, b_next))
    if prediction_type == "epsilon":
        d = 1.0 / a
    elif prediction_type == "v_prediction":
        d = a / (a * a + b * b)
    elif prediction_type == "sample":
        d = np.zeros_like(a)
    else:  # flow velocity: x0_hat = x - b v
        d = np.ones_like(a)
    return a_next * d + b_next * (1.0 - a * d) / b


def propagators(A: np.ndarray) -> np.ndarray:
    """``P_i = prod_{j > i} A_j``: how a perturbation made at step ``i`` reaches the final state."""
    A = np.asarray(A, dtype=np.float64)
    P = np.ones_like(A)
    for i in range(len(A) - 2, -1, -1):
        P[i] = P[i + 1] * A[i + 1]
    return P


def is_flow_config(config: dict[str, Any]) -> bool:
    """Whether a pair's scheduler config describes a flow-matching (velocity) model."""
    return (
        config.get("prediction_type") == FLOW_PREDICTION
        or "FlowMatch" in str(config.get("_class_name", ""))
        or ("shift" in config and "beta_schedule" not in config)
    )


def sigmas_of(scheduler, name: str) -> np.ndarray:
    """The ``steps + 1`` sigmas of a configured sigma-based scheduler, float64."""
    n = len(scheduler.timesteps)
    sigmas = scheduler.sigmas.detach().cpu().double().numpy()
    if len(sigmas) != n + 1:
        raise QDriftError(f"{name}: expected {n + 1} sigmas, got {len(sigmas)} (unsupported scheduler options)")
    return sigmas


def timesteps_of(scheduler) -> np.ndarray:
    """A configured scheduler's timesteps, float64 on the host."""
    return scheduler.timesteps.detach().cpu().double().numpy()


def alphas_cumprod_of(scheduler) -> np.ndarray:
    """A DDPM-family scheduler's ``alphas_cumprod`` table, float64 on the host."""
    return scheduler.alphas_cumprod.detach().cpu().double().numpy()


def vp_grid(
    name: str, timesteps: np.ndarray, abar: np.ndarray, abar_next: np.ndarray, prediction_type: str
) -> StepGrid:
    """The step grid of a VP scheduler from the cumulative alphas of each step's level and target level:
    ``a = sqrt(abar)``, ``b = sqrt(1 - abar)`` (``(steps,)`` float64 each)."""
    return StepGrid(
        name,
        timesteps,
        np.sqrt(abar),
        np.sqrt(1.0 - abar),
        np.sqrt(abar_next),
        np.sqrt(np.clip(1.0 - abar_next, 0.0, None)),
        prediction_type,
    )


# --------------------------------------------------------------------------------------------------
# the adapter base class and the registry


class SchedulerAdapter:
    """What Q-Drift needs to know about one diffusers scheduler family (module docstring).

    Subclasses set the class attributes and implement :meth:`build` and :meth:`grid`; the rest has
    defaults. Adapters hold no state: the registry keeps one instance per name.
    """

    name: ClassVar[str] = ""
    diffusers_classes: ClassVar[tuple[type, ...]] = ()
    flow: ClassVar[bool] = False
    multistep: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False

    @property
    def prediction_types(self) -> tuple[str, ...]:
        """The model outputs this adapter can turn into ``x0_hat``."""
        return (FLOW_PREDICTION,) if self.flow else VP_PREDICTIONS

    def build(self, config: dict[str, Any]):
        """The diffusers scheduler for a pair's ``scheduler_config`` (diffusers' ``_`` keys removed)."""
        raise NotImplementedError

    def matches(self, scheduler) -> bool:
        """Whether this adapter drives a configured scheduler instance (default: its class)."""
        return isinstance(scheduler, self.diffusers_classes)

    def grid(self, scheduler) -> StepGrid:
        """The per-step coordinates of a scheduler on which ``set_timesteps`` has been called."""
        raise NotImplementedError

    def refusal(self, scheduler) -> str | None:
        """Why a scheduler of one of :attr:`diffusers_classes` that :meth:`matches` refuses is not supported
        (one line for the error), or None for the generic "unsupported scheduler class" message."""
        return None

    def step_kwargs(self, scheduler) -> dict[str, Any]:
        """Extra keyword arguments for ``scheduler.step`` (e.g. DDIM's ``eta=0``)."""
        return {}

    def call_steps(self, scheduler) -> np.ndarray:
        """``(len(scheduler.timesteps),)`` int: the step (of :meth:`grid`) each timestep entry belongs to.

        A diffusers loop calls the model and ``scheduler.step`` once per entry of ``scheduler.timesteps``;
        a step *lands* (reaches the level ``b_next[i]``) at the last entry of its run. Default: one
        entry per step. Two-call solvers (Heun: a predictor and a corrector call) override it.
        """
        return np.arange(len(scheduler.timesteps))

    def x0_hat(self, grid: StepGrid, i: int, x: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """Clean-sample estimate at step ``i`` (:func:`x0_from_output` on the grid's prediction type)."""
        return grid.x0_from_output(i, x, model_output)

    def first_order_gain(self, grid: StepGrid) -> np.ndarray:
        """``(steps,)`` gain ``c_i`` of the first-order step on the model output (:func:`first_order_gain`)."""
        return first_order_gain(grid.prediction_type, grid.a, grid.b, grid.a_next, grid.b_next)

    def noise_std(self, grid: StepGrid) -> np.ndarray:
        """``(steps,)`` standard deviation, in state units, of the fresh noise step ``i`` injects
        (``x_{i+1} = mean_i + s_i z`` with ``z`` standard normal drawn by the step); 0 for a
        deterministic step. Stochastic adapters override it (see :mod:`qdrift_stats.schedulers.noise`)."""
        return np.zeros(grid.num_steps)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


_ADAPTERS: dict[str, SchedulerAdapter] = {}


def register(cls: type[SchedulerAdapter]) -> type[SchedulerAdapter]:
    """Class decorator: register an adapter under its ``name`` (a name is registered once)."""
    if not cls.name or cls.name in _ADAPTERS:
        raise ValueError(f"scheduler adapter name {cls.name!r} is empty or already registered")
    _ADAPTERS[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove the adapter registered as ``name`` (for tests and plugins that replace one)."""
    _ADAPTERS.pop(str(name), None)


def scheduler_names(flow: bool | None = None) -> tuple[str, ...]:
    """The registered scheduler names: the VP ones, then the flow ones, each in registration order
    (only the flow / only the VP ones if ``flow`` is given)."""
    if flow is None:
        return scheduler_names(False) + scheduler_names(True)
    return tuple(name for name, adapter in _ADAPTERS.items() if adapter.flow == flow)


def get_adapter(name: str) -> SchedulerAdapter:
    """The adapter registered as ``name``; :class:`QDriftError` naming the choices otherwise."""
    adapter = _ADAPTERS.get(str(name))
    if adapter is None:
        raise QDriftError(f"unknown scheduler {name!r}; choose one of {', '.join(scheduler_names())}")
    return adapter


def find_adapter(scheduler) -> SchedulerAdapter | None:
    """The adapter of a scheduler instance, or None: an exact class match first, then a subclass."""
    candidates = [a for a in _ADAPTERS.values() if a.matches(scheduler)]
    exact = [a for a in candidates if type(scheduler) in a.diffusers_classes]
    return (exact or candidates or [None])[0]


def adapter_for(scheduler) -> SchedulerAdapter:
    """The adapter of a configured diffusers scheduler instance; :class:`QDriftError` if none fits."""
    adapter = find_adapter(scheduler)
    if adapter is None:
        for candidate in _ADAPTERS.values():
            reason = candidate.refusal(scheduler) if isinstance(scheduler, candidate.diffusers_classes) else None
            if reason:
                raise QDriftError(reason)
        raise QDriftError(
            f"unsupported scheduler class {type(scheduler).__name__}; supported: {', '.join(scheduler_names())}"
        )
    return adapter


def _choices(names: tuple[str, ...]) -> str:
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


# --------------------------------------------------------------------------------------------------
# the functions the rest of the package calls


def make_scheduler(name: str, config: dict[str, Any]):
    """Build the diffusers scheduler called ``name`` from a pair's ``scheduler_config``.

    Raises :class:`QDriftError` for an unknown name or a scheduler that does not fit the pair
    (a flow scheduler for an epsilon model, or the reverse).
    """
    adapter = get_adapter(name)
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    flow = is_flow_config(config)
    if flow and not adapter.flow:
        raise QDriftError(
            f"scheduler {name!r} needs a VP model but the pair is flow-matching; use {_choices(scheduler_names(True))}"
        )
    if not flow and adapter.flow:
        raise QDriftError(
            f"scheduler {name!r} needs a flow-matching model but the pair predicts "
            f"{config.get('prediction_type', 'epsilon')!r}"
        )
    if not flow and config.get("prediction_type", "epsilon") not in adapter.prediction_types:
        raise QDriftError(f"unsupported prediction_type {config.get('prediction_type')!r}")
    return adapter.build(config)


def scheduler_name(scheduler) -> str:
    """The registered name of a configured diffusers scheduler instance."""
    return adapter_for(scheduler).name


def step_grid(scheduler) -> StepGrid:
    """Read the per-step coordinates of a scheduler on which ``set_timesteps`` has been called."""
    return adapter_for(scheduler).grid(scheduler)


def step_kwargs(scheduler) -> dict[str, Any]:
    """Extra keyword arguments for ``scheduler.step`` that make the update deterministic ({} if none is known)."""
    adapter = find_adapter(scheduler)
    return adapter.step_kwargs(scheduler) if adapter is not None else {}


def call_steps(scheduler) -> np.ndarray:
    """The step each entry of a configured scheduler's ``timesteps`` belongs to
    (:meth:`SchedulerAdapter.call_steps`; one entry per step for a scheduler no adapter drives)."""
    adapter = find_adapter(scheduler)
    return adapter.call_steps(scheduler) if adapter is not None else np.arange(len(scheduler.timesteps))


def step_calls(scheduler) -> list[list[int]]:
    """The timestep entries of each step, in order: ``[[0], [1], ...]`` for one-call solvers,
    ``[[0, 1], [2, 3], ..., [2n - 2]]`` for Heun (its last step is a single Euler call)."""
    steps = call_steps(scheduler)
    calls: list[list[int]] = []
    for k, i in enumerate(steps.tolist()):
        if not calls or i != steps[k - 1]:
            calls.append([])
        calls[-1].append(k)
    return calls


def first_order_output(grid: StepGrid, i: int, x: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
    """The model output with which a first-order step ``i`` from ``x`` lands on ``x_next``.

    A first-order step is ``x_next = (b_{i+1} / b_i) x + (a_{i+1} - b_{i+1} a_i / b_i) x0_hat(x, m)``
    (:func:`first_order_gain`), affine in ``m``; this inverts it. For a step that makes more than one
    model call (Heun) it is the step's *effective output*: the landing is then exactly the first-order
    step with this output, ``x_next - x_next' = gain_i (m - m')`` for two landings from the same ``x``
    (for Heun on epsilon the mean of its two calls' outputs). Shapes: equal, any.
    """
    a, b, a_next, b_next = (float(v[i]) for v in (grid.a, grid.b, grid.a_next, grid.b_next))
    x0 = (x_next - (b_next / b) * x) / (a_next - b_next * a / b)
    slope = float(x0_slope(grid.prediction_type, np.array([a]), np.array([b]))[0])
    return (x0 - x0_from_output(grid.prediction_type, a, b, x, torch.zeros_like(x))) / slope


def is_multistep(name: str) -> bool:
    """Whether the scheduler registered as ``name`` reuses earlier model outputs (False for unknown names)."""
    adapter = _ADAPTERS.get(str(name))
    return bool(adapter is not None and adapter.multistep)


def gain_on(grid: StepGrid) -> np.ndarray:
    """``(steps,)`` first-order gain on a grid, by the adapter registered as ``grid.name``
    (:func:`first_order_gain` for a name no adapter has, e.g. a store of a newer version)."""
    adapter = _ADAPTERS.get(str(grid.name))
    return adapter.first_order_gain(grid) if adapter is not None else SchedulerAdapter.first_order_gain(None, grid)


def output_gains(name: str, config: dict[str, Any], steps: int) -> np.ndarray:
    """``(steps,)`` per-step gain ``c_i`` of the first-order step on the model output, for ``steps`` steps
    of the scheduler ``name`` built from ``config`` (the adapter's :meth:`SchedulerAdapter.first_order_gain`)."""
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(steps)
    adapter = adapter_for(scheduler)
    return adapter.first_order_gain(adapter.grid(scheduler))


def scheduler_identity(scheduler) -> dict[str, Any]:
    """JSON-able description of a configured scheduler: name, class and config.

    diffusers' bookkeeping key ``_use_default_values`` is left out: it is built from a set, so its
    order changes from one process to the next.
    """
    config = {k: jsonable(v) for k, v in dict(scheduler.config).items() if k != "_use_default_values"}
    return {"name": scheduler_name(scheduler), "class": type(scheduler).__name__, "config": config}


def scheduler_from_identity(identity: dict[str, Any], steps: int):
    """A diffusers scheduler rebuilt from a recorded identity (``name``, ``class``, ``config``, as in a
    store's or an estimator file's metadata), with ``set_timesteps(steps)`` done."""
    import diffusers

    cls = getattr(diffusers, str(identity.get("class")), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise QDriftError(f"cannot rebuild scheduler class {identity.get('class')!r} from the recorded identity")
    config = identity.get("config") or {}
    try:
        config = json.loads(config) if isinstance(config, str) else dict(config)
    except (TypeError, ValueError):
        raise QDriftError("the recorded scheduler config is not a JSON object") from None
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(int(steps))
    return scheduler


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays (also inside lists and tuples) turned into Python ones."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def __getattr__(name: str) -> Any:
    # The name tuples follow the registry, which grows as the family modules are imported.
    if name == "SCHEDULER_NAMES":
        return scheduler_names()
    if name == "VP_SCHEDULERS":
        return scheduler_names(flow=False)
    if name == "FLOW_SCHEDULERS":
        return scheduler_names(flow=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
