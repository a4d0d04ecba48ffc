import numpy as np
import pytest
import torch

from qdrift_stats.correct.coefficients import apply_correction, correction_coefficients
from qdrift_stats.errors import QDriftError


def test_zero_variance_and_clean_target_give_zero_coefficients():
    b_next = np.array([2.0, 1.0, 0.0])
    for form in ("drift", "shrink"):
        assert np.all(correction_coefficients(np.zeros(3), b_next, form) == 0.0)
        c = correction_coefficients(np.ones(3), b_next, form)
        assert c[-1] == 0.0 and np.all(c[:-1] > 0)


def test_drift_and_shrink_agree_to_first_order_and_shrink_stays_below_one():
    b_next = np.ones(4)
    small = np.array([1e-6, 1e-5, 1e-4, 1e-3])
    np.testing.assert_allclose(
        correction_coefficients(small, b_next, "shrink"), correction_coefficients(small, b_next, "drift"), rtol=2e-3
    )
    huge = np.array([1e2, 1e4, 1e8, 1e12])
    assert np.all(correction_coefficients(huge, b_next, "shrink") < 1.0)
    assert np.all(correction_coefficients(huge, b_next, "drift-unclipped") > 1.0)  # the derivation's drift overshoots
    np.testing.assert_array_equal(correction_coefficients(huge, b_next, "drift"), 1.0)  # clipped onto a * x0_hat


def test_drift_is_clipped_exactly_where_the_first_order_coefficient_passes_one():
    b_next = np.array([1.0, 1.0, 1.0, 0.1, 0.0])
    v = np.array([0.5, 2.0, 4.0, 1.0, 1.0])
    literal = correction_coefficients(v, b_next, "drift-unclipped")
    np.testing.assert_allclose(literal, [0.25, 1.0, 2.0, 50.0, 0.0])
    np.testing.assert_allclose(correction_coefficients(v, b_next, "drift"), [0.25, 1.0, 1.0, 1.0, 0.0])
    # a clipped step lands on a * x0_hat: the residual is removed, never sign-flipped or amplified
    x, x0 = torch.tensor([[3.0]]), torch.tensor([[1.0]])
    c = torch.tensor(correction_coefficients(np.array([4.0]), np.array([0.1]), "drift")[0])
    assert apply_correction(x, x0, 0.5, c).item() == pytest.approx(0.5)


def test_the_unclipped_drift_is_not_a_file_or_command_line_form():
    from qdrift_stats.correct.coefficients import CORRECTION_FORMS

    assert "drift-unclipped" not in CORRECTION_FORMS


def test_shrink_matches_the_exact_gaussian_variance_map():
    """A N(0, b^2 + v) state shrunk by the coefficient has variance b^2 exactly."""
    b, v = 0.7, 0.2
    c = correction_coefficients(np.array([v]), np.array([b]), "shrink")[0]
    assert (1 - c) ** 2 * (b * b + v) == pytest.approx(b * b)


def test_strength_scales_the_statistic():
    b_next = np.array([1.0, 2.0])
    v = np.array([0.1, 0.3])
    np.testing.assert_allclose(
        correction_coefficients(v, b_next, "drift", 0.5), correction_coefficients(v / 2, b_next, "drift")
    )


def test_bad_statistics_are_refused():
    with pytest.raises(QDriftError):
        correction_coefficients(np.array([np.nan]), np.ones(1))
    with pytest.raises(QDriftError):
        correction_coefficients(np.array([-1.0]), np.ones(1))
    with pytest.raises(QDriftError, match="steps"):
        correction_coefficients(np.ones(3), np.ones(2))
    with pytest.raises(QDriftError, match="form"):
        correction_coefficients(np.ones(1), np.ones(1), "bogus")


def test_zero_coefficient_leaves_the_state_bit_identical():
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    assert torch.equal(apply_correction(x, x0, 0.9, torch.tensor(0.0)), x)


def test_per_channel_coefficients_act_on_their_own_channel():
    x = torch.ones(2, 3, 4)
    x0 = torch.zeros(2, 3, 4)
    c = torch.tensor([0.0, 0.5, 1.0])
    out = apply_correction(x, x0, 1.0, c)
    for ch, expected in enumerate([1.0, 0.5, 0.0]):
        assert torch.all(out[:, ch] == expected)
