"""Tests written to kill mutants that survived ``mutmut`` on the correction path (docs/results/mutation.md).

Each pins a behaviour the earlier tests left open: an exact message, a boundary, a fallback.
"""

import numpy as np
import pytest
import torch

from qdrift_stats.correct.coefficients import apply_correction, correction_coefficients, divergence_risk
from qdrift_stats.errors import QDriftError


def test_coefficients_are_float64_whatever_the_input_precision():
    c = correction_coefficients(np.array([0.1, 0.2], dtype=np.float32), np.array([1.0, 0.5], dtype=np.float32))
    assert c.dtype == np.float64
    np.testing.assert_allclose(c, [0.05, 0.4], rtol=1e-7)


def test_bad_statistic_messages_say_what_is_wrong():
    with pytest.raises(QDriftError, match=r"^variance statistic must be finite and non-negative$"):
        correction_coefficients(np.array([-1.0]), np.ones(1))
    with pytest.raises(QDriftError, match=r"^strength must be a finite non-negative number, got -1.0$"):
        correction_coefficients(np.ones(1), np.ones(1), strength=-1.0)
    with pytest.raises(QDriftError, match=r"^strength must be a finite non-negative number, got inf$"):
        correction_coefficients(np.ones(1), np.ones(1), strength=float("inf"))
    with pytest.raises(QDriftError, match=r"^estimator has 3 steps but the sampler has 2$"):
        correction_coefficients(np.ones(3), np.ones(2))
    with pytest.raises(QDriftError, match=r"^unknown correction form 'bogus'; choose drift or shrink$"):
        correction_coefficients(np.ones(1), np.ones(1), "bogus")


def test_strength_zero_is_allowed_and_gives_no_correction():
    np.testing.assert_array_equal(correction_coefficients(np.ones(2), np.ones(2), "shrink", 0.0), 0.0)


def test_per_channel_correction_keeps_the_state_shape():
    x = torch.ones(2, 3, 4)
    out = apply_correction(x, torch.zeros(2, 3, 4), 1.0, torch.tensor([0.0, 0.5, 1.0]))
    assert out.shape == x.shape


def test_divergence_risk_is_the_unclipped_half_gamma():
    np.testing.assert_allclose(
        divergence_risk(np.array([0.5, 4.0, 1.0]), np.array([1.0, 1.0, 0.0]), 2.0), [0.5, 4.0, 0.0], rtol=1e-14
    )


# ---- corrector: per-channel decomposition, device / dtype, skipped steps ----------------------------
def _grid(name="euler", steps=3):
    from qdrift_stats.schedulers.base import make_scheduler, step_grid
    from qdrift_stats.testbed import FLOW_SCHEDULER_CONFIG, VP_SCHEDULER_CONFIG

    sched = make_scheduler(name, FLOW_SCHEDULER_CONFIG if name.startswith("flow") else VP_SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    return sched, step_grid(sched)


def test_per_channel_decomposition_acts_on_its_own_channel_of_an_image_batch():
    from qdrift_stats.correct.corrector import Corrector

    _, grid = _grid()
    k = np.array([[0.25, 1.0], [0.0, 0.0], [0.0, 0.0]])
    mu = np.array([[0.5, -1.0], [0.0, 0.0], [0.0, 0.0]])
    corrector = Corrector(grid, np.zeros((3, 2)), torch.device("cpu"), torch.float64, k=k, mu=mu)
    m = torch.arange(2 * 2 * 3 * 3, dtype=torch.float64).reshape(2, 2, 3, 3)
    out = corrector.correct_output(0, m)
    assert out.shape == m.shape
    torch.testing.assert_close(out[:, 0], (m[:, 0] - 0.5) / 1.25)
    torch.testing.assert_close(out[:, 1], (m[:, 1] + 1.0) / 2.0)
    assert corrector.output_active == [True, False, False]
    assert corrector.correct_output(1, m) is m


def test_corrector_tensors_live_on_the_requested_dtype_and_survive_to():
    from qdrift_stats.correct.corrector import Corrector

    _, grid = _grid()
    c = np.array([0.1, 0.0, 0.3])
    corrector = Corrector(grid, c, torch.device("cpu"), torch.float32, k=np.array([0.1, 0, 0]), mu=np.zeros(3))
    assert corrector.coefficients.dtype == torch.float32 and corrector.coefficients.device.type == "cpu"
    assert corrector.scale.dtype == torch.float32
    assert corrector.active == [True, False, True]
    moved = corrector.to("cpu", torch.float64)
    assert moved.coefficients.dtype == torch.float64
    np.testing.assert_array_equal(moved.coefficients.numpy(), c)
    np.testing.assert_allclose(moved.scale.numpy(), 1 / np.array([1.1, 1.0, 1.0]))
    from_v = Corrector.from_variance(
        grid, np.array([0.02, 0.0, 0.01]), "drift", 2.0, torch.device("cpu"), torch.float32
    )
    assert from_v.coefficients.dtype == torch.float32
    assert grid.b_next[-1] == 0 and from_v.coefficients[-1] == 0  # the last step lands on b = 0
    np.testing.assert_allclose(from_v.coefficients.numpy()[:2], [0.02 / grid.b_next[0] ** 2, 0.0], rtol=1e-6)
    # per-channel coefficients: a step is active if any channel's coefficient is nonzero
    per_channel = Corrector(grid, np.array([[0.0, 0.2], [0.0, 0.0], [1.0, 1.0]]), torch.device("cpu"), torch.float64)
    assert per_channel.active == [True, False, True]


def test_corrector_refuses_a_grid_of_another_length_with_the_counts():
    from qdrift_stats.correct.corrector import Corrector

    _, grid = _grid()
    with pytest.raises(QDriftError, match=r"^correction has 4 steps but the sampler has 3$"):
        Corrector(grid, np.zeros((4, 2)), torch.device("cpu"), torch.float64)


# ---- the loop ---------------------------------------------------------------------------------------
def test_loop_scales_the_model_input_passes_conditions_and_steps_ddim_deterministically():
    from qdrift_stats.loop import run_sampler

    sched, grid = _grid("euler", 3)
    seen = []

    def model(model_input, t, scale=1.0):
        seen.append((model_input.clone(), scale))
        return model_input * 0.1 * scale

    x = torch.full((1, 2), 2.0, dtype=torch.float64) * sched.init_noise_sigma
    info = []
    run_sampler(model, sched, x, {"scale": 3.0}, callback=info.append)
    # Euler feeds the model x / sqrt(sigma^2 + 1)
    torch.testing.assert_close(seen[0][0], x / np.sqrt(grid.b[0] ** 2 + 1))
    assert all(s == 3.0 for _, s in seen)
    assert set(info[0]) >= {"i", "t", "x", "model_input", "output", "x_next"}
    assert float(info[1]["t"]) == float(sched.timesteps[1])
    torch.testing.assert_close(info[0]["model_input"], seen[0][0])
    # DDIM steps with eta = 0: deterministic, same input same output
    ddim, _ = _grid("ddim", 4)
    a = run_sampler(lambda z, t: 0.3 * z, ddim, torch.ones(2, 2, dtype=torch.float64))
    ddim2, _ = _grid("ddim", 4)
    b = run_sampler(lambda z, t: 0.3 * z, ddim2, torch.ones(2, 2, dtype=torch.float64))
    torch.testing.assert_close(a, b)


def test_loop_callback_may_replace_the_next_state():
    from qdrift_stats.loop import run_sampler

    sched, _ = _grid("flow-euler", 3)
    out = run_sampler(lambda z, t: torch.zeros_like(z), sched, torch.ones(1, 2), callback=lambda s: torch.zeros(1, 2))
    assert torch.equal(out, torch.zeros(1, 2))


# ---- x0_hat, estimator file grid matching -----------------------------------------------------------
def test_v_prediction_x0_uses_the_sum_of_squares_of_the_levels():
    from qdrift_stats.schedulers.base import x0_from_output

    x0, eps = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.25]])
    a, b = 0.6, 1.7
    r = (a * a + b * b) ** 0.5
    v = (a / r) * eps - (b / r) * x0
    torch.testing.assert_close(x0_from_output("v_prediction", a, b, a * x0 + b * eps, v), x0)
    with pytest.raises(QDriftError, match=r"^unsupported prediction_type 'bogus'$"):
        x0_from_output("bogus", a, b, x0, x0)


def test_estimator_file_uses_the_stored_grid_only_when_it_matches_closely():
    from qdrift_stats.correct.estimator_file import EstimatorFile
    from qdrift_stats.schedulers.base import StepGrid

    sched, grid = _grid("euler", 4)
    est = EstimatorFile.zeros_like_grid(sched, correction="drift")
    assert est._same_grid(grid)
    assert est.metadata["correction"]["strength"] == 1.0

    def shifted(dt=0.0, db=0.0, steps=None):
        n = steps or grid.num_steps
        return StepGrid(
            grid.name,
            grid.timesteps[:n] + dt,
            grid.a[:n],
            grid.b[:n],
            grid.a_next[:n],
            grid.b_next[:n] + db,
            grid.prediction_type,
        )

    assert est._same_grid(shifted(dt=5e-7)) and not est._same_grid(shifted(dt=1e-3))
    assert not est._same_grid(shifted(db=1e-3)) and est._same_grid(shifted(db=1e-12))
    assert not est._same_grid(shifted(steps=3))
    # a relative error of 1e-5 in b_next is not the same grid (rtol 1e-6)
    rel = StepGrid(
        grid.name, grid.timesteps, grid.a, grid.b, grid.a_next, grid.b_next * (1 + 1e-5), grid.prediction_type
    )
    assert not est._same_grid(rel)
    # the file's own strength is used unless one is given
    est.tensors["variance"] = 0.01 * grid.b_next**2
    est.metadata["correction"].pop("strength")
    np.testing.assert_allclose(est.coefficients(grid)[:-1], 0.005)


def test_estimator_file_corrector_carries_the_decomposition_and_the_device():
    from qdrift_stats.correct.estimator_file import EstimatorFile

    sched, grid = _grid("euler", 4)
    est = EstimatorFile.zeros_like_grid(sched, correction="drift")
    est.tensors["k"] = np.array([0.25, 0.0, 0.0, 0.0])
    est.tensors["mu"] = np.array([0.0, 0.5, 0.0, 0.0])
    corrector = est.corrector(sched, dtype=torch.float64)
    assert corrector.coefficients.device == sched.timesteps.device
    m = torch.ones(1, 2, dtype=torch.float64)
    torch.testing.assert_close(corrector.correct_output(0, m), m / 1.25)
    torch.testing.assert_close(corrector.correct_output(1, m), m - 0.5)
