"""The cross term with the deviation the state carries (issue 12, flow weight error).

Expected values are closed forms derived here (Gaussian moments, linear maps), not read from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from qdrift_stats.estimators.persistent import PersistentEstimator, carried_cross_terms
from qdrift_stats.record.lockstep import record
from qdrift_stats.testbed.errors import WeightError
from qdrift_stats.testbed.mixture import GaussianMixture, MixturePair

# a three-step grid: input levels b, landing levels b_next (= the next input), residual fractions rho
B = np.array([0.9, 0.6, 0.3])
B_NEXT = np.array([0.6, 0.3, 0.1])
RHO = np.array([0.95, 0.7, 0.3])


def spreads() -> tuple[np.ndarray, np.ndarray]:
    """``S_i = b_i / sqrt(rho_i)`` at each input and ``S_{i+1}`` at each landing (the last step keeps its rho)."""
    rho_next = np.append(RHO[1:], RHO[-1])
    return B / np.sqrt(RHO), B_NEXT / np.sqrt(rho_next)


def test_the_state_term_is_the_coupling_of_an_error_linear_in_the_deviation():
    # y_i ~ N(0, S_i^2) (the local deviation, fresh at each step), residual rho_i y_i, Delta_i = kappa_i y_i + noise.
    # The deviation at the landing is (S_{i+1} / S_i) y_i, so E[y_{i+1} Delta_i] = kappa_i S_i S_{i+1}; the
    # sibling's error kappa_i y' (a fresh deviation) is uncorrelated with y_i; earlier steps' errors are
    # independent of this step's, so the accumulated term is 0.
    rng = np.random.default_rng(0)
    n, kappa = 400_000, np.array([0.02, -0.05, 0.1])
    s_in, s_out = spreads()
    y = rng.standard_normal((3, 1, n)) * s_in[:, None, None]
    delta = kappa[:, None, None] * y + 0.01 * rng.standard_normal((3, 1, n))
    sibling = kappa[:, None, None] * rng.standard_normal((3, 1, n)) * s_in[:, None, None]
    out = carried_cross_terms(delta, sibling, RHO[:, None, None] * y, RHO, B, B_NEXT)
    expected = kappa * s_in * s_out
    for i in range(3):
        assert out["state"][i, 0] == pytest.approx(expected[i], abs=4 * out["state_se"][i, 0]), i
        assert out["state_se"][i, 0] < 0.05 * abs(expected[i]), i
        assert abs(out["accumulated"][i, 0]) < 4 * out["accumulated_se"][i, 0] + 1e-12, i
    np.testing.assert_allclose(out["state_total"], [np.sum(expected / s_out**2)], rtol=0.05)


@pytest.mark.parametrize("shared", [False, True])
def test_the_accumulated_term_counts_an_error_persistent_along_a_trajectory_but_not_a_shared_shift(shared):
    # Delta_i = c_i g with g ~ N(0, 1) fixed along each trajectory. Carried as the local spread, the earlier
    # perturbations sum to D_{i+1} = sum_{j<i} c_j g S_{i+1} / S_{j+1}, so
    # E[D_{i+1} Delta_i] = c_i sum_{j<i} c_j S_{i+1} / S_{j+1}. If the sibling (same local mean, fresh deviation)
    # meets a fresh error, that is the accumulated term. If it meets the same error, the error is a shift of the
    # whole component, not spread: 0.
    rng = np.random.default_rng(1)
    n, c = 400_000, np.array([0.03, 0.02, 0.05])
    s_in, s_out = spreads()
    g = rng.standard_normal((1, n))
    delta = c[:, None, None] * g[None]
    sibling = delta.copy() if shared else c[:, None, None] * rng.standard_normal((3, 1, n))
    residual = RHO[:, None, None] * rng.standard_normal((3, 1, n)) * s_in[:, None, None]
    out = carried_cross_terms(delta, sibling, residual, RHO, B, B_NEXT)
    for i in range(3):
        expected = 0.0 if shared else c[i] * sum(c[j] * s_out[i] / s_out[j] for j in range(i))
        assert out["accumulated"][i, 0] == pytest.approx(expected, rel=0.03, abs=1e-12), i


def test_a_step_landing_on_zero_has_no_cross_term():
    rng = np.random.default_rng(2)
    delta = rng.standard_normal((3, 1, 1000))
    out = carried_cross_terms(delta, 0 * delta, delta, RHO, B, np.array([0.6, 0.3, 0.0]))
    assert out["state"][2, 0] == 0.0 and out["accumulated"][2, 0] == 0.0


def test_the_statistic_follows_the_spread_a_linear_weight_error_adds_per_step(tmp_path):
    # One Gaussian mode N(0, s^2 I) in flow matching, a weight error m_q = m_fp + A W x. The exact denoiser is
    # linear, so each flow-Euler step maps the state linearly: FP x_{i+1} = L_i x_i with
    # L_i = 1 + (b_{i+1} - b_i)(b_i - a_i s^2) / (a_i^2 s^2 + b_i^2), Q x_{i+1} = M_i x_i with
    # M_i = L_i I + (b_{i+1} - b_i) A W. Starting from Sigma_0 = I, the quantized sampler's covariance is
    # Sigma_{i+1} = M_i Sigma_i M_i^T, and the spread step i adds beyond what the FP map carries is
    # w_i = (tr(M_i Sigma_i M_i^T) - L_i^2 tr Sigma_i) / d. The estimator (no bias term, so nothing is taken out of
    # the error first) must find it at each step where it is not negligible, and in total.
    s, d, amplitude, steps = 0.3, 8, 0.15, 10
    mixture = GaussianMixture(torch.zeros(1, d, dtype=torch.float64), s, torch.ones(1, dtype=torch.float64))
    error = WeightError(d, amplitude=amplitude)
    pair = MixturePair(mixture, kind="flow", error=error)
    path = record(
        pair,
        tmp_path / "w.zarr",
        pair_name="tests:one_mode_weight",
        scheduler_name="flow-euler",
        steps=steps,
        runs=4,
        batch_size=256,
        seed=0,
    )
    store = xr.open_zarr(path)
    fit = PersistentEstimator(bias="none", cross="carried", pair=pair).fit(path)
    a, b, b_next = (np.asarray(store[k].values, dtype=np.float64) for k in ("a", "b", "b_next"))
    W = error._W.numpy()
    sigma = np.eye(d)
    exact = np.zeros(steps)
    for i in range(steps):
        dt = b_next[i] - b[i]
        L = 1.0 + dt * (b[i] - a[i] * s * s) / (a[i] ** 2 * s * s + b[i] ** 2)
        M = L * np.eye(d) + dt * amplitude * W
        after = M @ sigma @ M.T
        exact[i] = (np.trace(after) - L * L * np.trace(sigma)) / d
        sigma = after
    active = b_next > 0
    big = active & (np.abs(exact) > 0.2 * np.max(np.abs(exact[active])))
    np.testing.assert_allclose(fit.variance[big], exact[big], rtol=0.25)
    assert np.sum(fit.variance[active]) == pytest.approx(np.sum(exact[active]), rel=0.1)


def test_an_unknown_cross_term_is_refused():
    from qdrift_stats.errors import QDriftError

    with pytest.raises(QDriftError, match="cross term"):
        PersistentEstimator(cross="sideways")


def test_the_sibling_share_is_removed_only_where_the_sibling_meets_the_same_error():
    # products d * Delta less beta d * Delta': an error the sibling shares fully is removed, an unrelated one kept
    from qdrift_stats.estimators.persistent import explained_by_sibling

    rng = np.random.default_rng(3)
    d = rng.standard_normal((1, 50_000))
    own = 0.5 * d + rng.standard_normal((1, 50_000))  # E[d * Delta] = 0.5
    np.testing.assert_allclose(explained_by_sibling(d, own, own), 0.0, atol=1e-12)
    kept = explained_by_sibling(d, own, rng.standard_normal((1, 50_000)))
    assert np.mean(kept) == pytest.approx(0.5, abs=0.03)


def test_the_default_takes_the_carried_cross_term_also_where_no_output_map_applies(tmp_path):
    # The low-frequency sine is not a function of the output (no affine map passes), so "auto" (the default before)
    # takes the accumulated term there; the default takes the carried one everywhere (docs/results.md, "The same
    # cells over independent calibrations").
    from tests.conftest import testbed_store

    pair, path = testbed_store(tmp_path, "mixture_flow_lowfreq", "flow-euler", steps=10, runs=3, batch_size=32)
    default = PersistentEstimator(pair=pair).fit(path)
    carried = PersistentEstimator(cross="carried", pair=pair).fit(path)
    auto = PersistentEstimator(cross="auto", pair=pair).fit(path)
    accumulated = PersistentEstimator(cross="accumulated", pair=pair).fit(path)
    assert auto.output_map is None and default.output_map is None
    assert (default.cross_used, auto.cross_used) == ("carried", "accumulated")
    np.testing.assert_array_equal(default.variance, carried.variance)
    np.testing.assert_array_equal(auto.variance, accumulated.variance)
    assert not np.array_equal(default.variance, auto.variance)
    assert "cross term with the deviation the state carries" in default.summary()
    assert "cross term with the earlier perturbations" in auto.summary()
