"""The calibration store: a zarr v3 group written and read through xarray.

Layout (schema ``qdrift-calibration``, version :data:`SCHEMA_VERSION`):

- dimensions ``run``, ``step``, ``sample``, then the sample's own dims (``channel`` and, for
  images, ``height``, ``width``; see :func:`sample_dims`);
- variables ``delta_x`` (the per-step perturbation ``Delta_i = x_{i+1}^q - x_{i+1}^fp``, state
  units), ``delta_out`` (``m_q - m_fp``, model-output units), ``out_fp`` (``m_fp``); optionally
  ``traj_fp`` and ``traj_q``, the free-running FP and Q states after each step, for accumulation plots;
- coordinates ``seed(run)``, ``timestep(step)``, ``a(step)``, ``b(step)`` (the state at the start of
  the step is ``a x0 + b eps``), ``a_next(step)``, ``b_next(step)`` (the level the step lands on),
  ``gain(step)`` (the first-order step's coefficient on the model output, see
  :func:`qdrift_stats.schedulers.base.output_gains`);
- attributes: schema name and version, scheduler name, class and config (JSON), step count,
  prediction type, pair name, batch size, package version, and ``runs_complete``.

Runs are appended one at a time along ``run``. The consolidated metadata (read by
``xarray.open_zarr``) and ``runs_complete`` are updated only after a run's arrays are fully
written, so they act as the commit point: a recording killed mid-run loses at most that run,
readers see the first ``runs_complete`` runs, and :func:`repair_store` trims the partial run
before a resume.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from qdrift_stats.errors import QDriftError
from qdrift_stats.schedulers.base import StepGrid

SCHEMA = "qdrift-calibration"
SCHEMA_VERSION = 1
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}  # the --dtype choices
PERTURBATION_VARS = ("delta_x", "delta_out", "out_fp")
TRAJECTORY_VARS = ("traj_fp", "traj_q")
# Coordinates every reader needs (``gain`` is optional: stores of older versions lack it).
REQUIRED_COORDS = ("seed", "timestep", "a", "b", "a_next", "b_next")
# Attributes that must agree before runs can be appended to an existing store.
IDENTITY_ATTRS = (
    "pair",
    "scheduler",
    "scheduler_config",
    "steps",
    "batch_size",
    "sample_shape",
    "dtype",
    "trajectories",
)


def _raised_by_storage(exc: BaseException | None, depth: int = 0) -> bool:
    """Whether an exception came out of zarr or its codecs (a damaged chunk or metadata)."""
    if exc is None or depth > 5:
        return False
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if any(f"{os.sep}{package}{os.sep}" in filename for package in ("zarr", "numcodecs")):
            return True
        tb = tb.tb_next
    return _raised_by_storage(exc.__cause__ or exc.__context__, depth + 1)


def storage_errors_as_qdrift(func):
    """Decorator for functions that read a store lazily: a damaged chunk becomes a one-line :class:`QDriftError`.

    Stores are opened lazily, so a corrupt chunk only shows when an estimator computes; zarr's
    decoding error would otherwise escape as a bare ``RuntimeError``/``ValueError``.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except QDriftError:
            raise
        except Exception as exc:
            if not _raised_by_storage(exc):
                raise
            detail = " ".join(str(exc).split())[:200]
            raise QDriftError(
                f"the calibration store has a damaged or unreadable chunk ({type(exc).__name__}: {detail}); re-record the affected runs"
            ) from None

    return wrapper


def sample_dims(sample_shape: tuple[int, ...]) -> tuple[str, ...]:
    """Names of a sample's own dimensions: ``channel`` first, then ``height, width`` for images."""
    if len(sample_shape) == 3:
        return ("channel", "height", "width")
    return ("channel",) + tuple(f"dim_{k}" for k in range(1, len(sample_shape)))


def package_version() -> str:
    from qdrift_stats import __version__

    return __version__


def run_dataset(
    arrays: dict[str, np.ndarray],
    seed: int,
    run_index: int,
    coords: dict[str, np.ndarray],
    attrs: dict[str, Any],
    dims: tuple[str, ...] | None = None,
) -> xr.Dataset:
    """A one-run dataset ready to be appended.

    Args:
        arrays: name -> ``(step, sample, *sample_shape)`` array of one run.
        coords: per-step coordinates ``timestep, a, b, a_next, b_next``, each ``(steps,)``.
        dims: names of the sample's own dims (default :func:`sample_dims`); pipelines with packed
            token latents name them ``("token", "channel")``.
    """
    first = next(iter(arrays.values()))
    own = tuple(dims) if dims is not None else sample_dims(first.shape[2:])
    if len(own) != first.ndim - 2:
        raise QDriftError(f"sample dims {own} do not fit samples of shape {first.shape[2:]}")
    dims = ("run", "step", "sample") + own
    data_vars = {name: (dims, value[None]) for name, value in arrays.items()}
    all_coords: dict[str, Any] = {
        "run": ("run", np.array([run_index], dtype=np.int64)),
        "seed": ("run", np.array([seed], dtype=np.int64)),
        "step": ("step", np.arange(first.shape[0], dtype=np.int64)),
    }
    all_coords.update({name: ("step", np.asarray(value, dtype=np.float64)) for name, value in coords.items()})
    return xr.Dataset(data_vars, coords=all_coords, attrs=attrs)


def _encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """One chunk per (run, step): a reader can stream steps in bounded memory."""
    encoding = {}
    for name, var in ds.data_vars.items():
        chunks = tuple(1 if d in ("run", "step") else size for d, size in zip(var.dims, var.shape))
        encoding[name] = {"chunks": chunks}
    return encoding


@contextmanager
def writer_lock(path: str | Path):
    """Hold an exclusive lock on a store while writing it (a ``STORE.lock`` file beside it).

    A second writer is refused at once with a one-line :class:`QDriftError`. The lock is an
    ``flock``: the operating system releases it if the writer dies, so no stale lock survives a
    kill. (Where ``fcntl`` does not exist, e.g. Windows, writers are not serialised.)
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QDriftError(
                f"another process is writing {path}; wait for it to finish or choose another --out"
            ) from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def _quiet_consolidation():
    """zarr warns that consolidated metadata is not yet in the v3 spec; we rely on it on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield


def append_run(path: str | Path, ds: xr.Dataset) -> int:
    """Append one run (``ds`` from :func:`run_dataset`) to the store, creating it if needed.

    Returns the new ``runs_complete``.
    """
    path = Path(path)
    with _quiet_consolidation():
        if not path.exists():
            ds = ds.assign_attrs(runs_complete=0)
            ds.to_zarr(path, mode="w-", zarr_format=3, consolidated=False, encoding=_encoding(ds))
        else:
            # xarray rewrites the group's attributes on append: keep them, with the old run count.
            done = int(zarr.open_group(path, mode="r", use_consolidated=False).attrs.get("runs_complete", 0))
            ds.assign_attrs(runs_complete=done).to_zarr(path, append_dim="run", zarr_format=3, consolidated=False)
        group = zarr.open_group(path, mode="r+", use_consolidated=False)
        done = int(group["run"].shape[0])
        group.attrs["runs_complete"] = done
        zarr.consolidate_metadata(path)  # the commit point
    return done


def _check_schema(attrs: dict[str, Any], path: Path) -> None:
    if attrs.get("qdrift_schema") != SCHEMA:
        raise QDriftError(f"{path} is not a qdrift calibration store (schema {attrs.get('qdrift_schema')!r})")
    version = attrs.get("qdrift_schema_version")
    if version != SCHEMA_VERSION:
        raise QDriftError(
            f"{path} has store schema version {version!r}; this qdrift-stats reads version {SCHEMA_VERSION}"
        )


def _open_group(path: Path, mode: str = "r"):
    if not path.exists():
        raise QDriftError(f"store {path} does not exist")
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3, use_consolidated=None if mode == "r" else False)
    except Exception as exc:  # zarr raises several types for a non-store folder
        raise QDriftError(f"{path} is not a readable zarr v3 store ({type(exc).__name__})") from None


def store_attrs(path: str | Path) -> dict[str, Any]:
    """The store's attributes, after checking its schema."""
    path = Path(path)
    attrs = dict(_open_group(path).attrs)
    _check_schema(attrs, path)
    return attrs


def repair_store(path: str | Path) -> int:
    """Trim a run that was being written when a recording stopped; return ``runs_complete``."""
    path = Path(path)
    group = _open_group(path, mode="r+")
    attrs = dict(group.attrs)
    _check_schema(attrs, path)
    done = int(attrs.get("runs_complete", 0))
    for _, array in group.arrays():
        dims = getattr(array.metadata, "dimension_names", None) or ()
        if dims and dims[0] == "run" and array.shape[0] != done:
            array.resize((done,) + tuple(array.shape[1:]))
    with _quiet_consolidation():
        zarr.consolidate_metadata(path)
    return done


def open_store(path: str | Path) -> xr.Dataset:
    """Open a calibration store lazily (dask-backed) after checking its schema.

    Only the runs that were completely written are returned.
    """
    path = Path(path)
    attrs = store_attrs(path)
    done = attrs.get("runs_complete", 0)
    if isinstance(done, bool) or not isinstance(done, (int, np.integer)) or done < 0:
        raise QDriftError(f"{path} has an invalid runs_complete attribute {done!r}; re-record the store")
    done = int(done)
    if "scheduler_config" in attrs:
        try:
            config = json.loads(attrs["scheduler_config"])
        except (TypeError, ValueError):
            config = None
        if not isinstance(config, dict):
            raise QDriftError(
                f"{path} has an invalid scheduler_config attribute (not a JSON object); re-record the store"
            )
    drop = _unread_variables(path)
    try:
        ds = xr.open_zarr(path, consolidated=True, drop_variables=drop)
    except Exception as exc:
        raise QDriftError(
            f"{path} could not be opened ({type(exc).__name__}); if a recording was interrupted, run the same 'qdrift record' again to resume"
        ) from None
    missing = [v for v in PERTURBATION_VARS + REQUIRED_COORDS if v not in ds.variables]
    if missing:
        raise QDriftError(f"{path} lacks the variables {', '.join(missing)}")
    if done > ds.sizes.get("run", 0):
        raise QDriftError(
            f"{path} says {done} runs are complete but holds {ds.sizes.get('run', 0)}; re-record the store"
        )
    if ds.sizes.get("run", 0) != done:
        ds = ds.isel(run=slice(0, done))
    if done == 0:
        raise QDriftError(f"{path} holds no complete run")
    return ds


def store_summary(path: str | Path) -> dict[str, Any]:
    """What a store holds, JSON-able: ``store``, ``runs_complete``, ``seeds``, ``steps``, ``scheduler``, ``batch``."""
    ds = open_store(path)
    seeds = [int(s) for s in ds["seed"].values]
    return {
        "store": str(path),
        "runs_complete": len(seeds),
        "seeds": seeds,
        "steps": int(ds.sizes["step"]),
        "scheduler": str(ds.attrs.get("scheduler")),
        "batch": int(ds.attrs.get("batch_size", ds.sizes.get("sample", 0))),
    }


def store_grid(ds: xr.Dataset) -> StepGrid:
    """The step grid recorded in a store (its per-step coordinates, scheduler name and prediction type)."""
    coords = {
        name: np.asarray(ds[name].values, dtype=np.float64) for name in ("timestep", "a", "b", "a_next", "b_next")
    }
    return StepGrid(
        str(ds.attrs.get("scheduler", "")),
        coords["timestep"],
        coords["a"],
        coords["b"],
        coords["a_next"],
        coords["b_next"],
        str(ds.attrs.get("prediction_type", "epsilon")),
    )


def _unread_variables(path: Path) -> list[str]:
    """Variables no reader uses (dropped on open, so nothing is allocated for them), after the
    declared shapes of the others are checked (:func:`qdrift_stats.inputs.check_declared_arrays`)."""
    from qdrift_stats.inputs import check_declared_arrays, declared_arrays

    arrays = declared_arrays(path)
    known = set(PERTURBATION_VARS + TRAJECTORY_VARS + REQUIRED_COORDS) | {"gain"}
    dims = {d for name in known if name in arrays for d in arrays[name][1]}
    keep = {name for name in arrays if name in known or name in dims}
    check_declared_arrays({name: arrays[name] for name in keep}, str(path))
    return sorted(set(arrays) - keep)


def scheduler_config_of(attrs: dict[str, Any]) -> dict[str, Any]:
    """The scheduler config recorded in a store's attributes, as a dict."""
    return json.loads(attrs["scheduler_config"])


def _public_config(value: Any) -> Any:
    try:
        config = json.loads(value) if isinstance(value, str) else dict(value or {})
    except (TypeError, ValueError):
        return value
    return {k: v for k, v in config.items() if not k.startswith("_")}


def check_compatible(attrs: dict[str, Any], wanted: dict[str, Any], path: Path) -> None:
    """Refuse to append to a store recorded under another configuration."""
    for key in IDENTITY_ATTRS:
        have, want = attrs.get(key), wanted.get(key)
        if key == "scheduler_config":  # compare as data, without diffusers' "_" bookkeeping keys
            have, want = (_public_config(v) for v in (have, want))
        if isinstance(have, list):
            have = tuple(have)
        if isinstance(want, list):
            want = tuple(want)
        if have != want:
            raise QDriftError(
                f"{path} was recorded with {key}={attrs.get(key)!r}, not {wanted.get(key)!r}; choose another --out or pass --overwrite"
            )
