"""Diagnostics classify the testbed's error families (known by construction) into the right regime."""

import json

import numpy as np
import pytest
import xarray as xr

from qdrift_stats import testbed
from qdrift_stats.cli import main
from qdrift_stats.record.lockstep import record
from qdrift_stats.validate.diagnostics import classify, diagnose, lattice_fraction, report, to_json

from .test_estimators_more import memory_store, one_torch_thread, spiky_pair  # noqa: F401 (one_torch_thread: autouse fixture)

FAMILIES = {
    # name: (pair factory, scheduler, regime, estimator)
    "vp_noise": (testbed.mixture_vp_noise, "euler", "noise-like", "first-order"),
    "vp_correlated": (testbed.mixture_vp_correlated, "euler", "signal-correlated", "decomposed"),
    "vp_rounding": (testbed.mixture_vp_rounding, "euler", "rounding-like", "decomposed"),
    "flow_noise": (testbed.mixture_flow_noise, "flow-euler", "noise-like", "first-order"),
    "flow_correlated": (testbed.mixture_flow_correlated, "flow-euler", "signal-correlated", "decomposed"),
    "flow_rounding": (testbed.mixture_flow_rounding, "flow-euler", "rounding-like", "decomposed"),
    "vp_spiky": (spiky_pair, "euler", "heavy-tailed", "robust"),
    # multistep solvers: the first-order statistic, never the lock-step one that counts reused errors again
    "vp_noise_dpmpp": (testbed.mixture_vp_noise, "dpmpp-2m", "noise-like", "first-order"),
    "flow_noise_dpmpp": (testbed.mixture_flow_noise, "flow-dpmpp-2m", "noise-like", "first-order"),
    "vp_spiky_dpmpp": (spiky_pair, "dpmpp-2m", "heavy-tailed", "robust-first-order"),
    "vp_correlated_dpmpp": (testbed.mixture_vp_correlated, "dpmpp-2m", "signal-correlated", "decomposed"),
}


@pytest.fixture(scope="module")
def diagnosed():
    out = {}
    for name, (factory, scheduler, _, _) in FAMILIES.items():
        ds = memory_store(factory(), scheduler, 10, 4, 32, 3).assign_attrs(
            pair=name, scheduler=scheduler, batch_size=32
        )
        out[name] = diagnose(ds, max_series=128)
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_error_family_is_classified_into_its_regime(diagnosed, name):
    _, _, regime, estimator = FAMILIES[name]
    verdict = classify(diagnosed[name])
    assert verdict["regime"] == regime
    assert verdict["estimator"] == estimator
    assert diagnosed[name].attrs["regime"] == regime


def test_signal_correlation_separates_correlated_from_noise(diagnosed):
    assert float(diagnosed["vp_correlated"]["weighted_r2"]) > 0.95
    assert float(diagnosed["vp_noise"]["weighted_r2"]) < 0.05
    k = diagnosed["vp_correlated"]["k"].values
    np.testing.assert_allclose(k[np.isfinite(k)][:-1], -0.05, atol=2e-3)


def test_correlated_errors_are_autocorrelated_across_steps_and_noise_much_less(diagnosed):
    assert float(diagnosed["vp_correlated"]["lb_reject"]) > float(diagnosed["vp_noise"]["lb_reject"])
    assert float(diagnosed["vp_correlated"]["lag1_autocorr"]) > 0.5


def test_per_step_dataset_has_the_documented_variables(diagnosed):
    diag = diagnosed["vp_noise"]
    for name in ("v", "weight", "kurtosis", "jb_stat", "jb_pvalue", "r2", "k", "lattice", "channel_spread"):
        assert diag[name].dims == ("step",)
    for name in (
        "lb_reject",
        "lag1_autocorr",
        "weighted_r2",
        "weighted_kurtosis",
        "weighted_lattice",
        "max_drift_pull",
    ):
        assert diag[name].ndim == 0
    # the sinusoidal error's arcsine distribution: excess kurtosis -1.5, not Gaussian
    np.testing.assert_allclose(diag["kurtosis"].values, -1.5, atol=0.2)
    assert np.all(diag["jb_pvalue"].values < 0.05)


def test_report_says_the_regime_and_what_to_use_in_words(diagnosed):
    text = report(diagnosed["vp_correlated"])
    assert "Regime: signal-correlated." in text and "--estimator decomposed" in text and "Ljung-Box" in text
    text = report(diagnosed["vp_rounding"])
    assert "rounding-like" in text and "grid" in text
    assert json.loads(json.dumps(to_json(diagnosed["vp_noise"])))["regime"] == "noise-like"


def test_lattice_fraction_detects_values_on_a_grid():
    rng = np.random.default_rng(0)
    continuous = rng.standard_normal(5000)
    assert lattice_fraction(continuous) > 0.99
    assert lattice_fraction(np.round(continuous / 0.25) * 0.25) < 0.02


def test_diagnose_command_prints_a_report_json_and_saves_the_dataset(tmp_path, capsys):
    store = tmp_path / "c.zarr"
    record(
        testbed.mixture_vp_correlated(),
        store,
        pair_name="qdrift_stats.testbed:mixture_vp_correlated",
        scheduler_name="euler",
        steps=6,
        runs=2,
        batch_size=16,
        seed=0,
    )
    assert main(["diagnose", str(store)]) == 0
    assert "signal-correlated" in capsys.readouterr().out
    assert main(["diagnose", str(store), "--json", "--out", str(tmp_path / "d.zarr")]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["regime"] == "signal-correlated" and len(verdict["per_step"]["r2"]) == 6
    assert xr.open_zarr(tmp_path / "d.zarr", consolidated=False)["r2"].sizes["step"] == 6
    assert main(["diagnose", str(store), "--out", str(tmp_path / "d.zarr")]) == 2  # exists, not overwritten
    assert main(["diagnose", str(tmp_path / "none.zarr")]) == 2
    assert main(["diagnose", "--help"]) == 0 and "Example:" in capsys.readouterr().out


def test_a_subsampled_diagnosis_reaches_the_same_verdict(diagnosed):
    factory, scheduler, regime, _ = FAMILIES["vp_rounding"]
    ds = memory_store(factory(), scheduler, 10, 4, 32, 3).assign_attrs(
        pair="vp_rounding", scheduler=scheduler, batch_size=32
    )
    small = diagnose(ds, max_points=400, max_series=64)
    assert small.attrs["regime"] == regime
    np.testing.assert_allclose(small["kurtosis"].values, diagnosed["vp_rounding"]["kurtosis"].values, atol=0.5)


def test_the_recommended_estimator_reads_the_first_order_statistic_on_a_multistep_store(tmp_path):
    """On DPM-Solver++ the lock-step robust statistic counts reused errors again; the recommended
    ``robust-first-order`` is ``gain^2 delta_out^2``-based and equals the first-order empirical one on bounded noise."""
    from qdrift_stats.estimators import get_estimator
    from qdrift_stats.record.store import open_store
    from qdrift_stats.validate.diagnostics import recommended_estimator

    store = tmp_path / "dpm.zarr"
    record(
        testbed.mixture_vp_noise(),
        store,
        pair_name="qdrift_stats.testbed:mixture_vp_noise",
        scheduler_name="dpmpp-2m",
        steps=10,
        runs=3,
        batch_size=32,
        seed=0,
    )
    ds = open_store(store).load()
    assert recommended_estimator("heavy-tailed", "dpmpp-2m") == "robust-first-order"
    assert recommended_estimator("heavy-tailed", "euler") == "robust"
    first = get_estimator("first-order").fit(ds).variance
    robust_first = get_estimator("robust-first-order").fit(ds).variance
    lockstep = get_estimator("robust").fit(ds).variance
    np.testing.assert_allclose(robust_first, first, rtol=1e-9)  # a bounded sinusoid is never winsorized
    inner = slice(2, -1)
    assert np.all(lockstep[inner] > 1.3 * first[inner])  # the lock-step statistic of 2M counts reused errors
