"""Diagnostics: does a pair's quantization error behave the way Q-Drift assumes?

Q-Drift treats each step's error as independent, zero-mean noise unrelated to the signal. The
diagnostics test each part of that on a calibration store, per step:

- ``kurtosis``, ``jb_stat``, ``jb_pvalue``: excess kurtosis (scipy, Fisher) and the Jarque-Bera
  normality test (scipy) of ``delta_x``, each channel standardised by its RMS at the step (pooled
  over runs, samples and elements; a fixed random subsample of at most ``max_points``);
- ``r2``, ``k``: the decomposed regression ``delta_out = k m_fp + mu + r`` (statsmodels OLS,
  :mod:`qdrift_stats.estimators.decomposed`): how much of the error the signal explains;
- ``lattice``: distinct Q output values per value (``m_q = m_fp + delta_out`` at a relative
  resolution of 1e-6): far below 1 when the output is rounded to a grid;
- ``channel_spread``: coefficient of variation across channels of the per-channel mean square;
- ``v``, ``weight``: the empirical statistic and ``v / b_next^2`` (the correction's strength at the
  step; 0 where ``b_next = 0``), which weights the summaries below;

and across steps, ``lb_reject``: the fraction of sample trajectories (run, sample, element; at most
``max_series``) whose per-step standardised errors ``delta_x_i / sqrt(v_i)`` the Ljung-Box test
(statsmodels ``acorr_ljungbox``, ``lb_lags`` lags) rejects at 5%, and ``lag1_autocorr``, their mean
lag-1 autocorrelation.

:func:`classify` turns the summaries into a regime, in this order (the thresholds are the module
constants; they separate the testbed's error families with wide margins, see ``tests/test_diagnostics.py``):

1. *signal-correlated*: weighted ``R^2`` >= :data:`CORRELATED_R2` -> ``decomposed`` estimator;
2. *rounding-like*: weighted median ``lattice`` < :data:`LATTICE_FRACTION` (the Q output lives on a
   grid; its error is a deterministic sawtooth of the output, not noise) -> ``decomposed`` (it takes
   out any linear part) with a strength chosen by ``qdrift cv``, and little to expect;
3. *persistent*: the lock-step perturbations accumulate to more than :data:`PERSISTENT_RATIO` times the
   sum of their per-step variances (the error budget's ``persistence_ratio``, :mod:`qdrift_stats.validate.budget`:
   cross-step covariance along each trajectory, propagated through the scheduler and *not* demeaned per
   trajectory, unlike Ljung-Box, which cannot see an error that is constant along a trajectory) -> ``persistent``;
4. *heavy-tailed*: weighted mean excess kurtosis > :data:`HEAVY_KURTOSIS` -> ``robust`` on one-step
   solvers, ``robust-first-order`` on multistep ones;
5. otherwise *noise-like* -> ``first-order`` (``smooth-glm`` to sample with another step count).

The recommended statistic depends on the scheduler (:func:`recommended_estimator`). On a multistep
solver (DPM-Solver++ 2M, VP or flow) the lock-step perturbation ``delta_x`` also carries the reused
errors of earlier steps, so the lock-step statistic (``empirical``, ``robust``) is 2-2.5x the
first-order one and a correction sized by it overshoots (224% of the gap closed where the first-order
statistic closed 105%, issue 14); the first-order statistic (``first-order``, ``robust-first-order``,
``decomposed``'s default) counts each error once. On one-step solvers (Euler, DDIM, flow Euler) the
two statistics are equal.

The shrink form is recommended unless the drift form's pull ``v / (2 b_next^2)`` stays below
:data:`DRIFT_SAFE_PULL` at every step. :func:`report` says all this in words.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from scipy import stats
from statsmodels.stats.diagnostic import acorr_ljungbox

from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.base import as_dataset, check_finite_store, grid_of
from qdrift_stats.estimators.decomposed import output_regression, pooled_step_values, subsample_index
from qdrift_stats.estimators.empirical import per_run_second_moment
from qdrift_stats.record.store import storage_errors_as_qdrift

CORRELATED_R2 = 0.5
PARTLY_CORRELATED_R2 = 0.1
LATTICE_FRACTION = 0.2
HEAVY_KURTOSIS = 1.5
AUTOCORRELATED_REJECT = 0.5
CHANNEL_SPREAD = 0.5
DRIFT_SAFE_PULL = 0.1
LATTICE_RESOLUTION = 1e-6
MULTISTEP = ("dpmpp-2m", "flow-dpmpp-2m")
#: regime -> (estimator on one-step solvers, estimator on multistep solvers)
RECOMMENDED: dict[str, tuple[str, str]] = {
    "signal-correlated": ("decomposed", "decomposed"),  # its default statistic is first-order
    "rounding-like": ("decomposed", "decomposed"),
    "heavy-tailed": ("robust", "robust-first-order"),
    "noise-like": ("first-order", "first-order"),
    "persistent": ("persistent", "persistent"),  # issue 12; see docs/results.md, the mixture table
}


def recommended_estimator(regime: str, scheduler: str) -> str:
    """The estimator :func:`classify` recommends for an error regime on a scheduler (module docstring)."""
    one_step, multistep = RECOMMENDED[regime]
    return multistep if str(scheduler) in MULTISTEP else one_step


#: Where the error persists: the default's state-aware output map needs the pair (docs/results.md, "A map that sees
#: the state").
STATE_MAP_HINT = (
    "fit with --pair: the default 'persistent' then also regresses the error on the sampler state (the state-aware "
    "output map, 'persistent-state-map'; without --pair it falls back to the map on the FP output and says so; on "
    "the digits zoo the state-aware map closed as much of the FD gap as the plain one or more on every degraded "
    "cell, most more on the DiT; docs/results.md)"
)
#: Accumulated over independent variance above which the error counts as persistent (see validate/budget.py).
PERSISTENT_RATIO = 1.5


def lattice_fraction(values: np.ndarray) -> float:
    """Distinct values per value of a flat array, at a resolution of ``1e-6`` times its RMS."""
    values = np.asarray(values, dtype=np.float64).ravel()
    rms = float(np.sqrt(np.mean(values**2)))
    if values.size == 0 or rms == 0:
        return float("nan")
    return len(np.unique(np.round(values / (rms * LATTICE_RESOLUTION)))) / values.size


def _standardised_by_channel(values: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """``(run, sample, channel, ...)`` values divided by each channel's RMS, flattened.

    ``index`` selects positions of the flattened ``sample x elements`` axis (a subsample), as in
    :func:`qdrift_stats.estimators.decomposed.subsample_index`.
    """
    runs, channels = values.shape[0], values.shape[2] if values.ndim >= 3 else 1
    inner = int(np.prod(values.shape[3:])) if values.ndim > 3 else 1
    flat = values.reshape(runs, -1)
    positions = np.arange(flat.shape[1]) if index is None else index
    flat = flat[:, positions]
    channel = (positions // inner) % channels
    out = np.empty_like(flat)
    for c in range(channels):
        block = flat[:, channel == c]
        rms = np.sqrt(np.mean(block**2)) if block.size else 0.0
        out[:, channel == c] = block / rms if rms > 0 else block
    return out.ravel()


def _ljung_box(ds: xr.Dataset, v: np.ndarray, max_series: int, lags: int, seed: int) -> tuple[float, float, int]:
    """``(reject fraction at 5%, mean lag-1 autocorrelation, series tested)`` over sample trajectories."""
    steps = np.flatnonzero(v > 0)
    if len(steps) < lags + 2:
        return float("nan"), float("nan"), 0
    runs = ds.sizes["run"]
    per_run = int(np.prod([n for d, n in ds["delta_x"].sizes.items() if d not in ("run", "step")]))
    rng = np.random.default_rng(seed)
    pick = rng.choice(runs * per_run, size=min(max_series, runs * per_run), replace=False)
    values = np.asarray(ds["delta_x"].isel(step=steps).values, dtype=np.float64)  # (run, step, ...)
    series = np.moveaxis(values.reshape(runs, len(steps), per_run), 1, 2).reshape(runs * per_run, len(steps))[pick]
    series = series / np.sqrt(v[steps])
    rejected, lag1 = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for z in series:
            if np.std(z) == 0:
                continue
            p = float(acorr_ljungbox(z, lags=[lags], return_df=True)["lb_pvalue"].iloc[0])
            rejected.append(p < 0.05)
            centred = z - z.mean()
            lag1.append(float(np.sum(centred[1:] * centred[:-1]) / np.sum(centred**2)))
    if not rejected:
        return float("nan"), float("nan"), 0
    return float(np.mean(rejected)), float(np.mean(lag1)), len(rejected)


@storage_errors_as_qdrift
def diagnose(
    store: xr.Dataset | str | Path,
    *,
    max_points: int = 100_000,
    max_series: int = 512,
    lb_lags: int | None = None,
    seed: int = 0,
) -> xr.Dataset:
    """Per-step diagnostics of a calibration store, and their summaries, as an xarray Dataset.

    Data variables over ``step`` (see the module docstring): ``v``, ``weight``, ``kurtosis``,
    ``jb_stat``, ``jb_pvalue``, ``r2``, ``k``, ``lattice``, ``channel_spread``; scalars
    ``lb_reject``, ``lag1_autocorr``, ``weighted_r2``, ``weighted_kurtosis``, ``weighted_lattice``,
    ``max_drift_pull``. Attributes: the store's pair, scheduler, steps, runs and batch, the
    regime, the recommended estimator and correction form, and the reasons (JSON).
    """
    ds = as_dataset(store)
    with readable(store):
        return _diagnose(ds, max_points, max_series, lb_lags, seed)


@contextmanager
def readable(store: Any):
    """Context manager: a failure to decode a store's chunks (a damaged file) becomes a one-line :class:`QDriftError`.

    Used around the readers of this module and :mod:`qdrift_stats.validate.crossval` (dask reads lazily, so
    the damage shows only when values are computed).
    """
    try:
        yield
    except QDriftError:
        raise
    except (RuntimeError, OSError, KeyError, zarr.errors.BaseZarrError) as exc:
        where = store if isinstance(store, (str, Path)) else "the store"
        raise QDriftError(
            f"{where} could not be read ({type(exc).__name__}: {exc}); re-record the damaged runs"
        ) from None


def _diagnose(ds: xr.Dataset, max_points: int, max_series: int, lb_lags: int | None, seed: int) -> xr.Dataset:
    grid = grid_of(ds)
    if not np.all(np.isfinite(np.stack(list(grid.values())))):
        raise QDriftError("the store's step coordinates hold non-finite values; re-record it")
    steps = ds.sizes["step"]
    index = subsample_index(ds, max_points, seed)
    v = per_run_second_moment(ds, "delta_x").values.mean(axis=0)
    check_finite_store(v)
    channel_v = per_run_second_moment(ds, "delta_x", per_channel=True).values.mean(axis=0)  # (step, channel)
    b2 = grid["b_next"] ** 2
    weight = np.where(b2 > 0, v / np.where(b2 > 0, b2, 1.0), 0.0)
    out = {
        name: np.full(steps, np.nan)
        for name in ("kurtosis", "jb_stat", "jb_pvalue", "r2", "k", "lattice", "channel_spread")
    }
    for i in range(steps):
        values = pooled_step_values(ds, ("delta_out", "out_fp"), i, index)
        check_finite_store(np.stack([values["delta_out"], values["out_fp"]]), "delta_out or out_fp")
        k, _, _, _, r2 = output_regression(values["delta_out"], values["out_fp"])
        out["k"][i], out["r2"][i] = k, r2
        out["lattice"][i] = lattice_fraction(values["out_fp"] + values["delta_out"])
        z = _standardised_by_channel(np.asarray(ds["delta_x"].isel(step=i).values, dtype=np.float64), index)
        if np.std(z) > 0:
            out["kurtosis"][i] = float(stats.kurtosis(z, fisher=True))
            jb = stats.jarque_bera(z)
            out["jb_stat"][i], out["jb_pvalue"][i] = float(jb.statistic), float(jb.pvalue)
        row = channel_v[i]
        if row.size > 1 and row.mean() > 0:
            out["channel_spread"][i] = float(row.std() / row.mean())
    lags = lb_lags or int(max(1, min(5, steps // 4)))
    lb_reject, lag1, tested = _ljung_box(ds, v, max_series, lags, seed)
    persistence = _persistence_section(ds, max_points, seed)
    w = weight if weight.sum() > 0 else np.ones(steps)
    summaries = {
        "weighted_r2": _weighted_mean(out["r2"], w),
        "weighted_kurtosis": _weighted_mean(out["kurtosis"], w),
        "weighted_lattice": _weighted_median(out["lattice"], w),
        "median_channel_spread": float(np.nanmedian(out["channel_spread"]))
        if np.any(np.isfinite(out["channel_spread"]))
        else float("nan"),
        "max_drift_pull": float(np.max(weight) / 2) if steps else 0.0,
        "lb_reject": lb_reject,
        "lag1_autocorr": lag1,
        **persistence["summaries"],
    }
    data = {name: ("step", values) for name, values in out.items()}
    data.update({"v": ("step", v), "weight": ("step", weight), "lag1_raw": ("step", persistence["lag1_raw"])})
    data.update({name: ((), value) for name, value in summaries.items()})
    coords = {
        "step": np.arange(steps),
        "timestep": ("step", grid["timestep"]),
        "b": ("step", grid["b"]),
        "b_next": ("step", grid["b_next"]),
    }
    attrs = {
        "pair": str(ds.attrs.get("pair")),
        "scheduler": str(ds.attrs.get("scheduler")),
        "steps": int(steps),
        "runs": int(ds.sizes["run"]),
        "batch_size": int(ds.sizes.get("sample", 0)),
        "lb_lags": int(lags),
        "lb_series": int(tested),
    }
    result = xr.Dataset(data, coords=coords, attrs=attrs)
    verdict = classify(result)
    result.attrs.update(
        {
            "regime": verdict["regime"],
            "estimator": verdict["estimator"],
            "correction": verdict["correction"],
            "reasons": json.dumps(verdict["reasons"]),
            "caveats": json.dumps(verdict["caveats"]),
        }
    )
    return result


# ---- persistence along the trajectory (issue 12; see qdrift_stats.validate.budget) ----------------------
def _persistence_section(ds: xr.Dataset, max_points: int, seed: int) -> dict[str, Any]:
    """The error budget's persistence summaries: unlike Ljung-Box, nothing is demeaned per series, so
    an error that stays the same along a trajectory is seen (it accumulates ``steps``-fold)."""
    from qdrift_stats.validate.budget import error_budget

    budget = error_budget(ds, max_points=max_points, seed=seed)
    names = ("persistence_ratio", "fraction_persistence", "fraction_bias", "fraction_explained_ptqd")
    return {
        "summaries": {name: float(budget[name].values) for name in names},
        "lag1_raw": np.asarray(budget["lag1_raw"].values),
    }


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    ok = np.isfinite(values) & (weights > 0)
    return float(np.sum(values[ok] * weights[ok]) / np.sum(weights[ok])) if ok.any() else float("nan")


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    ok = np.isfinite(values) & (weights > 0)
    if not ok.any():
        return float("nan")
    order = np.argsort(values[ok])
    cumulative = np.cumsum(weights[ok][order])
    return float(values[ok][order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def _scalar(diag: xr.Dataset, name: str) -> float:
    return float(diag[name].values)


def classify(diag: xr.Dataset) -> dict[str, Any]:
    """The regime, the recommended estimator and correction form, and the reasons, from :func:`diagnose`'s summaries."""
    r2, lattice, kurt = (
        _scalar(diag, "weighted_r2"),
        _scalar(diag, "weighted_lattice"),
        _scalar(diag, "weighted_kurtosis"),
    )
    lb, spread, pull = (
        _scalar(diag, "lb_reject"),
        _scalar(diag, "median_channel_spread"),
        _scalar(diag, "max_drift_pull"),
    )
    persist = _scalar(diag, "persistence_ratio") if "persistence_ratio" in diag else float("nan")
    reasons: list[str] = []
    caveats: list[str] = []
    scheduler = str(diag.attrs.get("scheduler"))
    if np.isfinite(r2) and r2 >= CORRELATED_R2:
        regime = "signal-correlated"
        reasons.append(
            f"the FP output explains {r2:.0%} of the output error (weighted R^2 >= "
            f"{CORRELATED_R2}): a scale error k m_fp, not noise"
        )
    elif np.isfinite(lattice) and lattice < LATTICE_FRACTION:
        regime = "rounding-like"
        reasons.append(
            f"the Q output takes only {lattice:.1%} distinct values per value (< "
            f"{LATTICE_FRACTION:.0%}): it is rounded to a grid, "
            "so its error is a deterministic sawtooth of the output, not noise"
        )
        caveats.append(
            "Q-Drift's noise assumption does not hold; expect a small gain at best and choose the "
            "strength with 'qdrift cv'"
        )
    elif np.isfinite(persist) and persist > PERSISTENT_RATIO:
        regime = "persistent"
        reasons.append(
            "the error repeats along each trajectory: the perturbations accumulate to "
            f"{persist:.1f}x the sum of the per-step "
            f"variances (> {PERSISTENT_RATIO}; propagated through the scheduler, not demeaned per "
            "trajectory), so the per-step "
            "statistic under-corrects"
        )
        caveats.append(STATE_MAP_HINT)
    elif np.isfinite(kurt) and kurt > HEAVY_KURTOSIS:
        regime = "heavy-tailed"
        reasons.append(
            f"the per-step error has weighted excess kurtosis {kurt:.1f} (> {HEAVY_KURTOSIS}): a "
            "few large values would dominate the plain mean square"
        )
    else:
        regime = "noise-like"
        reasons.append(
            f"the signal explains little of the error (weighted R^2 {r2:.2f} < {CORRELATED_R2}), "
            "the Q output is not on a grid "
            f"(distinct values {lattice:.0%}) and the tails are light (weighted excess kurtosis {kurt:.1f})"
        )
    estimator = recommended_estimator(regime, scheduler)
    if scheduler in MULTISTEP:
        reasons.append(
            f"{scheduler} is a multistep solver: its lock-step perturbation also carries the "
            "reused errors of earlier steps, "
            "so the lock-step statistic (empirical, robust) is 2-2.5x the first-order one and overshoots; "
            f"{estimator} counts each error once"
        )
    elif regime == "heavy-tailed":
        reasons.append(f"{scheduler} is a one-step solver: the lock-step and first-order statistics are equal")
    if regime != "signal-correlated" and np.isfinite(r2) and r2 >= PARTLY_CORRELATED_R2:
        caveats.append(f"the signal explains {r2:.0%} of the error: the decomposed estimator removes that part first")
        if regime == "noise-like":
            estimator = "decomposed"
    if regime in ("signal-correlated", "rounding-like") and np.isfinite(persist) and persist > PERSISTENT_RATIO:
        caveats.append(
            f"what the decomposition leaves also persists along trajectories ({persist:.1f}x the "
            "independent variance): "
            "try 'persistent' (its affine output map removes the part the output explains, inverted before each "
            "step, and the persistence-aware statistic sizes what is left; docs/results.md)"
        )
        caveats.append(STATE_MAP_HINT)
    if np.isfinite(lb) and lb > AUTOCORRELATED_REJECT:
        caveats.append(
            f"errors correlate across steps (Ljung-Box rejects for {lb:.0%} of sample "
            f"trajectories, lag-1 r {_scalar(diag, 'lag1_autocorr'):.2f}): "
            "the per-step independence behind the correction is weak, so check the strength with 'qdrift cv'"
        )
    if np.isfinite(spread) and spread > CHANNEL_SPREAD:
        caveats.append(
            f"the error's size differs across channels (median CV {spread:.2f} > "
            f"{CHANNEL_SPREAD}): consider the per-channel estimator"
        )
    correction = "drift" if pull < DRIFT_SAFE_PULL else "shrink"
    if correction == "shrink":
        reasons.append(
            f"shrink form: the drift form's pull v/(2 b_next^2) reaches {pull:.2f} (>= "
            f"{DRIFT_SAFE_PULL}), where the first-order drift is "
            "no longer accurate (it is clipped at 1); shrink is exact there for a Gaussian"
        )
    else:
        reasons.append(
            f"either form: the drift pull stays below {DRIFT_SAFE_PULL} ({pull:.3f}); drift is the "
            "derivation's own form"
        )
    if regime == "noise-like":
        caveats.append("to sample with another step count, fit 'smooth-glm' (it interpolates over log b)")
    return {"regime": regime, "estimator": estimator, "correction": correction, "reasons": reasons, "caveats": caveats}


def report(diag: xr.Dataset) -> str:
    """A plain-words report of :func:`diagnose`'s result: the regime, what to use, and the evidence."""
    a = diag.attrs
    verdict = classify(diag)
    g = lambda name: _scalar(diag, name)  # noqa: E731
    jb_reject = (
        float(np.nanmean(diag["jb_pvalue"].values < 0.05))
        if np.any(np.isfinite(diag["jb_pvalue"].values))
        else float("nan")
    )
    lines = [
        f"Q-Drift diagnostics: pair {a.get('pair')}, scheduler {a.get('scheduler')}, "
        f"{a.get('steps')} steps, {a.get('runs')} runs x {a.get('batch_size')} samples",
        f"Regime: {verdict['regime']}.",
        *[f"  - {r}" for r in verdict["reasons"]],
        f"Use: qdrift fit STORE --estimator {verdict['estimator']} --correction {verdict['correction']}"
        + (
            " --pair P  (it re-runs the store's seeds along the sampler's own path)"
            if verdict["estimator"] == "persistent"
            else ""
        ),
        "Evidence (weighted by each step's correction strength v/b_next^2):",
        f"  signal correlation   weighted R^2 {g('weighted_r2'):.3f}   (signal-correlated from {CORRELATED_R2})",
        f"  output grid          distinct Q outputs per value {g('weighted_lattice'):.3f}   "
        f"(rounding-like below {LATTICE_FRACTION})",
        f"  tails                weighted excess kurtosis {g('weighted_kurtosis'):.2f}   "
        f"(heavy-tailed above {HEAVY_KURTOSIS}; "
        f"Gaussian 0, uniform -1.2, sinusoid -1.5); Jarque-Bera rejects normality at {jb_reject:.0%} of steps",
        f"  across steps         Ljung-Box ({a.get('lb_lags')} lags) rejects for "
        f"{g('lb_reject'):.0%} of {a.get('lb_series')} sample trajectories; "
        f"mean lag-1 autocorrelation {g('lag1_autocorr'):.2f}",
        f"  along trajectories   accumulated / independent variance {g('persistence_ratio'):.2f}   "
        f"(persistent above {PERSISTENT_RATIO}; "
        f"not demeaned per trajectory); persistence {g('fraction_persistence'):.0%}, per-step mean "
        f"bias {g('fraction_bias'):.0%} "
        "of the predicted final deviation ('qdrift plot budget STORE' draws the full error budget)",
        f"  across channels      median CV of the per-channel variance {g('median_channel_spread'):.2f}",
        f"  drift-form pull      max v/(2 b_next^2) {g('max_drift_pull'):.3g}",
    ]
    if verdict["caveats"]:
        lines.append("Caveats:")
        lines += [f"  - {c}" for c in verdict["caveats"]]
    return "\n".join(lines)


def to_json(diag: xr.Dataset) -> dict[str, Any]:
    """The diagnostics as a JSON-able dict: verdict, summaries and per-step arrays."""
    verdict = classify(diag)
    summaries = {name: _json_float(diag[name].values) for name, var in diag.data_vars.items() if var.ndim == 0}
    per_step = {
        name: [_json_float(x) for x in diag[name].values]
        for name, var in diag.data_vars.items()
        if var.dims == ("step",)
    }
    per_step["timestep"] = [float(x) for x in diag["timestep"].values]
    meta = {k: v for k, v in diag.attrs.items() if k not in ("reasons", "caveats", "regime", "estimator", "correction")}
    return {**verdict, "store": meta, "summaries": summaries, "per_step": per_step}


def _json_float(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None
