"""The affine output map (``qdrift_stats.estimators.output_map``): fit, held-out choice, file, corrector.

Values are pinned against maps the test builds itself (a known convolution kernel, a known matrix, a
known per-element offset) and against a held-out share computed by hand on a tiny example.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qdrift_stats import testbed
from qdrift_stats.correct.corrector import AffineOutputMap
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.output_map import (
    MAX_LOCAL_NORM,
    STATE_CANDIDATES,
    candidate_name,
    fit_output_map,
    heldout_shares,
    local_norm,
    pooled_share,
    select_output_map,
    share_jackknife_error,
)
from qdrift_stats.estimators.persistent import PersistentEstimator
from qdrift_stats.loop import prepared_scheduler
from tests.test_output_map_gate import flow_store

SHAPE = (2, 5, 6)  # channels, height, width


def conv(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return F.conv2d(torch.from_numpy(x), torch.from_numpy(kernel), padding=kernel.shape[-1] // 2).numpy()


def test_a_local_map_recovers_a_known_convolution_and_its_inverse_recovers_the_fp_output():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(2, 2, 3, 3)) * 0.02  # a small convolution: the iteration converges
    norm = local_norm(kernel, SHAPE[1:])
    assert norm < MAX_LOCAL_NORM
    offset = rng.normal(size=SHAPE)
    m_fp = rng.normal(size=(400, *SHAPE)) + 3.0
    errors = offset + conv(m_fp - m_fp.mean(axis=0), kernel)
    fitted = fit_output_map([m_fp, m_fp], [errors, errors], "local", kernel=3, ridge=1e-12)
    for i in range(2):
        np.testing.assert_allclose(fitted.weight[i], kernel, atol=1e-8)
        np.testing.assert_allclose(fitted.offset[i], offset, atol=1e-8)
        np.testing.assert_allclose(fitted.center[i], m_fp.mean(axis=0) + offset, atol=1e-8)
    # the corrected output solves m = m_q - offset - K (m - c): the FP output, up to norm^7 of the error
    recovered = fitted.apply(1, m_fp + errors)
    assert np.max(np.abs(recovered - m_fp)) < 1e-3 * np.max(np.abs(errors - offset))


def test_a_full_map_is_inverted_exactly_and_the_mean_map_removes_each_elements_mean():
    rng = np.random.default_rng(1)
    d = 12
    matrix = rng.normal(size=(d, d)) * 0.1
    m_fp = rng.normal(size=(300, d))
    errors = 0.5 + (m_fp - m_fp.mean(axis=0)) @ matrix
    full = fit_output_map([m_fp], [errors], "full", ridge=1e-12)
    np.testing.assert_allclose(full.weight[0], np.eye(d) - np.linalg.inv(np.eye(d) + matrix), atol=1e-8)
    np.testing.assert_allclose(full.offset[0], np.full(d, 0.5), atol=1e-12)
    np.testing.assert_allclose(full.apply(0, m_fp + errors), m_fp, atol=1e-8)
    mean = fit_output_map([m_fp], [errors], "mean")
    assert mean.weight is None
    np.testing.assert_allclose(mean.offset[0], errors.mean(axis=0), atol=1e-15)
    np.testing.assert_allclose(mean.apply(0, m_fp[:3] + 1.0), m_fp[:3] + 1.0 - errors.mean(axis=0), atol=1e-15)


def test_the_ridge_is_relative_to_the_features_mean_square():
    # one feature of mean square s: the slope is K = cov / (s (1 + ridge)), stored as W = 1 - 1 / (1 + K);
    # the same at every scale of the output
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 1))
    x -= x.mean(axis=0)
    y = 0.7 * x
    for scale in (1.0, 1000.0):
        fitted = fit_output_map([scale * x], [scale * y], "full", ridge=0.25)
        assert fitted.weight[0][0, 0] == pytest.approx(1 - 1 / (1 + 0.7 / 1.25), rel=1e-12)


def test_the_held_out_share_of_the_mean_by_hand():
    # 2 runs x 2 samples, 1 element, 1 step, weight 2: each run is predicted by the other run's mean error
    errors = [np.array([[[1.0], [3.0]], [[-1.0], [1.0]]])]  # run 0 mean 2, run 1 mean 0
    m_q = [np.zeros_like(errors[0])]
    shares = heldout_shares(m_q, errors, np.array([2.0]), candidates=(("mean", 0, 0.0),))
    T = 2.0 * np.array([1.0, 3.0, -1.0, 1.0])
    T_hat = 2.0 * np.array([0.0, 0.0, 2.0, 2.0])
    assert shares["mean"] == pytest.approx(1 - np.sum((T - T_hat) ** 2) / np.sum(T**2), rel=1e-12)


def test_the_held_out_share_weights_each_step_by_its_reach_and_knows_an_exact_map():
    rng = np.random.default_rng(3)
    runs, n, steps = 3, 64, 2
    kernel = rng.normal(size=(2, 2, 3, 3)) * 0.3
    m_q = [rng.normal(size=(runs, n, *SHAPE)) for _ in range(steps)]
    # step 0 exactly a local map of m_q, step 1 pure noise independent of m_q
    errors = [conv(m_q[0].reshape(-1, *SHAPE), kernel).reshape(runs, n, *SHAPE), rng.normal(size=(runs, n, *SHAPE))]
    exact = heldout_shares(m_q, errors, np.array([1.0, 0.0]), candidates=(("local", 3, 1e-9),))
    assert exact["local3@1e-09"] == pytest.approx(1.0, abs=1e-6)
    noise_only = heldout_shares(m_q, errors, np.array([0.0, 1.0]), candidates=(("local", 3, 1e-9),))
    assert -0.2 < noise_only["local3@1e-09"] < 0.0  # predicting noise from unrelated outputs only costs


def test_a_state_candidate_knows_an_error_of_the_state_that_the_output_does_not_predict():
    # the error is a known convolution of the state x, and the FP output m is independent of x: regressed on m alone
    # nothing is explained; on (m, x) with the state's channels beside the output's, all of it (local and dense)
    rng = np.random.default_rng(5)
    runs, n = 3, 64
    kernel = rng.normal(size=(2, 2, 3, 3)) * 0.3
    m_fp = [rng.normal(size=(runs, n, *SHAPE))]
    states = [rng.normal(size=(runs, n, *SHAPE))]
    errors = [conv(states[0].reshape(-1, *SHAPE), kernel).reshape(runs, n, *SHAPE)]
    tried = (("local", 3, 1e-9), ("local", 3, 1e-9, True), ("full", 0, 1e-9, True))
    shares = heldout_shares(m_fp, errors, np.array([1.0]), candidates=tried, states=states)
    assert set(shares) == {"local3@1e-09", "local3@1e-09+state", "full@1e-09+state"}
    assert -0.2 < shares["local3@1e-09"] < 0.0
    assert shares["local3@1e-09+state"] == pytest.approx(1.0, abs=1e-6)
    # 60 features per sample and 128 training samples: the dense map is exact up to its conditioning
    assert shares["full@1e-09+state"] == pytest.approx(1.0, abs=1e-3)
    # without states the state candidates are not tried; the plain ones are, with the same share
    plain = heldout_shares(m_fp, errors, np.array([1.0]), candidates=tried)
    assert plain == {"local3@1e-09": shares["local3@1e-09"]}
    assert all(c[3] and c[0] != "mean" for c in STATE_CANDIDATES)
    assert candidate_name("full", 0, 0.3, True) == "full@0.3+state"


def test_a_state_candidate_splits_an_error_that_depends_on_both_the_output_and_the_state():
    # e = K m + L x with dense K, L on a flat sample: the output alone explains K's part, both explain all
    rng = np.random.default_rng(6)
    runs, n, d = 4, 200, 6
    K, L = rng.normal(size=(d, d)) * 0.3, rng.normal(size=(d, d)) * 0.3
    m_fp = [rng.normal(size=(runs, n, d))]
    states = [rng.normal(size=(runs, n, d))]
    errors = [m_fp[0] @ K + states[0] @ L]
    shares = heldout_shares(
        m_fp, errors, np.array([1.0]), candidates=(("full", 0, 1e-9), ("full", 0, 1e-9, True)), states=states
    )
    expected_plain = np.sum(K**2) / (np.sum(K**2) + np.sum(L**2))  # independent unit-variance inputs
    assert shares["full@1e-09"] == pytest.approx(expected_plain, abs=0.03)
    assert shares["full@1e-09+state"] == pytest.approx(1.0, abs=1e-9)


def test_selection_applies_the_best_candidate_only_above_the_threshold():
    rng = np.random.default_rng(4)
    runs, n = 4, 64
    m_q = [rng.normal(size=(runs, n, *SHAPE))]
    kernel = np.zeros((2, 2, 3, 3))
    kernel[0, 1, 1, 1] = 0.3  # channel 0's error is 0.3 of channel 1's output at the same position
    signal = conv(m_q[0].reshape(-1, *SHAPE), kernel).reshape(runs, n, *SHAPE)
    errors = [signal + 0.05 * rng.normal(size=signal.shape)]
    chosen, shares, share_errors = select_output_map(m_q, errors, np.array([1.0]), min_explained=0.1)
    assert chosen is not None and chosen.structure == "local"
    assert chosen.share == shares[chosen.name] == max(shares.values())
    assert chosen.weight[0][0, 1, 1, 1] == pytest.approx(0.3, abs=0.02)
    assert "full@0.1" in shares  # 2 * 5 * 6 = 60 elements per sample: a dense map is tried too
    none, *_ = select_output_map(m_q, errors, np.array([1.0]), min_explained=0.9999)
    assert none is None
    # the jackknife error of every share is measured (runs >= 3) and small against a clear choice
    assert set(share_errors) == set(shares) and 0 < share_errors[chosen.name] < 0.05


def test_theshare_jackknife_error_of_a_held_out_share_drops_one_run_at_a_time():
    # three runs of one sample each: T = 1, 2, 3 and the held-out predictions 0, 2, 2
    T, pred = np.array([[1.0], [2.0], [3.0]]), np.array([[0.0], [2.0], [2.0]])
    assert pooled_share(T, pred) == pytest.approx(1 - 2 / 14)
    # without run 0: 1 - 1/13; without run 1: 1 - 2/10; without run 2: 1 - 1/5
    leave_out = np.array([12 / 13, 8 / 10, 4 / 5])
    expected = np.sqrt(2 / 3 * np.sum((leave_out - leave_out.mean()) ** 2))
    assert share_jackknife_error(T, pred) == pytest.approx(expected, rel=1e-12)
    assert np.isnan(share_jackknife_error(T[:2], pred[:2]))  # two runs: no jackknife


def test_the_corrector_map_equals_the_fitted_map():
    rng = np.random.default_rng(5)
    m_fp = rng.normal(size=(50, *SHAPE))
    errors = 0.1 * m_fp + conv(m_fp, rng.normal(size=(2, 2, 3, 3)) * 0.01) + 0.2
    for structure, kernel in (("local", 3), ("full", 0), ("mean", 0)):
        fitted = fit_output_map([m_fp, 2 * m_fp], [errors, errors], structure, kernel, ridge=0.01)
        applied = AffineOutputMap(structure, fitted.center, fitted.offset, fitted.weight, dtype=torch.float64)
        for i, x in enumerate((m_fp, 2 * m_fp)):
            m_q = x[:7] + errors[:7]
            got = applied(i, torch.from_numpy(m_q)).numpy()
            np.testing.assert_allclose(got, fitted.apply(i, m_q), atol=1e-12, err_msg=structure)
    with pytest.raises(QDriftError, match="fitted for samples of shape"):
        applied(0, torch.zeros(3, 2, 5, 7, dtype=torch.float64))


def map_store(slope: float, noise: float, steps: int = 6, runs: int = 3, batch: int = 96, seed: int = 0):
    """A flow-Euler store of 8-element samples whose error is ``slope * (m_fp's previous element) + noise * z``."""

    def draw(rng):
        m_fp = rng.standard_normal((steps, batch, 8))
        return slope * np.roll(m_fp, 1, axis=-1) + noise * rng.standard_normal((steps, batch, 8)), m_fp

    return flow_store(draw, steps, runs, "synthetic-map", seed)


def test_the_default_applies_a_map_that_explains_the_error_and_fits_the_statistic_to_what_is_left(tmp_path):
    ds = map_store(slope=0.4, noise=0.01)
    fitted = PersistentEstimator(path="fp").fit(ds)  # bias="map" is the default
    assert fitted.output_map is not None and fitted.output_map.structure == "full"
    assert fitted.output_terms == (f"map:{fitted.output_map.name}",)
    # K = 0.4 / (1 + ridge) times the shift (x_flat @ shift = roll(x, 1)), stored as W = I - (I + K)^{-1}
    shift = np.roll(np.eye(8), 1, axis=1)
    K = 0.4 / (1 + fitted.output_map.ridge) * shift
    np.testing.assert_allclose(fitted.output_map.weight[0], np.eye(8) - np.linalg.inv(np.eye(8) + K), atol=0.03)
    plain = PersistentEstimator(bias="none", path="fp").fit(ds)
    assert np.all(fitted.independent_variance[:-1] < 0.1 * plain.independent_variance[:-1])
    fitted.export(tmp_path / "map.safetensors")
    loaded = EstimatorFile.load(tmp_path / "map.safetensors")
    assert loaded.metadata["format_version"] == 2
    assert loaded.metadata["estimator"]["output_map"]["structure"] == "full"
    sched = prepared_scheduler(testbed.mixture_flow_noise(), "flow-euler", 6)
    corrector = loaded.corrector(sched, dtype=torch.float64)
    assert all(corrector.output_active)
    m_q = ds["delta_out"].values[0, 2, :5] + ds["out_fp"].values[0, 2, :5]
    got = corrector.correct_output(2, torch.from_numpy(m_q)).numpy()
    np.testing.assert_allclose(got, fitted.output_map.apply(2, m_q), atol=1e-10)
    assert "affine output map: full@" in fitted.summary()


def test_the_default_leaves_unrelated_noise_alone():
    fitted = PersistentEstimator(path="fp").fit(map_store(slope=0.0, noise=0.3))
    assert fitted.output_map is None and fitted.output_terms == ()
    assert max(fitted.map_shares.values()) < 0.1
    assert "not applied" in fitted.summary()


def test_files_with_a_broken_or_unversioned_map_are_refused(tmp_path):
    fitted = PersistentEstimator(path="fp").fit(map_store(slope=0.4, noise=0.01))
    good = EstimatorFile.from_fitted(fitted)
    tensors, metadata = dict(good.tensors), json.loads(json.dumps(good.metadata))
    EstimatorFile.validate(tensors, metadata)
    cases = [
        ({**tensors, "map_weight": tensors["map_weight"][:, :4]}, metadata, "map_weight has shape"),
        ({k: v for k, v in tensors.items() if k != "map_offset"}, metadata, "needs the tensors map_center"),
        (tensors, {**metadata, "format_version": 1}, "needs estimator format version 2"),
        (tensors, {**metadata, "estimator": {**metadata["estimator"], "output_map": {"structure": "big"}}}, "known"),
        ({**tensors, "map_center": tensors["map_center"] * np.nan}, metadata, "must be finite"),
    ]
    for bad_tensors, bad_metadata, message in cases:
        with pytest.raises(QDriftError, match=message):
            EstimatorFile.validate(bad_tensors, bad_metadata, "f")


def test_candidate_names():
    assert candidate_name("mean", 0, 0.0) == "mean"
    assert candidate_name("local", 5, 0.1) == "local5@0.1"
    assert candidate_name("full", 0, 1.0) == "full@1"
    with pytest.raises(QDriftError, match="unknown output map structure"):
        fit_output_map([np.zeros((3, 4))], [np.zeros((3, 4))], "global")
    with pytest.raises(QDriftError, match="does not fit samples of shape"):
        fit_output_map([np.zeros((3, 4))], [np.zeros((3, 4))], "local", kernel=3)


def test_the_local_norm_is_the_convolutions_spectral_norm():
    # a 1x1 kernel mixing 2 channels is a 2x2 matrix at every position: its largest singular value
    matrix = np.array([[0.3, 0.4], [0.0, 0.2]])
    kernel = matrix[:, :, None, None]
    assert local_norm(kernel, (4, 5)) == pytest.approx(np.linalg.svd(matrix, compute_uv=False)[0], rel=1e-6)
    # a 1-channel 3-tap kernel [a, b, a] on a long row: close to |b| + 2|a| (the symbol's maximum)
    kernel = np.zeros((1, 1, 3, 3))
    kernel[0, 0, 1] = [0.1, 0.2, 0.1]
    assert local_norm(kernel, (1, 400), iterations=400) == pytest.approx(0.4, rel=1e-3)


def test_chunked_fits_and_scores_equal_the_unchunked_ones(monkeypatch):
    import qdrift_stats.estimators.output_map as output_map

    rng = np.random.default_rng(6)
    m_fp = [rng.normal(size=(3, 10, *SHAPE)) for _ in range(2)]
    errors = [0.2 * m + 0.1 * rng.normal(size=m.shape) for m in m_fp]
    weights = np.array([1.0, 0.5])
    whole = heldout_shares(m_fp, errors, weights)
    fitted = fit_output_map([m.reshape(-1, *SHAPE) for m in m_fp], [e.reshape(-1, *SHAPE) for e in errors], "local", 3)
    monkeypatch.setattr(output_map, "MAX_FEATURE_VALUES", 1700)  # 3 samples per chunk: 10 per run is uneven
    assert output_map._chunks(10, "local", 3, SHAPE)[-1] == slice(9, 10)
    chunked = heldout_shares(m_fp, errors, weights)
    assert chunked.keys() == whole.keys()
    for name in whole:
        assert chunked[name] == pytest.approx(whole[name], abs=1e-12)
    again = fit_output_map([m.reshape(-1, *SHAPE) for m in m_fp], [e.reshape(-1, *SHAPE) for e in errors], "local", 3)
    np.testing.assert_allclose(again.weight, fitted.weight, atol=1e-12)
