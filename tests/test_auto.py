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


@pytest.fixture(scope="module")
def weight_store(tmp_path_factory):
    """A flow pair whose error is a fixed weight error: the default fits an output map and the residual terms."""
    from tests.conftest import testbed_store

    return testbed_store(tmp_path_factory.mktemp("auto_weight"), "mixture_flow_weight", "flow-euler", 10, 3, 64)


@pytest.mark.parametrize("spread", ["local", "landing"])
def test_a_candidate_is_scored_with_the_correction_its_exported_file_applies(weight_store, spread):
    import torch

    from qdrift_stats.correct.auto import profiled_file
    from qdrift_stats.estimators.persistent import PersistentEstimator
    from qdrift_stats.loop import prepared_scheduler
    from qdrift_stats.schedulers.base import step_grid

    pair, path = weight_store
    fit = PersistentEstimator(spread=spread, pair=pair).fit(path)
    assert fit.output_map is not None and fit.residual_fraction is not None  # the terms the old search dropped
    sched = prepared_scheduler(pair, "flow-euler", 10)
    grid = step_grid(sched)
    plain = EstimatorFile.from_fitted(fit)
    steps = grid.num_steps
    ones, twos = np.ones(steps), np.full(steps, 2.0)
    half = np.where(np.arange(steps) < 5, 0.0, 1.0)
    same = profiled_file(fit, "shrink", ones).corrector(sched, device="cpu", dtype=torch.float64)
    reference = plain.corrector(sched, device="cpu", dtype=torch.float64)
    np.testing.assert_array_equal(same.coefficients.numpy(), reference.coefficients.numpy())
    for name in ("center", "offset", "weight"):
        np.testing.assert_array_equal(
            getattr(same.output_map, name).numpy(), getattr(reference.output_map, name).numpy()
        )
    # a uniform profile of 2 is the file's strength 2, per step
    doubled = profiled_file(fit, "shrink", twos).coefficients(grid)
    np.testing.assert_allclose(doubled, plain.coefficients(grid, strength=2.0), rtol=1e-12, atol=0)
    assert not np.allclose(doubled, plain.coefficients(grid))
    # a profile of 0 on the first five steps: no pull there, the strength-1 pull after (each step's c is its own)
    piecewise = profiled_file(fit, "shrink", half).coefficients(grid)
    np.testing.assert_array_equal(piecewise[:5], 0.0)
    np.testing.assert_allclose(piecewise[5:], plain.coefficients(grid)[5:], rtol=1e-12, atol=0)
    # the output map acts whatever the strength
    zero = profiled_file(fit, "shrink", np.zeros(steps)).corrector(sched, device="cpu", dtype=torch.float64)
    assert not zero.pull_active[0] and any(zero.output_active)


def test_auto_scores_the_output_map_alone_and_exports_what_it_chose(weight_store, tmp_path):
    import torch

    from qdrift_stats.correct.auto import corrects_output
    from qdrift_stats.loop import prepared_scheduler

    pair, path = weight_store
    fitted = AutoEstimator(
        candidates=("persistent",), forms=("shrink",), strengths=(0.0, 1.0), segments=1, pair=pair
    ).fit(path)
    trials = {tuple(t["profile"]): t["score"] for t in fitted.trials}
    # strength 0 still applies the map: it is sampled and scored, not taken as uncorrected Q
    assert set(trials) == {(0.0,), (1.0,)}
    assert trials[(0.0,)] != fitted.choice["q_score"]
    assert fitted.choice["estimator"] == "persistent" and fitted.choice["profile"] == [1.0]
    fitted.export(tmp_path / "auto.safetensors")
    loaded = EstimatorFile.load(tmp_path / "auto.safetensors")
    persistent = get_estimator("persistent").with_params(pair=pair).fit(path)
    assert corrects_output(persistent)
    own = EstimatorFile.from_fitted(persistent)
    for key in ("residual_fraction", "residual_error", "map_center", "map_offset", "map_weight"):
        np.testing.assert_array_equal(loaded.tensors[key], own.tensors[key])
    assert loaded.metadata["estimator"]["output_map"] == own.metadata["estimator"]["output_map"]
    sched = prepared_scheduler(pair, "flow-euler", 10)
    np.testing.assert_allclose(
        loaded.corrector(sched, dtype=torch.float64).coefficients.numpy(),
        own.corrector(sched, dtype=torch.float64).coefficients.numpy(),
        rtol=1e-12,
        atol=0,
    )


def test_each_strength_scan_stops_patience_strengths_after_its_best(store):
    grid = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    fitted = AutoEstimator(
        candidates=("first-order",),
        forms=("shrink",),
        strengths=grid,
        segments=1,
        patience=2,
        pair=testbed.mixture_vp_noise(),
    ).fit(store)
    scored = [t["profile"][0] for t in fitted.trials]  # strength 0 is Q's score, not a trial
    scores = [fitted.choice["q_score"]] + [t["score"] for t in fitted.trials]
    best = int(np.argmin(scores))
    assert [0.0] + scored == list(grid[: min(len(grid), best + 3)])
    with pytest.raises(QDriftError, match="patience"):
        AutoEstimator(patience=0)


def test_the_paired_score_difference_is_zero_for_one_set_and_sees_a_shift():
    from qdrift_stats.correct.auto import paired_score_difference

    rng = np.random.default_rng(1)
    ref = rng.standard_normal((200, 3))
    a = ref + 0.3 * rng.standard_normal((200, 3))  # row i near reference row i, as a corrected draw would be
    h = local_bandwidth(ref)
    assert paired_score_difference(a, a, ref, "mmd", h, n_boot=50) == (0.0, 0.0, 0.0)
    for score in ("mmd", "energy"):
        d, low, high = paired_score_difference(a + 0.5, a, ref, score, h, n_boot=200)
        assert d == pytest.approx(distribution_score(a + 0.5, ref, score, h) - distribution_score(a, ref, score, h))
        assert 0.0 < low < d < high
    with pytest.raises(QDriftError, match="same size"):
        paired_score_difference(a[:10], a, ref)


@pytest.mark.parametrize(
    "family, scheduler, anchor, kept_expected",
    [
        # the noise-like pair: first-order at 4 scores lower but not beyond the noise, so the default stays
        ("mixture_vp_noise", "ddim", "persistent", True),
        # the weight error: the output map alone beats the plain map's pull beyond the noise...
        ("mixture_vp_weight", "euler", "persistent-plain-map", False),
        # ...but not the default's state-aware map, which is kept
        ("mixture_vp_weight", "euler", "persistent", True),
    ],
)
def test_the_default_is_kept_unless_the_search_beats_it_beyond_the_noise(
    tmp_path, family, scheduler, anchor, kept_expected
):
    from tests.conftest import testbed_store

    pair, path = testbed_store(tmp_path, family, scheduler, 10, 3, 64)
    fitted = AutoEstimator(
        candidates=("first-order", anchor),
        forms=("shrink",),
        strengths=(0.0, 1.0, 4.0, 16.0),
        segments=1,
        anchor=anchor,
        pair=pair,
    ).fit(path)
    c, scores = fitted.choice, {(t["estimator"], t["profile"][0]): t["score"] for t in fitted.trials}
    best = min(scores, key=scores.get)
    against = c["against_default"]
    assert best != (anchor, 1.0) and against["against"] == anchor
    assert against["difference"] == pytest.approx(scores[best] - scores[(anchor, 1.0)])
    assert against["low"] < against["difference"] < against["high"]
    kept = (c["estimator"], c["profile"][0]) == (anchor, 1.0)
    assert kept == (against["high"] >= 0)
    assert c["score"] == pytest.approx(scores[(c["estimator"], c["profile"][0])]) and c["score"] < c["q_score"]
    assert kept == kept_expected
    assert "beyond the held-out noise" in c["reason"] and "automatic choice" in fitted.summary()


def test_the_default_is_chosen_when_it_beats_q_although_a_scan_stopped_before_its_strength(store, monkeypatch):
    """A scan that stops (patience) before strength 1 never scores the default; the keep-the-default step scores it
    afterwards, and when it beats Q and everything tried, it is the choice (this used to raise a KeyError)."""
    import qdrift_stats.correct.auto as auto

    scored_at = {"strength": None}
    profiled = auto.profiled_file

    def recording_profiled_file(fitted, form, strength):
        scored_at["strength"] = float(np.max(strength))
        return profiled(fitted, form, strength)

    by_strength = {None: 1.0, 0.0: 5.0, 0.25: 2.0, 0.5: 3.0, 1.0: 0.5}  # None: Q's score (no correction built)
    monkeypatch.setattr(auto, "profiled_file", recording_profiled_file)
    monkeypatch.setattr(auto, "distribution_score", lambda *args, **kw: by_strength[scored_at["strength"]])
    fitted = AutoEstimator(
        candidates=("persistent",),
        forms=("shrink",),
        strengths=(0.0, 0.25, 0.5, 1.0),
        segments=1,
        patience=2,
        pair=testbed.mixture_vp_noise(),
    ).fit(store)
    c = fitted.choice
    assert [t["profile"][0] for t in fitted.trials][-1] == 1.0  # scored by the keep-the-default step, last
    assert (c["estimator"], c["form"], c["profile"], c["score"], c["q_score"]) == (
        "persistent",
        "shrink",
        [1.0],
        0.5,
        1.0,
    )
    assert c["reason"] == "the default persistent scored lowest" and c["against_default"] is None
