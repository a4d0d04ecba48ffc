"""Cross-validation over calibration runs: how many runs are needed, and how strong to correct.

Two questions, in the scikit-learn ``model_selection`` spirit, each its own function:

- :func:`~qdrift_stats.validate.learning_curve.learning_curve`: the fit's error against the number
  of calibration runs (runs are the groups; scores and splits are described there);
- :func:`~qdrift_stats.validate.strength.strength_curve`: the correction form and strength chosen
  by K-fold cross-validation over runs (needs the model pair).

:func:`cross_validate` composes them (what ``qdrift cv`` runs) and returns a :class:`CVResult`.

:meth:`CVResult.runs_needed` answers "how many runs for a ``tolerance`` relative error with
probability ``confidence``" by the one rule of :mod:`qdrift_stats.validate.runs_needed` (per ``N`` the
``confidence`` quantile of ``rel_error`` over splits; the smallest ``N`` from which on every evaluated
count meets the tolerance, else extrapolated along ``1/sqrt(N)``), with an interval from a bootstrap
over the recorded runs, and "not enough runs to tell" when that interval reaches beyond ``M - 1``.

Results are an xarray Dataset saved to zarr (:func:`cross_validate` with ``out``). Each ``N`` (and
the strength search) is written as a group under ``parts/`` as soon as it is done and marked
complete (:class:`~qdrift_stats.validate.parts.ResultParts`), so an interrupted run resumes where
it stopped; when all parts are done the combined Dataset is written at the root.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.base import Estimator, as_dataset
from qdrift_stats.record.store import storage_errors_as_qdrift
from qdrift_stats.validate.learning_curve import (
    CV_IDENTITY,
    CV_SCHEMA,
    as_estimator,
    check_counts,
    cv_settings,
    learning_curve,
)
from qdrift_stats.validate.parts import ResultParts
from qdrift_stats.validate.runs_needed import RunsNeeded, needed_from_quantiles
from qdrift_stats.validate.runs_needed import runs_needed as _runs_needed
from qdrift_stats.validate.strength import DEFAULT_FORMS, DEFAULT_STRENGTHS, strength_curve

# ---- results ------------------------------------------------------------------------------------
# The rule and its interval live in :mod:`qdrift_stats.validate.runs_needed` (one rule for the CLI, the plot and the
# docs).
_needed_from_quantiles = needed_from_quantiles


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
        bootstrap: int = 200,
        seed: int = 0,
        aggregate: str = "rms",
    ) -> RunsNeeded:
        """Runs needed for a relative error ``<= tolerance`` with probability ``confidence``: the rule of
        :mod:`qdrift_stats.validate.runs_needed` on this learning curve, with its interval over which runs
        were recorded (a bootstrap over the recorded runs) and "not enough runs to tell" where they cannot answer.

        ``aggregate``: ``"rms"`` over the correctable steps, or ``"max"`` (every step within the tolerance).
        """
        per_run = np.asarray(self.dataset["per_run"].values) if "per_run" in self.dataset else None
        mask = None
        if per_run is not None:
            v_all = np.asarray(self.dataset["v_all"].values)
            b_next = np.asarray(self.dataset["b_next"].values).reshape((-1,) + (1,) * (v_all.ndim - 1))
            mask = np.broadcast_to(b_next > 0, v_all.shape) & (per_run.mean(axis=0) > 0)
        return _runs_needed(
            self.errors(aggregate),
            self.counts,
            per_run,
            mask,
            self.num_runs,
            tolerance,
            confidence,
            bootstrap=bootstrap,
            seed=seed,
            aggregate=aggregate,
            n_splits=int(self.dataset.attrs.get("n_splits", 50)),
        )

    def curve(self, bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> xr.Dataset:
        """Per ``N``: mean ``rel_error`` and ``heldout_loglik`` over splits with
        percentile-bootstrap intervals (over splits)."""
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
        need = self.runs_needed(tolerance, confidence)
        level = int(round(confidence * 100))
        lines = [
            f"Cross-validation over calibration runs: estimator {a.get('estimator')}, store {a.get('store')}",
            f"{a.get('num_runs')} runs x {a.get('batch_size')} samples, {a.get('scheduler')} "
            f"{a.get('steps')} steps; up to {a.get('n_splits')} splits per count",
            f"{'N':>4} {'splits':>6} {'rel. error (vs truth, est.)':>28} {'95% CI':>17} "
            f"{f'{level}% quantile (decides)':>24} "
            f"{'vs all-runs fit':>16} {'held-out loglik':>16}",
        ]
        splits = np.isfinite(np.asarray(self.dataset["rel_error"].values)).sum(axis=1)
        for j, n in enumerate(self.counts):
            c = curve.isel(n_runs=j)
            lines.append(
                f"{int(n):>4} {int(splits[j]):>6} {float(c['rel_error']):>28.4f} "
                f"[{float(c['rel_error_low']):>7.4f},{float(c['rel_error_high']):>7.4f}] "
                f"{need.quantiles[int(n)]:>24.4f}{' <=' if need.quantiles[int(n)] <= tolerance else '   '} "
                f"{float(c['rel_error_vs_all']):>13.4f} {float(c['heldout_loglik']):>16.4f}"
            )
        lines.append(f"runs needed (tolerance {tolerance:g}; the {level}% quantile column decides): {need}")
        chosen = self.chosen_strength()
        if chosen:
            lines.append(
                f"strength by CV ({a.get('folds')}-fold over runs, energy distance to FP samples from the same seeds): "
                f"{chosen['form']} lambda={chosen['strength']:g} (energy {chosen['energy']:.4g}; "
                f"uncorrected Q {chosen['energy_uncorrected']:.4g})"
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
            "runs_needed": need.to_json(),
            "curve": {
                name: [None if not np.isfinite(x) else float(x) for x in curve[name].values] for name in curve.data_vars
            },
            "n_runs": [int(n) for n in self.counts],
            "strength": self.chosen_strength(),
        }


# ---- the computation ----------------------------------------------------------------------------
@storage_errors_as_qdrift
def cross_validate(
    estimator: Estimator | str,
    store: xr.Dataset | str | Path,
    out: str | Path | None = None,
    *,
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
    """The learning curve and the strength search; saved to ``out`` (zarr) if given, resuming a partial one.

    Args:
        estimator: a configured estimator, e.g. ``RobustEstimator(c=2.5)`` (cloned for every
            split and fold), or a registered name (``qdrift fit --estimator``).
        store: calibration store path or Dataset (at least 2 runs).
        out: results folder (zarr); an interrupted run with the same settings resumes there.
        counts: calibration counts to evaluate (default ``1 .. M-1``).
        n_splits: most random subsets per count.
        seed: seed of the splits and folds.
        strength: search the correction strength; None does it when a pair is given.
        pair: the model pair for the strength search (never loaded from the store: without it the
            search is skipped, or refused when ``strength`` is True).
        forms, strengths: the grid of the strength search.
        folds: folds of the strength search.
        num_samples: samples per sampler and fold in the strength search.
        bootstrap: resamples (over folds) for how often each (form, strength) wins.
        overwrite: replace an existing ``out`` instead of resuming it.
        progress: wraps the iterables of counts and folds (e.g. a progress bar).
    """
    est, label = as_estimator(estimator)
    ds = as_dataset(store)
    chosen = check_counts(counts, ds.sizes["run"])
    if n_splits < 1:
        raise QDriftError("n_splits must be >= 1")
    parts = None
    if out is not None:
        settings = cv_settings(ds, store, label, n_splits, seed, chosen)
        parts = ResultParts(out, settings, CV_IDENTITY, "cross-validation result", overwrite=overwrite)
    # Label the curve as resolved here, so that a resumed result is identified the same way.
    result = learning_curve(
        est, ds, counts=chosen, n_splits=n_splits, seed=seed, parts=parts, progress=progress
    ).assign_attrs(estimator=label, store=str(store) if not isinstance(store, xr.Dataset) else "(dataset)")
    result = _with_strength(
        result, est, ds, parts, strength, pair, forms, strengths, folds, seed, num_samples, bootstrap, progress
    )
    if parts is not None:
        parts.finish(result)
    return CVResult(result)


def _with_strength(
    result: xr.Dataset,
    estimator: Estimator,
    ds: xr.Dataset,
    parts: ResultParts | None,
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
    """``result`` merged with the strength search (read back from ``parts`` when committed there)."""
    if strength is False:
        result.attrs["strength_skipped"] = "not asked"
        return result
    if pair is None:
        # A pair is code: it comes from the caller (--pair), never from the store's 'pair' attribute.
        from qdrift_stats.pair import recorded_pair_hint

        hint = recorded_pair_hint(ds.attrs.get("pair"), "the strength search")
        if strength:
            raise QDriftError(hint)
        result.attrs["strength_skipped"] = f"no pair given; {hint}"
        return result
    part = parts.read("strength") if parts is not None and parts.done("strength") else None
    if part is not None and not (
        list(part["form"].values) == list(forms)
        and len(part["strength"]) == len(strengths)
        and np.allclose(part["strength"].values, strengths)
        and part.attrs.get("folds") == min(folds, ds.sizes["run"])
        and part.attrs.get("strength_samples") == num_samples
    ):
        part = None  # saved with another grid: search again
    if part is None:
        part = strength_curve(
            estimator,
            ds,
            pair,
            forms=tuple(forms),
            strengths=tuple(float(s) for s in strengths),
            folds=folds,
            seed=seed,
            num_samples=num_samples,
            bootstrap=bootstrap,
            progress=progress,
        )
        if parts is not None:
            parts.write("strength", part)
    merged = xr.merge([result, part], combine_attrs="override")
    merged.attrs = {**result.attrs, **part.attrs}
    return merged


def runs_needed_dataset(
    store: xr.Dataset | str | Path, estimator: Estimator | str = "first-order", tolerance: float = 0.1
) -> xr.Dataset:
    """The learning-curve Dataset of a store without the strength search (what ``qdrift plot
    runs-needed STORE`` draws)."""
    result = cross_validate(estimator, store, strength=False)
    need = result.runs_needed(tolerance)
    return result.dataset.assign_attrs(
        tolerance=tolerance,
        confidence=need.confidence,
        runs_needed=need.runs,
        runs_needed_low=need.low,
        runs_needed_high=need.high,
        runs_needed_decided=int(need.decided),
        runs_needed_text=str(need),
    )


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
