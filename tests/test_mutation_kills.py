"""Tests written to kill mutants that survived ``mutmut`` on the correction path (docs/results/mutation.md).

Each pins a behaviour the earlier tests left open: an exact message, a boundary, a fallback.
"""

import numpy as np
import pytest
import torch

from qdrift_stats.correct.coefficients import apply_correction, correction_coefficients, divergence_risk
from qdrift_stats.errors import QDriftError


def test_coefficients_are_float64_whatever_the_input_precision():
    c = correction_coefficients(np.array([0.1, 0.2], dtype=np.float32), np.array([1.0, 0.5], dtype=np.float32))
    assert c.dtype == np.float64
    np.testing.assert_allclose(c, [0.05, 0.4], rtol=1e-7)


def test_bad_statistic_messages_say_what_is_wrong():
    with pytest.raises(QDriftError, match=r"^variance statistic must be finite and non-negative$"):
        correction_coefficients(np.array([-1.0]), np.ones(1))
    with pytest.raises(QDriftError, match=r"^strength must be a finite non-negative number, got -1.0$"):
        correction_coefficients(np.ones(1), np.ones(1), strength=-1.0)
    with pytest.raises(QDriftError, match=r"^strength must be a finite non-negative number, got inf$"):
        correction_coefficients(np.ones(1), np.ones(1), strength=float("inf"))
    with pytest.raises(QDriftError, match=r"^estimator has 3 steps but the sampler has 2$"):
        correction_coefficients(np.ones(3), np.ones(2))
    with pytest.raises(QDriftError, match=r"^unknown correction form 'bogus'; choose drift or shrink$"):
        correction_coefficients(np.ones(1), np.ones(1), "bogus")


def test_strength_zero_is_allowed_and_gives_no_correction():
    np.testing.assert_array_equal(correction_coefficients(np.ones(2), np.ones(2), "shrink", 0.0), 0.0)


def test_per_channel_correction_keeps_the_state_shape():
    x = torch.ones(2, 3, 4)
    out = apply_correction(x, torch.zeros(2, 3, 4), 1.0, torch.tensor([0.0, 0.5, 1.0]))
    assert out.shape == x.shape


def test_divergence_risk_is_the_unclipped_half_gamma():
    np.testing.assert_allclose(
        divergence_risk(np.array([0.5, 4.0, 1.0]), np.array([1.0, 1.0, 0.0]), 2.0), [0.5, 4.0, 0.0], rtol=1e-14
    )
