"""Persistent error: the testbed families, the persistence-aware statistic, the error budget and diagnose.

Ground truth here is built by construction: synthetic stores whose output error is exactly constant
along each trajectory (or exactly independent from step to step), so the per-step values of the
statistic and the budget are known in closed form.
"""

import json

import numpy as np
import pytest
import torch
import xarray as xr

from qdrift_stats import testbed
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import get_estimator
from qdrift_stats.estimators.persistent import (
    PersistentEstimator,
    accumulated_cross_terms,
    quantized_path_errors,
    shrink_to_zero,
)
from qdrift_stats.loop import prepared_scheduler
from qdrift_stats.record.lockstep import record
from qdrift_stats.record.store import run_dataset
from qdrift_stats.schedulers.base import output_gains, scheduler_identity, step_grid
from qdrift_stats.validate.budget import error_budget, is_persistent, propagators, state_coefficients
from qdrift_stats.validate.diagnostics import classify, diagnose

RUNS, BATCH, DIM, STEPS = 4, 256, 8, 10
WEIGHT_PAIR = "qdrift_stats.testbed:mixture_vp_weight"


def synthetic_store(scheduler: str, kind: str, error: str, seed: int = 0, offset: float = 0.0) -> xr.Dataset:
    """A store on a real step grid whose output error is ``constant`` along each trajectory,
    ``independent`` from step to step, or (``offset``) shifted by a constant shared by every sample."""
    pair = testbed.mixture_vp_noise() if kind == "vp" else testbed.mixture_flow_noise()
    sched = prepared_scheduler(pair, scheduler, STEPS)
    grid = step_grid(sched)
    gains = output_gains(scheduler, pair.scheduler_config, STEPS)
    ident = scheduler_identity(sched)
    rng = np.random.default_rng(seed)
    coords = {"timestep": grid.timesteps, "a": grid.a, "b": grid.b, "a_next": grid.a_next, "b_next": grid.b_next}
    attrs = {
        "scheduler": scheduler,
        "scheduler_config": json.dumps(ident["config"]),
        "prediction_type": grid.prediction_type,
        "pair": f"synthetic-{error}",
    }
    parts = []
    for r in range(RUNS):
        if error == "constant":
            e = np.broadcast_to(rng.standard_normal((1, BATCH, DIM)), (STEPS, BATCH, DIM))
        else:
            e = rng.standard_normal((STEPS, BATCH, DIM))
        e = e + offset
        out_fp = rng.standard_normal((STEPS, BATCH, DIM))
        arrays = {"delta_x": gains[:, None, None] * e, "delta_out": np.array(e), "out_fp": out_fp}
        parts.append(run_dataset(arrays, r, r, coords, attrs))
    ds = xr.concat(parts, dim="run").assign_coords(gain=("step", gains))
    return ds.assign_attrs(attrs)


@pytest.fixture(scope="module")
def stores():
    return {
        (sched, err): synthetic_store(sched, kind, err)
        for sched, kind in (("ddim", "vp"), ("flow-euler", "flow"))
        for err in ("constant", "independent")
    }


@pytest.mark.parametrize("scheduler", ["ddim", "flow-euler"])
def test_persistent_statistic_matches_the_closed_form_for_an_error_constant_along_each_trajectory(stores, scheduler):
    ds = stores[(scheduler, "constant")]
    fitted = PersistentEstimator(bias="ptqd", center=False, path="fp").fit(ds)
    g, b = ds["gain"].values, ds["b_next"].values
    m = float(np.mean(ds["delta_out"].isel(step=0).values ** 2))  # E e^2 (the same at every step)
    for i in range(STEPS):
        if b[i] == 0:
            expected = g[i] ** 2 * m  # the last step is not corrected: its plain v_i
        else:
            earlier = sum(g[j] / b[j] for j in range(i))
            expected = g[i] ** 2 * m + 2 * b[i] * g[i] * m * earlier
        # 1024 independent samples: the shrinkage of the cross term towards 0 is below 1%
        assert fitted.variance[i] == pytest.approx(expected, rel=0.01), i
    assert fitted.persistence_ratio > 2.0


@pytest.mark.parametrize("scheduler", ["ddim", "flow-euler"])
def test_persistent_statistic_equals_the_per_step_one_for_independent_errors(stores, scheduler):
    ds = stores[(scheduler, "independent")]
    fitted = PersistentEstimator(bias="ptqd", center=False, path="fp").fit(ds)
    g = ds["gain"].values
    truth = g**2  # E e^2 = 1 at every step
    # each v_i pools 4 x 256 x 8 unit-variance values: 3 standard errors ~ 0.13 relative to chi^2 spread
    np.testing.assert_allclose(fitted.variance, truth, rtol=0.15)
    assert 0.85 < fitted.persistence_ratio < 1.15


def test_cross_terms_of_a_hand_made_sequence_and_the_shrinkage():
    # two trajectories, b = 1 throughout (propagation by b is then the identity)
    delta = np.array([[[1.0, -1.0]], [[2.0, -2.0]], [[0.5, 0.5]]])  # (steps, groups, n)
    terms = accumulated_cross_terms(delta, np.ones(3))
    np.testing.assert_allclose(terms["v"][:, 0], [1.0, 4.0, 0.25])
    # cross_i = mean(U_{i-1} * Delta_i): U_0 = (1, -1), U_1 = (3, -3)
    np.testing.assert_allclose(terms["cross"][:, 0], [0.0, 2.0, 0.0])
    np.testing.assert_allclose(terms["accumulated"][:, 0], [1.0, 9.0, 0.25 * 0 + ((3.5**2 + 2.5**2) / 2)])
    assert shrink_to_zero(np.array([1.0]), np.array([2.0]))[0] == 0.0
    assert shrink_to_zero(np.array([10.0]), np.array([1.0]))[0] == pytest.approx(9.9)


def test_budget_finds_persistence_in_the_constant_store_and_none_in_the_independent_one(stores):
    constant = error_budget(stores[("flow-euler", "constant")])
    independent = error_budget(stores[("flow-euler", "independent")])
    assert is_persistent(constant) and not is_persistent(independent)
    # FlowMatchEuler's state coefficient is 1 (x_{i+1} = x_i + dt * v): the accumulated sum is (sum g)^2 E e^2
    np.testing.assert_allclose(constant["A"].values, 1.0, atol=1e-12)
    g = stores[("flow-euler", "constant")]["gain"].values
    ratio = float(constant["persistence_ratio"])
    assert ratio == pytest.approx(np.sum(g) ** 2 / np.sum(g**2), rel=0.02)
    assert abs(float(independent["fraction_persistence"])) < 0.1
    assert float(constant["fraction_persistence"]) > 0.5
    # the lag-1 correlation, not demeaned per series, is 1 for the constant error and ~0 for the independent one
    assert np.nanmin(constant["lag1_raw"].values) > 0.99
    assert np.nanmax(np.abs(independent["lag1_raw"].values)) < 0.1


def test_budget_attributes_a_shared_offset_to_the_bias_part():
    ds = synthetic_store("flow-euler", "flow", "independent", seed=3, offset=3.0)
    budget = error_budget(ds)
    assert float(budget["fraction_bias"]) > 0.8


def test_state_coefficients_and_propagators_of_ddim_are_the_ratio_of_signal_scales():
    # checked against diffusers itself: one DDIM step from the state 1 with the output held at 0
    import torch

    from qdrift_stats.schedulers.base import step_kwargs

    pair = testbed.mixture_vp_noise()
    sched = prepared_scheduler(pair, "ddim", STEPS)
    grid = step_grid(sched)
    A = state_coefficients("epsilon", grid.a, grid.b, grid.a_next, grid.b_next)
    # DDIM with the output held fixed: x_{i+1} = (a_{i+1} / a_i) x_i + gain * eps
    np.testing.assert_allclose(A, grid.a_next / grid.a, rtol=1e-12)
    probe = prepared_scheduler(pair, "ddim", STEPS)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    stepped = [float(probe.step(zero, t, one, **step_kwargs(probe), return_dict=False)[0][0]) for t in probe.timesteps]
    np.testing.assert_allclose(A, stepped, rtol=1e-5)
    P = propagators(A)
    np.testing.assert_allclose(P[0], np.prod(A[1:]), rtol=1e-12)
    assert P[-1] == 1.0


def test_diagnose_detects_an_error_constant_along_each_trajectory_that_ljung_box_cannot_see(stores):
    constant = diagnose(stores[("ddim", "constant")], max_series=64)
    independent = diagnose(stores[("ddim", "independent")], max_series=64)
    assert constant.attrs["regime"] == "persistent"
    assert constant.attrs["estimator"] == "persistent"
    caveats = json.loads(constant.attrs["caveats"])  # the default's state-aware map needs the pair
    assert any("--pair" in c and "sampler state" in c and "'persistent'" in c for c in caveats)
    assert not any("sampler state" in c for c in json.loads(independent.attrs["caveats"]))
    assert float(constant["persistence_ratio"]) > 2.0
    assert np.nanmin(constant["lag1_raw"].values) > 0.99  # not demeaned per trajectory
    assert independent.attrs["regime"] != "persistent"
    assert classify(constant)["regime"] == "persistent"
    # without the persistence section (Ljung-Box alone demeans each series, which removes a constant error)
    # the same store reads as plain noise
    assert classify(constant.drop_vars("persistence_ratio"))["regime"] == "noise-like"


@pytest.mark.parametrize("factory", ["mixture_vp_weight", "mixture_flow_weight", "mixture_vp_actround"])
def test_persistent_testbed_families_repeat_their_error_from_step_to_step(factory):
    pair = getattr(testbed, factory)()
    x = torch.randn(512, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    t0, t1 = torch.tensor(900.0), torch.tensor(880.0)
    e0 = pair.q(x, t0) - pair.fp(x, t0)
    e1 = pair.q(x * 0.999, t1) - pair.fp(x * 0.999, t1)  # the next step's nearly unchanged input
    corr = float(torch.sum(e0 * e1) / torch.sqrt(torch.sum(e0**2) * torch.sum(e1**2)))
    assert corr > 0.9
    assert float(e0.pow(2).mean()) > 1e-3


def test_weight_error_is_the_linear_map_it_says():
    err = testbed.WeightError(DIM, amplitude=0.2)
    z = torch.randn(5, DIM, dtype=torch.float64)
    m = torch.zeros(5, DIM, dtype=torch.float64)
    out = err(m, z, torch.tensor(0.0))
    torch.testing.assert_close(out, 0.2 * z @ err._W.T)
    torch.testing.assert_close(err(m, 2 * z, torch.tensor(0.0)), 2 * out)  # linear


def test_activation_rounding_error_vanishes_on_the_grid_and_is_bounded():
    err = testbed.ActivationRoundingError(DIM, amplitude=0.3, delta=0.5)
    z = torch.randn(1000, DIM, dtype=torch.float64)
    e = err(torch.zeros_like(z), z, torch.tensor(0.0))
    # |round(h) - h| <= delta / 2 per feature, through B and the normalisation by delta / sqrt(12)
    bound = 0.3 * err._B.abs().sum(dim=1).max() * (0.25 / (0.5 / 12**0.5))
    assert float(e.abs().max()) <= float(bound) + 1e-12
    assert float(e.pow(2).mean()) > 0.01


def test_persistent_estimator_refuses_unknown_options():
    with pytest.raises(QDriftError):
        PersistentEstimator(bias="median")
    with pytest.raises(QDriftError):
        PersistentEstimator(propagation="sideways")
    with pytest.raises(QDriftError):
        PersistentEstimator(path="elsewhere")


@pytest.fixture(scope="module")
def weight_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("persist") / "weight.zarr"
    record(
        testbed.mixture_vp_weight(),
        path,
        pair_name=WEIGHT_PAIR,
        scheduler_name="ddim",
        steps=6,
        runs=2,
        batch_size=16,
        seed=0,
    )
    return path


def test_quantized_path_starts_where_the_store_does_and_then_leaves_it(weight_store):
    ds = xr.open_zarr(weight_store)
    e, m, _, _ = quantized_path_errors(testbed.mixture_vp_weight(), "ddim", 6, [int(s) for s in ds["seed"].values], 16)
    # step 0: the same initial state, so the same errors and FP outputs as the lock-step store
    np.testing.assert_allclose(e[:, 0], ds["delta_out"].isel(step=0).values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m[:, 0], ds["out_fp"].isel(step=0).values, rtol=1e-5, atol=1e-6)
    # later steps: the quantized trajectory has moved away from the FP one
    assert not np.allclose(m[:, -1], ds["out_fp"].isel(step=5).values, rtol=1e-3, atol=1e-4)


def test_quantized_path_of_an_exact_pair_is_the_fp_path():
    pair = testbed.mixture_vp_exact()
    e, _, _, _ = quantized_path_errors(pair, "ddim", 4, [0, 1], 8)
    assert np.all(e == 0)


def test_the_mapped_path_steps_with_the_corrected_output_and_returns_the_error_it_keeps(weight_store):
    pair, seeds = testbed.mixture_vp_weight(), [int(s) for s in xr.open_zarr(weight_store)["seed"].values]
    plain = quantized_path_errors(pair, "ddim", 6, seeds, 16)
    same = quantized_path_errors(pair, "ddim", 6, seeds, 16, correct_output=lambda i, m, x: m)
    for a, b in zip(plain, same):
        np.testing.assert_array_equal(a, b)
    # the quantized output shifted by a known step-dependent offset: at step 0 (same state) the error kept is the
    # uncorrected one plus the offset; the shifted output is what the scheduler steps with, so the path leaves
    # the quantized one after step 0
    calls = []

    def offset(i, m, x):
        calls.append(i)
        return m + 0.01 * (i + 1)

    e, m_fp, *_ = quantized_path_errors(pair, "ddim", 6, seeds, 16, correct_output=offset)
    assert calls == list(range(6)) * len(seeds)
    m_q_raw = plain[0][:, 0] + plain[1][:, 0]
    np.testing.assert_allclose(e[:, 0], m_q_raw + 0.01 - m_fp[:, 0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(m_fp[:, 0], plain[1][:, 0])
    assert not np.allclose(m_fp[:, -1], plain[1][:, -1], rtol=1e-3, atol=1e-4)


def test_the_mapped_path_is_the_quantized_one_where_no_map_applies_and_differs_where_one_does(weight_store, tmp_path):
    from tests.conftest import testbed_store

    pair = testbed.mixture_vp_weight()
    mapped = PersistentEstimator(path="mapped", pair=pair).fit(weight_store)
    quantized = PersistentEstimator(path="quantized", pair=pair).fit(weight_store)
    assert mapped.output_map is not None and mapped.path_used == "mapped" and "output-mapped" in mapped.summary()
    assert quantized.path_used == "quantized" and "output-mapped" not in quantized.summary()
    np.testing.assert_array_equal(mapped.independent_variance, quantized.independent_variance)  # from the store
    assert not np.allclose(mapped.variance, quantized.variance)
    # the default is the mapped path, bit for bit
    np.testing.assert_array_equal(PersistentEstimator(pair=pair).fit(weight_store).variance, mapped.variance)
    noise_pair, noise_store = testbed_store(tmp_path, "mixture_vp_noise", "ddim", steps=6, runs=2, batch_size=16)
    a = PersistentEstimator(path="mapped", pair=noise_pair).fit(noise_store)
    b = PersistentEstimator(path="quantized", pair=noise_pair).fit(noise_store)
    assert a.output_map is None and a.path_used == "quantized"
    np.testing.assert_array_equal(a.variance, b.variance)


def test_the_registry_names_the_default_path_and_the_one_before():
    from qdrift_stats.estimators import registered_name

    assert get_estimator("persistent").path == "mapped"
    assert get_estimator("persistent-quantized-path").path == "quantized"
    assert registered_name(PersistentEstimator()) == "persistent"
    assert registered_name(PersistentEstimator(path="quantized", map_state=False)) == "persistent-quantized-path"
    with pytest.raises(QDriftError, match="unknown path 'q'; choose mapped, quantized, fp"):
        PersistentEstimator(path="q")


def test_with_the_pair_persistence_is_measured_along_the_quantized_path_and_never_from_the_store(weight_store):
    # the plain map: without the pair the default's state-aware map falls back to it, so both fit the same map
    with_pair = PersistentEstimator(path="quantized", map_state=False, pair=testbed.mixture_vp_weight()).fit(
        weight_store
    )
    assert with_pair.path_used == "quantized" and not with_pair.path_note
    # the store names the pair it was recorded with; it is not imported from there (a pair is code)
    without = PersistentEstimator().fit(weight_store)
    assert without.path_used == "fp" and "--pair" in without.path_note
    # the per-step size comes from the store either way; only the persistence factor differs
    np.testing.assert_allclose(with_pair.independent_variance, without.independent_variance)


def test_registered_names_fit_and_export(tmp_path, weight_store):
    for name in ("persistent", "persistent-ptqd", "persistent-conditional", "ptqd", "published"):
        fitted = get_estimator(name).fit(weight_store)
        assert np.all(np.isfinite(fitted.variance)) and np.all(fitted.variance >= 0)
        fitted.export(tmp_path / f"{name}.safetensors")


def test_without_a_loadable_pair_persistence_is_measured_along_the_fp_path_and_the_fit_says_so(stores):
    fitted = PersistentEstimator(center=False).fit(stores[("ddim", "constant")])  # pair "synthetic-constant"
    assert fitted.path_used == "fp" and "no model pair given" in fitted.path_note
    assert "note:" in fitted.summary()
    same = PersistentEstimator(center=False, path="fp").fit(stores[("ddim", "constant")])
    np.testing.assert_array_equal(fitted.variance, same.variance)


def test_budget_figure_has_the_parts_and_the_per_step_contributions(weight_store):
    from qdrift_stats.plots.figures import figure_for

    fig = figure_for("budget", weight_store)
    left, right = fig.axes[:2]
    assert [t.get_text() for t in left.get_xticklabels()][0] == "bias"
    assert len(right.get_lines()) == 3
