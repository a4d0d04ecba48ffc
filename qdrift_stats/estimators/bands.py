"""Simultaneous bands over the steps, beside the pointwise intervals.

A pointwise 95% interval covers each step's true ``v_i`` with probability 0.95; over 25 steps some
steps are expected to be missed. A *simultaneous* band covers every step at once with probability
0.95: it replaces the per-step quantile by the ``confidence`` quantile of ``max_i |T_i|``, the largest
standardised error over the steps (a max-t band). The correlation of the ``T_i`` across steps comes
from the fit, and each ``T_i`` is studentized by its own estimated standard error, so the critical
value is simulated for the studentized statistic (:func:`studentized_max_t_critical`): Gaussian samples
of ``R`` independent units with the estimated correlation across the steps, each sample with its own
per-step standard deviations. For a mean over runs the units are the runs and the correlation is the
runs' sample correlation (a run that is large at one step and large at the next counts once). For
the smooth GLM with the run-clustered covariance the units are the runs as clusters and the
correlation is that of the linear predictors under the clustered covariance (the sandwich is the sum of
the clusters' centred contributions, so each step's statistic is a t statistic over the clusters). An
earlier version divided Gaussian draws by one common ``sqrt(W / df)`` (a multivariate t); that ignores
that each step's standard error is estimated with an error of its own and gave 89-92% simultaneous
coverage at nominal 95% on ``mixture_vp_hetero`` (``studies/coverage.py --hetero``). The GLM's own
(nonrobust) covariance is treated as known: Gaussian draws. Either band reduces to the pointwise t
interval when the steps are perfectly correlated and widens as they decorrelate.

Both are labelled in the results: ``ci_low/ci_high`` pointwise, ``band_low/band_high`` simultaneous.
Written here because neither scipy nor statsmodels offers a max-t band for these fits
(``statsmodels``' ``multipletests`` adjusts p-values, not bands).
"""

from __future__ import annotations

import numpy as np

DRAWS = 20000  # simulation error of the 97.5% point of t_4: about 1.6% relative


def max_t_critical(draws: np.ndarray, df: float | None, confidence: float, seed: int = 0) -> float:
    """``confidence`` quantile of ``max_i |Z_i| / sqrt(W / df)`` over rows of ``draws`` (``(n, k)``, N(0, corr)).

    ``df`` None: Gaussian (no chi-square divisor).
    """
    if draws.shape[1] == 0:
        return float("nan")
    stat = np.abs(draws).max(axis=1)
    if df is not None:
        w = np.random.default_rng(seed + 1).chisquare(df, size=len(stat))
        stat = stat / np.sqrt(w / df)
    return float(np.quantile(stat, confidence))


def studentized_max_t_critical(root: np.ndarray, runs: int, confidence: float, seed: int = 0) -> float:
    """``confidence`` quantile of ``max_i |T_i|`` over ``DRAWS`` simulated samples of ``runs`` independent units.

    ``root``: ``(r, k)`` with ``root.T @ root`` the correlation of the ``k`` entries. Each simulated sample
    is ``runs`` rows drawn from N(0, corr), and ``T_i = sqrt(R) mean_i / sd_i`` with each entry's own
    sample standard deviation, as the real statistic is studentized (each ``T_i`` is exactly t with
    ``runs - 1`` df; a common chi-square divisor instead would understate the max when the entries'
    standard deviations are estimated with error of their own). Draws are made in blocks of bounded size.
    """
    k = root.shape[1]
    if k == 0 or runs < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    stat = np.empty(DRAWS)
    block = max(1, min(DRAWS, 4_000_000 // (runs * max(k, root.shape[0]))))
    for start in range(0, DRAWS, block):
        n = min(block, DRAWS - start)
        sim = rng.standard_normal((n, runs, root.shape[0])) @ root  # n samples of R rows ~ N(0, corr)
        t = np.sqrt(runs) * sim.mean(axis=1) / sim.std(axis=1, ddof=1)
        stat[start : start + n] = np.abs(t).max(axis=1)
    return float(np.quantile(stat, confidence))


def run_mean_band(per_run: np.ndarray, confidence: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Simultaneous max-t band of the mean over runs (axis 0) across every other entry; floored at 0.

    The critical value is the ``confidence`` quantile of ``max_i |T_i|``, ``T_i = sqrt(R) mean_i / sd_i``,
    over Gaussian samples of ``R`` runs with the runs' own correlation (:func:`studentized_max_t_critical`).
    NaN with fewer than two runs. Entries whose per-run values do not vary get the mean itself.
    """
    runs = per_run.shape[0]
    mean = per_run.mean(axis=0)
    if runs < 2:
        nan = np.full_like(mean, np.nan)
        return nan, nan
    flat = per_run.reshape(runs, -1)
    sd = flat.std(axis=0, ddof=1)
    keep = sd > 0
    crit = float("nan")
    if keep.any():
        centred = (flat[:, keep] - flat[:, keep].mean(axis=0)) / sd[keep] / np.sqrt(runs - 1)  # c.T @ c = corr
        _, s, vt = np.linalg.svd(centred, full_matrices=False)  # a root of rank <= min(runs - 1, k)
        crit = studentized_max_t_critical(s[:, None] * vt, runs, confidence, seed)
    half = np.zeros(flat.shape[1])
    half[keep] = crit * sd[keep] / np.sqrt(runs)
    half = half.reshape(mean.shape)
    return np.maximum(mean - half, 0.0), mean + half


def linear_predictor_band(
    exog: np.ndarray, params: np.ndarray, cov: np.ndarray, runs: int | None, confidence: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Simultaneous max-t band ``(low, high)`` of ``exog @ params`` (on the link scale), rows of ``exog`` the steps.

    ``runs`` None: ``cov`` is treated as known (Gaussian max over the steps). ``runs`` given: ``cov`` is a
    sandwich over ``runs`` clusters, itself estimated from those clusters; the critical value is then
    that of the studentized statistic (:func:`studentized_max_t_critical` with the correlation of the
    linear predictors): a cluster-robust covariance is ``G / (G - 1)`` times the sum of the ``G`` centred
    cluster contributions ``psi_g`` (each ``N(0, cov / G)`` to first order), so ``x_i (theta_hat - theta)``
    over its standard error is, step by step, the t statistic of the mean of the ``G`` values ``x_i psi_g``.
    """
    eta = exog @ params
    se = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", exog, cov, exog), 0.0))
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    root = vectors * np.sqrt(np.clip(values, 0.0, None))  # root @ root.T = cov
    keep = se > 0
    corr_root = root.T @ exog[keep].T / se[keep]  # (K, k): corr_root.T @ corr_root = corr of the predictors
    if runs is None:
        draws = np.random.default_rng(seed).standard_normal((DRAWS, len(params))) @ corr_root
        crit = max_t_critical(draws, None, confidence, seed)
    else:
        crit = studentized_max_t_critical(corr_root, runs, confidence, seed)
    return eta - crit * se, eta + crit * se
