import numpy as np
import pytest
import xarray as xr

from qdrift_stats import testbed
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import EmpiricalEstimator, get_estimator
from qdrift_stats.record.lockstep import record

from .conftest import VP_PAIR


@pytest.fixture(scope="module")
def euler_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("est") / "euler.zarr"
    record(
        testbed.mixture_vp_noise(),
        path,
        pair_name=VP_PAIR,
        scheduler_name="euler",
        steps=10,
        runs=5,
        batch_size=64,
        seed=0,
    )
    return path


def true_variance(ds):
    """Ground truth for Euler with noise-like error: Delta_i = dsigma_i * A sin(.), E sin^2 = 1/2."""
    amplitude = testbed.NOISE_AMPLITUDE["vp"]
    return (ds["b_next"].values - ds["b"].values) ** 2 * amplitude**2 / 2


def test_empirical_estimate_matches_the_analytic_variance(euler_store):
    fitted = EmpiricalEstimator().fit(euler_store)
    truth = true_variance(xr.open_zarr(euler_store))
    np.testing.assert_allclose(fitted.variance, truth, rtol=0.06)
    assert fitted.variance.shape == (10,) and fitted.num_runs == 5
    # the interval's construction is pinned exactly in tests/test_pinned.py, its coverage sized in
    # test_estimators_more.py::test_intervals_cover_the_true_variance_over_seeds


def test_per_channel_estimate_averages_to_the_scalar_one(euler_store):
    scalar = EmpiricalEstimator().fit(euler_store)
    per_channel = get_estimator("per-channel").fit(euler_store)
    assert per_channel.variance.shape == (10, 8)
    np.testing.assert_allclose(per_channel.variance.mean(axis=1), scalar.variance, rtol=1e-10)


def test_summary_and_dataset_are_readable(euler_store):
    fitted = EmpiricalEstimator().fit(euler_store)
    text = fitted.summary()
    assert "empirical" in text and "euler" in text and "95% CI" in text and len(text.splitlines()) == 3 + 10
    ds = fitted.to_dataset()
    assert set(ds.data_vars) >= {"variance", "ci_low", "ci_high", "per_run"} and ds["per_run"].dims == ("run", "step")


def test_one_run_gives_an_estimate_without_interval(tmp_path):
    path = tmp_path / "one.zarr"
    record(
        testbed.mixture_vp_noise(),
        path,
        pair_name=VP_PAIR,
        scheduler_name="ddim",
        steps=3,
        runs=1,
        batch_size=8,
        seed=0,
    )
    fitted = EmpiricalEstimator().fit(path)
    assert np.all(np.isfinite(fitted.variance)) and np.all(np.isnan(fitted.ci_low))


def test_unknown_estimator_name_is_refused():
    with pytest.raises(QDriftError, match="unknown estimator"):
        get_estimator("bogus")
