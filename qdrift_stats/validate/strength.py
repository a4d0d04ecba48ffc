"""The correction strength by cross-validation over calibration runs (a validation curve over ``lambda``).

Needs the model pair. ``folds``-fold split of the runs (scikit-learn ``KFold`` over run indices).
For each fold the estimator (a clone of the one given) is fitted on the training runs only, and
``num_samples`` fresh seeds (never used for calibration) are sampled with the FP model, the Q
model, and the Q model corrected at each (form, strength ``lambda``); the score of a (form,
``lambda``) in the fold is the energy distance (:func:`qdrift_stats.metrics.distances.energy_distance`)
of its final samples to the FP ones. The chosen (form, ``lambda``) minimises the mean over folds (a
Student-t interval over folds beside it; ``chosen_share``: how often each wins when the folds are
resampled).

Why this score: Q-Drift's aim is the FP sampler's marginal, not each FP sample; the energy distance
is a metric between distributions (zero only when they are equal) that needs no feature network and
no density, and every sampler of a fold uses the same seeds, so the comparison across ``lambda`` is
paired. Fitting on the training runs only makes the score that of the whole procedure (calibrate on
``N`` runs, then correct), not of one lucky estimate. It is a noisy score with few samples: read
``energy_low/high`` and ``chosen_share`` before trusting a choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.base import Estimator, as_dataset
from qdrift_stats.record.store import storage_errors_as_qdrift
from qdrift_stats.validate.learning_curve import as_estimator

DEFAULT_STRENGTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
DEFAULT_FORMS: tuple[str, ...] = ("drift", "shrink")
EVALUATION_SEED = 7_000_000  # fresh seeds for the strength search, far from calibration seeds


@storage_errors_as_qdrift
def strength_curve(
    estimator: Estimator | str,
    store: xr.Dataset | str | Path,
    pair: Any = None,
    *,
    forms: tuple[str, ...] = DEFAULT_FORMS,
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS,
    folds: int = 5,
    seed: int = 0,
    num_samples: int = 1024,
    bootstrap: int = 1000,
    progress: Callable[[Iterable], Iterator] | None = None,
) -> xr.Dataset:
    """The strength search (module docstring): energy distance of corrected Q to FP, K-fold over runs.

    Args:
        estimator: a configured estimator (cloned per fold) or a registered name.
        store: calibration store path or Dataset.
        pair: the model pair (required: a pair is never loaded from the store's ``pair`` attribute).
        forms, strengths: the grid searched.
        folds: folds over runs (at most the number of runs).
        seed: seed of the folds and of the bootstrap.
        num_samples: samples per sampler and fold.
        bootstrap: resamples (over folds) for how often each (form, strength) wins.
        progress: wraps the iterable of folds.

    Returns:
        Dataset with ``energy``, ``energy_low``, ``energy_high``, ``chosen_share`` ``(form, strength)``,
        ``energy_fold`` ``(fold, form, strength)`` and ``energy_uncorrected`` (scalar); attributes
        ``chosen_form``, ``chosen_strength``, ``chosen_energy``, ``folds``, ``strength_samples``.
    """
    from sklearn.model_selection import KFold

    from qdrift_stats.correct.estimator_file import EstimatorFile
    from qdrift_stats.correct.sample import sample
    from qdrift_stats.metrics.distances import energy_distance
    from qdrift_stats.pair import check_pair, recorded_pair_hint

    est, _ = as_estimator(estimator)
    ds = as_dataset(store)
    forms = tuple(forms)
    strengths = tuple(float(s) for s in strengths)
    if pair is None:  # a pair is code: never imported from the store's 'pair' attribute
        raise QDriftError(recorded_pair_hint(ds.attrs.get("pair"), "the strength search"))
    pair = check_pair(pair)
    runs = ds.sizes["run"]
    scheduler, steps = str(ds.attrs["scheduler"]), int(ds.sizes["step"])
    batch = min(num_samples, 512)
    k = min(folds, runs)
    splits = list(KFold(n_splits=k, shuffle=True, random_state=seed).split(np.arange(runs)))
    table = np.full((k, len(forms), len(strengths)), np.nan)
    uncorrected = np.full(k, np.nan)
    for f, (train, _) in enumerate(progress(splits) if progress else splits):
        estimator_file = EstimatorFile.from_fitted(est.clone().fit(ds.isel(run=train)))
        decomposed = "k" in estimator_file.tensors or "mu" in estimator_file.tensors
        fold_seed = EVALUATION_SEED + 100_003 * (seed * 97 + f)
        ref = sample(pair, scheduler, steps, num_samples, batch, fold_seed, model="fp")
        plain = sample(pair, scheduler, steps, num_samples, batch, fold_seed, model="q")
        uncorrected[f] = energy_distance(plain, ref)
        for a, form in enumerate(forms):
            for b, lam in enumerate(strengths):
                if lam == 0 and not decomposed:  # strength 0 without an output decomposition: the plain Q sampler
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
                    estimator=estimator_file,
                    correction=form,
                    strength=lam,
                )
                finite = np.isfinite(test).all(axis=tuple(range(1, test.ndim)))
                diverged = finite.mean() < 0.99
                table[f, a, b] = np.inf if diverged else energy_distance(test[finite], ref)
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


#: scikit-learn's name for a score over a hyperparameter's values.
validation_curve = strength_curve

__all__ = ["DEFAULT_FORMS", "DEFAULT_STRENGTHS", "strength_curve", "validation_curve"]
