"""An interrupted cross-validation resumes to exactly the result of an uninterrupted one.

The interruption is injected (monkeypatching) at several points: between two calibration counts,
while a count's part is being written (after its arrays, before its commit mark), and inside the
strength search. Each time the second call with the same settings must finish the job, recompute
only what was not committed, and give the same Dataset as a run that was never interrupted.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from qdrift_stats import testbed
from qdrift_stats.record.lockstep import record
from qdrift_stats.validate import crossval, parts
from qdrift_stats.validate import learning_curve as learning_curve_module
from qdrift_stats.validate.crossval import cross_validate, open_cv

PAIR = "qdrift_stats.testbed:mixture_vp_noise"
ESTIMATOR = "empirical"
SETTINGS = dict(n_splits=6, seed=3)
STRENGTH = dict(
    strength=True,
    pair=testbed.mixture_vp_noise(),  # never loaded from the store's attribute
    forms=("shrink",),
    strengths=(0.0, 1.0),
    folds=2,
    num_samples=48,
    bootstrap=50,
)


class Interrupted(KeyboardInterrupt):
    """What a user's Ctrl-C (or a killed worker) looks like to the code in flight."""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cv-resume") / "calib.zarr"
    record(
        testbed.mixture_vp_noise(), path, pair_name=PAIR, scheduler_name="euler", steps=4, runs=5, batch_size=8, seed=0
    )
    return path


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """The uninterrupted result, without and with the strength search."""
    plain = cross_validate(ESTIMATOR, store, tmp_path_factory.mktemp("ref") / "cv.zarr", strength=False, **SETTINGS)
    searched = cross_validate(ESTIMATOR, store, tmp_path_factory.mktemp("ref-s") / "cv.zarr", **SETTINGS, **STRENGTH)
    return plain.dataset, searched.dataset


def assert_same_result(a: xr.Dataset, b: xr.Dataset) -> None:
    assert set(a.data_vars) == set(b.data_vars)
    xr.testing.assert_identical(a.drop_attrs(deep=False), b.drop_attrs(deep=False))
    skip = {"store"}  # the store path differs between the two output folders only when given so
    assert {k: str(v) for k, v in a.attrs.items() if k not in skip} == {
        k: str(v) for k, v in b.attrs.items() if k not in skip
    }


def counting(monkeypatch, fail_on: int | None = None):
    """Wrap ``count_scores``: record each calibration count computed; raise on the ``fail_on``-th call."""
    calls: list[int] = []
    original = learning_curve_module.count_scores

    def wrapped(*args, **kwargs):
        calls.append(int(args[6]))
        if fail_on is not None and len(calls) == fail_on:
            raise Interrupted()
        return original(*args, **kwargs)

    monkeypatch.setattr(learning_curve_module, "count_scores", wrapped)
    return calls


def test_interrupted_between_counts_resumes_with_only_the_missing_counts(store, reference, tmp_path, monkeypatch):
    out = tmp_path / "cv.zarr"
    calls = counting(monkeypatch, fail_on=3)
    with pytest.raises(Interrupted):
        cross_validate(ESTIMATOR, store, out, strength=False, **SETTINGS)
    assert calls == [1, 2, 3]
    monkeypatch.undo()
    calls = counting(monkeypatch)
    resumed = cross_validate(ESTIMATOR, store, out, strength=False, **SETTINGS)
    assert calls == [3, 4]  # counts 1 and 2 were committed before the interruption
    assert_same_result(resumed.dataset, reference[0])
    assert_same_result(open_cv(out).dataset[list(reference[0].data_vars)], reference[0])


def test_interrupted_while_a_part_is_written_recomputes_that_part(store, reference, tmp_path, monkeypatch):
    out = tmp_path / "cv.zarr"
    original = parts.ResultParts.write
    written: list[str] = []

    def write_then_die(self, name, piece):
        written.append(name)
        if name == "n0002":  # the arrays land, the commit mark does not
            piece.to_zarr(self.path, group=f"parts/{name}", mode="w", zarr_format=3, consolidated=False)
            raise Interrupted()
        original(self, name, piece)

    monkeypatch.setattr(parts.ResultParts, "write", write_then_die)
    with pytest.raises(Interrupted):
        cross_validate(ESTIMATOR, store, out, strength=False, **SETTINGS)
    assert written == ["n0001", "n0002"]
    monkeypatch.undo()
    calls = counting(monkeypatch)
    resumed = cross_validate(ESTIMATOR, store, out, strength=False, **SETTINGS)
    assert calls == [2, 3, 4]
    assert_same_result(resumed.dataset, reference[0])


def test_interrupted_in_the_strength_search_resumes_to_the_same_choice(store, reference, tmp_path, monkeypatch):
    out = tmp_path / "cv.zarr"
    original = crossval.strength_curve
    monkeypatch.setattr(crossval, "strength_curve", lambda *a, **k: (_ for _ in ()).throw(Interrupted()))
    with pytest.raises(Interrupted):
        cross_validate(ESTIMATOR, store, out, **SETTINGS, **STRENGTH)
    monkeypatch.setattr(crossval, "strength_curve", original)
    calls = counting(monkeypatch)
    resumed = cross_validate(ESTIMATOR, store, out, **SETTINGS, **STRENGTH)
    assert calls == []  # every count was committed before the search started
    assert_same_result(resumed.dataset, reference[1])
    assert resumed.chosen_strength() == open_cv(out).chosen_strength()
    assert np.isfinite(resumed.dataset["energy"].values).all()


def test_a_finished_result_is_reused_without_recomputing(store, reference, tmp_path, monkeypatch):
    out = tmp_path / "cv.zarr"
    cross_validate(ESTIMATOR, store, out, strength=False, **SETTINGS)
    calls = counting(monkeypatch)
    again = cross_validate(ESTIMATOR, store, out, strength=False, **SETTINGS)
    assert calls == []
    assert_same_result(again.dataset, reference[0])
