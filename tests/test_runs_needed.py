"""The runs-needed rule and its interval over which runs were recorded (qdrift_stats.validate.runs_needed)."""

import numpy as np
import pytest
import xarray as xr

from qdrift_stats.errors import QDriftError
from qdrift_stats.validate.crossval import cross_validate
from qdrift_stats.validate.runs_needed import (
    expanded_tail,
    needed_from_quantiles,
    runs_needed,
    runs_needed_from_runs,
    subset_errors,
)


def test_the_rule_is_the_first_count_from_which_every_quantile_meets_the_tolerance():
    counts = np.array([1, 2, 3, 4, 5])
    assert needed_from_quantiles(counts, np.array([0.3, 0.09, 0.11, 0.08, 0.07]), 0.1) == (4, False)
    assert needed_from_quantiles(counts, np.array([0.05, 0.04, 0.03, 0.02, 0.01]), 0.1) == (1, False)
    # none meets 0.1: q(N) sqrt(N) = 0.45 at every N -> ceil((0.45 / 0.1)^2) = ceil(20.25) = 21, flagged
    assert needed_from_quantiles(counts, 0.45 / np.sqrt(counts), 0.1) == (21, True)


def test_expanded_tail_is_hesterbergs_for_ten_runs():
    # Phi(sqrt(10/9) * t_9(0.025)) with t_9(0.025) = -2.262157 (tables): Phi(-2.38452) = 0.008551
    assert expanded_tail(10, 0.95) == pytest.approx(0.008551, abs=2e-6)


def test_subset_errors_by_hand_on_three_runs():
    per_run = np.array([[1.0, 2.0], [2.0, 2.0], [3.0, 8.0]])
    mask = np.array([True, True])
    e = subset_errors(per_run, mask, np.array([1, 2]), n_splits=50)
    full = np.array([2.0, 4.0])
    # N = 1: subsets {0}, {1}, {2}; rms over steps of (v - full)/full, times sqrt(3/2)
    rel = per_run / full - 1
    np.testing.assert_allclose(e[0, :3], np.sqrt((rel**2).mean(axis=1)) * np.sqrt(1.5))
    pair_means = np.array([per_run[[0, 1]].mean(0), per_run[[0, 2]].mean(0), per_run[[1, 2]].mean(0)])
    np.testing.assert_allclose(e[1, :3], np.sqrt(((pair_means / full - 1) ** 2).mean(axis=1)) * np.sqrt(3.0))


def _store(per_run_scale: np.ndarray, steps: int = 4, batch: int = 8, seed: int = 0) -> xr.Dataset:
    """A store whose first-order per-run values are ``scale_r * gain_i^2 * ms`` (constructed)."""
    rng = np.random.default_rng(seed)
    runs = len(per_run_scale)
    d = rng.normal(size=(runs, steps, batch, 2)) * np.sqrt(per_run_scale)[:, None, None, None]
    gain = -np.linspace(1.0, 0.5, steps)
    dims = ("run", "step", "sample", "channel")
    b = np.linspace(4, 1, steps)
    return xr.Dataset(
        {"delta_out": (dims, d), "delta_x": (dims, d * gain[None, :, None, None]), "out_fp": (dims, np.zeros_like(d))},
        coords={
            "run": np.arange(runs),
            "seed": ("run", np.arange(runs)),
            "step": np.arange(steps),
            "timestep": ("step", np.linspace(900, 100, steps)),
            "a": ("step", np.ones(steps)),
            "b": ("step", b),
            "a_next": ("step", np.ones(steps)),
            "b_next": ("step", b + gain),
            "gain": ("step", gain),
        },
        attrs={"scheduler": "euler", "prediction_type": "epsilon", "pair": "hand", "batch_size": batch},
    )


@pytest.mark.parametrize("runs", [6, 12])
def test_cv_answer_equals_the_answer_from_the_per_run_values(runs):
    ds = _store(np.exp(np.random.default_rng(1).normal(0, 0.3, runs)))
    result = cross_validate("first-order", ds, n_splits=40, strength=False, seed=3)
    need = result.runs_needed(0.2, 0.95, bootstrap=100, seed=5)
    per_run = result.dataset["per_run"].values
    same = runs_needed_from_runs(per_run, np.ones(per_run.shape[1], bool), 0.2, 0.95, 40, 3, 100, 5)
    assert (need.runs, need.low, need.high, need.decided) == (same.runs, same.low, same.high, same.decided)
    assert need.low <= need.runs <= need.high
    q = np.nanquantile(result.errors(), 0.95, axis=1)
    assert need.runs == needed_from_quantiles(result.counts, q, 0.2)[0]


def test_few_runs_say_not_enough_runs_to_tell_and_the_text_prints_the_deciding_quantile():
    rng = np.random.default_rng(2)
    ds = _store(np.exp(rng.normal(0, 0.5, 5)))
    need = cross_validate("first-order", ds, n_splits=40, strength=False).runs_needed(0.05, 0.95, bootstrap=100)
    assert not need.decided and str(need).startswith("not enough runs to tell")
    assert need.high > need.max_count == 4
    ds = _store(np.ones(30), batch=400)  # identical runs with many samples: 1 run is enough
    need = cross_validate("first-order", ds, n_splits=20, strength=False).runs_needed(0.5, 0.95, bootstrap=50)
    assert need.decided and need.runs == 1
    assert f"{need.quantiles[1]:.4f} <= 0.5 at N=1" in str(need)


def test_runs_needed_refuses_bad_settings():
    with pytest.raises(QDriftError):
        runs_needed(np.ones((2, 3)), np.array([1, 2]), None, None, 3, tolerance=0.0)
