"""Exact metrics of samples against the testbed's known mixture."""

from __future__ import annotations

import numpy as np
import torch

from qdrift_stats.metrics.distances import energy_distance
from qdrift_stats.testbed.mixture import GaussianMixture


def _flat(samples: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(samples), dtype=torch.float64).reshape(len(samples), -1)


def within_mode_variance(samples: np.ndarray | torch.Tensor, mixture: GaussianMixture) -> float:
    """Mean per-coordinate variance of the samples around their own mode's sample mean.

    Each sample is assigned to its most likely mode; the within-mode variances of modes with at
    least two samples are averaged, weighted by count. The truth is ``mixture.std ** 2``.
    """
    x = _flat(samples)
    modes = mixture.assign(x)
    total, count = 0.0, 0
    for k in modes.unique():
        members = x[modes == k]
        if len(members) > 1:
            total += float(members.var(dim=0, unbiased=True).mean()) * len(members)
            count += len(members)
    return total / count


def negative_log_likelihood(samples: np.ndarray | torch.Tensor, mixture: GaussianMixture) -> float:
    """Mean negative log density of the samples under the true mixture (nats per sample)."""
    return float(-mixture.log_prob(_flat(samples)).mean())


def mixture_metrics(
    samples: np.ndarray | torch.Tensor, mixture: GaussianMixture, reference: np.ndarray | torch.Tensor | None = None
) -> dict[str, float]:
    """``within_var``, ``nll`` and (with a reference sample) ``energy`` distance of a sample set."""
    out = {"within_var": within_mode_variance(samples, mixture), "nll": negative_log_likelihood(samples, mixture)}
    if reference is not None:
        out["energy"] = energy_distance(_flat(samples), _flat(reference))
    return out


def gap_closed(fp: float, q: float, corrected: float) -> float:
    """Fraction of the FP-to-Q gap a correction closes: 1 = back to FP, 0 = no change, < 0 = worse."""
    gap = q - fp
    return float("nan") if gap == 0 else (q - corrected) / gap


def gap_closed_interval(
    fp: np.ndarray,
    q: np.ndarray,
    corrected: np.ndarray,
    mixture: GaussianMixture,
    reps: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired percentile-bootstrap interval of :func:`gap_closed` on the within-mode variance.

    The three sample sets come from the same seeds (sample ``j`` of each shares its initial noise),
    so each replicate resamples one set of indices for all three. NaN bounds when a replicate's
    gap is 0 or a set is not finite.
    """
    fp, q, corrected = (_flat(x) for x in (fp, q, corrected))
    n = min(len(fp), len(q), len(corrected))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(reps):
        idx = torch.as_tensor(rng.integers(0, n, n))
        values.append(
            gap_closed(
                within_mode_variance(fp[idx], mixture),
                within_mode_variance(q[idx], mixture),
                within_mode_variance(corrected[idx], mixture),
            )
        )
    values = np.asarray(values)
    if not np.all(np.isfinite(values)):
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))
