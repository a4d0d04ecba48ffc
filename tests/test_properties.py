"""Property-based tests (hypothesis): scheduler adapters, the correction, the empirical estimator.

Each property is checked on a few random examples (``max_examples`` small, no deadline) so the
whole file stays well under a minute on two CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qdrift_stats.correct.coefficients import apply_correction, correction_coefficients
from qdrift_stats.estimators import EmpiricalEstimator
from qdrift_stats.record.store import run_dataset
from qdrift_stats.schedulers.base import (
    FLOW_PREDICTION,
    SCHEDULER_NAMES,
    adapter_for,
    make_scheduler,
    step_grid,
    x0_from_output,
)
from qdrift_stats.testbed import FLOW_SCHEDULER_CONFIG, VP_SCHEDULER_CONFIG

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def config_for(name: str, prediction_type: str = "epsilon") -> dict:
    if name.startswith("flow"):
        return dict(FLOW_SCHEDULER_CONFIG)
    return {**VP_SCHEDULER_CONFIG, "prediction_type": prediction_type}


# ---- scheduler adapters ---------------------------------------------------------------------


@FAST
@given(name=st.sampled_from(SCHEDULER_NAMES), steps=st.integers(1, 60))
def test_step_grid_shapes_monotone_b_and_clean_last_step(name, steps):
    if name == "lcm":  # diffusers' LCM takes at most original_inference_steps (50) steps
        steps = min(steps, 50)
    scheduler = make_scheduler(name, config_for(name))
    scheduler.set_timesteps(steps)
    grid = step_grid(scheduler)
    assert grid.num_steps == steps
    for arr in (grid.timesteps, grid.a, grid.b, grid.a_next, grid.b_next):
        assert arr.shape == (steps,) and arr.dtype == np.float64 and np.all(np.isfinite(arr))
    # The noise level falls along sampling: each step lands below where it starts, and the next
    # step starts where this one landed. diffusers' PLMS (steps_offset 0, set_alpha_to_one False) ends with a
    # step from t = 0 to alphas_cumprod[0], the same level: it stays put (gain 0, never corrected).
    if name == "pndm":
        assert np.all(grid.b_next[:-1] < grid.b[:-1]) and grid.b_next[-1] == grid.b[-1]
        assert adapter_for(scheduler).first_order_gain(grid)[-1] == 0.0
    else:
        assert np.all(grid.b_next < grid.b)
    assert np.allclose(grid.b[1:], grid.b_next[:-1])
    assert np.all(np.diff(grid.b) < 0)
    if name in ("deis", "pndm"):  # diffusers' DEIS and PNDM end on the t = 0 training level, not on the clean sample
        assert 0.0 < grid.b_next[-1] < 0.02
    else:
        assert grid.b_next[-1] == 0.0
    # The signal scale never vanishes where a step lands (flow grids may start at pure noise, a = 0).
    assert np.all(grid.a >= 0) and np.all(grid.a_next > 0) and np.all(grid.b >= 0)


finite = dict(allow_nan=False, allow_infinity=False)


@FAST
@given(
    prediction=st.sampled_from(["epsilon", "v_prediction", "sample", FLOW_PREDICTION]),
    a=st.floats(0.05, 1.0, **finite),
    b=st.floats(0.0, 20.0, **finite),
    seed=st.integers(0, 2**31 - 1),
)
def test_x0_from_output_inverts_each_prediction_type(prediction, a, b, seed):
    if prediction == FLOW_PREDICTION:  # flow states are (1 - s) x0 + s eps
        b = min(b, 0.95)
        a = 1.0 - b
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    x = a * x0 + b * eps
    r = (a * a + b * b) ** 0.5
    out = {
        "epsilon": eps,
        "v_prediction": (a / r) * eps - (b / r) * x0,  # v of the model input x / r
        "sample": x0,
        FLOW_PREDICTION: eps - x0,
    }[prediction]
    recovered = x0_from_output(prediction, a, b, x, out)
    tol = 1e-9 * (1.0 + b / a)
    assert torch.allclose(recovered, x0, rtol=0, atol=tol)


# ---- correction -----------------------------------------------------------------------------

variances = st.one_of(st.just(0.0), st.floats(0.0, 1e30, **finite), st.sampled_from([1e-300, 1e30]))
b_levels = st.one_of(st.just(0.0), st.floats(1e-4, 1e3, **finite))


@FAST
@given(
    data=st.data(),
    steps=st.integers(1, 12),
    channels=st.one_of(st.none(), st.integers(1, 4)),
    form=st.sampled_from(["drift", "shrink"]),
    strength=st.floats(0.0, 4.0, **finite),
)
def test_correction_coefficients_are_finite_and_shrink_is_a_fraction(data, steps, channels, form, strength):
    shape = (steps,) if channels is None else (steps, channels)
    variance = np.array(
        data.draw(st.lists(variances, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    ).reshape(shape)
    b_next = np.array(data.draw(st.lists(b_levels, min_size=steps, max_size=steps)))
    c = correction_coefficients(variance, b_next, form, strength)
    assert c.shape == shape and c.dtype == np.float64
    assert np.all(np.isfinite(c)) and np.all(c >= 0)
    b_col = b_next.reshape((-1,) + (1,) * (len(shape) - 1))
    # No correction where there is nothing to correct: zero variance, zero strength, or a step
    # that lands on the clean sample.
    zero = (variance == 0) | (strength == 0) | np.broadcast_to(b_col == 0, shape)
    assert np.all(c[zero] == 0.0)
    assert np.all(c <= 1.0)  # both forms: never past a * x0_hat
    if form == "shrink":
        gamma = strength * variance / np.where(b_col > 0, b_col, 1.0) ** 2
        moderate = gamma < 1e12  # beyond, 1 - 1/sqrt(1 + gamma) rounds to 1 in float64
        assert np.all(c[moderate] < 1.0)


@FAST
@given(steps=st.integers(1, 8), b=st.floats(1e-3, 10.0, **finite))
def test_zero_variance_gives_exactly_zero_coefficients(steps, b):
    for form in ("drift", "shrink"):
        c = correction_coefficients(np.zeros(steps), np.full(steps, b), form, 1.0)
        assert np.array_equal(c, np.zeros(steps))


@FAST
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    shape=st.sampled_from([(2, 3), (1, 4, 5), (3, 2, 4, 4)]),
    per_channel=st.booleans(),
    a_next=st.floats(0.0, 2.0, **finite),
    seed=st.integers(0, 2**31 - 1),
)
def test_zero_coefficient_leaves_the_state_bit_identical(dtype, shape, per_channel, a_next, seed):
    gen = torch.Generator().manual_seed(seed)
    x_next = (torch.randn(shape, generator=gen) * 3).to(dtype)
    x0_hat = (torch.randn(shape, generator=gen) * 3).to(dtype)
    coefficient = torch.zeros(shape[1] if per_channel else (), dtype=dtype)
    out = apply_correction(x_next, x0_hat, a_next, coefficient)
    assert out.dtype == dtype and out.shape == x_next.shape
    assert torch.equal(
        out.view(torch.int16) if dtype != torch.float32 else out.view(torch.int32),
        x_next.view(torch.int16) if dtype != torch.float32 else x_next.view(torch.int32),
    )


# ---- the empirical estimator on synthetic in-memory stores ------------------------------------


def synthetic_store(runs: int, steps: int, batch: int, channels: int, seed: int, scale: float = 1.0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    b = np.linspace(1.0, 0.1, steps)
    b_next = np.append(b[1:], 0.0)
    coords = {
        "timestep": np.linspace(999, 0, steps),
        "a": np.ones(steps),
        "b": b,
        "a_next": np.ones(steps),
        "b_next": b_next,
        "gain": b_next - b,
    }
    attrs = {"pair": "synthetic", "scheduler": "euler", "batch_size": batch}
    pieces = []
    for r in range(runs):
        shape = (steps, batch, channels)
        arrays = {
            "delta_x": (scale * rng.normal(size=shape) * rng.uniform(0.1, 2.0)).astype(np.float64),
            "delta_out": rng.normal(size=shape),
            "out_fp": rng.normal(size=shape),
        }
        pieces.append(run_dataset(arrays, seed=100 + r, run_index=r, coords=coords, attrs=attrs))
    return xr.concat(
        pieces, dim="run", data_vars="minimal", coords="minimal", compat="override", combine_attrs="override"
    )


store_shapes = dict(
    runs=st.integers(1, 4),
    steps=st.integers(1, 6),
    batch=st.integers(1, 4),
    channels=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)


@FAST
@given(per_channel=st.booleans(), statistic=st.sampled_from(["lockstep", "first-order"]), **store_shapes)
def test_empirical_estimator_shapes_and_non_negativity(per_channel, statistic, runs, steps, batch, channels, seed):
    ds = synthetic_store(runs, steps, batch, channels, seed)
    fitted = EmpiricalEstimator(per_channel=per_channel, statistic=statistic).fit(ds)
    shape = (steps, channels) if per_channel else (steps,)
    assert fitted.variance.shape == shape and fitted.ci_low.shape == shape and fitted.ci_high.shape == shape
    assert fitted.per_run.shape == (runs,) + shape
    assert np.all(fitted.variance >= 0) and np.all(np.isfinite(fitted.variance))
    if runs == 1:
        assert np.all(np.isnan(fitted.ci_low)) and np.all(np.isnan(fitted.ci_high))
    else:
        assert np.all(fitted.ci_low >= 0)
        assert np.all(fitted.ci_low <= fitted.variance) and np.all(fitted.variance <= fitted.ci_high)
    assert fitted.num_runs == runs and fitted.num_steps == steps


@FAST
@given(s=st.floats(1e-3, 1e3, **finite), per_channel=st.booleans(), **store_shapes)
def test_scaling_delta_x_by_s_scales_the_statistic_by_s_squared(s, per_channel, runs, steps, batch, channels, seed):
    base = EmpiricalEstimator(per_channel=per_channel).fit(synthetic_store(runs, steps, batch, channels, seed))
    scaled = EmpiricalEstimator(per_channel=per_channel).fit(
        synthetic_store(runs, steps, batch, channels, seed, scale=s)
    )
    np.testing.assert_allclose(scaled.variance, s**2 * base.variance, rtol=1e-10)
    if runs > 1:
        np.testing.assert_allclose(scaled.ci_high, s**2 * base.ci_high, rtol=1e-10)


def test_one_run_store_has_no_interval():
    fitted = EmpiricalEstimator().fit(synthetic_store(1, 3, 2, 2, seed=0))
    assert np.all(np.isnan(fitted.conf_int()))
    assert np.all(np.isfinite(fitted.variance))


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_name_builds(name):
    scheduler = make_scheduler(name, config_for(name))
    assert scheduler is not None
