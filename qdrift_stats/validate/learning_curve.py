"""The learning curve over the calibration count: how the fit's error shrinks with more runs.

Runs are the groups (a run is one seed's batch; its samples are not independent units). In the
scikit-learn ``model_selection`` spirit, the splitter (:func:`run_subsets`) decides *how* runs are
split and the scores decide *what* is measured. For ``N = 1 .. M-1`` (``M`` runs in the store),
repeated random subsets of ``N`` training runs (all ``C(M, N)`` subsets when there are at most
``n_splits``, else scikit-learn ``ShuffleSplit`` with ``train_size=N``). Per split, the estimator
(a clone of the one given: same class and parameters) is fitted on the training runs and scored:

- ``rel_error_vs_all``: root mean square over the correctable steps (``b_next > 0``, all-runs
  ``v > 0``) of ``(v_N - v_M) / v_M``, the ``N``-run fit against the all-runs fit;
- ``rel_error``: the same times ``sqrt(M / (M - N))``. A subset shares runs with the all-runs fit,
  which hides part of its error (at ``N = M - 1`` most of it). For an estimate that averages
  per-run values (empirical, robust) ``Var(v_N - v_M) = s^2 (1/N - 1/M)`` while the error against
  the truth has ``Var(v_N) = s^2 / N``: the factor is that finite-population correction, and
  ``rel_error`` estimates the error of an ``N``-run fit against the truth (the runs-needed study
  checks it against the testbed's analytic truth);
- ``heldout_loglik``: mean Gaussian log-likelihood (nats per value) of the held-out runs'
  perturbations under ``N(0, v_N)`` on the correctable steps: ``-1/2 log(2 pi v) - ms / (2 v)``
  with ``ms`` the held-out runs' mean square of the perturbation the estimator models
  (:meth:`~qdrift_stats.estimators.base.Estimator.heldout_mean_square`: ``delta_x``;
  ``c_i delta_out`` for the first-order statistic). NaN for the decomposed estimator, whose ``v``
  is that of a residual;
- ``rel_error_step``: the signed per-step ``(v_N - v_M) / v_M``.

An estimator whose estimate is the mean of its per-run values
(:attr:`~qdrift_stats.estimators.base.Estimator.pools_runs`) is not refitted per split: the
subset's fit is the mean of the subset's per-run values (the ``fast_path`` attribute says so).

Scores are stored over the dims ``(n_runs, repeat)``, one ``repeat`` per split (NaN-padded where a
count has fewer splits than ``n_splits``). :class:`~qdrift_stats.validate.crossval.CVResult` reads
the curve and the runs needed off this Dataset.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import get_estimator, registered_name
from qdrift_stats.estimators.base import Estimator, FittedEstimator, as_dataset
from qdrift_stats.record.store import storage_errors_as_qdrift
from qdrift_stats.validate.diagnostics import readable
from qdrift_stats.validate.parts import ResultParts

CV_SCHEMA = "qdrift-cv"
CV_SCHEMA_VERSION = 1


# ---- splitting ----------------------------------------------------------------------------------
def run_subsets(num_runs: int, size: int, n_splits: int, seed: int) -> list[np.ndarray]:
    """Training run indices for one calibration count: all subsets if few, else ShuffleSplit draws."""
    if not 1 <= size < num_runs:
        raise QDriftError(f"a training subset needs 1 <= N < {num_runs} runs, got {size}")
    if math.comb(num_runs, size) <= n_splits:
        return [np.array(c) for c in combinations(range(num_runs), size)]
    from sklearn.model_selection import ShuffleSplit

    splitter = ShuffleSplit(n_splits=n_splits, train_size=size, test_size=num_runs - size, random_state=seed + size)
    return [np.sort(train) for train, _ in splitter.split(np.arange(num_runs))]


# ---- scores -------------------------------------------------------------------------------------
def relative_errors(v_subset: np.ndarray, v_all: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Signed ``(v_N - v_M) / v_M`` on the masked entries, NaN elsewhere (same shape as ``v_all``)."""
    out = np.full(v_all.shape, np.nan)
    out[mask] = (v_subset[mask] - v_all[mask]) / v_all[mask]
    return out


def gaussian_loglik(v: np.ndarray, mean_square: np.ndarray, mask: np.ndarray) -> float:
    """Mean over masked entries of ``-1/2 log(2 pi v) - ms / (2 v)`` (nats per value).

    ``-inf`` if ``v = 0`` on a masked entry; NaN when nothing is masked.
    """
    keep = mask & np.isfinite(mean_square)
    if not keep.any():
        return float("nan")
    vv, ms = v[keep], mean_square[keep]
    if np.any(vv <= 0):
        return float("-inf")
    return float(np.mean(-0.5 * np.log(2 * np.pi * vv) - ms / (2 * vv)))


# ---- the estimator and the settings -------------------------------------------------------------
def as_estimator(estimator: Estimator | str) -> tuple[Estimator, str]:
    """``(estimator, label)`` from an estimator instance or a registered name.

    The label names the estimator in results (and identifies a resumable result): the registered
    name when one builds the same class with the same parameters, else the estimator's ``repr``.
    """
    if isinstance(estimator, str):
        return get_estimator(estimator), estimator
    if not isinstance(estimator, Estimator):
        raise QDriftError(f"expected an estimator or an estimator name, got a {type(estimator).__name__}")
    return estimator, registered_name(estimator) or repr(estimator)


def check_counts(counts: Iterable[int] | None, runs: int) -> list[int]:
    """The calibration counts to evaluate, sorted (default ``1 .. runs - 1``); refused outside ``1..runs-1``."""
    if runs < 2:
        raise QDriftError(f"cross-validation needs at least 2 runs; the store holds {runs}")
    chosen = sorted({int(n) for n in (counts if counts is not None else range(1, runs))})
    if not chosen or chosen[0] < 1 or chosen[-1] >= runs:
        raise QDriftError(f"calibration counts must lie in 1..{runs - 1}")
    return chosen


def cv_settings(
    ds: xr.Dataset, store: Any, estimator_label: str, n_splits: int, seed: int, counts: list[int]
) -> dict[str, Any]:
    """The attributes that identify a learning curve (and a resumable cross-validation result)."""
    return {
        "counts": json.dumps(counts),
        "qdrift_schema": CV_SCHEMA,
        "qdrift_schema_version": CV_SCHEMA_VERSION,
        "store": str(store) if not isinstance(store, xr.Dataset) else "(dataset)",
        "estimator": estimator_label,
        "n_splits": int(n_splits),
        "seed": int(seed),
        "num_runs": int(ds.sizes["run"]),
        "seeds": json.dumps([int(s) for s in ds["seed"].values]),
        "pair": str(ds.attrs.get("pair")),
        "scheduler": str(ds.attrs.get("scheduler")),
        "steps": int(ds.sizes["step"]),
        "batch_size": int(ds.attrs.get("batch_size", ds.sizes.get("sample", 0))),
    }


# The settings a resumed result must share with the folder it resumes.
CV_IDENTITY: tuple[str, ...] = (
    "qdrift_schema",
    "qdrift_schema_version",
    "estimator",
    "n_splits",
    "seed",
    "counts",
    "num_runs",
    "seeds",
    "pair",
    "scheduler",
    "steps",
)


# ---- the computation ----------------------------------------------------------------------------
def pooled_fast_path(estimator: Estimator, fitted: FittedEstimator) -> bool:
    """Whether a subset's fit is the mean of the all-runs fit's per-run values (no refit needed)."""
    return (
        estimator.pools_runs
        and fitted.per_run.size > 0
        and np.allclose(fitted.variance, fitted.per_run.mean(axis=0), rtol=1e-10, atol=0)
    )


def count_scores(
    ds_mem: xr.Dataset,
    estimator: Estimator,
    fitted_all: FittedEstimator,
    fast: bool,
    heldout_ms: np.ndarray,
    mask: np.ndarray,
    size: int,
    n_splits: int,
    seed: int,
) -> xr.Dataset:
    """Scores of every split of one calibration count ``size`` (module docstring), dims ``(n_runs, repeat)``."""
    runs = ds_mem.sizes["run"]
    subsets = run_subsets(runs, size, n_splits, seed)
    v_all = fitted_all.variance
    width = max(n_splits, len(subsets))
    rel = np.full(width, np.nan)
    rel_all = np.full(width, np.nan)
    loglik = np.full(width, np.nan)
    per_step = np.full((width,) + v_all.shape, np.nan)
    train_mask = np.zeros((width, runs), dtype=bool)
    correction = math.sqrt(runs / (runs - size))
    for j, train in enumerate(subsets):
        if fast:
            v = fitted_all.per_run[train].mean(axis=0)
        else:
            v = estimator.clone().fit(ds_mem.isel(run=train)).variance
        errors = relative_errors(v, v_all, mask)
        per_step[j] = errors
        rms = float(np.sqrt(np.nanmean(errors**2))) if np.any(mask) else float("nan")
        rel_all[j], rel[j] = rms, rms * correction
        held = np.setdiff1d(np.arange(runs), train)
        if fitted_all.k is None:
            loglik[j] = gaussian_loglik(np.broadcast_to(v, heldout_ms.shape[1:]), heldout_ms[held].mean(axis=0), mask)
        train_mask[j, train] = True
    step_dims = ("step",) if v_all.ndim == 1 else ("step", "channel")
    return xr.Dataset(
        {
            "rel_error": (("n_runs", "repeat"), rel[None]),
            "rel_error_vs_all": (("n_runs", "repeat"), rel_all[None]),
            "heldout_loglik": (("n_runs", "repeat"), loglik[None]),
            "rel_error_step": (("n_runs", "repeat") + step_dims, per_step[None]),
            "train_mask": (("n_runs", "repeat", "run"), train_mask[None]),
        },
        coords={"n_runs": [size]},
    )


def part_name(count: int) -> str:
    """The name of a calibration count's part in a resumable result."""
    return f"n{count:04d}"


@storage_errors_as_qdrift
def learning_curve(
    estimator: Estimator | str,
    store: xr.Dataset | str | Path,
    *,
    counts: Iterable[int] | None = None,
    n_splits: int = 50,
    seed: int = 0,
    parts: ResultParts | None = None,
    progress: Callable[[Iterable], Iterator] | None = None,
) -> xr.Dataset:
    """The learning curve over the calibration count (module docstring).

    Args:
        estimator: a configured estimator (cloned per split) or a registered name.
        store: calibration store path or Dataset (at least 2 runs).
        counts: calibration counts to evaluate (default ``1 .. M-1``).
        n_splits: most random subsets per count.
        seed: seed of the splits.
        parts: a resumable results folder: each count is committed there as it finishes, and counts
            already committed are read back instead of recomputed (the caller checks that the folder
            belongs to the same settings, as :func:`~qdrift_stats.validate.crossval.cross_validate` does).
        progress: wraps the iterable of counts (e.g. a progress bar).

    Returns:
        Dataset with ``rel_error``, ``rel_error_vs_all``, ``heldout_loglik`` ``(n_runs, repeat)``,
        ``rel_error_step`` ``(n_runs, repeat, step[, channel])``, ``train_mask``
        ``(n_runs, repeat, run)``, ``v_all`` ``(step[, channel])`` (the all-runs fit), ``per_run``
        ``(run, step[, channel])`` (the all-runs fit's per-run values, where it has them); coordinates
        ``b_next``, ``timestep`` (step), ``seed`` (run); attributes: the settings
        (:func:`cv_settings`), ``estimator_params`` (JSON) and ``fast_path``.
    """
    est, label = as_estimator(estimator)
    ds = as_dataset(store)
    chosen = check_counts(counts, ds.sizes["run"])
    if n_splits < 1:
        raise QDriftError("n_splits must be >= 1")
    settings = cv_settings(ds, store, label, n_splits, seed, chosen)
    with readable(store):
        ds_mem = ds.load() if ds.nbytes < 2e9 else ds
        fitted_all = est.clone().fit(ds_mem)
    fast = pooled_fast_path(est, fitted_all)
    per_channel = fitted_all.variance.ndim == 2
    heldout_ms = np.asarray(est.heldout_mean_square(ds_mem, fitted_all))
    b_next = np.asarray(ds_mem["b_next"].values)
    correctable = (b_next > 0).reshape((-1,) + (1,) * (fitted_all.variance.ndim - 1))
    mask = np.broadcast_to(correctable, fitted_all.variance.shape) & (fitted_all.variance > 0)
    pieces: dict[int, xr.Dataset] = {}
    todo = [n for n in chosen if parts is None or not parts.done(part_name(n))]
    for n in progress(todo) if progress else todo:
        piece = count_scores(ds_mem, est, fitted_all, fast, heldout_ms, mask, n, n_splits, seed)
        if parts is not None:
            parts.write(part_name(n), piece)
        else:
            pieces[n] = piece
    if parts is not None:
        pieces = {n: parts.read(part_name(n)) for n in chosen}
    width = max(p.sizes["repeat"] for p in pieces.values())
    ordered = [pieces[n] for n in chosen]
    ordered = [p.reindex(repeat=np.arange(width)) if p.sizes["repeat"] < width else p for p in ordered]
    for p in ordered:
        p["train_mask"] = p["train_mask"].fillna(False).astype(bool)
    result = xr.concat(ordered, dim="n_runs")
    step_dims = ("step",) if not per_channel else ("step", "channel")
    result["v_all"] = (step_dims, fitted_all.variance)
    if fitted_all.per_run.shape[1:] == fitted_all.variance.shape and fitted_all.per_run.shape[0] == ds_mem.sizes["run"]:
        # the recorded runs' own values: the runs-needed interval resamples them (validate.runs_needed)
        result["per_run"] = (("run",) + step_dims, np.asarray(fitted_all.per_run, dtype=np.float64))
    result = result.assign_coords(
        b_next=("step", b_next),
        timestep=("step", np.asarray(ds_mem["timestep"].values)),
        seed=("run", np.asarray(ds_mem["seed"].values)),
    )
    result.attrs.update(settings)
    result.attrs["estimator_params"] = json.dumps(fitted_all.params)
    result.attrs["fast_path"] = bool(fast)
    return result


__all__ = [
    "CV_IDENTITY",
    "as_estimator",
    "count_scores",
    "cv_settings",
    "gaussian_loglik",
    "learning_curve",
    "relative_errors",
    "run_subsets",
]
