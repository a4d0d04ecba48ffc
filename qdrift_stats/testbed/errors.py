"""Quantization-error families for the analytic testbed.

Each family maps the FP output ``m_fp`` (and the model input, for input-dependent errors) to a
"quantized" output ``m_q``. They are chosen to probe the method's assumption that the error of a
step behaves like independent zero-mean noise:

- :class:`NoiseLikeError` - deterministic but decorrelated: ``amplitude * sin(G z + phi)`` with a
  high-frequency random ``G``; the regime Q-Drift is derived for.
- :class:`GaussianNoiseError` - the same construction with an exactly Gaussian marginal
  (``amplitude / sqrt(2) * Phi^-1(u)``, ``u`` a triangle wave of the same phase): the regime in
  which the Gaussian-consistent robust scales (Huber, MAD) estimate the variance itself.
- :class:`CorrelatedError` - signal-correlated: ``(1 + k) m_fp + mu``; not noise (PTQD's regime).
- :class:`RoundingError` - the output rounded to a grid of width ``delta``; not noise either
  (at small noise levels the error is ``-m_fp`` for small outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class QuantizationError:
    """Base class: ``error(m_fp, model_input, timestep) -> m_q`` (shapes equal)."""

    name = "none"

    def __call__(self, m_fp: torch.Tensor, model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ZeroError(QuantizationError):
    """No error: ``q`` equals ``fp``."""

    name = "zero"

    def __call__(self, m_fp, model_input, timestep):
        return m_fp


@dataclass
class NoiseLikeError(QuantizationError):
    """``m_q = m_fp + amplitude * sin(G z + phi)``, ``z`` the flattened model input.

    ``G ~ N(0, frequency^2)`` is ``(d, d)`` and ``phi ~ U(0, 2 pi)``, both drawn from ``seed``. With
    a high frequency the error decorrelates between nearby states and steps. Its per-coordinate
    variance is about ``amplitude^2 / 2``.

    The default frequency (200) keeps the error decorrelated along a 50-step flow trajectory
    (lag-1 autocorrelation < 0.1). At 40 the flow pair's velocity error stays correlated over
    neighbouring steps (lag-1 autocorrelation 0.2-0.3 over the first half of the trajectory): a
    violation of the method's assumption that ``studies/mixture_table.py`` reports separately.
    """

    dim: int
    amplitude: float = 0.1
    frequency: float = 200.0
    seed: int = 1234
    name = "noise"

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        self._G = torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64) * self.frequency
        self._phi = torch.rand(self.dim, generator=g, dtype=torch.float64) * 2 * torch.pi

    def __call__(self, m_fp, model_input, timestep):
        z = model_input.reshape(model_input.shape[0], -1).double()
        err = self.amplitude * torch.sin(z @ self._G.T + self._phi)
        return m_fp + err.reshape(m_fp.shape).to(m_fp.dtype)


@dataclass
class GaussianNoiseError(NoiseLikeError):
    """``m_q = m_fp + amplitude / sqrt(2) * Phi^-1(u)``, ``u = 1/2 + arcsin(sin(G z + phi)) / pi``.

    The phase ``theta = G z + phi`` is that of :class:`NoiseLikeError` (same ``G``, ``phi``, seed and
    frequency, so the same decorrelation along a trajectory). ``arcsin(sin theta)`` is a triangle
    wave, so ``u`` is exactly ``Uniform(0, 1)`` where the phase is uniform modulo ``2 pi``, and the
    error, ``Phi^-1`` being the standard normal quantile function, is exactly ``N(0, amplitude^2 / 2)``:
    the same per-coordinate variance as the sinusoid (the testbed's truth formula is unchanged), but
    with a Gaussian marginal instead of the sinusoid's bounded arcsine one. ``u`` is clamped to
    ``[1e-12, 1 - 1e-12]`` (the error is at most about 7 standard deviations).
    """

    name = "gaussian-noise"

    def __call__(self, m_fp, model_input, timestep):
        z = model_input.reshape(model_input.shape[0], -1).double()
        u = 0.5 + torch.arcsin(torch.sin(z @ self._G.T + self._phi)) / torch.pi
        u = u.clamp(1e-12, 1 - 1e-12)
        err = self.amplitude / math.sqrt(2.0) * torch.special.ndtri(u)
        return m_fp + err.reshape(m_fp.shape).to(m_fp.dtype)


@dataclass
class CorrelatedError(QuantizationError):
    """``m_q = (1 + k) * m_fp + mu``: a scale error and a bias, both constant."""

    k: float = -0.05
    mu: float = 0.0
    name = "correlated"

    def __call__(self, m_fp, model_input, timestep):
        return (1.0 + self.k) * m_fp + self.mu


@dataclass
class RoundingError(QuantizationError):
    """``m_q = delta * round(m_fp / delta)``: output rounding to a uniform grid."""

    delta: float = 0.25
    name = "rounding"

    def __call__(self, m_fp, model_input, timestep):
        return torch.round(m_fp / self.delta) * self.delta


@dataclass
class WeightError(QuantizationError):
    """A weight error ``dW z``: ``m_q = m_fp + amplitude * W z / sqrt(d)``, ``z`` the flattened model input.

    ``W`` is a fixed ``(d, d)`` standard-normal matrix drawn from ``seed``: the error of a linear
    layer whose weights were rounded, seen through the identity. Unlike :class:`NoiseLikeError` it
    is a *smooth* function of the input, so it changes as slowly as the input does: along a
    deterministic trajectory at high noise the model input is nearly the initial noise, and the
    error stays nearly the same from step to step (it **persists**). Its per-coordinate variance is
    ``amplitude^2 * E|z|^2 / d`` (about ``amplitude^2`` for a unit-variance input), and it has zero
    mean for a zero-mean input. Part of it is explained by the FP output wherever the output
    follows the input (the diagonal of ``W`` at high noise), the rest is not.
    """

    dim: int
    amplitude: float = 0.1
    seed: int = 4321
    name = "weight"

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        self._W = torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64) / math.sqrt(self.dim)

    def __call__(self, m_fp, model_input, timestep):
        z = model_input.reshape(model_input.shape[0], -1).double()
        err = self.amplitude * (z @ self._W.T)
        return m_fp + err.reshape(m_fp.shape).to(m_fp.dtype)


@dataclass
class ActivationRoundingError(QuantizationError):
    """An activation error: a hidden feature rounded to a grid, seen through an output projection.

    ``h = tanh(H z + c)`` with a fixed ``(hidden, d)`` matrix ``H`` (entries ``N(0, scale^2 / d)``)
    and offsets ``c ~ N(0, 1)``; the quantized layer uses ``delta * round(h / delta)`` instead of
    ``h``, and the error reaches the output through a fixed ``(d, hidden)`` projection ``B``
    (entries ``N(0, 1 / hidden)``):

        m_q = m_fp + amplitude * B (delta round(h / delta) - h) / (delta / sqrt(12)).

    The rounding error of one feature is a sawtooth of the input: constant in sign and slowly
    varying until ``h`` crosses a grid point. With a coarse grid (``delta`` large against how far
    ``h`` moves along a trajectory) it **persists** over many steps; with a fine grid it changes
    sign often and looks like noise. Normalised by the uniform rounding error's std
    ``delta / sqrt(12)`` so that ``amplitude`` sets the output error's size (per-coordinate
    variance about ``amplitude^2``) whatever the grid.
    """

    dim: int
    amplitude: float = 0.1
    delta: float = 0.5
    hidden: int = 32
    scale: float = 1.0
    seed: int = 2468
    name = "activation-rounding"

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        self._H = torch.randn(self.hidden, self.dim, generator=g, dtype=torch.float64) * (
            self.scale / math.sqrt(self.dim)
        )
        self._c = torch.randn(self.hidden, generator=g, dtype=torch.float64)
        self._B = torch.randn(self.dim, self.hidden, generator=g, dtype=torch.float64) / math.sqrt(self.hidden)

    def __call__(self, m_fp, model_input, timestep):
        z = model_input.reshape(model_input.shape[0], -1).double()
        h = torch.tanh(z @ self._H.T + self._c)
        rounded = torch.round(h / self.delta) * self.delta
        err = self.amplitude * ((rounded - h) @ self._B.T) / (self.delta / math.sqrt(12.0))
        return m_fp + err.reshape(m_fp.shape).to(m_fp.dtype)
