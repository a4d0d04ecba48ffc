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
``mixture_vp_weight``      VP eps   weight error ``dW z`` (persistent along the trajectory)
``mixture_vp_weight_strong`` VP eps the same, 2.7x larger (a regime where no variance term suffices)
``mixture_flow_weight``    flow     weight error
``mixture_vp_actround``    VP eps   coarsely rounded hidden activation (persistent, rough)
``mixture_flow_actround``  flow     coarsely rounded hidden activation
``mixture_vp_actround_fine`` VP eps finely rounded hidden activation (grid 0.05: still persistent)
``mixture_flow_actround_fine`` flow finely rounded hidden activation
``mixture_vp_hetero``      VP eps   noise-like, level-dependent, per-run scale
``mixture_flow_hetero``    flow     noise-like, level-dependent, per-run scale
========================== ======== ==========================================

The persistent families (:class:`~.errors.WeightError`, :class:`~.errors.ActivationRoundingError`)
model real PTQ error: a deterministic function of a slowly moving input, so that the error of one
step repeats in the next. ``PERSISTENT_FAMILIES`` and ``NOISE_FAMILIES`` list the pairs by regime
(the studies report them separately).

The noise-like sine error ``A sin(G z + phi)`` has a bounded (arcsine) marginal; the ``_gauss``
pairs use :class:`~.errors.GaussianNoiseError`, the same phase mapped to an exactly Gaussian
marginal of the same variance ``A^2 / 2`` (same ``A``), so the true statistic of both is
``v_i = c_i^2 A^2 / 2`` for a one-step solver with gain ``c_i``.
"""

from __future__ import annotations

from qdrift_stats.testbed.errors import (
    ActivationRoundingError,
    CorrelatedError,
    GaussianNoiseError,
    NoiseLikeError,
    QuantizationError,
    RoundingError,
    WeightError,
    ZeroError,
)
from qdrift_stats.testbed.heterogeneous import HeterogeneousPair
from qdrift_stats.testbed.metrics import gap_closed, mixture_metrics, negative_log_likelihood, within_mode_variance
from qdrift_stats.testbed.mixture import FLOW_SCHEDULER_CONFIG, VP_SCHEDULER_CONFIG, GaussianMixture, MixturePair

DIM = 8
NOISE_AMPLITUDE = {"vp": 0.5, "flow": 1.0}
#: Output-error size of the persistent families (per-coordinate std, output units).
WEIGHT_AMPLITUDE = 0.15
WEIGHT_STRONG_AMPLITUDE = 0.4
ACTIVATION_AMPLITUDE = 0.3
ACTIVATION_COARSE, ACTIVATION_FINE = 0.5, 0.05


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


def mixture_vp_weight() -> MixturePair:
    """VP pair with a weight error ``dW z`` (persistent along each trajectory)."""
    return _pair("vp", WeightError(DIM, amplitude=WEIGHT_AMPLITUDE))


def mixture_vp_weight_strong() -> MixturePair:
    """VP pair with a large weight error: a systematic distortion no variance term repairs."""
    return _pair("vp", WeightError(DIM, amplitude=WEIGHT_STRONG_AMPLITUDE))


def mixture_flow_weight() -> MixturePair:
    """Flow pair with a weight error ``dW z``."""
    return _pair("flow", WeightError(DIM, amplitude=WEIGHT_AMPLITUDE))


def mixture_vp_actround() -> MixturePair:
    """VP pair with a coarsely rounded hidden activation (grid 0.5: persistent and rough)."""
    return _pair("vp", ActivationRoundingError(DIM, amplitude=ACTIVATION_AMPLITUDE, delta=ACTIVATION_COARSE))


def mixture_flow_actround() -> MixturePair:
    """Flow pair with a coarsely rounded hidden activation."""
    return _pair("flow", ActivationRoundingError(DIM, amplitude=ACTIVATION_AMPLITUDE, delta=ACTIVATION_COARSE))


def mixture_vp_actround_fine() -> MixturePair:
    """VP pair with a finely rounded hidden activation (grid 0.05: sign changes more often, still persistent)."""
    return _pair("vp", ActivationRoundingError(DIM, amplitude=ACTIVATION_AMPLITUDE, delta=ACTIVATION_FINE))


def mixture_flow_actround_fine() -> MixturePair:
    """Flow pair with a finely rounded hidden activation."""
    return _pair("flow", ActivationRoundingError(DIM, amplitude=ACTIVATION_AMPLITUDE, delta=ACTIVATION_FINE))


PERSISTENT_FAMILIES: tuple[str, ...] = (
    "mixture_vp_weight",
    "mixture_flow_weight",
    "mixture_vp_actround",
    "mixture_flow_actround",
    "mixture_vp_actround_fine",
    "mixture_flow_actround_fine",
    "mixture_flow_lowfreq",
)
NOISE_FAMILIES: tuple[str, ...] = ("mixture_vp_noise", "mixture_flow_noise", "mixture_vp_gauss", "mixture_flow_gauss")


def mixture_vp_hetero(group: int = 0) -> HeterogeneousPair:
    """VP pair whose noise-like error grows with the noise level and differs per run (testbed/heterogeneous.py)."""
    return HeterogeneousPair(default_mixture(), kind="vp", error=NoiseLikeError(DIM, amplitude=0.5), group=group)


def mixture_flow_hetero(group: int = 0) -> HeterogeneousPair:
    """Flow pair whose noise-like error grows with the noise level and differs per run."""
    return HeterogeneousPair(default_mixture(), kind="flow", error=NoiseLikeError(DIM, amplitude=1.0), group=group)


__all__ = [
    "HeterogeneousPair",
    "GaussianMixture",
    "MixturePair",
    "QuantizationError",
    "ZeroError",
    "NoiseLikeError",
    "GaussianNoiseError",
    "CorrelatedError",
    "RoundingError",
    "WeightError",
    "ActivationRoundingError",
    "PERSISTENT_FAMILIES",
    "NOISE_FAMILIES",
    "VP_SCHEDULER_CONFIG",
    "FLOW_SCHEDULER_CONFIG",
    "within_mode_variance",
    "negative_log_likelihood",
    "mixture_metrics",
    "gap_closed",
    "default_mixture",
]
