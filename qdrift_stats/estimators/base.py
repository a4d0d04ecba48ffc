"""The estimator base class and what every estimator returns: a results object in the statsmodels style.

:class:`Estimator` holds the parameters (read from ``__init__``, as scikit-learn's
``BaseEstimator``); ``Estimator.fit(store) -> FittedEstimator``. A fitted estimator carries the per-step estimate
``variance`` (``(steps,)`` or ``(steps, channels)``, state units squared), its confidence interval,
the per-run values it was computed from, the step grid it belongs to, and the store's identity;
``summary()`` prints a table a person can read, ``to_dataset()`` gives an xarray Dataset and
``EstimatorFile.from_fitted(fitted)`` (:mod:`qdrift_stats.correct.estimator_file`) makes the
estimator file (``fitted.export(path)`` is a shortcut).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import xarray as xr

from qdrift_stats.errors import QDriftError
from qdrift_stats.record.store import open_store, sample_dims


def as_dataset(store: xr.Dataset | str | Path) -> xr.Dataset:
    """A calibration store given as a path or an already opened Dataset."""
    return store if isinstance(store, xr.Dataset) else open_store(store)


def reduce_dims(ds: xr.Dataset, per_channel: bool) -> list[str]:
    """Dimensions averaged over for one run's statistic: ``sample`` and the sample dims (but ``channel``)."""
    dims = ["sample"] + [d for d in ds["delta_x"].dims if d not in ("run", "step", "sample")]
    return [d for d in dims if not (per_channel and d == "channel")]


class Estimator:
    """Base class of the estimators of the variance statistic (scikit-learn / statsmodels spirit).

    A subclass declares its parameters as keyword arguments of ``__init__`` and stores each under
    the same attribute name (as scikit-learn's ``BaseEstimator``); :meth:`get_params` reads them
    back from the signature, so :meth:`clone` (``type(est)(**est.get_params())``) gives an unfitted
    copy with the same configuration (what cross-validation fits per split). ``fit(store)``
    returns a :class:`FittedEstimator`.

    Class attributes:
        name: the estimator's name, recorded in fitted results and estimator files.
        pools_runs: True when the estimate is the plain mean over runs of the fit's ``per_run``
            values, each computed from its own run alone (the empirical and robust estimators):
            a fit on a subset of runs is then the mean of the subset's per-run values, which
            :mod:`qdrift_stats.validate` uses instead of refitting.
        fixed_params: constant entries added to :attr:`params` (e.g. the model a smooth
            estimator fits), recorded in estimator files.
        unrecorded_params: ``__init__`` parameters left out of :attr:`params` (not JSON-able,
            e.g. the model pair of the moment estimator).
    """

    name: ClassVar[str] = ""
    pools_runs: ClassVar[bool] = False
    fixed_params: ClassVar[dict[str, Any]] = {}
    unrecorded_params: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def param_names(cls) -> list[str]:
        """The names of the ``__init__`` keyword parameters, in signature order."""
        names = []
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name == "self":
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"{cls.__name__}.__init__ must name its parameters (no *args or **kwargs)")
            names.append(p.name)
        return names

    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` parameters and their current values (enough to rebuild the estimator)."""
        return {name: getattr(self, name) for name in self.param_names()}

    @property
    def params(self) -> dict[str, Any]:
        """The JSON-able parameters recorded in fitted results and estimator files."""
        recorded = {k: v for k, v in self.get_params().items() if k not in self.unrecorded_params}
        return {**recorded, **self.fixed_params}

    def clone(self) -> Estimator:
        """An unfitted estimator with the same parameters (scikit-learn's ``clone``)."""
        return type(self)(**self.get_params())

    def with_params(self, **params: Any) -> Estimator:
        """A new estimator with some parameters changed (checked by ``__init__`` as any other).

        Raises:
            QDriftError: a name that is not a parameter of this estimator.
        """
        unknown = sorted(set(params) - set(self.param_names()))
        if unknown:
            raise QDriftError(
                f"the {self.name} estimator has no parameter {', '.join(unknown)}; "
                f"its parameters: {', '.join(self.param_names())}"
            )
        return type(self)(**{**self.get_params(), **params})

    def fit(self, store: xr.Dataset | str | Path) -> FittedEstimator:
        """Fit the statistic on a calibration store (path or opened Dataset)."""
        raise NotImplementedError

    def heldout_mean_square(self, ds: xr.Dataset, fitted: FittedEstimator) -> np.ndarray:
        """``(run, step[, channel])`` per-run mean square of the perturbation this estimator models.

        Cross-validation scores a fit by the Gaussian log-likelihood of held-out runs under it. The
        default is the lock-step perturbation ``delta_x``; an estimator of another perturbation (the
        empirical ``first-order`` statistic) returns its own per-run values.
        """
        return per_run_second_moment(ds, "delta_x", fitted.per_channel).values

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def per_run_second_moment(ds: xr.Dataset, variable: str = "delta_x", per_channel: bool = False) -> xr.DataArray:
    """``(run, step[, channel])`` mean square of a store variable per run (lazy, dask-friendly)."""
    return (ds[variable].astype("float64") ** 2).mean(dim=reduce_dims(ds, per_channel))


@dataclass
class FittedEstimator:
    """A fitted variance statistic on one step grid.

    Estimators with more to report return a subclass with typed fields
    (:class:`~qdrift_stats.estimators.decomposed.DecomposedFit`,
    :class:`~qdrift_stats.estimators.smooth.SmoothFit`, :class:`~qdrift_stats.estimators.moment.MomentFit`).

    Attributes:
        name: estimator name (e.g. ``"empirical"``).
        params: the estimator's parameters (JSON-able).
        variance: ``(steps,)`` or ``(steps, channels)``, ``v_i`` in state units squared.
        ci_low, ci_high: confidence bounds of ``variance`` (same shape; NaN where undefined).
        confidence: the CI's nominal level.
        per_run: ``(runs, steps[, channels])`` the per-run statistics the estimate pools (may be empty).
        timesteps, a_next, b_next: the step grid, ``(steps,)``.
        store_attrs: the calibration store's attributes (scheduler, pair, ...).
        seeds: the runs' seeds.
        k, mu: optional per-step decomposition ``m_q - m_fp = k m_fp + mu + r`` (output units).
        smooth: whether ``variance`` comes from a smooth model of ``log b`` (then an exported file
            may be interpolated to another step grid).
        band_low, band_high: a *simultaneous* band at ``confidence`` (every step covered at once; max-t,
            :mod:`qdrift_stats.estimators.bands`), beside the *pointwise* ``ci_low, ci_high``; None
            where the estimator has none.
    """

    name: str
    params: dict[str, Any]
    variance: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    confidence: float
    per_run: np.ndarray
    timesteps: np.ndarray
    a_next: np.ndarray
    b_next: np.ndarray
    store_attrs: dict[str, Any]
    seeds: np.ndarray
    k: np.ndarray | None = None
    mu: np.ndarray | None = None
    smooth: bool = False
    band_low: np.ndarray | None = None
    band_high: np.ndarray | None = None

    @classmethod
    def on_store(
        cls,
        ds: xr.Dataset,
        estimator: Estimator,
        variance: np.ndarray,
        ci_low: np.ndarray,
        ci_high: np.ndarray,
        per_run: np.ndarray,
        **fields: Any,
    ):
        """A fitted estimate on a store's step grid, carrying the store's attributes and seeds.

        ``estimator`` supplies ``name``, ``params`` and ``confidence``; ``fields`` are further
        attributes (``k``, ``mu``, ``smooth``, a subclass's fields, or ``seeds`` to override the store's).
        """
        grid = grid_of(ds)
        fields.setdefault("seeds", np.asarray(ds["seed"].values))
        return cls(
            name=estimator.name,
            params=estimator.params,
            variance=variance,
            ci_low=ci_low,
            ci_high=ci_high,
            confidence=estimator.confidence,
            per_run=per_run,
            timesteps=grid["timestep"],
            a_next=grid["a_next"],
            b_next=grid["b_next"],
            store_attrs=dict(ds.attrs),
            **fields,
        )

    def export_tensors(self) -> dict[str, np.ndarray]:
        """Tensors an estimator file carries beside the per-step ones (a smooth estimator's curves)."""
        return {}

    def export_metadata(self) -> dict[str, Any]:
        """Entries of the estimator file's ``estimator`` metadata beside name, params and smooth."""
        return {}

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def num_runs(self) -> int:
        return len(self.seeds)

    @property
    def per_channel(self) -> bool:
        return self.variance.ndim == 2

    @property
    def scheduler_name(self) -> str:
        return str(self.store_attrs.get("scheduler"))

    def conf_int(self) -> np.ndarray:
        """``(steps[, channels], 2)`` lower and upper confidence bounds."""
        return np.stack([self.ci_low, self.ci_high], axis=-1)

    def to_dataset(self) -> xr.Dataset:
        """The estimate as an xarray Dataset over ``step`` (and ``channel``)."""
        dims = ("step", "channel") if self.per_channel else ("step",)
        data = {"variance": (dims, self.variance), "ci_low": (dims, self.ci_low), "ci_high": (dims, self.ci_high)}
        if self.per_run.size:
            data["per_run"] = (("run",) + dims, self.per_run)
        for name, value in (("k", self.k), ("mu", self.mu)):  # per channel even with a per-step variance
            if value is not None:
                data[name] = (("step", "channel") if np.ndim(value) == 2 else ("step",), value)
        coords = {
            "step": np.arange(self.num_steps),
            "timestep": ("step", self.timesteps),
            "b_next": ("step", self.b_next),
        }
        if self.per_run.size:
            coords["seed"] = ("run", self.seeds)
        attrs = {"estimator": self.name, "params": json.dumps(self.params), "confidence": self.confidence}
        return xr.Dataset(data, coords=coords, attrs=attrs)

    def summary(self, max_rows: int = 12) -> str:
        """A readable table: per step, the timestep, target level and the estimate with its CI."""
        v = self.variance if not self.per_channel else self.variance.mean(axis=1)
        lo = self.ci_low if not self.per_channel else self.ci_low.mean(axis=1)
        hi = self.ci_high if not self.per_channel else self.ci_high.mean(axis=1)
        level = int(round(self.confidence * 100))
        head = [
            f"Q-Drift variance statistic: {self.name} {json.dumps(self.params, sort_keys=True)}",
            f"pair {self.store_attrs.get('pair')}, scheduler {self.scheduler_name}, {self.num_steps} steps, "
            f"{self.num_runs} runs x {self.store_attrs.get('batch_size')} samples"
            + (", per channel (averaged below)" if self.per_channel else ""),
            f"{'step':>5} {'timestep':>9} {'b_next':>9} {'v':>11} {f'[{level}% CI':>12} {'':>11}]  {'v/b_next^2':>10}",
        ]
        rows = np.arange(self.num_steps)
        if self.num_steps > max_rows:
            rows = np.unique(np.linspace(0, self.num_steps - 1, max_rows).round().astype(int))
        lines = []
        for i in rows:
            ratio = v[i] / self.b_next[i] ** 2 if self.b_next[i] > 0 else float("nan")
            lines.append(
                f"{i:>5} {self.timesteps[i]:>9.2f} {self.b_next[i]:>9.4f} {v[i]:>11.4e} "
                f"{lo[i]:>12.4e} {hi[i]:>11.4e}  {ratio:>10.3e}"
            )
        note = self.interval_note()
        return "\n".join(head + lines + ([f"note: {note}"] if note else []))

    def to_json(self) -> dict[str, Any]:
        """The estimate as a JSON-able dict (what ``qdrift fit --json`` prints, beside the file written).

        Per-step lists hold ``None`` where a value is not finite (e.g. the bounds of a 1-run store).
        """

        def listed(a: np.ndarray) -> list:
            return np.where(np.isfinite(a), a, None).tolist()

        return {
            "estimator": self.name,
            "params": self.params,
            "scheduler": self.scheduler_name,
            "steps": self.num_steps,
            "num_runs": self.num_runs,
            "timesteps": listed(self.timesteps),
            "variance": listed(self.variance),
            "ci_low": listed(self.ci_low),
            "ci_high": listed(self.ci_high),
            "confidence": self.confidence,
            "interval_note": self.interval_note(),
        }

    def interval_note(self) -> str | None:
        """Why the confidence bounds are NaN, when they all are (e.g. a 1-run store), else ``None``."""
        if np.isfinite(self.ci_low).any() or np.isfinite(self.ci_high).any():
            return None
        if self.num_runs < 2:
            return (
                f"no confidence interval: the store holds {self.num_runs} run, an interval over runs needs at least 2"
            )
        return "no confidence interval: this estimator gives none for this store"

    def export(
        self,
        path: str | Path,
        correction: str | None = None,
        strength: float = 1.0,
        provenance: dict[str, Any] | None = None,
        overwrite: bool = False,
    ):
        """Write the estimator file; returns the :class:`~qdrift_stats.correct.estimator_file.EstimatorFile`.

        A convenience for ``EstimatorFile.from_fitted(self, ...).save(path)``. The import of
        :mod:`qdrift_stats.correct.estimator_file` is done here, at call time, on purpose: the
        estimators sit below ``correct`` in the package's layers and import nothing from it at
        module level (``tests/test_layout.py`` checks the module-level import graph is acyclic).
        """
        from qdrift_stats.correct.estimator_file import EstimatorFile

        est = EstimatorFile.from_fitted(self, correction=correction, strength=strength, provenance=provenance)
        est.save(path, overwrite=overwrite)
        return est


STATISTICS: tuple[str, ...] = ("lockstep", "first-order")


def check_statistic(statistic: str) -> str:
    """Validate a statistic name (see :mod:`qdrift_stats.estimators.empirical`); return it."""
    if statistic not in STATISTICS:
        raise QDriftError(f"unknown statistic {statistic!r}; choose lockstep or first-order")
    return statistic


def check_finite_store(per_run: np.ndarray, what: str = "delta_x") -> None:
    if not np.all(np.isfinite(per_run)):
        raise QDriftError(f"the store's {what} holds non-finite values; re-record the affected runs")


def grid_of(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """The step grid coordinates of a store as float64 arrays."""
    return {name: np.asarray(ds[name].values, dtype=np.float64) for name in ("timestep", "a", "b", "a_next", "b_next")}


__all__ = [
    "Estimator",
    "FittedEstimator",
    "as_dataset",
    "reduce_dims",
    "per_run_second_moment",
    "grid_of",
    "sample_dims",
]
