"""PNDM with ``skip_prk_steps`` (PLMS), pinned against the pseudo linear multistep method written out by hand,
and its correction checked against the mixture testbed's ground truth.

The analytic model: data ``x0 ~ N(0, 1)`` per coordinate, VP state ``x = a x0 + b eps`` (``a^2 + b^2 = 1``),
so the exact epsilon is ``E[eps | x] = b x``; PNDM does not scale the model input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler

from qdrift_stats import testbed
from qdrift_stats.errors import QDriftError
from qdrift_stats.loop import run_sampler
from qdrift_stats.record.lockstep import record_run
from qdrift_stats.schedulers import adapter_for, scheduler_name, step_calls, step_grid
from qdrift_stats.testbed import VP_SCHEDULER_CONFIG
from qdrift_stats.testbed.evaluate import evaluate_correction

STEPS = 5


def plms(steps=STEPS, **config):
    scheduler = PNDMScheduler.from_config({**VP_SCHEDULER_CONFIG, **config}, skip_prk_steps=True)
    scheduler.set_timesteps(steps)
    return scheduler


def test_the_grid_is_ddims_levels_one_step_per_landing():
    scheduler = plms()
    abar = scheduler.alphas_cumprod.double().numpy()
    stride = 1000 // STEPS
    levels = [800, 600, 400, 200, 0]  # leading spacing: t_k = k * stride, listed from the noisiest
    assert scheduler.timesteps.tolist() == [800, 600, 600, 400, 200, 0]  # the first landing twice
    assert step_calls(scheduler) == [[0, 1], [2], [3], [4], [5]]
    grid = step_grid(scheduler)
    np.testing.assert_array_equal(grid.timesteps, levels)
    np.testing.assert_allclose(grid.a, np.sqrt(abar[levels]), rtol=1e-12)
    next_abar = np.append(abar[[t - stride for t in levels[:-1]]], abar[0])  # the last step lands on abar[0]
    np.testing.assert_allclose(grid.b_next, np.sqrt(1 - next_abar), rtol=1e-12)
    assert adapter_for(scheduler).multistep and scheduler_name(scheduler) == "pndm"


def test_run_sampler_is_plms_written_out_by_hand():
    scheduler = plms()
    grid = step_grid(scheduler)
    a = np.append(grid.a, grid.a_next[-1])
    b = np.append(grid.b, grid.b_next[-1])
    sigma_of = {int(t): float(np.sqrt(1 - scheduler.alphas_cumprod[int(t)])) for t in scheduler.timesteps}
    calls, seen = [], []

    def model(x, t):
        calls.append(int(t))
        return sigma_of[int(t)] * x

    def transfer(x, e, i):  # DDIM from level i to level i + 1 (PNDM's formula 9)
        return (a[i + 1] / a[i]) * x + (b[i + 1] - a[i + 1] * b[i] / a[i]) * e

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = run_sampler(model, scheduler, x, callback=seen.append)
    e0 = b[0] * x
    e1 = b[1] * transfer(x, e0, 0)  # the second call: at the Euler prediction
    y = transfer(x, (e0 + e1) / 2, 0)
    history, outputs = [e0], [(e0 + e1) / 2]  # diffusers keeps e0, not the average, in the history
    weights = {2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for i in range(1, STEPS):
        e = b[i] * y
        history = (history + [e])[-4:]
        combined = sum(w * h for w, h in zip(weights[len(history)], reversed(history)))
        outputs.append(e)
        y = transfer(y, combined, i)
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-6)  # diffusers' alphas_cumprod are float32
    assert len(calls) == STEPS + 1 and [s["i"] for s in seen] == list(range(STEPS))
    for info, m in zip(seen, outputs):  # the first step's effective output, then each step's fresh output
        torch.testing.assert_close(info["output"], m, rtol=1e-5, atol=1e-6)


def test_lock_step_delta_of_the_two_call_first_step_is_its_first_order_gain_times_the_effective_error():
    arrays, sched = record_run(testbed.mixture_vp_noise(), "pndm", STEPS, 8, seed=1)
    gain = adapter_for(sched).first_order_gain(step_grid(sched))
    np.testing.assert_allclose(arrays["delta_x"][0], gain[0] * arrays["delta_out"][0], rtol=1e-4, atol=1e-5)


def test_prk_steps_and_level_skipping_spacings_are_refused():
    with pytest.raises(QDriftError, match="skip_prk_steps=False .* not supported; use skip_prk_steps=True"):
        scheduler_name(PNDMScheduler.from_config(VP_SCHEDULER_CONFIG))  # the Runge-Kutta warm-up
    with pytest.raises(QDriftError, match="timestep_spacing 'linspace'.*use timestep_spacing 'leading'"):
        step_grid(plms(timestep_spacing="linspace"))


def test_pndm_correction_closes_the_gap_on_a_noise_like_pair():
    """Ground truth: the mixture testbed's noise-like pair, 5 calibration runs, 25 PLMS steps."""
    torch.set_num_threads(1)
    result = evaluate_correction(testbed.mixture_vp_noise(), "pndm", 25, num_samples=3000, forms=("shrink",))
    m = result.metrics
    assert m["q"]["within_var"] > m["fp"]["within_var"]
    assert abs(m["shrink"]["within_var"] - m["fp"]["within_var"]) < abs(m["q"]["within_var"] - m["fp"]["within_var"])
    assert 0.5 < result.closed("shrink") < 1.5
