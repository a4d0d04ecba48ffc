"""Bias terms of the output error: what part of ``e = m_q - m_fp`` the sampler can subtract before stepping.

Two models of the systematic part, both returned as the affine output map the
:class:`~qdrift_stats.correct.corrector.Corrector` applies, ``m <- (m_q - mu) / (1 + k)``:

- ``ptqd`` (PTQD, He et al. 2023): per step, one regression over all elements,
  ``e = k m_fp + mu + r`` (:func:`qdrift_stats.estimators.decomposed.output_regression`); the map
  ``(m_q - mu) / (1 + k)`` equals ``m_fp + r / (1 + k)``.
- ``conditional`` (the published Q-Drift code, following D²-DPM): per step and channel, a 2-D
  Gaussian of ``(m_q, e)`` fitted after dropping errors more than ``trim`` standard deviations from
  their mean; the bias is the conditional mean ``E[e | m_q] = mu_e + beta (m_q - mu_q)`` with
  ``beta = Cov(m_q, e) / Var(m_q)``, and what is left has the conditional variance
  ``Var(e) (1 - rho^2)``. Subtracting it, ``m_q - E[e | m_q] = (1 - beta) m_q - (mu_e - beta mu_q)``,
  is the map above with ``1 / (1 + k) = 1 - beta`` and ``mu = (mu_e - beta mu_q) / (1 - beta)``.

Both are fitted per step from pooled ``(run, n)`` arrays; :func:`residual` applies a fitted bias to
the output error, giving what the variance statistic then describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qdrift_stats.errors import QDriftError

BIAS_TERMS: tuple[str, ...] = ("none", "ptqd", "conditional")
#: The published code's trimming of the error, in standard deviations.
TRIM_STD = 4.0


def check_bias(bias: str) -> str:
    if bias not in BIAS_TERMS:
        raise QDriftError(f"unknown bias term {bias!r}; choose one of {', '.join(BIAS_TERMS)}")
    return bias


@dataclass
class ConditionalGaussian:
    """Per-channel 2-D Gaussian of ``(m_q, e)``; arrays ``(channels,)``."""

    mu_q: np.ndarray
    mu_e: np.ndarray
    var_q: np.ndarray
    var_e: np.ndarray
    cov: np.ndarray

    @property
    def rho(self) -> np.ndarray:
        denom = np.sqrt(np.maximum(self.var_q, 1e-300) * np.maximum(self.var_e, 1e-300))
        return np.clip(np.where(denom > 0, self.cov / denom, 0.0), -0.9999, 0.9999)

    @property
    def beta(self) -> np.ndarray:
        """Slope of ``E[e | m_q]`` in ``m_q``."""
        return np.where(self.var_q > 0, self.cov / np.where(self.var_q > 0, self.var_q, 1.0), 0.0)

    @property
    def conditional_variance(self) -> np.ndarray:
        """``Var(e | m_q) = Var(e) (1 - rho^2)`` (output units squared)."""
        return self.var_e * (1.0 - self.rho**2)


def conditional_gaussian(
    m_q: np.ndarray, e: np.ndarray, channel: np.ndarray, trim: float = TRIM_STD
) -> ConditionalGaussian:
    """Fit :class:`ConditionalGaussian` per channel.

    Args:
        m_q, e: flat float64 arrays of the Q output and its error, paired.
        channel: flat int array, the channel of each value.
        trim: values whose error lies more than ``trim`` standard deviations from the channel's
            mean error are left out (the published code's outlier rule).
    """
    channels = int(channel.max()) + 1 if channel.size else 0
    out = {name: np.zeros(channels) for name in ("mu_q", "mu_e", "var_q", "var_e", "cov")}
    for c in range(channels):
        q, err = m_q[channel == c], e[channel == c]
        if err.size == 0:
            continue
        sd = err.std()
        keep = np.abs(err - err.mean()) <= trim * sd if sd > 0 else np.ones_like(err, dtype=bool)
        q, err = q[keep], err[keep]
        out["mu_q"][c], out["mu_e"][c] = q.mean(), err.mean()
        out["var_q"][c], out["var_e"][c] = q.var(), err.var()
        out["cov"][c] = np.mean((q - q.mean()) * (err - err.mean()))
    return ConditionalGaussian(**out)


def conditional_output_map(g: ConditionalGaussian, min_scale: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``(k, mu)`` per channel such that ``(m_q - mu) / (1 + k) = m_q - E[e | m_q]``.

    Channels where ``1 - beta`` is below ``min_scale`` (the Q output barely follows the FP one) are
    left uncorrected (``k = mu = 0``), as in the decomposed estimator.
    """
    scale = 1.0 - g.beta
    ok = scale >= min_scale
    safe = np.where(ok, scale, 1.0)
    k = np.where(ok, 1.0 / safe - 1.0, 0.0)
    mu = np.where(ok, (g.mu_e - g.beta * g.mu_q) / safe, 0.0)
    return k, mu


def channel_index(shape: tuple[int, ...]) -> np.ndarray:
    """For values of shape ``(run, sample, *sample_shape)`` flattened per run: the channel of each position.

    The channel is the first sample dim (a flat sample of one dim has one channel per element).
    """
    sample_shape = shape[2:]
    if not sample_shape:
        return np.zeros(shape[1], dtype=np.int64)
    channels = sample_shape[0]
    inner = int(np.prod(sample_shape[1:])) if len(sample_shape) > 1 else 1
    per_sample = np.repeat(np.arange(channels), inner)
    return np.tile(per_sample, shape[1])


def residual(delta_out: np.ndarray, out_fp: np.ndarray, k: np.ndarray | float, mu: np.ndarray | float) -> np.ndarray:
    """What the output error becomes after the map ``(m_q - mu) / (1 + k)``: ``(e - k m_fp - mu) / (1 + k)``.

    ``k``, ``mu``: scalars or arrays broadcastable to the inputs.
    """
    return (delta_out - k * out_fp - mu) / (1.0 + k)
