"""The PTQD output map (``bias="ptqd"``, the default before the affine map): its slope and its mean, each
decided on the whole trajectory.

``output_map_shares`` is pinned against hand arithmetic; the fit against stores whose error is a known
per-step offset or a known linear function of the FP output.
"""

import json

import numpy as np
import pytest
import xarray as xr

from qdrift_stats import testbed
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import get_estimator
from qdrift_stats.estimators.persistent import PersistentEstimator, output_map_shares
from qdrift_stats.loop import prepared_scheduler
from qdrift_stats.record.store import run_dataset
from qdrift_stats.schedulers.base import output_gains, scheduler_identity, step_grid

RUNS, BATCH, DIM, STEPS = 3, 128, 4, 6


def flow_store(draw, steps: int, runs: int, name: str, seed: int = 0) -> xr.Dataset:
    """A flow-Euler store on the testbed's grid whose run ``r`` holds ``draw(rng) -> (e, m_fp)``, each
    ``(steps, batch, dim)``: the output error and the FP output."""
    pair = testbed.mixture_flow_noise()
    sched = prepared_scheduler(pair, "flow-euler", steps)
    grid = step_grid(sched)
    gains = output_gains("flow-euler", pair.scheduler_config, steps)
    coords = {"timestep": grid.timesteps, "a": grid.a, "b": grid.b, "a_next": grid.a_next, "b_next": grid.b_next}
    attrs = {
        "scheduler": "flow-euler",
        "scheduler_config": json.dumps(scheduler_identity(sched)["config"]),
        "prediction_type": grid.prediction_type,
        "pair": name,
    }
    rng = np.random.default_rng(seed)
    parts = []
    for r in range(runs):
        e, out_fp = draw(rng)
        arrays = {"delta_x": gains[:, None, None] * e, "delta_out": e, "out_fp": out_fp}
        parts.append(run_dataset(arrays, r, r, coords, attrs))
    ds = xr.concat(parts, dim="run").assign_coords(gain=("step", gains))
    return ds.assign_attrs(attrs)


def linear_store(slope: float, offsets: np.ndarray, noise: float, seed: int = 0) -> xr.Dataset:
    """A flow-Euler store whose output error is ``slope * m_fp + offsets[i] + noise * z``."""

    def draw(rng):
        out_fp = rng.standard_normal((STEPS, BATCH, DIM))
        e = slope * out_fp + offsets[:, None, None] + noise * rng.standard_normal((STEPS, BATCH, DIM))
        return e, out_fp

    return flow_store(draw, STEPS, RUNS, "synthetic-linear", seed)


def test_output_map_share_of_two_steps_by_hand_without_propagation():
    errors = [np.array([[1.0, 3.0]]), np.array([[2.0, -2.0]])]
    outputs = [np.array([[0.0, 2.0]]), np.array([[5.0, 1.0]])]
    grid = {}
    # P = 1 (no prediction type); explained = 1 * (m_fp,0 - mean) = [-1, 1]; total = [3, 1];
    # the mean errors 2 and 0 shift every position by 2
    mean_share, slope_share = output_map_shares(errors, outputs, np.array([1.0, 0.0]), np.array([1.0, 1.0]), grid, None)
    assert slope_share == pytest.approx((1 + 1) / (9 + 1), rel=1e-12)
    assert mean_share == pytest.approx(4 / 5, rel=1e-12)


def test_output_map_share_propagates_each_step_to_the_final_state():
    # epsilon: A_i = a_{i+1} / a_i = [1.6, 1.25], so P = [A_1, 1] = [1.25, 1]
    grid = {
        "a": np.array([0.5, 0.8]),
        "b": np.sqrt(1 - np.array([0.5, 0.8]) ** 2),
        "a_next": np.array([0.8, 1.0]),
        "b_next": np.sqrt(1 - np.array([0.8, 1.0]) ** 2),
    }
    errors = [np.array([[1.0, -1.0]]), np.array([[0.5, 0.5]])]
    outputs = [np.array([[2.0, 0.0]]), np.array([[0.0, 0.0]])]
    gain = np.array([2.0, 3.0])
    mean_share, slope_share = output_map_shares(errors, outputs, np.array([0.5, 0.0]), gain, grid, "epsilon")
    total = 1.25 * 2.0 * np.array([1.0, -1.0]) + 3.0 * np.array([0.5, 0.5])  # [4, -1]
    explained = 1.25 * 2.0 * 0.5 * np.array([1.0, -1.0])  # [1.25, -1.25]
    shift = 1.25 * 2.0 * 0.0 + 3.0 * 0.5
    assert slope_share == pytest.approx(np.mean(explained**2) / np.mean(total**2), rel=1e-12)
    assert mean_share == pytest.approx(shift**2 / np.mean(total**2), rel=1e-12)


def test_a_pure_offset_is_removed_as_each_steps_mean_and_no_slope_is_applied():
    offsets = np.linspace(-0.3, 0.4, STEPS)
    fitted = PersistentEstimator(bias="ptqd", path="fp").fit(linear_store(0.0, offsets, noise=0.01))
    assert fitted.output_terms == ("mean",) and fitted.output_map_shares[1] < 0.01
    np.testing.assert_array_equal(fitted.k, np.zeros(STEPS))
    # the mean of 3 x 128 x 4 values with noise 0.01: within 5e-3 of the offset at every step
    np.testing.assert_allclose(fitted.mu, offsets, atol=5e-3)


def test_an_error_linear_in_the_output_gets_the_slope_and_the_intercept():
    offsets = np.full(STEPS, 0.1)
    ds = linear_store(0.5, offsets, noise=0.05)
    fitted = PersistentEstimator(bias="ptqd", path="fp").fit(ds)
    # flow: P = 1; per element the final deviation is sum_i g_i (0.5 m_i + 0.1 + 0.05 z_i), the slope's part
    # sum_i g_i 0.5 m_i: share = 0.25 S2 / (0.25 S2 + 0.01 S1^2 + 0.0025 S2), S1 = sum g, S2 = sum g^2
    g = ds["gain"].values
    s1, s2 = g.sum(), (g**2).sum()
    assert fitted.output_terms == ("mean", "slope")
    assert fitted.output_map_shares[1] == pytest.approx(0.25 * s2 / (0.25 * s2 + 0.01 * s1**2 + 0.0025 * s2), rel=0.05)
    np.testing.assert_allclose(fitted.k, np.full(STEPS, 0.5), atol=0.01)
    np.testing.assert_allclose(fitted.mu, offsets, atol=0.01)
    assert "slope and intercept are applied" in fitted.summary()


def test_below_the_threshold_the_same_error_keeps_only_its_mean():
    ds = linear_store(0.5, np.full(STEPS, 0.1), noise=0.05)
    # the mean's share here is 0.01 S1^2 / E T^2, well below 0.3; the slope's about 0.8
    fitted = PersistentEstimator(bias="ptqd", path="fp", min_explained=0.9).fit(ds)
    assert fitted.output_terms == ()
    np.testing.assert_array_equal(fitted.k, np.zeros(STEPS))
    np.testing.assert_array_equal(fitted.mu, np.zeros(STEPS))
    assert "neither is applied" in fitted.summary()
    offset = linear_store(0.0, np.full(STEPS, 0.3), noise=0.05)
    fitted = PersistentEstimator(bias="ptqd", path="fp", min_explained=0.9).fit(
        offset
    )  # a shift is ~97% of the deviation
    assert fitted.output_terms == ("mean",)
    np.testing.assert_array_equal(fitted.k, np.zeros(STEPS))
    means = [float(offset["delta_out"].isel(step=i).mean()) for i in range(STEPS)]
    np.testing.assert_allclose(fitted.mu, means, rtol=1e-9, atol=1e-12)
    assert "mean error is removed" in fitted.summary()


def test_persistent_ptqd_always_applies_the_slope_and_bad_thresholds_are_refused():
    assert get_estimator("persistent-ptqd").min_explained == 0.0
    assert get_estimator("persistent").min_explained == 0.1
    with pytest.raises(QDriftError, match="min_explained"):
        PersistentEstimator(min_explained=1.5)
