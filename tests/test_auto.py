"""The automatic choice: cross-validation over calibration runs, never worse than Q on the held-out score."""

import numpy as np
import pytest

from qdrift_stats import testbed
from qdrift_stats.correct.auto import AutoEstimator, distribution_score, local_bandwidth, segment_index
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import get_estimator
from qdrift_stats.record.lockstep import record

PAIR = "qdrift_stats.testbed:mixture_vp_noise"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("auto") / "c.zarr"
    record(
        testbed.mixture_vp_noise(), path, pair_name=PAIR, scheduler_name="ddim", steps=8, runs=3, batch_size=32, seed=0
    )
    return path


def test_segments_split_the_corrected_steps_by_level_noisiest_first():
    b = np.array([10.0, 5.0, 2.0, 1.0, 0.5, 0.0])
    np.testing.assert_array_equal(segment_index(b, 2), [0, 0, 0, 1, 1, -1])
    np.testing.assert_array_equal(segment_index(b, 1), [0, 0, 0, 0, 0, -1])


def test_the_score_sees_a_shift_and_not_a_resample():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((400, 4)), rng.standard_normal((400, 4))
    h = local_bandwidth(a)
    same, shifted = distribution_score(b, a, "mmd", h), distribution_score(b + 1.0, a, "mmd", h)
    assert abs(same) < 0.002 < 0.01 < shifted
    assert distribution_score(b + 1.0, a, "energy") > distribution_score(b, a, "energy")
    assert distribution_score(np.full((10, 4), np.nan), a) == float("inf")


def test_auto_never_picks_a_correction_scoring_worse_than_q_and_exports_its_profile(store, tmp_path):
    fitted = AutoEstimator(
        candidates=("first-order",), forms=("shrink",), strengths=(0.0, 1.0, 4.0), pair=testbed.mixture_vp_noise()
    ).fit(store)
    c = fitted.choice
    assert c["score"] <= c["q_score"]
    assert len(c["profile"]) == 2 and len(c["segment_b"]) == 2
    base = get_estimator("first-order").fit(store)
    lam = np.array([c["profile"][s] if s >= 0 else 0.0 for s in segment_index(base.b_next, 2)])
    np.testing.assert_allclose(fitted.variance, base.variance * lam if c["estimator"] else 0.0)
    est = fitted.export(tmp_path / "auto.safetensors")
    loaded = EstimatorFile.load(tmp_path / "auto.safetensors")
    assert loaded.metadata["estimator"]["auto"]["estimator"] == c["estimator"]
    assert est.form == c["form"]
    assert "automatic choice" in fitted.summary()
    # every trial's score is recorded; the chosen one is the best of them (or Q's)
    assert min([t["score"] for t in fitted.trials] + [c["q_score"]]) == pytest.approx(c["score"])


def test_auto_refuses_one_run_and_never_imports_the_pair_named_in_the_store(store):
    import xarray as xr

    ds = xr.open_zarr(store)
    with pytest.raises(QDriftError):
        AutoEstimator(pair=testbed.mixture_vp_noise()).fit(ds.isel(run=[0]))
    with pytest.raises(QDriftError, match="--pair"):
        AutoEstimator().fit(ds)  # the store names a real pair; it is still not imported
    with pytest.raises(QDriftError):
        AutoEstimator(score="likelihood")
