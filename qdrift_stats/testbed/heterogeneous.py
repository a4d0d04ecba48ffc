"""A testbed where interval and coverage studies can fail: level-dependent error variance and runs that differ.

The plain noise pairs have an error variance that is flat across noise levels (every smoother is
unbiased there) and runs that are identical batches (every interval that treats (run, step) values
as independent looks right). Real calibration runs differ (prompts, classes, seeds change how
large the quantization error is), and the error's size changes with the noise level. This pair has
both, with a known truth:

    m_q = m_fp + s_r * f(b) * e(z),    f(b) = (b0 + b) / (b0 + 1),    E s_r^2 = 1,

``e(z)`` the noise-like sinusoid of :class:`~qdrift_stats.testbed.errors.NoiseLikeError` (variance
``A^2 / 2``), ``b`` the noise level of the model input, and ``s_r = exp(sigma z_r - sigma^2)``
(``z_r`` standard normal) a scale drawn once per run (per group of ``group`` samples, the run's
batch; ``group = 0``: the whole batch), as a condition of the pair (``conditions``), so a seed fixes
it. The true per-step statistic of a one-step solver with gain ``c_i`` is

    v_i = c_i^2 f(b_i)^2 A^2 / 2           (:meth:`HeterogeneousPair.true_output_variance`).

The run-level scale makes the per-run values of one run move together across steps: an interval
that treats every (run, step) value as independent is too narrow, one that clusters by run is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qdrift_stats.testbed.mixture import MixturePair


@dataclass
class HeterogeneousPair(MixturePair):
    """A :class:`MixturePair` whose error scales with the noise level and with a per-run factor (module docstring).

    Args (beyond :class:`MixturePair`'s):
        run_sigma: log-standard deviation of the per-run scale ``s_r`` (0: identical runs).
        level_offset: ``b0`` in ``f(b) = (b0 + b) / (b0 + 1)``.
        group: samples sharing one scale (0: the whole batch, i.e. one scale per recorded run).
    """

    run_sigma: float = 0.15
    level_offset: float = 0.2
    group: int = 0

    def conditions(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        group = self.group or batch_size
        draws = torch.randn(math.ceil(batch_size / group), generator=generator, dtype=torch.float64)
        scale = torch.exp(self.run_sigma * draws - self.run_sigma**2)  # E s^2 = 1
        return {"run_scale": scale.repeat_interleave(group)[:batch_size]}

    def level_factor(self, b: float | np.ndarray) -> float | np.ndarray:
        return (self.level_offset + b) / (self.level_offset + 1.0)

    def fp(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        return super().fp(sample, timestep)

    def q(self, sample: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> torch.Tensor:
        m_fp = super().fp(sample, timestep)
        err = self.error(m_fp, sample, timestep) - m_fp
        _, b = self.levels(timestep)
        scale = cond.get("run_scale")
        factor = torch.full((sample.shape[0],), 1.0, dtype=torch.float64) if scale is None else scale.double()
        factor = (factor * self.level_factor(b)).reshape((-1,) + (1,) * (sample.ndim - 1))
        return m_fp + (err.double() * factor.to(err.device)).to(m_fp.dtype)

    def true_output_variance(self, b: np.ndarray) -> np.ndarray:
        """``E (m_q - m_fp)^2`` per element at model-input level ``b``: ``f(b)^2 A^2 / 2`` (runs averaged)."""
        return self.level_factor(np.asarray(b, dtype=np.float64)) ** 2 * self.error.amplitude**2 / 2
