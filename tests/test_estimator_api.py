"""The Estimator base (parameters from __init__, clone, pooling flag), typed fitted results, export
beside the estimator file, and cross-validation of a configured estimator instance."""

import json

import numpy as np
import pytest

from qdrift_stats import testbed
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import (
    ESTIMATORS,
    DecomposedFit,
    EmpiricalEstimator,
    Estimator,
    MomentEstimator,
    RobustEstimator,
    SmoothFit,
    SmoothGLMEstimator,
    get_estimator,
    registered_name,
)
from qdrift_stats.record.lockstep import record
from qdrift_stats.validate.crossval import cross_validate
from qdrift_stats.validate.learning_curve import learning_curve

PAIR = "qdrift_stats.testbed:mixture_vp_noise"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "calib.zarr"
    record(
        testbed.mixture_vp_noise(), path, pair_name=PAIR, scheduler_name="euler", steps=5, runs=5, batch_size=16, seed=0
    )
    return path


def test_every_registered_estimator_subclasses_the_base_and_has_a_name():
    for name in ESTIMATORS:
        est = get_estimator(name)
        assert isinstance(est, Estimator) and est.name, name


def test_parameters_are_read_from_init_and_clone_keeps_them():
    est = RobustEstimator(c=2.5, method="huber")
    assert est.get_params() == {
        "method": "huber",
        "c": 2.5,
        "ci": "t",
        "confidence": 0.95,
        "bootstrap": 2000,
        "max_points": 100_000,
        "seed": 0,
        "statistic": "lockstep",
    }
    copy = est.clone()
    assert copy is not est and type(copy) is RobustEstimator and copy.get_params() == est.get_params()
    assert repr(est).startswith("RobustEstimator(method='huber', c=2.5")


def test_recorded_parameters_keep_the_estimator_file_format():
    """The JSON ``params`` written to estimator files (format v1): the ``__init__`` parameters, plus
    a smooth GLM's fixed ``model`` entry, minus what is not JSON (the moment estimator's pair)."""
    first_order = get_estimator("first-order")
    assert first_order.params == {"per_channel": False, "confidence": 0.95, "statistic": "first-order"}
    glm = get_estimator("smooth-glm")
    assert list(glm.params) == ["df", "confidence", "cov_type", "statistic", "model"]
    assert glm.params["model"] == "gamma-glm-log-link-bspline"
    assert {k: v for k, v in glm.params.items() if k != "model"} == glm.get_params()
    # the moment estimator's pair is a parameter (clone keeps it) but is not recorded
    pair = testbed.mixture_vp_noise()
    moment = MomentEstimator(pair=pair)
    assert moment.params == {"form": "shrink", "min_factor": 0.5, "confidence": 0.95}
    assert moment.clone().pair is pair
    for name in ESTIMATORS:  # every recorded parameter set is JSON
        json.dumps(get_estimator(name).params)


def test_pooling_flag_replaces_type_checks():
    assert get_estimator("empirical").pools_runs and get_estimator("robust").pools_runs
    assert not any(get_estimator(n).pools_runs for n in ("decomposed", "smooth-glm", "smooth-lowess", "moment"))


def test_registered_name_of_a_configured_instance():
    assert registered_name(EmpiricalEstimator(statistic="first-order")) == "first-order"
    assert registered_name(RobustEstimator(method="mad")) == "robust-mad"
    assert registered_name(RobustEstimator(c=2.5)) is None


def test_fitted_results_carry_typed_fields(store):
    decomposed = get_estimator("decomposed").fit(store)
    assert isinstance(decomposed, DecomposedFit)
    steps = decomposed.num_steps
    assert decomposed.applied.shape == (steps,) and decomposed.applied.dtype == bool
    assert decomposed.k_ci.shape == (steps, 2) and isinstance(decomposed.notes, list)
    smooth = SmoothGLMEstimator().fit(store)
    assert isinstance(smooth, SmoothFit) and smooth.df_used is not None and smooth.curve_log_kappa is None
    assert set(smooth.export_tensors()) == {"curve_log_b", "curve_log_u"}
    assert not hasattr(smooth, "extra")


def test_from_fitted_writes_a_v1_file_with_the_smooth_curves(store, tmp_path):
    fitted = SmoothGLMEstimator().fit(store)
    est = EstimatorFile.from_fitted(fitted, correction="drift", strength=0.5, provenance={"store": "x"})
    path = tmp_path / "e.safetensors"
    est.save(path)
    loaded = EstimatorFile.load(path)
    assert loaded.metadata["format_version"] == 1 and loaded.metadata["estimator"]["smooth"] is True
    assert loaded.metadata["estimator"]["smooth_model"]["covariate"] == "log b"
    assert loaded.metadata["correction"] == {"form": "drift", "strength": 0.5}
    np.testing.assert_array_equal(loaded.tensors["curve_log_u"], fitted.curve_log_u)
    np.testing.assert_array_equal(loaded.tensors["variance"], fitted.variance)


class CountingEstimator(EmpiricalEstimator):
    """An empirical estimator that is refitted per split (no pooling) and counts its fits."""

    name = "counting"
    pools_runs = False
    fits: list[dict] = []

    def fit(self, store):
        CountingEstimator.fits.append(self.get_params())
        return super().fit(store)


def test_cross_validation_clones_a_configured_instance_per_split(store):
    CountingEstimator.fits.clear()
    est = CountingEstimator(statistic="first-order", confidence=0.9)
    result = cross_validate(est, store, counts=[2], n_splits=3, strength=False)
    # one all-runs fit plus one per split, each with the instance's parameters
    assert len(CountingEstimator.fits) == 1 + 3
    assert all(p == est.get_params() for p in CountingEstimator.fits)
    assert not result.dataset.attrs["fast_path"]
    assert json.loads(result.dataset.attrs["estimator_params"])["confidence"] == 0.9


def test_a_configured_robust_estimator_is_cross_validated_with_its_own_parameters(store):
    est = RobustEstimator(c=2.5)
    result = cross_validate(est, store, counts=[1, 4], n_splits=4, strength=False)
    np.testing.assert_allclose(result.dataset["v_all"].values, RobustEstimator(c=2.5).fit(store).variance)
    assert result.dataset.attrs["estimator"] == repr(est)  # not a registered configuration: named by repr
    assert json.loads(result.dataset.attrs["estimator_params"])["c"] == 2.5


def test_learning_curve_alone_equals_the_cross_validation_without_strength(store):
    curve = learning_curve("empirical", store, counts=[1, 3], n_splits=5)
    cv = cross_validate("empirical", store, counts=[1, 3], n_splits=5, strength=False).dataset
    for name in ("rel_error", "rel_error_vs_all", "heldout_loglik", "rel_error_step", "v_all"):
        np.testing.assert_array_equal(curve[name].values, cv[name].values)


def test_cross_validate_refuses_what_is_not_an_estimator(store):
    with pytest.raises(QDriftError, match="expected an estimator"):
        cross_validate(object(), store, strength=False)
    with pytest.raises(QDriftError, match="unknown estimator"):
        cross_validate("no-such", store, strength=False)


def test_with_params_rebuilds_through_init_and_refuses_unknown_names():
    est = RobustEstimator(c=2.5).with_params(method="mad")
    assert est.get_params()["method"] == "mad" and est.get_params()["c"] == 2.5
    with pytest.raises(QDriftError, match="no parameter pair"):
        RobustEstimator().with_params(pair=None)
    with pytest.raises(QDriftError, match="unknown robust method"):
        RobustEstimator().with_params(method="nope")  # checked by __init__


def test_to_json_lists_the_estimate_with_none_where_undefined(store):
    import qdrift_stats

    fitted = get_estimator("empirical").fit(qdrift_stats.open_store(store).isel(run=[0]))
    out = fitted.to_json()
    json.dumps(out)
    assert out["num_runs"] == 1 and out["steps"] == fitted.num_steps
    assert out["ci_low"] == [None] * fitted.num_steps and out["interval_note"]
    np.testing.assert_allclose(out["variance"], fitted.variance)
