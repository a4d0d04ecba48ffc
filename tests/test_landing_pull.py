"""The pull solved at the landing level with the step's own error modelled (``spread="landing"``, an option).

Expected values come from the step's algebra written out here (a first-order step and the clean estimate of each
prediction type) and from a Monte Carlo of the deviation the condition describes, not from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdrift_stats.correct.coefficients import correction_coefficients, landing_coefficients, own_error_factor
from qdrift_stats.correct.estimator_file import FORMAT_VERSION_LANDING, EstimatorFile
from qdrift_stats.errors import QDriftError
from qdrift_stats.schedulers.base import FLOW_PREDICTION, x0_from_output

# three steps of a VP (a^2 + b^2 = 1) grid and of a flow grid (a = 1 - sigma, b = sigma); the last lands on b = 0
VP_B = np.array([0.95, 0.8, 0.5, 0.0])
VP_A = np.sqrt(1 - VP_B**2)
FLOW_B = np.array([0.9, 0.6, 0.2, 0.0])
FLOW_A = 1 - FLOW_B


def step_shares(prediction_type: str, a: float, b: float, a_next: float, b_next: float) -> tuple[float, float]:
    """``(d x_next / d m, d r / d m)`` of a first-order step from ``x = 0.3``, by finite differences of the step
    ``x_next = a_next x0 + b_next (x - a x0) / b`` and of the pull's residual ``r = x_next - a_next x0``."""
    x = torch.tensor([0.3], dtype=torch.float64)

    def landing(m: float) -> tuple[float, float]:
        x0 = x0_from_output(prediction_type, a, b, x, torch.tensor([m], dtype=torch.float64))
        x_next = a_next * x0 + b_next * (x - a * x0) / b
        return float(x_next[0]), float((x_next - a_next * x0)[0])

    (x1, r1), (x0_, r0) = landing(0.7), landing(0.2)
    return (x1 - x0_) / 0.5, (r1 - r0) / 0.5


@pytest.mark.parametrize(
    "prediction_type, a, b",
    [("epsilon", VP_A, VP_B), ("v_prediction", VP_A, VP_B), ("sample", VP_A, VP_B), (FLOW_PREDICTION, FLOW_A, FLOW_B)],
)
def test_the_own_error_factor_is_the_residuals_share_of_the_steps_perturbation(prediction_type, a, b):
    eta = own_error_factor(a[:-1], b[:-1], a[1:], b[1:])
    for i in range(len(eta)):
        gain, share = step_shares(prediction_type, a[i], b[i], a[i + 1], b[i + 1])
        expected = share / gain if b[i + 1] > 0 else 0.0
        assert eta[i] == pytest.approx(expected, rel=1e-9, abs=1e-12), (prediction_type, i)
    assert np.all(eta[b[1:] > 0] < 0)  # the pull enlarges the step's own perturbation


def test_the_pull_returns_the_landing_spread_of_a_monte_carlo_deviation():
    # y_c ~ N(0, S^2) per coordinate (what the FP flow carried), Delta = kappa y_c / S^2 + noise (this step's
    # perturbation, coupled to the deviation); after the pull the deviation is (1 - c q) y_c + (1 - c eta) Delta.
    rng = np.random.default_rng(0)
    a, b = VP_A, VP_B
    rho = np.array([0.9, 0.5, 0.2])
    rho_next = np.append(rho[1:], rho[-1])
    q = np.sqrt(rho * rho_next)
    eta = own_error_factor(a[:-1], b[:-1], a[1:], b[1:])
    spread = b[1:] ** 2 / rho_next
    n = 2_000_000
    for i in range(2):  # the steps that land on b > 0
        s2 = spread[i]
        y = rng.standard_normal(n)
        y *= np.sqrt(s2 / np.mean(y**2))  # the carried spread is exactly S^2, as the condition assumes
        delta = 0.05 * y + rng.standard_normal(n) * 0.1 * np.sqrt(s2)
        v, kappa = np.mean(delta**2), np.mean(y * delta)
        w = v + 2 * kappa
        c = landing_coefficients(np.array([w, w, 0.0]), np.array([v, v, 0.0]), a[:-1], b[:-1], a[1:], b[1:], rho)[i]
        after = (1 - c * q[i]) * y + (1 - c * eta[i]) * delta
        assert np.mean(after**2) == pytest.approx(s2, rel=1e-9)  # the condition holds on the sample's own moments
        assert 0 < c < 1 / q[i]  # the smaller root: the carried deviation keeps its sign


def test_the_landing_pull_is_zero_without_a_statistic_on_the_last_step_and_at_strength_zero():
    a, b = FLOW_A, FLOW_B
    rho = np.array([1.0, 0.7, 0.3])
    w, v = np.array([0.02, 0.01, 0.5]), np.array([0.01, 0.01, 0.4])
    c = landing_coefficients(w, v, a[:-1], b[:-1], a[1:], b[1:], rho)
    assert c[2] == 0.0 and np.all(c[:2] > 0)
    assert np.all(landing_coefficients(w, v, a[:-1], b[:-1], a[1:], b[1:], rho, strength=0.0) == 0.0)
    assert np.all(landing_coefficients(0 * w, 0 * v, a[:-1], b[:-1], a[1:], b[1:], rho) == 0.0)
    with pytest.raises(QDriftError, match="independent variance"):
        landing_coefficients(w, v[:2], a[:-1], b[:-1], a[1:], b[1:], rho)


def landing_file(**changes) -> tuple[dict, dict]:
    tensors = {
        "variance": np.array([0.02, 0.01, 0.5]),
        "independent_variance": np.array([0.01, 0.01, 0.4]),
        "residual_fraction": np.array([1.0, 0.7, 0.3]),
        "residual_error": np.zeros(3),
        "timesteps": np.array([900.0, 600.0, 200.0]),
        "a_next": FLOW_A[1:],
        "b_next": FLOW_B[1:],
    }
    metadata = {
        "format": "qdrift-estimator",
        "format_version": FORMAT_VERSION_LANDING,
        "scheduler": {"name": "flow-euler", "class": "FlowMatchEulerDiscreteScheduler", "config": {}},
        "steps": 3,
        "estimator": {"name": "persistent", "params": {"spread": "landing"}, "smooth": False},
        "correction": {"form": "shrink", "strength": 1.0},
        "num_runs": 5,
        "provenance": {},
    }
    for key, value in changes.items():
        if key == "drop":
            for name in value:
                tensors.pop(name)
        elif key in tensors:
            tensors[key] = value
        else:
            metadata[key] = value
    return tensors, metadata


def test_a_landing_file_is_checked_on_load(tmp_path):
    tensors, metadata = landing_file()
    EstimatorFile.validate(tensors, metadata, "f")
    with pytest.raises(QDriftError, match="format version 3"):
        EstimatorFile.validate(*landing_file(format_version=2), "f")
    with pytest.raises(QDriftError, match="independent_variance must be"):
        EstimatorFile.validate(*landing_file(drop=("residual_fraction", "residual_error")), "f")
    with pytest.raises(QDriftError, match="independent_variance must be"):
        EstimatorFile.validate(*landing_file(independent_variance=np.array([0.01, -1.0, 0.4])), "f")
    with pytest.raises(QDriftError, match="independent_variance"):
        EstimatorFile.validate(*landing_file(independent_variance=np.ones((3, 2))), "f")


def test_the_persistent_estimator_with_the_landing_pull_exports_v_and_its_file_pulls_with_it(tmp_path):
    from qdrift_stats.estimators.persistent import PersistentEstimator
    from qdrift_stats.loop import prepared_scheduler
    from qdrift_stats.schedulers import get_adapter
    from tests.conftest import testbed_store

    pair, path = testbed_store(tmp_path, "mixture_vp_noise", "ddim", steps=8, runs=2, batch_size=16)
    fitted = PersistentEstimator(spread="landing", pair=pair).fit(path)
    local = PersistentEstimator(pair=pair).fit(path)
    np.testing.assert_array_equal(fitted.variance, local.variance)  # the same statistic, another pull
    out = tmp_path / "e.safetensors"
    fitted.export(out)
    est = EstimatorFile.load(out)
    assert est.metadata["format_version"] == FORMAT_VERSION_LANDING
    np.testing.assert_array_equal(est.tensors["independent_variance"], fitted.independent_variance)
    grid = get_adapter("ddim").grid(prepared_scheduler(pair, "ddim", 8))
    expected = landing_coefficients(
        fitted.variance,
        fitted.independent_variance,
        grid.a,
        grid.b,
        grid.a_next,
        grid.b_next,
        fitted.residual_fraction,
    )
    np.testing.assert_allclose(est.coefficients(grid), expected, rtol=1e-12)
    # the drift form keeps the local-spread pull
    np.testing.assert_allclose(
        est.coefficients(grid, correction="drift"),
        correction_coefficients(
            fitted.variance, grid.b_next, "drift", 1.0, fitted.residual_fraction, fitted.residual_error
        ),
        rtol=1e-12,
    )
