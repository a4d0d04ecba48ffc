"""Cross-validation over calibration runs: splits, runs needed, resuming, the strength search, the CLI."""

import json
import math

import numpy as np
import pytest
import xarray as xr
import zarr

from qdrift_stats import testbed
from qdrift_stats.cli import main
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import get_estimator
from qdrift_stats.record.lockstep import record
from qdrift_stats.validate import learning_curve as learning_curve_module
from qdrift_stats.validate.crossval import CVResult, cross_validate, open_cv
from qdrift_stats.validate.learning_curve import run_subsets

from .test_estimators_more import memory_store, one_torch_thread  # noqa: F401 (one_torch_thread: autouse fixture)

VP_NOISE = "qdrift_stats.testbed:mixture_vp_noise"


@pytest.fixture(scope="module")
def noise_store():
    """8 runs of the VP noise pair (Euler, 6 steps), in memory."""
    return memory_store(testbed.mixture_vp_noise(), "euler", 6, 8, 16, 11).assign_attrs(
        pair=VP_NOISE, scheduler="euler", batch_size=16
    )


@pytest.fixture(scope="module")
def small_zarr(tmp_path_factory):
    path = tmp_path_factory.mktemp("cv") / "calib.zarr"
    record(
        testbed.mixture_vp_noise(),
        path,
        pair_name=VP_NOISE,
        scheduler_name="euler",
        steps=5,
        runs=4,
        batch_size=16,
        seed=0,
    )
    return path


def test_subsets_are_all_combinations_when_few_and_random_draws_otherwise():
    few = run_subsets(5, 2, 50, 0)
    assert len(few) == math.comb(5, 2) and len({tuple(s) for s in few}) == len(few)
    many = run_subsets(12, 5, 20, 0)
    assert len(many) == 20 and all(len(s) == 5 and len(set(s)) == 5 and s.max() < 12 for s in many)
    with pytest.raises(QDriftError):
        run_subsets(5, 5, 10, 0)


def test_learning_curve_shrinks_with_more_runs_and_matches_the_per_run_spread(noise_store):
    result = cross_validate("empirical", noise_store, strength=False, n_splits=30)
    ds = result.dataset
    assert ds["rel_error"].dims == ("n_runs", "repeat") and list(ds["n_runs"].values) == list(range(1, 8))
    curve = result.curve(bootstrap=200)
    errors = curve["rel_error_vs_all"].values
    assert np.all(np.diff(errors) < 0)  # nested subsets approach the all-runs fit
    # the relative error of an N-run mean of per-run values, from their spread: s / (v sqrt N)
    per_run = get_estimator("empirical").fit(noise_store).per_run
    keep = noise_store["b_next"].values > 0
    cv = per_run[:, keep].std(axis=0, ddof=1) / per_run[:, keep].mean(axis=0)
    expected = np.sqrt(np.mean(cv**2))
    for j, n in enumerate(ds["n_runs"].values):
        assert curve["rel_error"].values[j] == pytest.approx(expected / np.sqrt(n), rel=0.5)


def test_runs_needed_decreases_as_the_tolerance_loosens(noise_store):
    result = cross_validate("empirical", noise_store, strength=False, n_splits=30)
    tolerances = [0.005, 0.01, 0.02, 0.05, 0.1, 0.3]
    needed = [result.runs_needed(t, 0.95, bootstrap=100) for t in tolerances]
    runs = [n.runs for n in needed]
    assert all(a >= b for a, b in zip(runs, runs[1:]))
    assert runs[0] > runs[-1]
    assert needed[0].extrapolated and needed[0].runs > 7  # beyond the recorded runs, and says so
    assert all(n.low <= n.runs <= n.high or n.extrapolated for n in needed)
    # a higher confidence never needs fewer runs
    assert result.runs_needed(0.05, 0.99, bootstrap=10).runs >= result.runs_needed(0.05, 0.8, bootstrap=10).runs


def test_heldout_likelihood_is_scored_and_decomposed_has_none(noise_store):
    result = cross_validate("empirical", noise_store, counts=[1, 4], strength=False)
    assert np.all(np.isfinite(result.dataset["heldout_loglik"].values[:, 0]))
    decomposed = cross_validate("decomposed", noise_store, counts=[2], n_splits=3, strength=False)
    assert np.all(np.isnan(decomposed.dataset["heldout_loglik"].values))


def test_an_interrupted_cross_validation_resumes_without_recomputing(small_zarr, tmp_path, monkeypatch):
    out = tmp_path / "cv.zarr"
    full = cross_validate("empirical", small_zarr, out, strength=False)
    # simulate a crash while N = 2 was being written: its part exists but is not marked complete
    zarr.open_group(out, path="parts/n0002", mode="r+").attrs["complete"] = False
    calls = []
    original = learning_curve_module.count_scores
    monkeypatch.setattr(learning_curve_module, "count_scores", lambda *a, **k: calls.append(a[6]) or original(*a, **k))
    resumed = cross_validate("empirical", small_zarr, out, strength=False)
    assert calls == [2]
    xr.testing.assert_allclose(full.dataset["rel_error"], resumed.dataset["rel_error"])
    reread = open_cv(out)
    assert isinstance(reread, CVResult) and reread.runs_needed(0.1).runs == full.runs_needed(0.1).runs
    with pytest.raises(QDriftError, match="n_splits"):
        cross_validate("empirical", small_zarr, out, strength=False, n_splits=7)


def test_strength_search_picks_the_best_scored_form_and_strength(small_zarr, tmp_path):
    result = cross_validate(
        "empirical",
        small_zarr,
        tmp_path / "s.zarr",
        counts=[1],
        strength=True,
        pair=testbed.mixture_vp_noise(),  # never loaded from the store's attribute
        forms=("shrink",),
        strengths=(0.0, 1.0),
        folds=2,
        num_samples=128,
        bootstrap=50,
    )
    ds = result.dataset
    assert ds["energy"].dims == ("form", "strength") and np.all(np.isfinite(ds["energy"].values))
    chosen = result.chosen_strength()
    best = ds["energy"].where(ds["energy"] == ds["energy"].min(), drop=True)
    assert chosen["strength"] == float(best["strength"].values[0]) and chosen["form"] == "shrink"
    assert float(ds["energy"].sel(form="shrink", strength=0.0)) == pytest.approx(chosen["energy_uncorrected"])
    assert ds["chosen_share"].sum() == pytest.approx(1.0)


def test_cv_command_writes_zarr_and_json_and_refuses_bad_input(small_zarr, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    assert main(["cv", str(small_zarr), "--out", str(out), "--estimator", "empirical", "--no-strength", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["num_runs"] == 4 and payload["n_runs"] == [1, 2, 3] and payload["strength"] is None
    assert (
        main(["cv", str(small_zarr), "--out", str(out), "--estimator", "empirical", "--no-strength"]) == 0
    )  # resumes (done)
    assert "runs needed" in capsys.readouterr().out
    assert main(["cv", str(small_zarr), "--out", str(out), "--estimator", "robust", "--no-strength"]) == 2
    assert main(["cv", str(small_zarr), "--out", str(tmp_path / "x.zarr"), "--estimator", "bogus"]) == 2
    assert main(["cv", "--help"]) == 0 and "Example:" in capsys.readouterr().out
