"""Cross-validation over calibration runs: how many runs are needed, and how strong to correct.

Runs are the groups (a run is one seed's batch; its samples are not independent units). Two
questions, in the scikit-learn ``model_selection`` spirit (the splitters decide *how* runs are
split; the scores decide *what* is measured):

**Learning curve over the calibration count.** For ``N = 1 .. M-1`` (``M`` runs in the store),
repeated random subsets of ``N`` training runs (all ``C(M, N)`` subsets when there are at most
``n_splits``, else scikit-learn ``ShuffleSplit`` with ``train_size=N``). Per split:

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
  with ``ms`` the held-out runs' mean square of the perturbation the estimator models (``delta_x``;
  ``c_i delta_out`` for the first-order statistic). NaN for the decomposed estimator, whose ``v``
  is that of a residual;
- ``rel_error_step``: the signed per-step ``(v_N - v_M) / v_M``.

Scores are stored over the dims ``(n_runs, repeat)``, one ``repeat`` per split (NaN-padded where a
count has fewer splits than ``n_splits``).

:meth:`CVResult.runs_needed` answers "how many runs for a ``tolerance`` relative error with
probability ``confidence``": per ``N`` the ``confidence`` quantile of ``rel_error`` over splits,
and the smallest ``N`` from which on every evaluated count meets the tolerance. If none does, it
extrapolates the quantile's ``1/sqrt(N)`` law (the error of a mean of ``N`` runs) beyond ``M - 1``
and says so. Its interval is a percentile bootstrap over splits.

**Correction strength by cross-validation** (needs the model pair). ``folds``-fold split of the
runs (scikit-learn ``KFold`` over run indices). For each fold the estimator is fitted on the
training runs only, and ``num_samples`` fresh seeds (never used for calibration) are sampled with the
FP model, the Q model, and the Q model corrected at each (form, strength ``lambda``); the score of a
(form, ``lambda``) in the fold is the energy distance
(:func:`qdrift_stats.metrics.distances.energy_distance`) of its final samples to the FP ones. The
chosen (form, ``lambda``) minimises the mean over folds (a Student-t interval over folds beside it;
``chosen_share``: how often each wins when the folds are resampled). Why this score: Q-Drift's aim
is the FP sampler's marginal, not each FP sample; the energy distance is a metric between
distributions (zero only when they are equal) that needs no feature network and no density, and
every sampler of a fold uses the same seeds, so the comparison across ``lambda`` is paired. Fitting
on the training runs only makes the score that of the whole procedure (calibrate on ``N`` runs,
then correct), not of one lucky estimate. It is a noisy score with few samples: read
``energy_low/high`` and ``chosen_share`` before trusting a choice.

Results are an xarray Dataset saved to zarr (:func:`cross_validate` with ``out``). Each ``N`` (and
the strength search) is written as a group under ``parts/`` as soon as it is done and marked
complete, so an interrupted run resumes where it stopped; when all parts are done the combined
Dataset is written at the root.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import EmpiricalEstimator, RobustEstimator, get_estimator
from qdrift_stats.estimators.base import FittedEstimator, as_dataset
from qdrift_stats.estimators.empirical import per_run_second_moment
from qdrift_stats.record.store import storage_errors_as_qdrift
from qdrift_stats.validate.diagnostics import readable

CV_SCHEMA = "qdrift-cv"
CV_SCHEMA_VERSION = 1
DEFAULT_STRENGTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
DEFAULT_FORMS: tuple[str, ...] = ("drift", "shrink")
EVALUATION_SEED = 7_000_000  # fresh seeds for the strength search, far from calibration seeds


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
    """Mean over masked entries of ``-1/2 log(2 pi v) - ms / (2 v)`` (nats per value); ``-inf`` if ``v = 0`` there."""
    keep = mask & np.isfinite(mean_square)
    if not keep.any():
        return float("nan")
    vv, ms = v[keep], mean_square[keep]
    if np.any(vv <= 0):
        return float("-inf")
    return float(np.mean(-0.5 * np.log(2 * np.pi * vv) - ms / (2 * vv)))


# ---- results ------------------------------------------------------------------------------------
@dataclass
class RunsNeeded:
    """Runs needed for a relative error ``<= tolerance`` with probability ``confidence``.

    ``runs`` is the estimate (``low``, ``high`` its bootstrap interval); ``extrapolated`` says it lies
    beyond the evaluated counts (from the ``1/sqrt(N)`` law); ``quantiles`` maps each evaluated ``N``
    to the ``confidence`` quantile of its relative error.
    """

    runs: int
    low: int
    high: int
    extrapolated: bool
    tolerance: float
    confidence: float
    quantiles: dict[int, float] = field(default_factory=dict)

    def __str__(self) -> str:
        level = int(round(self.confidence * 100))
        where = " (extrapolated beyond the recorded runs)" if self.extrapolated else ""
        return f"{self.runs} runs{where} for a relative error <= {self.tolerance:g} at {level}% confidence [bootstrap interval {self.low}-{self.high}]"


def _needed_from_quantiles(counts: np.ndarray, quantiles: np.ndarray, tolerance: float) -> tuple[int, bool]:
    """Smallest ``N`` from which on every evaluated quantile meets ``tolerance``, else the ``1/sqrt(N)`` extrapolation."""
    ok = quantiles <= tolerance
    if ok[-1]:
        first = len(ok) - 1
        while first > 0 and ok[first - 1]:
            first -= 1
        return int(counts[first]), False
    good = np.isfinite(quantiles) & (quantiles > 0)
    if not good.any():
        return int(counts[-1]) + 1, True
    scale = float(np.exp(np.mean(np.log(quantiles[good] * np.sqrt(counts[good])))))
    return int(max(math.ceil((scale / tolerance) ** 2), counts[-1] + 1)), True


class CVResult:
    """The cross-validation results: ``dataset`` (xarray) plus the questions asked of it."""

    def __init__(self, dataset: xr.Dataset):
        self.dataset = dataset

    @property
    def counts(self) -> np.ndarray:
        return np.asarray(self.dataset["n_runs"].values)

    @property
    def num_runs(self) -> int:
        return int(self.dataset.attrs["num_runs"])

    def errors(self, aggregate: str = "rms") -> np.ndarray:
        """``(n_runs, repeat)`` relative error of each split against the truth (estimated; NaN-padded).

        ``aggregate``: ``"rms"`` over the correctable steps (``rel_error``) or ``"max"``, the worst
        step (from ``rel_error_step``, with the same finite-population correction).
        """
        if aggregate == "rms":
            return np.asarray(self.dataset["rel_error"].values)
        if aggregate != "max":
            raise QDriftError(f"aggregate must be rms or max, got {aggregate!r}")
        step = np.abs(np.asarray(self.dataset["rel_error_step"].values))
        step = step.reshape(step.shape[0], step.shape[1], -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # all-NaN rows are the padding
            worst = np.nanmax(step, axis=2)
        correction = np.sqrt(self.num_runs / (self.num_runs - self.counts.astype(float)))
        return worst * correction[:, None]

    def runs_needed(
        self,
        tolerance: float = 0.1,
        confidence: float = 0.95,
        bootstrap: int = 1000,
        seed: int = 0,
        aggregate: str = "rms",
    ) -> RunsNeeded:
        """Runs needed for a relative error ``<= tolerance`` with probability ``confidence`` (module docstring).

        ``aggregate``: ``"rms"`` over the correctable steps, or ``"max"`` (every step within the tolerance).
        """
        if not tolerance > 0 or not 0 < confidence < 1:
            raise QDriftError("tolerance must be > 0 and confidence in (0, 1)")
        errors = self.errors(aggregate)  # (n_runs, repeat), NaN-padded
        counts = self.counts
        quantiles = np.array(
            [np.nanquantile(row, confidence) if np.any(np.isfinite(row)) else np.nan for row in errors]
        )
        runs, extrapolated = _needed_from_quantiles(counts, quantiles, tolerance)
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(bootstrap):
            q = []
            for row in errors:
                row = row[np.isfinite(row)]
                q.append(np.quantile(row[rng.integers(0, len(row), len(row))], confidence) if len(row) else np.nan)
            draws.append(_needed_from_quantiles(counts, np.array(q), tolerance)[0])
        low, high = (int(x) for x in np.quantile(draws, [0.025, 0.975], method="nearest")) if draws else (runs, runs)
        return RunsNeeded(
            runs, low, high, extrapolated, tolerance, confidence, {int(n): float(q) for n, q in zip(counts, quantiles)}
        )

    def curve(self, bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> xr.Dataset:
        """Per ``N``: mean ``rel_error`` and ``heldout_loglik`` over splits with percentile-bootstrap intervals (over splits)."""
        rng = np.random.default_rng(seed)
        tail = (1 - confidence) / 2
        out: dict[str, Any] = {}
        for name in ("rel_error", "rel_error_vs_all", "heldout_loglik"):
            values = np.asarray(self.dataset[name].values)
            mean, low, high = [], [], []
            for row in values:
                row = row[np.isfinite(row)]
                if not len(row):
                    mean.append(np.nan), low.append(np.nan), high.append(np.nan)
                    continue
                boots = row[rng.integers(0, len(row), (bootstrap, len(row)))].mean(axis=1)
                mean.append(row.mean()), low.append(np.quantile(boots, tail)), high.append(np.quantile(boots, 1 - tail))
            out[name] = ("n_runs", np.array(mean))
            out[f"{name}_low"] = ("n_runs", np.array(low))
            out[f"{name}_high"] = ("n_runs", np.array(high))
        return xr.Dataset(out, coords={"n_runs": self.counts}, attrs={"confidence": confidence})

    @property
    def has_strength(self) -> bool:
        return "energy" in self.dataset

    def chosen_strength(self) -> dict[str, Any] | None:
        """The (form, strength) that the strength search chose, with its score; None without a search."""
        if not self.has_strength:
            return None
        a = self.dataset.attrs
        return {
            "form": a["chosen_form"],
            "strength": float(a["chosen_strength"]),
            "energy": float(a["chosen_energy"]),
            "energy_uncorrected": float(self.dataset["energy_uncorrected"].values),
        }

    def summary(self, tolerance: float = 0.1, confidence: float = 0.95) -> str:
        """A readable table: the learning curve, runs needed, and the chosen strength."""
        a = self.dataset.attrs
        curve = self.curve()
        lines = [
            f"Cross-validation over calibration runs: estimator {a.get('estimator')}, store {a.get('store')}",
            f"{a.get('num_runs')} runs x {a.get('batch_size')} samples, {a.get('scheduler')} {a.get('steps')} steps; up to {a.get('n_splits')} splits per count",
            f"{'N':>4} {'splits':>6} {'rel. error (vs truth, est.)':>28} {'95% CI':>17} {'vs all-runs fit':>16} {'held-out loglik':>16}",
        ]
        splits = np.isfinite(np.asarray(self.dataset["rel_error"].values)).sum(axis=1)
        for j, n in enumerate(self.counts):
            c = curve.isel(n_runs=j)
            lines.append(
                f"{int(n):>4} {int(splits[j]):>6} {float(c['rel_error']):>28.4f} [{float(c['rel_error_low']):>7.4f},{float(c['rel_error_high']):>7.4f}] "
                f"{float(c['rel_error_vs_all']):>16.4f} {float(c['heldout_loglik']):>16.4f}"
            )
        lines.append(f"runs needed: {self.runs_needed(tolerance, confidence)}")
        chosen = self.chosen_strength()
        if chosen:
            lines.append(
                f"strength by CV ({a.get('folds')}-fold over runs, energy distance to FP samples from the same seeds): "
                f"{chosen['form']} lambda={chosen['strength']:g} (energy {chosen['energy']:.4g}; uncorrected Q {chosen['energy_uncorrected']:.4g})"
            )
            e = self.dataset["energy"]
            for form in e["form"].values:
                row = " ".join(f"{float(x):.4g}" for x in e.sel(form=form).values)
                lines.append(f"  {form:>6}: lambda {list(map(float, e['strength'].values))} -> energy {row}")
        elif a.get("strength_skipped"):
            lines.append(f"strength by CV: skipped ({a['strength_skipped']})")
        return "\n".join(lines)

    def to_dataset(self) -> xr.Dataset:
        """The results Dataset (dims ``n_runs``, ``repeat``, ``step``, ``run``; see the module docstring)."""
        return self.dataset

    def to_json(self, tolerance: float = 0.1, confidence: float = 0.95) -> dict[str, Any]:
        """The headline numbers as a JSON-able dict."""
        need = self.runs_needed(tolerance, confidence)
        curve = self.curve()
        return {
            "store": self.dataset.attrs.get("store"),
            "estimator": self.dataset.attrs.get("estimator"),
            "num_runs": self.num_runs,
            "runs_needed": {
                "runs": need.runs,
                "low": need.low,
                "high": need.high,
                "extrapolated": need.extrapolated,
                "tolerance": tolerance,
                "confidence": confidence,
                "quantiles": {str(k): v for k, v in need.quantiles.items()},
            },
            "curve": {
                name: [None if not np.isfinite(x) else float(x) for x in curve[name].values] for name in curve.data_vars
            },
            "n_runs": [int(n) for n in self.counts],
            "strength": self.chosen_strength(),
        }


# ---- the computation ----------------------------------------------------------------------------
def _fast_path(estimator: Any, fitted: FittedEstimator) -> bool:
    """Whether a subset's fit is the mean of the all-runs fit's per-run values (no refit needed)."""
    return (
        isinstance(estimator, (EmpiricalEstimator, RobustEstimator))
        and fitted.per_run.size > 0
        and np.allclose(fitted.variance, fitted.per_run.mean(axis=0), rtol=1e-10, atol=0)
    )


def _settings(
    ds: xr.Dataset, store: Any, estimator_name: str, n_splits: int, seed: int, counts: list[int]
) -> dict[str, Any]:
    return {
        "counts": json.dumps(counts),
        "qdrift_schema": CV_SCHEMA,
        "qdrift_schema_version": CV_SCHEMA_VERSION,
        "store": str(store) if not isinstance(store, xr.Dataset) else "(dataset)",
        "estimator": estimator_name,
        "n_splits": int(n_splits),
        "seed": int(seed),
        "num_runs": int(ds.sizes["run"]),
        "seeds": json.dumps([int(s) for s in ds["seed"].values]),
        "pair": str(ds.attrs.get("pair")),
        "scheduler": str(ds.attrs.get("scheduler")),
        "steps": int(ds.sizes["step"]),
        "batch_size": int(ds.attrs.get("batch_size", ds.sizes.get("sample", 0))),
    }


_IDENTITY = (
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


def _check_resumable(path: Path, settings: dict[str, Any]) -> None:
    try:
        have = dict(zarr.open_group(path, mode="r").attrs)
    except Exception:
        raise QDriftError(
            f"{path} exists and is not a qdrift cross-validation result; choose another --out or pass --overwrite"
        ) from None
    for key in _IDENTITY:
        if str(have.get(key)) != str(settings.get(key)):
            raise QDriftError(
                f"{path} was computed with {key}={have.get(key)!r}, not {settings.get(key)!r}; choose another --out or pass --overwrite"
            )


def _part_done(path: Path, name: str) -> bool:
    try:
        return bool(zarr.open_group(path, path=f"parts/{name}", mode="r").attrs.get("complete", False))
    except Exception:
        return False


def _write_part(path: Path | None, name: str, piece: xr.Dataset) -> None:
    if path is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        piece.to_zarr(path, group=f"parts/{name}", mode="w", zarr_format=3, consolidated=False)
    zarr.open_group(path, path=f"parts/{name}", mode="r+").attrs["complete"] = True  # the commit point


def _read_part(path: Path, name: str) -> xr.Dataset:
    return xr.open_zarr(path, group=f"parts/{name}", consolidated=False).load()


def _count_piece(
    ds_mem: xr.Dataset,
    estimator_name: str,
    fitted_all: FittedEstimator,
    fast: bool,
    heldout_ms: np.ndarray,
    mask: np.ndarray,
    size: int,
    n_splits: int,
    seed: int,
) -> xr.Dataset:
    """Scores of every split of one calibration count ``size`` (module docstring)."""
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
            fitted = get_estimator(estimator_name).fit(ds_mem.isel(run=train))
            v = fitted.variance
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


def _strength_part(
    ds_mem: xr.Dataset,
    pair: Any,
    estimator_name: str,
    forms: tuple[str, ...],
    strengths: tuple[float, ...],
    folds: int,
    seed: int,
    num_samples: int,
    bootstrap: int,
    progress: Callable[[Iterable], Iterator] | None,
) -> xr.Dataset:
    """The strength search (module docstring): energy distance of corrected Q to FP, K-fold over runs."""
    from sklearn.model_selection import KFold

    from qdrift_stats.correct.estimator_file import EstimatorFile
    from qdrift_stats.correct.sample import sample
    from qdrift_stats.metrics.distances import energy_distance

    runs = ds_mem.sizes["run"]
    scheduler, steps = str(ds_mem.attrs["scheduler"]), int(ds_mem.sizes["step"])
    batch = min(num_samples, 512)
    k = min(folds, runs)
    splits = list(KFold(n_splits=k, shuffle=True, random_state=seed).split(np.arange(runs)))
    table = np.full((k, len(forms), len(strengths)), np.nan)
    uncorrected = np.full(k, np.nan)
    for f, (train, _) in enumerate(progress(splits) if progress else splits):
        estimator = EstimatorFile.from_fitted(get_estimator(estimator_name).fit(ds_mem.isel(run=train)))
        decomposed = "k" in estimator.tensors or "mu" in estimator.tensors
        fold_seed = EVALUATION_SEED + 100_003 * (seed * 97 + f)
        ref = sample(pair, scheduler, steps, num_samples, batch, fold_seed, model="fp")
        plain = sample(pair, scheduler, steps, num_samples, batch, fold_seed, model="q")
        uncorrected[f] = energy_distance(plain, ref)
        for a, form in enumerate(forms):
            for b, lam in enumerate(strengths):
                if lam == 0 and not decomposed:  # strength 0 without an output decomposition is the plain Q sampler
                    table[f, a, b] = uncorrected[f]
                    continue
                test = sample(
                    pair,
                    scheduler,
                    steps,
                    num_samples,
                    batch,
                    fold_seed,
                    model="q",
                    estimator=estimator,
                    correction=form,
                    strength=lam,
                )
                finite = np.isfinite(test).all(axis=tuple(range(1, test.ndim)))
                table[f, a, b] = (
                    energy_distance(test[finite], ref) if finite.mean() >= 0.99 else np.inf
                )  # else: diverged
    mean = table.mean(axis=0)
    if k >= 2:
        from scipy import stats

        half = stats.t.ppf(0.975, k - 1) * table.std(axis=0, ddof=1) / np.sqrt(k)
    else:
        half = np.full(mean.shape, np.nan)
    rng = np.random.default_rng(seed)
    winners = []
    for _ in range(bootstrap):
        pick = table[rng.integers(0, k, k)].mean(axis=0)
        winners.append(int(np.argmin(np.where(np.isfinite(pick), pick, np.inf))))
    share = np.bincount(winners, minlength=mean.size).reshape(mean.shape) / max(bootstrap, 1)
    best = np.unravel_index(np.argmin(np.where(np.isfinite(mean), mean, np.inf)), mean.shape)
    return xr.Dataset(
        {
            "energy": (("form", "strength"), mean),
            "energy_low": (("form", "strength"), mean - half),
            "energy_high": (("form", "strength"), mean + half),
            "energy_fold": (("fold", "form", "strength"), table),
            "chosen_share": (("form", "strength"), share),
            "energy_uncorrected": ((), float(uncorrected.mean())),
        },
        coords={"form": list(forms), "strength": list(strengths)},
        attrs={
            "chosen_form": str(forms[best[0]]),
            "chosen_strength": float(strengths[best[1]]),
            "chosen_energy": float(mean[best]),
            "folds": int(k),
            "strength_samples": int(num_samples),
        },
    )


@storage_errors_as_qdrift
def cross_validate(
    store: xr.Dataset | str | Path,
    out: str | Path | None = None,
    *,
    estimator: str = "first-order",
    counts: Iterable[int] | None = None,
    n_splits: int = 50,
    seed: int = 0,
    strength: bool | None = None,
    pair: Any = None,
    forms: tuple[str, ...] = DEFAULT_FORMS,
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS,
    folds: int = 5,
    num_samples: int = 1024,
    bootstrap: int = 1000,
    overwrite: bool = False,
    progress: Callable[[Iterable], Iterator] | None = None,
) -> CVResult:
    """Run the cross-validation (module docstring); save it to ``out`` (zarr) if given, resuming a partial one.

    Args:
        estimator: estimator name (``qdrift fit --estimator``).
        counts: calibration counts to evaluate (default ``1 .. M-1``).
        n_splits: most random subsets per count.
        strength: search the correction strength; None does it when the pair can be loaded.
        pair: the model pair for the strength search (default: load the store's ``pair`` attribute).
        forms, strengths: the grid of the strength search.
        folds: folds of the strength search.
        num_samples: samples per sampler and fold in the strength search.
        bootstrap: resamples (over folds) for how often each (form, strength) wins.
    """
    ds = as_dataset(store)
    runs = ds.sizes["run"]
    if runs < 2:
        raise QDriftError(f"cross-validation needs at least 2 runs; the store holds {runs}")
    counts = sorted(set(int(n) for n in (counts if counts is not None else range(1, runs))))
    if not counts or counts[0] < 1 or counts[-1] >= runs:
        raise QDriftError(f"calibration counts must lie in 1..{runs - 1}")
    if n_splits < 1:
        raise QDriftError("n_splits must be >= 1")
    settings = _settings(ds, store, estimator, n_splits, seed, counts)
    path = Path(out) if out is not None else None
    if path is not None and path.exists():
        if overwrite:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        else:
            _check_resumable(path, settings)
    if path is not None and not path.exists():
        group = zarr.open_group(path, mode="w", zarr_format=3)
        group.attrs.update(settings)
    est = get_estimator(estimator)
    with readable(store):
        ds_mem = ds.load() if ds.nbytes < 2e9 else ds
        fitted_all = est.fit(ds_mem)
    fast = _fast_path(est, fitted_all)
    per_channel = fitted_all.variance.ndim == 2
    # The held-out runs' mean square of the perturbation the estimator models: its own per-run values
    # for the empirical estimator (delta_x, or c_i delta_out for the first-order statistic), else delta_x.
    if isinstance(est, EmpiricalEstimator) and fitted_all.per_run.size:
        heldout_ms = fitted_all.per_run
    else:
        heldout_ms = per_run_second_moment(ds_mem, "delta_x", per_channel).values
    b_next = np.asarray(ds_mem["b_next"].values)
    mask = np.broadcast_to(
        ((b_next > 0).reshape((-1,) + (1,) * (fitted_all.variance.ndim - 1))), fitted_all.variance.shape
    ) & (fitted_all.variance > 0)
    pieces = []
    todo = [n for n in counts if path is None or not _part_done(path, f"n{n:04d}")]
    for n in progress(todo) if progress else todo:
        piece = _count_piece(ds_mem, estimator, fitted_all, fast, heldout_ms, mask, n, n_splits, seed)
        _write_part(path, f"n{n:04d}", piece)
        if path is None:
            pieces.append(piece)
    if path is not None:
        pieces = [_read_part(path, f"n{n:04d}") for n in counts]
    width = max(p.sizes["repeat"] for p in pieces)
    pieces = [p.reindex(repeat=np.arange(width)) if p.sizes["repeat"] < width else p for p in pieces]
    for p in pieces:
        p["train_mask"] = p["train_mask"].fillna(False).astype(bool)
    result = xr.concat(pieces, dim="n_runs")
    step_dims = ("step",) if not per_channel else ("step", "channel")
    result["v_all"] = (step_dims, fitted_all.variance)
    result = result.assign_coords(
        b_next=("step", b_next),
        timestep=("step", np.asarray(ds_mem["timestep"].values)),
        seed=("run", np.asarray(ds_mem["seed"].values)),
    )
    result.attrs.update(settings)
    result.attrs["estimator_params"] = json.dumps(fitted_all.params)
    result.attrs["fast_path"] = bool(fast)
    result = _with_strength(
        result, ds_mem, path, estimator, strength, pair, forms, strengths, folds, seed, num_samples, bootstrap, progress
    )
    if path is not None:
        root = zarr.open_group(path, mode="r+")
        for name in list(root.array_keys()):  # an earlier combined result (the parts stay)
            del root[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result.to_zarr(path, mode="a", zarr_format=3, consolidated=False)
        zarr.open_group(path, mode="r+").attrs["complete"] = True
    return CVResult(result)


def _with_strength(
    result: xr.Dataset,
    ds_mem: xr.Dataset,
    path: Path | None,
    estimator: str,
    strength: bool | None,
    pair: Any,
    forms: tuple[str, ...],
    strengths: tuple[float, ...],
    folds: int,
    seed: int,
    num_samples: int,
    bootstrap: int,
    progress: Callable[[Iterable], Iterator] | None,
) -> xr.Dataset:
    if strength is False:
        result.attrs["strength_skipped"] = "not asked"
        return result
    if pair is None:
        from qdrift_stats.pair import load_pair

        name = str(ds_mem.attrs.get("pair", ""))
        try:
            pair = load_pair(name)
        except QDriftError as exc:
            if strength:
                raise QDriftError(
                    f"the strength search re-samples the pair, which could not be loaded: {exc}"
                ) from None
            result.attrs["strength_skipped"] = f"pair {name!r} could not be loaded"
            return result
    part = _read_part(path, "strength") if path is not None and _part_done(path, "strength") else None
    if part is not None and not (
        list(part["form"].values) == list(forms)
        and len(part["strength"]) == len(strengths)
        and np.allclose(part["strength"].values, strengths)
        and part.attrs.get("folds") == min(folds, ds_mem.sizes["run"])
        and part.attrs.get("strength_samples") == num_samples
    ):
        part = None  # saved with another grid: search again
    if part is None:
        part = _strength_part(
            ds_mem,
            pair,
            estimator,
            tuple(forms),
            tuple(float(s) for s in strengths),
            folds,
            seed,
            num_samples,
            bootstrap,
            progress,
        )
        _write_part(path, "strength", part)
    merged = xr.merge([result, part], combine_attrs="override")
    merged.attrs = {**result.attrs, **part.attrs}
    return merged


def runs_needed_dataset(
    store: xr.Dataset | str | Path, estimator: str = "first-order", tolerance: float = 0.1
) -> xr.Dataset:
    """The learning-curve Dataset of a store without the strength search (what ``qdrift plot runs-needed STORE`` draws)."""
    result = cross_validate(store, estimator=estimator, strength=False)
    return result.dataset.assign_attrs(tolerance=tolerance, runs_needed=result.runs_needed(tolerance).runs)


def open_cv(path: str | Path) -> CVResult:
    """Read a finished cross-validation result written by :func:`cross_validate`."""
    path = Path(path)
    if not path.exists():
        raise QDriftError(f"{path} does not exist")
    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs)
    except Exception:
        raise QDriftError(f"{path} is not a readable zarr store") from None
    if attrs.get("qdrift_schema") != CV_SCHEMA:
        raise QDriftError(f"{path} is not a qdrift cross-validation result")
    if not attrs.get("complete"):
        raise QDriftError(f"{path} is incomplete; run the same 'qdrift cv' again to finish it")
    return CVResult(xr.open_zarr(path, consolidated=False).load())
