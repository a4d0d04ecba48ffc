"""The analytic mixture testbed: exact denoisers, quantization-error families and exact metrics.

Pair factories (``--pair qdrift_stats.testbed:<name>``):

========================== ======== ==========================================
name                       kind     quantization error
========================== ======== ==========================================
``mixture_vp_exact``       VP eps   none (q == fp)
``mixture_vp_noise``       VP eps   noise-like (the embedded default)
``mixture_vp_gauss``       VP eps   noise-like with a Gaussian marginal
``mixture_vp_correlated``  VP eps   signal-correlated, ``0.95 * m_fp``
``mixture_vp_rounding``    VP eps   output rounded to a 0.25 grid
``mixture_flow_exact``     flow     none
``mixture_flow_noise``     flow     noise-like
``mixture_flow_gauss``     flow     noise-like with a Gaussian marginal
``mixture_flow_lowfreq``   flow     low-frequency sine: correlated along the trajectory
``mixture_flow_correlated`` flow    signal-correlated
``mixture_flow_rounding``  flow     output rounding
========================== ======== ==========================================

The noise-like sine error ``A sin(G z + phi)`` has a bounded (arcsine) marginal; the ``_gauss``
pairs use :class:`~.errors.GaussianNoiseError`, the same phase mapped to an exactly Gaussian
marginal of the same variance ``A^2 / 2`` (same ``A``), so the true statistic of both is
``v_i = c_i^2 A^2 / 2`` for a one-step solver with gain ``c_i``.
"""

from __future__ import annotations

from qdrift_stats.testbed.errors import (
    CorrelatedError,
    GaussianNoiseError,
    NoiseLikeError,
    QuantizationError,
    RoundingError,
    ZeroError,
)
from qdrift_stats.testbed.metrics import gap_closed, mixture_metrics, negative_log_likelihood, within_mode_variance
from qdrift_stats.testbed.mixture import FLOW_SCHEDULER_CONFIG, VP_SCHEDULER_CONFIG, GaussianMixture, MixturePair

DIM = 8
NOISE_AMPLITUDE = {"vp": 0.5, "flow": 1.0}


def default_mixture() -> GaussianMixture:
    """The testbed's mixture: 4 modes in 8 dimensions, within-mode std 0.3 (seed 0)."""
    return GaussianMixture.random(dim=DIM, modes=4, spread=1.5, std=0.3, seed=0)


def _pair(kind: str, error: QuantizationError) -> MixturePair:
    return MixturePair(default_mixture(), kind=kind, error=error)


def mixture_vp_exact() -> MixturePair:
    return _pair("vp", ZeroError())


def mixture_vp_noise() -> MixturePair:
    return _pair("vp", NoiseLikeError(DIM, amplitude=NOISE_AMPLITUDE["vp"]))


def mixture_vp_gauss() -> MixturePair:
    """VP pair with a Gaussian-marginal noise-like error (variance ``A^2 / 2`` as ``mixture_vp_noise``)."""
    return _pair("vp", GaussianNoiseError(DIM, amplitude=NOISE_AMPLITUDE["vp"]))


def mixture_vp_correlated() -> MixturePair:
    return _pair("vp", CorrelatedError(k=-0.05))


def mixture_vp_rounding() -> MixturePair:
    return _pair("vp", RoundingError(delta=0.25))


def mixture_flow_exact() -> MixturePair:
    return _pair("flow", ZeroError())


def mixture_flow_noise() -> MixturePair:
    return _pair("flow", NoiseLikeError(DIM, amplitude=NOISE_AMPLITUDE["flow"]))


def mixture_flow_gauss() -> MixturePair:
    """Flow pair with a Gaussian-marginal noise-like error (variance ``A^2 / 2`` as ``mixture_flow_noise``)."""
    return _pair("flow", GaussianNoiseError(DIM, amplitude=NOISE_AMPLITUDE["flow"]))


def mixture_flow_lowfreq() -> MixturePair:
    """Flow pair with a low-frequency (40) sine error: correlated along the trajectory."""
    return _pair("flow", NoiseLikeError(DIM, amplitude=NOISE_AMPLITUDE["flow"], frequency=40.0))


def mixture_flow_correlated() -> MixturePair:
    return _pair("flow", CorrelatedError(k=-0.05))


def mixture_flow_rounding() -> MixturePair:
    return _pair("flow", RoundingError(delta=0.25))


__all__ = [
    "GaussianMixture",
    "MixturePair",
    "QuantizationError",
    "ZeroError",
    "NoiseLikeError",
    "GaussianNoiseError",
    "CorrelatedError",
    "RoundingError",
    "VP_SCHEDULER_CONFIG",
    "FLOW_SCHEDULER_CONFIG",
    "within_mode_variance",
    "negative_log_likelihood",
    "mixture_metrics",
    "gap_closed",
    "default_mixture",
]
