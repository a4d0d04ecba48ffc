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
  :func:`qdrift_stats.schedulers.base.first_order_gain`; stores written before it existed can be
  upgraded with :func:`upgrade_store`);
- attributes: schema name and version, scheduler name, class and config (JSON), step count,
  prediction type, pair name, batch size, package version, and ``runs_complete``.

One writer (:class:`StoreWriter`) writes every store, for ``record``, ``calibrate_pipeline`` and
the dask path alike: the identity attributes (:func:`identity_attrs`), the per-step coordinates
(:func:`step_coordinates`), the resume rule, the writer lock and the commit point.

Crash consistency (a writer may be killed at any point; the same command resumes):

- **Creation is atomic.** The first run is written to a hidden sibling ``.STORE.creating``, then
  renamed to ``STORE``. A store that exists always holds at least one complete run; a leftover
  ``.STORE.creating`` is removed by the next writer (under the lock).
- **Appends never touch what readers read.** A run is appended by growing the ``run``-dimension
  arrays and writing their new chunks; readers open the store through its consolidated metadata
  (in the root ``zarr.json``), which still describes the committed runs only.
- **The commit point** is one atomic replacement of the root ``zarr.json``: ``runs_complete`` and the
  consolidated metadata together (:func:`commit_store`). A killed append leaves arrays longer than
  ``runs_complete``; :func:`repair_store` trims them before the next append. Readers
  (:func:`open_store`) see the first ``runs_complete`` runs at every moment.
- **The writer lock** (:class:`StoreLock`) is an ``flock`` on ``STORE.lock``, removed while still
  held and checked to be the file at that path after locking, so two writers never both hold it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from qdrift_stats.errors import QDriftError
from qdrift_stats.outputs import remove_output
from qdrift_stats.schedulers.base import (
    StepGrid,
    adapter_for,
    gain_on,
    scheduler_from_identity,
    scheduler_identity,
)

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
                f"the calibration store has a damaged or unreadable chunk ({type(exc).__name__}: "
                f"{detail}); re-record the affected runs"
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


class StoreLock:
    """The exclusive writer lock of a store: an ``flock`` on ``STORE.lock`` beside it.

    ``acquire`` refuses at once (one-line :class:`QDriftError`) if another writer holds it. The
    operating system releases an ``flock`` when its holder dies, so no stale lock survives a kill.
    ``release`` removes the file *while still holding* the lock, then unlocks; ``acquire`` checks
    after locking that its open file is still the one at ``STORE.lock`` and retries otherwise.
    Together these close the race of a contender that opened the file just before its removal:
    it then holds a lock on a removed file, sees that, and competes for the current one. (Where
    ``fcntl`` does not exist, e.g. Windows, writers are not serialised.)
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        self.store = path
        self.path = path.with_name(path.name + ".lock")
        self.handle: Any = None

    def acquire(self) -> StoreLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise QDriftError(
                    f"another process is writing {self.store}; wait for it to finish or choose another --out"
                ) from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(handle.fileno()).st_ino:
                self.handle = handle
                return self
            handle.close()  # we locked a file its holder had just removed: try the one there now
        raise QDriftError(f"could not lock {self.path}: it keeps being replaced")  # pragma: no cover

    def release(self) -> None:
        if self.handle is None:
            return
        import fcntl

        try:
            self.path.unlink(missing_ok=True)  # while held: a contender that locks this file sees it gone
        finally:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


@contextmanager
def writer_lock(path: str | Path):
    """Hold the exclusive writer lock of a store (:class:`StoreLock`) for the ``with`` block."""
    lock = StoreLock(path).acquire()
    try:
        yield lock
    finally:
        lock.release()


@contextmanager
def _quiet_consolidation():
    """zarr warns that consolidated metadata is not yet in the v3 spec; we rely on it on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield


def creating_path(path: str | Path) -> Path:
    """Where a store's first run is written before the store is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.creating")


def _write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        json.dump(document, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def commit_store(path: str | Path, runs_complete: int) -> None:
    """The commit point: one atomic rewrite of the root ``zarr.json`` with ``runs_complete`` and the
    consolidated metadata of every array, read from the arrays' own ``zarr.json``.

    (Written here rather than by ``zarr.consolidate_metadata``: setting the attribute and consolidating
    through zarr are two writes of the root document, and a reader between them finds no
    consolidated metadata.)
    """
    path = Path(path)
    root = json.loads((path / "zarr.json").read_text())
    root.setdefault("attributes", {})["runs_complete"] = int(runs_complete)
    metadata = {}
    for child in sorted(path.iterdir()):
        document = child / "zarr.json"
        if child.is_dir() and document.is_file():
            metadata[child.name] = json.loads(document.read_text())
    root["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": metadata}
    _write_json_atomically(path / "zarr.json", root)


def _run_arrays(group) -> dict[str, Any]:
    """The group's arrays along ``run`` (data variables and the ``run`` / ``seed`` coordinates)."""
    found = {}
    for name, array in group.arrays():
        dims = getattr(array.metadata, "dimension_names", None) or ()
        if dims and dims[0] == "run":
            found[name] = array
    return found


def append_run(path: str | Path, ds: xr.Dataset) -> int:
    """Append one run (``ds`` from :func:`run_dataset`) to the store, creating it if needed; return
    the new ``runs_complete``. Call under the writer lock (:class:`StoreWriter` does).

    A new store is written whole to :func:`creating_path` and renamed into place. An existing one
    grows its ``run`` arrays and gets the new chunks, then :func:`commit_store` publishes the run.
    """
    path = Path(path)
    with _quiet_consolidation():
        if not path.exists():
            temporary = creating_path(path)
            if temporary.exists():
                shutil.rmtree(temporary)
            ds = ds.assign_attrs(runs_complete=1)
            ds.to_zarr(temporary, mode="w-", zarr_format=3, consolidated=True, encoding=_encoding(ds))
            os.replace(temporary, path)
            return 1
        group = zarr.open_group(path, mode="r+", zarr_format=3, use_consolidated=False)
        done = int(group.attrs.get("runs_complete", 0))
        arrays = _run_arrays(group)
        wanted = {name for name, var in ds.variables.items() if var.dims[:1] == ("run",)}
        if set(arrays) != wanted:
            raise QDriftError(
                f"{path} holds the run variables {', '.join(sorted(arrays))}, this run {', '.join(sorted(wanted))}"
            )
        for name, array in arrays.items():
            if array.shape[0] != done:
                raise QDriftError(f"{path}: {name} holds {array.shape[0]} runs, runs_complete is {done}; repair first")
            array.resize((done + 1,) + tuple(array.shape[1:]))
            array[done : done + 1] = np.asarray(ds[name].values).astype(array.dtype)
        commit_store(path, done + 1)
    return done + 1


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
    """Trim a run that was being appended when a recording stopped; return ``runs_complete``.

    Idempotent, and safe to kill: the consolidated metadata describes the committed runs throughout.
    """
    path = Path(path)
    group = _open_group(path, mode="r+")
    attrs = dict(group.attrs)
    _check_schema(attrs, path)
    done = int(attrs.get("runs_complete", 0))
    for array in _run_arrays(group).values():
        if array.shape[0] != done:
            array.resize((done,) + tuple(array.shape[1:]))
    commit_store(path, done)  # also restores the consolidated metadata of a store an older version left without
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
            f"{path} could not be opened ({type(exc).__name__}); if a recording was interrupted, "
            "run the same 'qdrift record' again to resume"
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
    _check_step_coordinates(ds, path)
    return ds


#: Largest magnitude accepted for a step coordinate (levels, timesteps, gains are of order 1e3 at most).
MAX_COORDINATE = 1e30


def _check_step_coordinates(ds: xr.Dataset, path: Path) -> None:
    """The per-step coordinates (a few numbers each) must be finite and of sane size (a value like
    1e300 overflows when squared; the fit would print numpy's warning beside its error)."""
    for name in ("timestep", "a", "b", "a_next", "b_next", "gain"):
        if name not in ds.variables:
            continue
        try:
            values = np.asarray(ds[name].values, dtype=np.float64)
        except Exception as exc:  # a damaged chunk of the coordinate
            raise QDriftError(
                f"{path}: the coordinate {name!r} is unreadable ({type(exc).__name__}); re-record the store"
            ) from None
        if not np.all(np.isfinite(values)) or np.any(np.abs(values) > MAX_COORDINATE):
            raise QDriftError(f"{path}: the coordinate {name!r} holds non-finite or huge values; re-record the store")


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
        if key not in wanted:  # not known yet (a pipeline's batch and latent shape before its first run)
            continue
        have, want = attrs.get(key), wanted.get(key)
        if key == "scheduler_config":  # compare as data, without diffusers' "_" bookkeeping keys
            have, want = (_public_config(v) for v in (have, want))
        if isinstance(have, list):
            have = tuple(have)
        if isinstance(want, list):
            want = tuple(want)
        if have != want:
            raise QDriftError(
                f"{path} was recorded with {key}={attrs.get(key)!r}, not {wanted.get(key)!r}; "
                "choose another --out or pass --overwrite"
            )


# --------------------------------------------------------------------------------------------------
# the one writer of a store's identity


def identity_attrs(
    pair_name: str,
    scheduler,
    steps: int | None = None,
    *,
    dtype: str,
    trajectories: bool,
    batch_size: int | None = None,
    sample_shape: tuple[int, ...] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The attributes of a store recorded with ``scheduler`` (a diffusers scheduler).

    ``steps`` (and with it ``prediction_type``, read from the configured scheduler's grid),
    ``batch_size`` and ``sample_shape`` may be left out where they are only known from the first
    run (a pipeline's replayed grid and latents): the caller sets them on :attr:`StoreWriter.attrs`
    then, or :meth:`StoreWriter.append` fills in the batch and sample shape from the run's arrays.
    ``extra``: further attributes (e.g. a pipeline's ``pipeline``, ``guidance_scale``, ``recipe``).
    """
    if dtype not in STORAGE_DTYPES:
        raise QDriftError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}")
    identity = scheduler_identity(scheduler)
    attrs: dict[str, Any] = {
        "qdrift_schema": SCHEMA,
        "qdrift_schema_version": SCHEMA_VERSION,
        "pair": pair_name,
        "scheduler": identity["name"],
        "scheduler_class": identity["class"],
        "scheduler_config": json.dumps(identity["config"], sort_keys=True),
    }
    if steps is not None:
        attrs["steps"] = int(steps)
        attrs["prediction_type"] = adapter_for(scheduler).grid(scheduler).prediction_type
    if batch_size is not None:
        attrs["batch_size"] = int(batch_size)
    if sample_shape is not None:
        attrs["sample_shape"] = [int(n) for n in sample_shape]
    attrs.update(
        {
            "dtype": dtype,
            "trajectories": bool(trajectories),
            "package": "qdrift-stats",
            "package_version": package_version(),
        }
    )
    attrs.update(extra or {})
    return attrs


def grid_coordinates(grid: StepGrid) -> dict[str, np.ndarray]:
    """The store's per-step coordinates on a step grid, each float64 ``(steps,)``: ``timestep, a, b,
    a_next, b_next`` and ``gain``, the first-order gain of the grid's scheduler adapter
    (:func:`qdrift_stats.schedulers.base.gain_on`)."""
    return {
        "timestep": grid.timesteps,
        "a": grid.a,
        "b": grid.b,
        "a_next": grid.a_next,
        "b_next": grid.b_next,
        "gain": gain_on(grid),
    }


def step_coordinates(scheduler) -> dict[str, np.ndarray]:
    """:func:`grid_coordinates` of a configured scheduler (after ``set_timesteps``)."""
    return grid_coordinates(adapter_for(scheduler).grid(scheduler))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class StoreWriter:
    """The one writer of a calibration store, used as a context manager::

        with StoreWriter(out, attrs, coords, overwrite=False) as writer:
            for seed in writer.todo(seeds):
                writer.append(seed, arrays_of(seed))

    On entering it takes the writer lock (:class:`StoreLock`) and applies the resume rule: a
    leftover creation folder is removed; a missing store is created by the first ``append``;
    ``overwrite`` removes an existing store; otherwise the store must have the same identity
    (the :data:`IDENTITY_ATTRS` given in ``attrs``), a partly appended run is trimmed
    (:func:`repair_store`), :attr:`existing` holds its attributes and :attr:`done_seeds` the seeds
    of its complete runs. A store of this schema that never committed a run (an older version
    killed while creating it) is started again.

    Args:
        attrs: from :func:`identity_attrs`; ``coords``: from :func:`step_coordinates`. A recording
            that learns its grid or latent layout from its first run (``calibrate_pipeline``) sets
            :attr:`attrs`, :attr:`coords` and :attr:`dims` (the sample's own dims, default
            :func:`sample_dims`) before its first ``append``.
    """

    def __init__(
        self,
        path: str | Path,
        attrs: dict[str, Any],
        coords: dict[str, np.ndarray] | None = None,
        *,
        overwrite: bool = False,
        dims: tuple[str, ...] | None = None,
    ):
        self.path = Path(path)
        self.attrs = dict(attrs)
        self.coords = dict(coords or {})
        self.dims = dims
        self.overwrite = overwrite
        self.existing: dict[str, Any] | None = None
        self.done_seeds: set[int] = set()
        self.runs_complete = 0
        self.lock: StoreLock | None = None

    def __enter__(self) -> StoreWriter:
        self.lock = StoreLock(self.path).acquire()
        try:
            self.done_seeds = self._prepare()
        except BaseException:
            self.lock.release()
            self.lock = None
            raise
        self.runs_complete = len(self.done_seeds)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _prepare(self) -> set[int]:
        path = self.path
        temporary = creating_path(path)
        if temporary.exists():
            shutil.rmtree(temporary)  # a creation that never finished: it holds no committed run
        if not path.exists() and not path.is_symlink():
            return set()
        if self.overwrite:
            remove_output(path, "store")  # only a calibration store, never a foreign folder
            return set()
        attrs = store_attrs(path)
        if not attrs.get("runs_complete"):  # created by an older version, killed before its first commit
            _remove(path)
            return set()
        check_compatible(attrs, self.attrs, path)
        done = repair_store(path)
        self.existing = store_attrs(path)
        return {int(s) for s in zarr.open_group(path, mode="r", use_consolidated=False)["seed"][:done]}

    def todo(self, seeds: Iterable[int]) -> list[int]:
        """The seeds of ``seeds`` the store does not hold yet, in order."""
        return [int(s) for s in seeds if int(s) not in self.done_seeds]

    def append(self, seed: int, arrays: dict[str, np.ndarray]) -> int:
        """Append one run (name -> ``(steps, batch, *sample_shape)``, cast to the store's dtype) and
        commit it; return ``runs_complete``."""
        if self.lock is None:
            raise QDriftError("StoreWriter.append outside its 'with' block")
        if not self.coords:
            raise QDriftError("StoreWriter.append before the step coordinates are known")
        first = next(iter(arrays.values()))
        attrs = {"batch_size": int(first.shape[1]), "sample_shape": [int(n) for n in first.shape[2:]], **self.attrs}
        if attrs["batch_size"] != first.shape[1] or list(attrs["sample_shape"]) != list(first.shape[2:]):
            raise QDriftError(
                f"the run's arrays are {tuple(first.shape[1:])}, the recording declares batch "
                f"{attrs['batch_size']} of {tuple(attrs['sample_shape'])}"
            )
        if self.path.exists():
            check_compatible(store_attrs(self.path), attrs, self.path)
        dtype = STORAGE_DTYPES[str(attrs.get("dtype", "float32"))]
        arrays = {name: np.asarray(value).astype(dtype) for name, value in arrays.items()}
        ds = run_dataset(arrays, int(seed), self.runs_complete, self.coords, attrs, dims=self.dims)
        self.runs_complete = append_run(self.path, ds)
        self.done_seeds.add(int(seed))
        return self.runs_complete


def upgrade_store(path: str | Path) -> bool:
    """Add the ``gain`` coordinate to a store written before it existed; return whether it was added.

    The gain is the first-order gain of the recorded scheduler (rebuilt from the store's
    ``scheduler_class`` and ``scheduler_config`` with its step count), after checking that it gives
    the store's timesteps. Takes the writer lock; safe to kill and to run again. The schema
    version does not change (``gain`` was always optional for readers).
    """
    path = Path(path)
    with writer_lock(path):
        attrs = store_attrs(path)
        done = repair_store(path)
        group = zarr.open_group(path, mode="r+", zarr_format=3, use_consolidated=False)
        listed = all("gain" in str(group[name].attrs.get("coordinates", "")).split() for name in PERTURBATION_VARS)
        if "gain" in group and listed:
            return False
        identity = {
            "name": attrs.get("scheduler"),
            "class": attrs.get("scheduler_class"),
            "config": attrs.get("scheduler_config"),
        }
        scheduler = scheduler_from_identity(identity, int(attrs["steps"]))
        coords = step_coordinates(scheduler)
        recorded = np.asarray(group["timestep"][:], dtype=np.float64)
        if recorded.shape != coords["timestep"].shape or not np.allclose(
            recorded, coords["timestep"], rtol=0, atol=1e-4
        ):
            raise QDriftError(
                f"{path}: its recorded scheduler config does not give its timesteps; cannot "
                "compute the gain, re-record the store"
            )
        template = group["b"]
        gain = group.create_array(
            "gain",
            shape=template.shape,
            dtype=template.dtype,
            chunks=template.chunks,
            dimension_names=("step",),
            fill_value=template.fill_value,
            attributes=dict(template.attrs),
            overwrite=True,
        )
        gain[:] = coords["gain"]
        for _, array in group.arrays():
            listed_coords = str(array.attrs.get("coordinates", "")).split()
            if listed_coords and "gain" not in listed_coords:
                array.attrs["coordinates"] = " ".join(sorted([*listed_coords, "gain"]))
        commit_store(path, done)
    return True
