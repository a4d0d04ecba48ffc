"""Heun (two model calls per step), pinned against Heun's method written out by hand, the lock-step
recording and the pipeline recording of a two-call step, and the correction checked against the
mixture testbed's ground truth.

The analytic model: data ``x0 ~ N(0, 1)`` per coordinate, state ``x = x0 + sigma eps`` (Euler
coordinates), so the exact epsilon is ``E[eps | x] = sigma x / (1 + sigma^2)``; the model sees
``u = x / sqrt(1 + sigma^2)`` and returns ``sigma u / sqrt(1 + sigma^2)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import HeunDiscreteScheduler

from qdrift_stats import testbed
from qdrift_stats.correct.diffusers import QDriftScheduler
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.loop import run_sampler
from qdrift_stats.record.lockstep import record_run
from qdrift_stats.schedulers import adapter_for, step_calls, step_grid
from qdrift_stats.testbed import VP_SCHEDULER_CONFIG
from qdrift_stats.testbed.evaluate import evaluate_correction

STEPS = 4


def heun(steps=STEPS):
    scheduler = HeunDiscreteScheduler.from_config(VP_SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    return scheduler


def levels(scheduler) -> np.ndarray:
    """``sigma_0 .. sigma_{n-1}, 0``: each inner level appears twice in diffusers' ``sigmas``."""
    s = scheduler.sigmas.double().numpy()
    return np.append(s[0::2], s[-1])


def analytic_model(scheduler, calls):
    sigma_of = {float(t): float(s) for t, s in zip(scheduler.timesteps, scheduler.sigmas)}

    def model(u, t):
        calls.append(float(t))
        s = sigma_of[float(t)]
        return s * u / (1.0 + s * s) ** 0.5

    return model


def eps(x, s):
    return s * x / (1.0 + s * s)


def test_the_grid_has_one_step_per_landing_and_the_first_order_gain():
    scheduler = heun()
    s = levels(scheduler)
    grid = step_grid(scheduler)
    assert grid.num_steps == STEPS and len(scheduler.timesteps) == 2 * STEPS - 1
    assert step_calls(scheduler) == [[0, 1], [2, 3], [4, 5], [6]]
    np.testing.assert_array_equal(grid.timesteps, scheduler.timesteps.double().numpy()[[0, 1, 3, 5]])
    np.testing.assert_allclose(grid.b, s[:-1], rtol=0) and np.testing.assert_allclose(grid.b_next, s[1:], rtol=0)
    assert np.all(grid.a == 1.0) and np.all(grid.a_next == 1.0) and grid.b_next[-1] == 0.0
    np.testing.assert_allclose(adapter_for(scheduler).first_order_gain(grid), s[1:] - s[:-1], rtol=1e-12)


def test_run_sampler_is_heuns_method_with_one_callback_per_landing():
    scheduler = heun()
    s = levels(scheduler)
    calls, seen = [], []
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s[0]
    got = run_sampler(analytic_model(scheduler, calls), scheduler, x, callback=seen.append)
    # by hand: Euler predictor to sigma_{i+1}, corrector with the mean derivative; the last step is Euler to 0
    y, states, outputs = x.clone(), [], []
    for i in range(STEPS):
        dt, d = s[i + 1] - s[i], eps(y, s[i])
        if i < STEPS - 1:
            d = (d + eps(y + dt * d, s[i + 1])) / 2
        states.append(y)
        outputs.append(d)
        y = y + dt * d
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)  # diffusers scales the input with float32 sigmas
    assert len(calls) == 2 * STEPS - 1  # no extra model call
    assert [info["i"] for info in seen] == list(range(STEPS))
    assert [float(info["t"]) for info in seen] == step_grid(scheduler).timesteps.tolist()
    for info, x_i, m in zip(seen, states, outputs):  # the step's start and its effective (mean) output
        torch.testing.assert_close(info["x"], x_i, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(info["output"], m, rtol=1e-5, atol=1e-6)


def test_the_wrapper_corrects_each_landing_once_and_never_the_predictor_half_step():
    scheduler = heun()
    s = levels(scheduler)
    variance = np.array([0.5, 0.2, 0.05, 0.01])
    est = EstimatorFile.zeros_like_grid(scheduler, correction="shrink")
    est.tensors["variance"] = variance
    wrapped = QDriftScheduler(heun(), est)
    wrapped.set_timesteps(STEPS)
    calls = []
    model = analytic_model(wrapped, calls)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * s[0]
    returned = []
    y = x
    for t in wrapped.timesteps:
        y = wrapped.step(model(wrapped.scale_model_input(y, t), t), t, y).prev_sample
        returned.append(y)
    # by hand: Heun's step, then x' - c (x' - x0_hat) with x0_hat = x_i - sigma_i m_eff (a = 1), shrink c
    c = 1.0 - 1.0 / np.sqrt(1.0 + variance / np.where(s[1:] > 0, s[1:], 1.0) ** 2)
    c[-1] = 0.0  # no correction of the step that lands on the clean sample
    y, expected = x.clone(), []
    for i in range(STEPS):
        dt, d = s[i + 1] - s[i], eps(y, s[i])
        if i < STEPS - 1:
            predicted = y + dt * d
            expected.append(predicted)  # what the predictor call returns: uncorrected
            d = (d + eps(predicted, s[i + 1])) / 2
        landed = y + dt * d
        x0_hat = y - s[i] * d
        y = landed - c[i] * (landed - x0_hat)
        expected.append(y)
    assert len(returned) == len(expected) == 2 * STEPS - 1
    for got, want in zip(returned, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lock_step_recording_steps_the_quantized_heun_from_the_fp_state_with_its_own_predictor():
    pair = testbed.mixture_vp_correlated()  # a smooth error (m_q = 0.95 m_fp + ...): comparable to a float64 hand step
    arrays, sched = record_run(pair, "heun", STEPS, 8, seed=3)
    grid = step_grid(sched)
    gain = (grid.b_next - grid.b).reshape(-1, 1, 1)
    # a whole Heun step is a first-order step with its effective output: Delta_i = gain_i (m_q - m_fp) exactly
    np.testing.assert_allclose(arrays["delta_x"], gain * arrays["delta_out"], rtol=1e-4, atol=1e-5)
    # step 0 by hand: both samplers start at x_0; each predicts with its own model, then corrects at its own prediction
    from qdrift_stats.loop import initial_noise

    x, _ = initial_noise(pair, heun(), 8, 3)
    x = x.double()
    s = levels(sched)

    def heun_step(model, predictor):
        t0, t1 = sched.timesteps[0], sched.timesteps[1]
        d0 = model((x / (1 + s[0] ** 2) ** 0.5).float(), t0).double()
        predicted = x + (s[1] - s[0]) * predictor((x / (1 + s[0] ** 2) ** 0.5).float(), t0).double()
        d1 = model((predicted / (1 + s[1] ** 2) ** 0.5).float(), t1).double()
        return (d0 + d1) / 2

    m_fp, m_q = heun_step(pair.fp, pair.fp), heun_step(pair.q, pair.q)
    m_q_at_fp_prediction = heun_step(pair.q, pair.fp)  # what a corrector evaluated at the FP prediction would give
    np.testing.assert_allclose(arrays["out_fp"][0], m_fp.numpy(), rtol=1e-4, atol=1e-4)
    recorded = arrays["delta_out"][0]
    np.testing.assert_allclose(recorded, (m_q - m_fp).numpy(), rtol=1e-4, atol=1e-5)
    assert (
        np.abs(recorded - (m_q_at_fp_prediction - m_fp).numpy()).max()
        > 100 * np.abs(recorded - (m_q - m_fp).numpy()).max()
    )


def test_heun_correction_closes_the_gap_on_a_noise_like_pair():
    """Ground truth: the mixture testbed's noise-like pair, 5 calibration runs, 25 Heun steps (49 calls)."""
    torch.set_num_threads(1)
    result = evaluate_correction(testbed.mixture_vp_noise(), "heun", 25, num_samples=3000, forms=("shrink",))
    m = result.metrics
    assert m["q"]["within_var"] > m["fp"]["within_var"]  # the error degrades FP at all
    assert result.closed("shrink") > 0.5
    assert abs(m["shrink"]["within_var"] - m["fp"]["within_var"]) < abs(m["q"]["within_var"] - m["fp"]["within_var"])


@pytest.mark.parametrize("steps", [1, 2])
def test_short_grids(steps):
    """One step is a single Euler call; two steps are a Heun step and the final Euler step."""
    scheduler = heun(steps)
    assert step_calls(scheduler) == ([[0]] if steps == 1 else [[0, 1], [2]])
    assert step_grid(scheduler).num_steps == steps


def test_pipeline_calibration_records_one_step_per_landing_with_the_q_corrector_at_its_own_prediction(tmp_path):
    """Through StableDiffusionPipeline (tiny): 3 steps are 5 denoiser calls per pass; the Q pass is fed the FP
    state at each step's first call and evaluates its corrector call at the Q sampler's own prediction."""
    import logging
    import warnings

    from qdrift_stats.record.pipelines import calibrate_pipeline
    from qdrift_stats.record.store import open_store
    from tests import tiny_pipelines as tiny

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    fp = tiny.sd_with(HeunDiscreteScheduler(**tiny.SD_BETAS))
    q = tiny.twin(fp)
    inputs = {"fp": [], "q": []}
    hooks = [
        module.register_forward_hook(
            lambda m, args, kwargs, out, key=key: inputs[key].append(args[0]), with_kwargs=True
        )
        for key, module in (("fp", fp.unet), ("q", q.unet))
    ]
    call = tiny.sd_call()
    guidance = call.pop("guidance_scale")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = calibrate_pipeline(
            fp,
            q,
            out=tmp_path / "c.zarr",
            seeds=[0],
            num_inference_steps=3,
            guidance_scale=guidance,
            pipeline_kwargs=call,
        )
    for h in hooks:
        h.remove()
    ds = open_store(store).load()
    # 5 calls per pass, then each denoiser once on the fingerprint probe
    assert ds.sizes["step"] == 3 and len(inputs["fp"]) == len(inputs["q"]) == 6
    sched = HeunDiscreteScheduler(**tiny.SD_BETAS, steps_offset=1)  # StableDiffusionPipeline's patch
    sched.set_timesteps(3)
    np.testing.assert_allclose(ds["timestep"].values, step_grid(sched).timesteps, atol=1e-4)
    np.testing.assert_allclose(ds["gain"].values, ds["b_next"].values - ds["b"].values, rtol=1e-6)
    gain = ds["gain"].values.reshape(1, -1, 1, 1, 1, 1)
    np.testing.assert_allclose(ds["delta_x"].values, gain * ds["delta_out"].values, rtol=1e-3, atol=1e-4)
    for k in (0, 2, 4):  # each step's first call: the FP state
        assert torch.equal(inputs["q"][k], inputs["fp"][k])
    for k in (1, 3):  # the corrector calls: the Q prediction, not the FP one
        assert not torch.equal(inputs["q"][k], inputs["fp"][k])


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_first_order_output_inverts_diffusers_own_first_order_step(prediction):
    """The effective output of a landing is the output with which a first-order step lands there: checked
    against diffusers' Euler step (its own x0 formula per prediction type), at every step of a 6-step grid."""
    from diffusers import EulerDiscreteScheduler

    from qdrift_stats.schedulers import first_order_output

    scheduler = EulerDiscreteScheduler.from_config({**VP_SCHEDULER_CONFIG, "prediction_type": prediction})
    scheduler.set_timesteps(6)
    grid = step_grid(scheduler)
    g = torch.Generator().manual_seed(5)
    for i, t in enumerate(scheduler.timesteps):
        x = torch.randn(4, 3, generator=g, dtype=torch.float64) * float(grid.b[i])
        out = torch.randn(4, 3, generator=g, dtype=torch.float64)
        x_next = scheduler.step(out, t, x).prev_sample
        torch.testing.assert_close(first_order_output(grid, i, x, x_next), out, rtol=1e-5, atol=1e-5)
