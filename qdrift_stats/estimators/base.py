"""What every estimator of the variance statistic returns: a results object in the statsmodels style.

``Estimator.fit(store) -> FittedEstimator``. A fitted estimator carries the per-step estimate
``variance`` (``(steps,)`` or ``(steps, channels)``, state units squared), its confidence interval,
the per-run values it was computed from, the step grid it belongs to, and the store's identity;
``summary()`` prints a table a person can read, ``to_dataset()`` gives an xarray Dataset and
``export(path, ...)`` writes the estimator file (:mod:`qdrift_stats.correct.estimator_file`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class FittedEstimator:
    """A fitted variance statistic on one step grid.

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
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def on_store(
        cls,
        ds: xr.Dataset,
        estimator: Any,
        variance: np.ndarray,
        ci_low: np.ndarray,
        ci_high: np.ndarray,
        per_run: np.ndarray,
        **fields: Any,
    ):
        """A fitted estimate on a store's step grid, carrying the store's attributes and seeds.

        ``estimator`` supplies ``name``, ``params`` and ``confidence``; ``fields`` are further
        attributes (``k``, ``mu``, ``smooth``, ``extra``, or ``seeds`` to override the store's).
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
        if self.k is not None:
            data["k"] = (dims, self.k)
        if self.mu is not None:
            data["mu"] = (dims, self.mu)
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
                f"{i:>5} {self.timesteps[i]:>9.2f} {self.b_next[i]:>9.4f} {v[i]:>11.4e} {lo[i]:>12.4e} {hi[i]:>11.4e}  {ratio:>10.3e}"
            )
        return "\n".join(head + lines)

    def export(
        self,
        path: str | Path,
        correction: str = "shrink",
        strength: float = 1.0,
        provenance: dict[str, Any] | None = None,
        overwrite: bool = False,
    ):
        """Write the estimator file (safetensors + JSON metadata); returns the :class:`EstimatorFile`."""
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


__all__ = ["FittedEstimator", "as_dataset", "reduce_dims", "grid_of", "sample_dims"]
