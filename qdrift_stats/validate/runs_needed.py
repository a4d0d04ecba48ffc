"""How many calibration runs are needed: the one rule, and its uncertainty over which runs were recorded.

**The rule** (:func:`needed_from_quantiles`; what ``qdrift cv`` prints, what ``qdrift plot runs-needed``
draws and what the docs report). For each evaluated count ``N`` the learning curve
(:mod:`qdrift_stats.validate.learning_curve`) holds the relative error of ``N``-run fits against the
truth, estimated from random subsets of the recorded runs; ``q(N)`` is its ``confidence`` quantile
(95% by default) over subsets. The runs needed for a ``tolerance`` are the smallest ``N`` from which
on every evaluated ``q`` is within the tolerance. If even the largest evaluated count is not, the
answer is extrapolated along ``q(N) ~ s / sqrt(N)`` (the error of a mean of ``N`` runs) and flagged.

**Its uncertainty** (:func:`bootstrap_answers`). The answer depends on which ``M`` runs happened to
be recorded, and resampling splits of those same runs cannot show that (an interval built that way
covered a known answer in 45% of Monte Carlo trials). So the recorded runs themselves are
resampled: ``B`` bootstrap samples of ``M`` runs drawn with replacement from the recorded ones; in
each, the learning curve is recomputed from the runs' own per-run values (subsets of ``N`` of the
``M`` resampled runs, the fit of a subset being the mean of its per-run values, with the same
finite-population correction as the learning curve) and the same rule applied. The interval reads
the bootstrap answers at the *expanded* percentile tails ``Phi(sqrt(M / (M - 1)) t_{M-1}((1 - level) / 2))``
(Hesterberg 2015; as :func:`qdrift_stats.estimators.robust.bootstrap_interval`), which widens the
plain percentile interval for few runs, and always contains the point answer. With 10 runs even the
expanded bootstrap interval was too narrow (it covered a known answer of 7 in 76% of the Monte Carlo
trials where it claimed an answer): a bootstrap of 10 values does not see how far off their spread
may be. So the interval is also widened to at least the range that the per-run spread's own
uncertainty implies: the runs needed scale with the variance of the per-run values, whose estimate
from ``M`` runs lies within ``(M-1)/chi^2_{M-1}`` quantile factors of the truth for normal values
(:func:`spread_factors`: 0.47-3.33 at 10 runs, 0.67-1.65 at 40); the interval is the union of the two.

For an estimator that does not pool per-run values (smooth, decomposed) the bootstrap still uses
the mean of its per-run values (the learning curve refits the estimator itself): the interval is
then that of the run-mean version of the statistic, wider than the smooth fit's own (conservative).

**"Not enough runs to tell".** When the interval's upper end lies beyond the largest count the
recorded runs can evaluate (``M - 1``), the recorded runs cannot say whether the answer is enough:
the result says so (``decided`` is False) and how far the interval reaches; record more runs.
``studies/runs_needed.py`` checks the interval by Monte Carlo against the answer computed from runs
never used in the cross-validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from qdrift_stats.errors import QDriftError


@dataclass
class RunsNeeded:
    """Runs needed for a relative error ``<= tolerance`` with probability ``confidence`` (module docstring).

    Attributes:
        runs: the answer of the rule on the recorded runs.
        low, high: its interval over which runs were recorded (bootstrap over runs, ``level``).
        extrapolated: ``runs`` lies beyond the evaluated counts (from the ``1/sqrt(N)`` law).
        decided: False when ``high`` exceeds the largest evaluated count ("not enough runs to tell").
        quantiles: each evaluated ``N`` -> the ``confidence`` quantile of its relative error (the
            numbers the rule compares with the tolerance).
        num_runs: runs recorded; ``max_count``: the largest evaluated count.
    """

    runs: int
    low: int
    high: int
    extrapolated: bool
    tolerance: float
    confidence: float
    quantiles: dict[int, float] = field(default_factory=dict)
    decided: bool = True
    num_runs: int = 0
    max_count: int = 0
    level: float = 0.95
    bootstrap: int = 0

    @property
    def deciding_quantile(self) -> float | None:
        """``q(runs)``, the quantile that met the tolerance (None when extrapolated)."""
        return None if self.extrapolated else self.quantiles.get(int(self.runs))

    def __str__(self) -> str:
        level = int(round(self.confidence * 100))
        interval = f"{int(round(self.level * 100))}% interval over the recorded runs {self.low}-{self.high}"
        if self.extrapolated:
            rule = (
                f"{level}% quantile of the relative error above {self.tolerance:g} up to "
                f"N={self.max_count}; extrapolated along 1/sqrt(N)"
            )
        else:
            rule = (
                f"{level}% quantile of the relative error {self.deciding_quantile:.4f} <= "
                f"{self.tolerance:g} at N={self.runs} and beyond"
            )
        if not self.decided:
            return (
                f"not enough runs to tell: {self.num_runs} recorded runs evaluate at most N={self.max_count}, and the "
                f"answer's {interval} reaches {self.high} (point answer {self.runs}: {rule}); record more runs"
            )
        return (
            f"{self.runs} runs for a relative error <= {self.tolerance:g} at {level}% confidence ({rule}) [{interval}]"
        )

    def to_json(self) -> dict:
        return {
            "runs": int(self.runs),
            "low": int(self.low),
            "high": int(self.high),
            "decided": bool(self.decided),
            "answer": str(self) if not self.decided else int(self.runs),
            "extrapolated": bool(self.extrapolated),
            "tolerance": self.tolerance,
            "confidence": self.confidence,
            "deciding_quantile": self.deciding_quantile,
            "quantiles": {str(k): v for k, v in self.quantiles.items()},
            "num_runs": int(self.num_runs),
            "max_count": int(self.max_count),
            "interval_level": self.level,
            "bootstrap": int(self.bootstrap),
        }


def needed_from_quantiles(counts: np.ndarray, quantiles: np.ndarray, tolerance: float) -> tuple[int, bool]:
    """The rule: smallest ``N`` from which on every evaluated quantile meets ``tolerance``, else the
    ``1/sqrt(N)`` extrapolation (flagged by the second value)."""
    counts = np.asarray(counts)
    quantiles = np.asarray(quantiles, dtype=np.float64)
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


def split_quantiles(
    per_run: np.ndarray,
    mask: np.ndarray,
    counts: np.ndarray,
    confidence: float,
    n_splits: int,
    rng: np.random.Generator,
    aggregate: str = "rms",
    resamples: np.ndarray | None = None,
) -> np.ndarray:
    """``(B, len(counts))`` the ``confidence`` quantile over random ``N``-run subsets of the relative error.

    ``per_run``: ``(M, ...)`` per-run values; ``mask``: the entries scored (``per_run.shape[1:]``);
    ``resamples``: ``(B, M)`` run indices of each bootstrap sample (default: the recorded runs, B = 1).
    A subset's fit is the mean of its runs' values; its error against the sample's all-runs mean is
    scaled by ``sqrt(M / (M - N))`` (the learning curve's finite-population correction).
    """
    runs = per_run.shape[0]
    flat = per_run.reshape(runs, -1)[:, np.asarray(mask).reshape(-1)]
    if resamples is None:
        resamples = np.arange(runs)[None]
    out = np.full((len(resamples), len(counts)), np.nan)
    if flat.shape[1] == 0:
        return out
    fpc = {int(n): math.sqrt(runs / (runs - int(n))) for n in counts if 1 <= int(n) < runs}
    for b0 in range(0, len(resamples), 50):  # chunks bound the memory of (b, splits, M)
        sample = flat[resamples[b0 : b0 + 50]]  # (b, M, k)
        full = sample.mean(axis=1)  # (b, k)
        valid = full > 0
        safe = np.where(valid, full, 1.0)
        # one random order of the M slots per (b, split); the first N slots are the N-run subset
        rank = np.argsort(np.argsort(rng.random((sample.shape[0], n_splits, runs)), axis=2), axis=2)
        for j, n in enumerate(counts):
            n = int(n)
            if n not in fpc:
                continue
            weights = (rank < n) / n  # (b, s, M)
            rel = np.where(valid[:, None, :], (weights @ sample) / safe[:, None, :] - 1.0, np.nan)  # (b, s, k)
            out[b0 : b0 + len(sample), j] = np.quantile(_aggregate(rel, aggregate) * fpc[n], confidence, axis=1)
    return out


def _aggregate(rel: np.ndarray, aggregate: str) -> np.ndarray:
    """RMS or max of ``|rel|`` over the last axis (NaN entries ignored)."""
    if aggregate == "rms":
        return np.sqrt(np.nanmean(rel**2, axis=-1))
    if aggregate == "max":
        return np.nanmax(np.abs(rel), axis=-1)
    raise QDriftError(f"aggregate must be rms or max, got {aggregate!r}")


def subset_errors(
    per_run: np.ndarray, mask: np.ndarray, counts: np.ndarray, n_splits: int, seed: int = 0, aggregate: str = "rms"
) -> np.ndarray:
    """``(len(counts), splits)`` the learning curve of a run-pooled estimate from its per-run values alone.

    The same subsets as :func:`qdrift_stats.validate.learning_curve.run_subsets` (all of them when
    few) and the same score (error of the subset mean against the all-runs mean, finite-population
    corrected): for an estimator whose fit is the mean of its per-run values this equals the learning
    curve's ``rel_error`` (``rel_error_step`` for ``"max"``) without the store bookkeeping.
    """
    from qdrift_stats.validate.learning_curve import run_subsets

    runs = per_run.shape[0]
    flat = per_run.reshape(runs, -1)[:, np.asarray(mask).reshape(-1)]
    full = flat.mean(axis=0)
    subsets = {int(n): run_subsets(runs, int(n), n_splits, seed) for n in counts}
    width = max(len(v) for v in subsets.values())
    out = np.full((len(counts), width), np.nan)
    for j, n in enumerate(counts):
        means = np.stack([flat[train].mean(axis=0) for train in subsets[int(n)]])
        rel = means / full - 1.0
        out[j, : len(means)] = _aggregate(rel, aggregate) * math.sqrt(runs / (runs - int(n)))
    return out


def bootstrap_answers(
    per_run: np.ndarray,
    mask: np.ndarray,
    counts: np.ndarray,
    tolerance: float,
    confidence: float,
    bootstrap: int = 200,
    n_splits: int = 50,
    seed: int = 0,
    aggregate: str = "rms",
) -> np.ndarray:
    """``(bootstrap,)`` the rule's answer on each bootstrap sample of the recorded runs (module docstring)."""
    rng = np.random.default_rng(seed)
    runs = per_run.shape[0]
    resamples = rng.integers(0, runs, (bootstrap, runs))
    q = split_quantiles(per_run, mask, counts, confidence, n_splits, rng, aggregate, resamples)
    return np.array([needed_from_quantiles(counts, row, tolerance)[0] for row in q])


def spread_factors(runs: int, level: float) -> tuple[float, float]:
    """``((M-1) / chi2_{M-1}(1 - a/2), (M-1) / chi2_{M-1}(a/2))``: the interval of a variance over its
    estimate from ``M`` normal values; the runs needed scale with the per-run variance."""
    df = runs - 1
    return df / float(stats.chi2.ppf(1 - (1 - level) / 2, df)), df / float(stats.chi2.ppf((1 - level) / 2, df))


def expanded_tail(runs: int, level: float) -> float:
    """Tail probability of the expanded percentile interval for a mean over ``runs`` (Hesterberg 2015)."""
    return float(stats.norm.cdf(math.sqrt(runs / (runs - 1)) * stats.t.ppf((1 - level) / 2, runs - 1)))


def runs_needed(
    errors: np.ndarray,
    counts: np.ndarray,
    per_run: np.ndarray | None,
    mask: np.ndarray | None,
    num_runs: int,
    tolerance: float = 0.1,
    confidence: float = 0.95,
    bootstrap: int = 200,
    seed: int = 0,
    aggregate: str = "rms",
    level: float = 0.95,
    n_splits: int = 50,
) -> RunsNeeded:
    """The rule on the learning curve's ``errors`` ``(len(counts), splits)`` (NaN-padded), with its
    interval from a bootstrap over the recorded runs' ``per_run`` values (module docstring).

    Without ``per_run`` (a result saved by an older version) the interval is the point itself and
    the answer is marked undecided only when extrapolated.
    """
    if not tolerance > 0 or not 0 < confidence < 1:
        raise QDriftError("tolerance must be > 0 and confidence in (0, 1)")
    counts = np.asarray(counts)
    quantiles = np.array(
        [np.nanquantile(row, confidence) if np.any(np.isfinite(row)) else np.nan for row in np.asarray(errors)]
    )
    runs, extrapolated = needed_from_quantiles(counts, quantiles, tolerance)
    low = high = runs
    if per_run is not None and per_run.size and num_runs >= 2 and bootstrap > 0:
        answers = bootstrap_answers(per_run, mask, counts, tolerance, confidence, bootstrap, n_splits, seed, aggregate)
        tail = expanded_tail(num_runs, level)
        low = min(int(np.quantile(answers, tail, method="lower")), runs)
        high = max(int(np.quantile(answers, 1 - tail, method="higher")), runs)
        chi_low, chi_high = spread_factors(num_runs, level)
        low = min(low, max(1, math.floor(runs * chi_low)))
        high = max(high, math.ceil(runs * chi_high))
    max_count = int(counts.max())
    return RunsNeeded(
        runs=int(runs),
        low=int(low),
        high=int(high),
        extrapolated=bool(extrapolated),
        tolerance=float(tolerance),
        confidence=float(confidence),
        quantiles={int(n): float(q) for n, q in zip(counts, quantiles)},
        decided=bool(high <= max_count and not extrapolated),
        num_runs=int(num_runs),
        max_count=max_count,
        level=float(level),
        bootstrap=int(bootstrap if per_run is not None else 0),
    )


def runs_needed_from_runs(
    per_run: np.ndarray,
    mask: np.ndarray,
    tolerance: float = 0.1,
    confidence: float = 0.95,
    n_splits: int = 50,
    split_seed: int = 0,
    bootstrap: int = 200,
    seed: int = 0,
    aggregate: str = "rms",
) -> RunsNeeded:
    """:func:`runs_needed` for a run-pooled estimate straight from its per-run values ``(M, steps[, ...])``.

    Equal to ``cross_validate(est, store, n_splits=n_splits, seed=split_seed).runs_needed(...)`` for an
    estimator whose fit is the mean of its per-run values (``tests/test_runs_needed.py``); the Monte
    Carlo study uses it to skip the store bookkeeping.
    """
    runs = per_run.shape[0]
    counts = np.arange(1, runs)
    errors = subset_errors(per_run, mask, counts, n_splits, split_seed, aggregate)
    return runs_needed(
        errors, counts, per_run, mask, runs, tolerance, confidence, bootstrap, seed, aggregate, n_splits=n_splits
    )


__all__ = [
    "runs_needed_from_runs",
    "subset_errors",
    "RunsNeeded",
    "bootstrap_answers",
    "needed_from_quantiles",
    "runs_needed",
    "split_quantiles",
]
