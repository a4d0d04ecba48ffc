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
    """Build the pair named ``MODULE:FACTORY`` or ``path/to/file.py:FACTORY``.

    ``MODULE`` is imported as usual, with the current folder importable (as ``python -m`` does);
    a ``.py`` path is loaded from that file (its folder importable while it loads). A pair is only
    ever built from a name the user gives (``--pair`` or the caller), never from a name stored in a
    data file. Anything that goes wrong while importing or calling the factory (a missing model
    file, a syntax error) is a one-line :class:`QDriftError` naming the pair.
    """
    if not isinstance(spec, str):
        raise QDriftError(f"--pair must be a string MODULE:FACTORY, got {type(spec).__name__}")
    module_name, sep, factory_name = spec.rpartition(":")
    if not sep or not module_name or not factory_name or not factory_name.isidentifier():
        raise QDriftError(f"--pair must look like MODULE:FACTORY or path/to/file.py:FACTORY, got {spec!r}")
    module = _import_pair_module(module_name, spec)
    factory: Callable[[], Any] | None = getattr(module, factory_name, None)
    if not callable(factory):
        raise QDriftError(f"{module_name!r} has no callable {factory_name!r} (--pair {spec})")
    try:
        pair = factory()
    except QDriftError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        raise QDriftError(f"--pair {spec}: the factory failed: {_one_line(exc)}") from None
    return check_pair(pair, name=spec)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _import_pair_module(module_name: str, spec: str) -> Any:
    import os
    import sys

    is_file = module_name.endswith(".py") or "/" in module_name or os.sep in module_name
    try:
        if is_file:
            return _import_file(module_name, spec)
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.append(cwd)  # after the installed packages: the current folder never shadows them
        return importlib.import_module(module_name)
    except QDriftError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except ModuleNotFoundError as exc:
        hint = " (a file? give its path, e.g. ./my_pairs.py:FACTORY)" if exc.name == module_name else ""
        raise QDriftError(f"cannot import pair module {module_name!r}: {_one_line(exc)}{hint}") from None
    except Exception as exc:
        raise QDriftError(f"cannot import pair module {module_name!r}: {_one_line(exc)}") from None


def _import_file(file_name: str, spec: str) -> Any:
    import hashlib
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(file_name).expanduser().resolve()
    if not path.is_file():
        raise QDriftError(f"--pair {spec}: the file {file_name} does not exist")
    name = f"qdrift_user_pair_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise QDriftError(f"--pair {spec}: cannot load {file_name} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    folder = str(path.parent)
    sys.path.insert(0, folder)  # the file may import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def recorded_pair_hint(recorded: Any, what: str) -> str:
    """The one line asking for ``--pair`` when a step re-samples the model pair.

    A store names the pair it was recorded with, but a pair is code: it is imported only from a
    name the user passes, never from a data file (a store naming ``os:abort`` would otherwise run it).
    """
    name = "".join(c for c in str(recorded) if c.isprintable()) if recorded else ""
    example = f" (the store was recorded with --pair {name})" if name and len(name) < 200 else ""
    return f"{what} re-samples the model pair: pass --pair MODULE:FACTORY{example}"
