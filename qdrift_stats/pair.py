"""The model-pair protocol: a full-precision denoiser, its quantized twin, and how to sample them.

A *pair* is any object with

- ``sample_shape``: ``tuple[int, ...]``, the shape of one sample without the batch dimension;
- ``scheduler_config``: ``dict`` passed to the chosen diffusers scheduler's ``from_config``
  (``num_train_timesteps``, ``beta_schedule``, ``prediction_type``, ``shift``, ...);
- ``fp(sample, timestep, **cond)`` and ``q(sample, timestep, **cond)``: the raw model output
  as a diffusers pipeline would get it from its denoiser. ``sample`` has shape
  ``(batch, *sample_shape)`` and has already been through ``scheduler.scale_model_input``;
  ``timestep`` is the scheduler's timestep (a 0-d tensor);
- optionally ``conditions(batch_size, generator) -> dict`` of keyword arguments for conditional
  models (class labels, prompt embeddings, guidance scale, ...);
- optionally ``device`` and ``dtype`` (default: CPU, float32) for the initial noise.

Pairs are named ``MODULE:FACTORY`` on the command line; ``FACTORY()`` returns the pair.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from qdrift_stats.errors import QDriftError


@runtime_checkable
class ModelPair(Protocol):
    """Structural type of a model pair (see the module docstring)."""

    sample_shape: tuple[int, ...]
    scheduler_config: dict[str, Any]

    def fp(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor: ...

    def q(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor: ...


def pair_device(pair: Any) -> torch.device:
    """The device on which the pair wants its inputs (default CPU)."""
    return torch.device(getattr(pair, "device", "cpu"))


def pair_dtype(pair: Any) -> torch.dtype:
    """The dtype of the pair's state (default float32)."""
    return getattr(pair, "dtype", torch.float32)


def pair_conditions(pair: Any, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
    """The pair's conditioning keyword arguments for one batch, or ``{}`` for an unconditional pair."""
    make = getattr(pair, "conditions", None)
    return dict(make(batch_size, generator)) if callable(make) else {}


def check_pair(pair: Any, name: str = "pair") -> Any:
    """Check that ``pair`` follows the protocol; raise :class:`QDriftError` naming what is missing."""
    for attr in ("fp", "q"):
        if not callable(getattr(pair, attr, None)):
            raise QDriftError(f"{name} has no callable '{attr}(sample, timestep, **cond)': not a model pair")
    shape = getattr(pair, "sample_shape", None)
    if not isinstance(shape, (tuple, list)) or not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise QDriftError(f"{name}.sample_shape must be a non-empty tuple of positive ints, got {shape!r}")
    config = getattr(pair, "scheduler_config", None)
    if not isinstance(config, dict):
        raise QDriftError(f"{name}.scheduler_config must be a dict, got {type(config).__name__}")
    return pair


def load_pair(spec: str) -> Any:
    """Build the pair named ``MODULE:FACTORY`` (e.g. ``qdrift_stats.testbed:mixture_vp_noise``)."""
    module_name, sep, factory_name = spec.partition(":")
    if not sep or not module_name or not factory_name:
        raise QDriftError(f"--pair must look like MODULE:FACTORY, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise QDriftError(f"cannot import pair module {module_name!r}: {exc}") from None
    factory: Callable[[], Any] | None = getattr(module, factory_name, None)
    if not callable(factory):
        raise QDriftError(f"module {module_name!r} has no callable {factory_name!r}")
    return check_pair(factory(), name=spec)
