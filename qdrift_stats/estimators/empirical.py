"""The empirical estimator: ``v_i = mean ||Delta_i||^2 / dim`` over runs and samples.

Two statistics:

- ``lockstep`` (the method's definition): the mean square of the recorded lock-step
  perturbation ``delta_x``. For a multistep solver the Q scheduler carries a Q history, so
  ``Delta_i`` holds the fresh error of step ``i`` *and* the reused errors of earlier steps; the
  same error then counts in several ``v_i``.
- ``first-order``: ``gain_i^2 * mean (m_q - m_fp)^2``, the variance a fresh output error injects
  through the first-order step (``gain`` is a store coordinate). Identical to ``lockstep`` for
  one-step solvers (Euler, DDIM, flow Euler); for DPM-Solver++ 2M it counts each error once.

Runs are the independent units (a run is one seed; its samples share nothing else, but treating
runs as the unit keeps the interval honest when a pair's conditions or noise correlate samples
within a run). The estimate is the mean of the per-run values and its confidence interval is a
Student-t interval over runs, floored at 0 (pointwise: each step's); beside it a simultaneous max-t
band over the steps (``band_low``, ``band_high``; :mod:`qdrift_stats.estimators.bands`). With one run
there is no interval (NaN).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
from scipy import stats

from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.bands import run_mean_band
from qdrift_stats.estimators.base import (
    STATISTICS,
    Estimator,
    FittedEstimator,
    as_dataset,
    check_finite_store,
    check_statistic,
    per_run_second_moment,
)
from qdrift_stats.record.store import storage_errors_as_qdrift


def t_interval(per_run: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over axis 0 with a Student-t interval; returns ``(mean, low, high)``, low floored at 0."""
    n = per_run.shape[0]
    mean = per_run.mean(axis=0)
    if n < 2:
        return mean, np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    se = per_run.std(axis=0, ddof=1) / np.sqrt(n)
    half = stats.t.ppf(0.5 + confidence / 2, df=n - 1) * se
    return mean, np.maximum(mean - half, 0.0), mean + half


class EmpiricalEstimator(Estimator):
    """Per-step mean square of the recorded perturbation ``delta_x``.

    Args:
        per_channel: one value per channel (the first sample dim) instead of one per step.
        confidence: nominal level of the t-interval over runs.
        statistic: ``"lockstep"`` or ``"first-order"`` (see the module docstring).
    """

    name = "empirical"
    pools_runs = True
    STATISTICS = STATISTICS

    def __init__(self, per_channel: bool = False, confidence: float = 0.95, statistic: str = "lockstep"):
        check_statistic(statistic)
        self.per_channel = per_channel
        self.confidence = confidence
        self.statistic = statistic

    def heldout_mean_square(self, ds: xr.Dataset, fitted: FittedEstimator) -> np.ndarray:
        """The per-run values themselves: the mean square of ``delta_x`` or of ``gain * delta_out``."""
        return fitted.per_run if fitted.per_run.size else super().heldout_mean_square(ds, fitted)

    @storage_errors_as_qdrift
    def fit(self, store: xr.Dataset | str | Path) -> FittedEstimator:
        ds = as_dataset(store)
        if self.statistic == "lockstep":
            per_run = per_run_second_moment(ds, "delta_x", self.per_channel).values
        else:
            if "gain" not in ds.coords:
                raise QDriftError(
                    "the store has no 'gain' coordinate (recorded by an older qdrift-stats); add it once with "
                    "python -c \"from qdrift_stats.record.store import upgrade_store; upgrade_store('STORE')\" "
                    "or use the lockstep statistic"
                )
            gain2 = ds["gain"].values.astype(np.float64) ** 2
            moment = per_run_second_moment(ds, "delta_out", self.per_channel).values
            per_run = moment * gain2.reshape((1, -1) + (1,) * (moment.ndim - 2))
        check_finite_store(per_run)
        variance, low, high = t_interval(per_run, self.confidence)
        band_low, band_high = run_mean_band(per_run, self.confidence)
        return FittedEstimator.on_store(ds, self, variance, low, high, per_run, band_low=band_low, band_high=band_high)
