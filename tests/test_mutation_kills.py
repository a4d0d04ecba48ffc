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


# ---- stochastic samplers: the noise-lowering split and the corrector's noise path ---------------------
def test_stochastic_split_lowers_the_noise_variance_by_lambda_v_and_leaves_the_rest_to_the_pull():
    """``remaining = max(lambda v - s^2, 0)``, ``f = s (1 - sqrt(max(1 - lambda v / s^2, 0)))`` (0 where v = 0),
    so that the kept noise ``s - f`` has variance ``max(s^2 - lambda v, 0)``; a step without noise (s = 0)
    leaves everything to the pull."""
    from qdrift_stats.correct.coefficients import stochastic_split

    v = np.array([0.09, 0.25, 0.0, 0.5])
    s = np.array([0.5, 0.4, 0.3, 0.0])
    remaining, f = stochastic_split(v, s)
    np.testing.assert_allclose(remaining, [0.0, 0.25 - 0.16, 0.0, 0.5], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(f, [0.5 * (1 - np.sqrt(1 - 0.09 / 0.25)), 0.4, 0.0, 0.0], rtol=1e-14)
    np.testing.assert_allclose((s - f) ** 2, [0.25 - 0.09, 0.0, 0.09, 0.0], rtol=1e-12, atol=1e-15)
    # strength multiplies v; per channel: each channel's own v against the step's s
    remaining, f = stochastic_split(v, s, strength=2.0)
    np.testing.assert_allclose(remaining, [0.0, 0.5 - 0.16, 0.0, 1.0], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(f[0], 0.5 * (1 - np.sqrt(1 - 0.18 / 0.25)), rtol=1e-14)
    vc = np.array([[0.09, 0.16], [0.0, 0.05]])
    remaining, f = stochastic_split(vc, np.array([0.5, 0.2]))
    assert remaining.shape == f.shape == (2, 2) and f.dtype == np.float64
    np.testing.assert_allclose(f, [[0.5 * (1 - 0.8), 0.5 * (1 - 0.6)], [0.0, 0.2]], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(remaining, [[0.0, 0.0], [0.0, 0.01]], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stochastic_split(np.float32([0.09]), np.float32([0.5]))[1], 0.1, rtol=1e-7)


def _noise_corrector(channel_axis=1, dtype=torch.float64):
    from qdrift_stats.correct.corrector import Corrector

    _, grid = _grid("euler", 3)
    c = np.array([[0.2, 0.5], [0.0, 0.0], [0.0, 0.0]])
    f = np.array([[0.0, 0.0], [0.3, 0.6], [0.0, 0.0]])
    k = np.array([[0.25, 0.0], [0.0, 0.0], [0.0, 0.0]])
    mu = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    corrector = Corrector(grid, c, torch.device("cpu"), dtype, k=k, mu=mu, channel_axis=channel_axis, noise_factor=f)
    return grid, corrector


def test_corrector_lowers_the_injected_noise_per_channel_then_pulls():
    """Step 1 lowers the noise channel by channel, ``x' - f_c z``, and has no pull; step 0 pulls channel by
    channel, ``x' - c_c (x' - a_next x0_hat)``, with ``x0_hat = (x - b_0 m) / a_0`` (Euler, epsilon)."""
    grid, corrector = _noise_corrector()
    assert corrector.needs_noise and corrector.noise_active == [False, True, False]
    assert corrector.pull_active == [True, False, False] and corrector.active == [True, True, False]
    x = torch.linspace(-1, 1, 2 * 2 * 3, dtype=torch.float64).reshape(2, 2, 3)
    m, x_next, z = 0.5 * x + 0.1, 0.9 * x, torch.full((2, 2, 3), 2.0, dtype=torch.float64)
    out = corrector(1, x, m, x_next, z)
    torch.testing.assert_close(out[:, 0], x_next[:, 0] - 0.3 * 2.0)
    torch.testing.assert_close(out[:, 1], x_next[:, 1] - 0.6 * 2.0)
    x0 = (x - grid.b[0] * m) / grid.a[0]
    out = corrector(0, x, m, x_next)
    for ch, c in ((0, 0.2), (1, 0.5)):
        torch.testing.assert_close(out[:, ch], x_next[:, ch] - c * (x_next[:, ch] - grid.a_next[0] * x0[:, ch]))
    assert corrector(2, x, m, x_next) is x_next
    with pytest.raises(
        QDriftError, match=r"^step 1 injects noise that the correction lowers, but the sampler did not show it$"
    ):
        corrector(1, x, m, x_next)
    with pytest.raises(
        QDriftError,
        match=r"^the estimator is per channel with 2 channels, the samples have shape \(3, 2\); "
        r"fit it on a store of this model$",
    ):
        corrector(0, x.transpose(1, 2), m.transpose(1, 2), x_next.transpose(1, 2))
    # channels last (packed tokens): the same numbers along axis -1
    _, last = _noise_corrector(channel_axis=-1)
    xt, mt, nt = x.transpose(1, 2), m.transpose(1, 2), x_next.transpose(1, 2)
    torch.testing.assert_close(last(0, xt, mt, nt), out.transpose(1, 2))
    torch.testing.assert_close(last(1, xt, mt, nt, z.transpose(1, 2))[..., 1], nt[..., 1] - 1.2)


def test_corrector_to_keeps_every_part_of_the_correction():
    """``to`` moves the coefficients, the noise factor, the decomposition and the channel axis; device and dtype
    are the requested ones."""
    _, corrector = _noise_corrector(channel_axis=-1, dtype=torch.float32)
    moved = corrector.to("cpu", torch.float64)
    for name in ("coefficients", "noise_factor", "scale", "shift"):
        assert getattr(moved, name).dtype == torch.float64
    np.testing.assert_array_equal(moved.noise_factor.numpy(), [[0.0, 0.0], [0.3, 0.6], [0.0, 0.0]])
    np.testing.assert_array_equal(moved.scale.numpy()[0], [0.8, 1.0])
    np.testing.assert_array_equal(moved.shift.numpy()[2], [0.0, 1.0])
    assert moved.channel_axis == -1 and moved.noise_active == [False, True, False]
    assert moved.output_active == [True, False, True]
    half = corrector.to("cpu", torch.float16)
    assert half.coefficients.dtype == torch.float16 and half.noise_factor.dtype == torch.float16
    meta = corrector.to("meta", torch.float32)
    assert meta.coefficients.device.type == "meta" and meta.noise_factor.device.type == "meta"


def test_channelwise_defaults_to_axis_one_and_divergence_risk_to_strength_one():
    from qdrift_stats.correct.coefficients import channelwise

    like = torch.zeros(2, 3, 4, 5)
    assert channelwise(torch.ones(3), like).shape == (1, 3, 1, 1)
    assert channelwise(torch.ones(5), like, -1).shape == (1, 1, 1, 5)
    scalar = torch.tensor(0.5)
    assert channelwise(scalar, like) is scalar
    np.testing.assert_allclose(divergence_risk(np.array([0.5]), np.array([1.0])), [0.25], rtol=1e-14)


def test_adapter_x0_hat_is_the_grid_estimate_at_the_steps_own_level():
    from qdrift_stats.schedulers.base import get_adapter

    _, grid = _grid("euler", 3)
    x, m = torch.tensor([[1.0, -2.0]], dtype=torch.float64), torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    for i in (0, 2):
        expected = (x - grid.b[i] * m) / grid.a[i]  # epsilon: x = a x0 + b eps
        torch.testing.assert_close(get_adapter("euler").x0_hat(grid, i, x, m), expected)


def test_loop_passes_the_generator_and_shows_the_step_noise_to_a_noise_lowering_corrector():
    """Euler ancestral written out by hand (epsilon model ``0.1 * input``): the model sees ``x / sqrt(s^2 + 1)``,
    the step goes to ``s_down`` along ``eps`` and adds ``s_up z_i`` with ``z_i`` the generator's i-th standard
    normal draw; the corrector then removes ``f_i z_i``, with the same ``z_i``."""
    from qdrift_stats.correct.corrector import Corrector
    from qdrift_stats.loop import run_sampler

    sched, grid = _grid("euler-ancestral", 3)
    f, c = np.array([0.3, 0.7, 0.0]), np.array([0.1, 0.0, 0.0])
    corrector = Corrector(grid, c, torch.device("cpu"), torch.float64, noise_factor=f)
    x0 = torch.linspace(-2, 2, 8, dtype=torch.float64).reshape(2, 4) * float(grid.b[0])
    out = run_sampler(lambda z, t: 0.1 * z, sched, x0, corrector=corrector, generator=torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)
    x = x0
    for i in range(3):
        s, s_next = float(grid.b[i]), float(grid.b_next[i])
        s_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        s_down = (s_next**2 - s_up**2) ** 0.5
        eps = 0.1 * x / (s**2 + 1) ** 0.5
        z = torch.randn(x.shape, generator=draws, dtype=torch.float64)
        x_next = x + eps * (s_down - s) + (s_up - f[i]) * z
        x = x_next - c[i] * (x_next - (x - s * eps))  # then the pull to x0_hat = x - s eps (a = 1)
    torch.testing.assert_close(out, x)
    # without the corrector, the same generator gives the same noise
    sched2, _ = _grid("euler-ancestral", 3)
    plain = run_sampler(lambda z, t: 0.1 * z, sched2, x0, generator=torch.Generator().manual_seed(5))
    sched3, _ = _grid("euler-ancestral", 3)
    again = run_sampler(lambda z, t: 0.1 * z, sched3, x0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(plain, again, rtol=0, atol=0)
    assert not torch.allclose(plain, out)


def test_every_adapter_grid_carries_its_name_and_refuses_a_sigma_table_of_the_wrong_length():
    from qdrift_stats.schedulers.base import adapter_for, step_grid

    for name in ("euler", "ddim", "dpmpp-2m", "flow-euler", "flow-dpmpp-2m"):
        sched, _ = _grid(name, 4)
        assert step_grid(sched).name == name
        if name != "ddim":
            sched.sigmas = sched.sigmas[:-1]
            with pytest.raises(
                QDriftError, match=rf"^{name}: expected 5 sigmas, got 4 \(unsupported scheduler options\)$"
            ):
                adapter_for(sched).grid(sched)


def test_per_channel_checks_and_decomposition_follow_the_channel_axis():
    """Per-channel values need a channel axis of the right size: 2-d samples ``(batch, channel)`` are fine,
    1-d ones and a wrong size are refused with the counts; the decomposition ``(m - mu_c) / (1 + k_c)`` acts
    along ``channel_axis`` (-1: channels last)."""
    from qdrift_stats.correct.corrector import Corrector

    grid, corrector = _noise_corrector()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    m, x_next = 0.5 * x, 0.9 * x
    x0 = (x - grid.b[0] * m) / grid.a[0]
    expected = x_next - torch.tensor([0.2, 0.5], dtype=torch.float64) * (x_next - grid.a_next[0] * x0)
    torch.testing.assert_close(corrector(0, x, m, x_next), expected)
    torch.testing.assert_close(corrector.correct_output(0, m), torch.stack([m[:, 0] / 1.25, m[:, 1]], dim=1))
    with pytest.raises(
        QDriftError,
        match=r"^the estimator is per channel with 2 channels, the samples have shape \(\); fit it on a store",
    ):
        corrector(0, x[:, 0], m[:, 0], x_next[:, 0])
    with pytest.raises(
        QDriftError,
        match=r"^the decomposition is per channel with 2 channels, the samples have shape \(3, 4\); fit it on a store",
    ):
        corrector.correct_output(0, torch.zeros(1, 3, 4, dtype=torch.float64))
    _, last = _noise_corrector(channel_axis=-1)
    m3 = torch.arange(12, dtype=torch.float64).reshape(2, 3, 2)
    out = last.correct_output(0, m3)
    torch.testing.assert_close(out[..., 0], m3[..., 0] / 1.25)
    torch.testing.assert_close(out[..., 1], m3[..., 1])
    torch.testing.assert_close(last.correct_output(2, m3)[..., 1], m3[..., 1] - 1.0)
    from_v = Corrector.from_variance(grid, np.full(3, 0.01), "drift", 1.0, torch.device("meta"), torch.float32)
    assert from_v.coefficients.device.type == "meta"


def test_estimator_file_corrector_published_form_is_the_increment_rescaling_with_the_files_strength():
    """Form ``published`` (the baseline): an :class:`IncrementCorrector` with ``c = lambda V |s' - s| / (2 s)``
    (Euler), ratio 1, lambda the file's strength unless one is given; the decomposition and channel axis
    travel with it; device and dtype are the requested ones."""
    from qdrift_stats.correct.corrector import IncrementCorrector
    from qdrift_stats.correct.estimator_file import EstimatorFile

    sched, grid = _grid("euler", 4)
    est = EstimatorFile.zeros_like_grid(sched, correction="published")
    V = np.array([0.4, 0.3, 0.2, 0.1])
    est.tensors["output_variance"] = V
    est.tensors["k"] = np.array([0.25, 0.0, 0.0, 0.0])
    est.tensors["mu"] = np.array([0.0, 0.5, 0.0, 0.0])
    est.metadata["correction"]["strength"] = 2.0
    est.metadata["sample_dims"] = ["token", "channel"]
    rule = V * np.abs(grid.b_next - grid.b) / (2 * grid.b)
    corrector = est.corrector(sched, dtype=torch.float64)
    assert isinstance(corrector, IncrementCorrector) and corrector.channel_axis == -1
    np.testing.assert_allclose(corrector.coefficients.numpy(), 2.0 * rule, rtol=1e-12)
    assert corrector.ratio == [1.0, 1.0, 1.0, 1.0]
    np.testing.assert_allclose(corrector.scale.numpy(), [0.8, 1.0, 1.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(corrector.shift.numpy(), [0.0, 0.5, 0.0, 0.0])
    x, x_next = torch.ones(1, 2, dtype=torch.float64), torch.full((1, 2), 0.5, dtype=torch.float64)
    torch.testing.assert_close(corrector(0, x, x, x_next), x_next + 2.0 * rule[0] * (x_next - x))
    given = est.corrector(sched, strength=3.0, device="meta")
    assert given.coefficients.device.type == "meta" and given.coefficients.dtype == torch.float32
    np.testing.assert_allclose(given.to("cpu", torch.float64).coefficients.numpy(), 3.0 * rule, rtol=1e-12)
    drift = EstimatorFile.zeros_like_grid(sched, correction="drift")
    drift.tensors["output_variance"] = V
    assert isinstance(drift.corrector(sched, correction="published"), IncrementCorrector)
    assert not isinstance(drift.corrector(sched), IncrementCorrector)


def test_estimator_file_corrector_device_dtype_and_the_stochastic_split():
    """Deterministic schedulers: float32 by default, the requested device. A stochastic scheduler (Euler
    ancestral, noise ``s_up = b' sqrt(b^2 - b'^2) / b``): the noise is lowered by ``f = s (1 - sqrt(1 - v / s^2))``
    where ``v < s^2`` and only ``max(v - s^2, 0)`` is left to the pull, ``c = min(rest / (2 b'^2), 1)``."""
    from qdrift_stats.correct.estimator_file import EstimatorFile

    sched, grid = _grid("euler", 4)
    est = EstimatorFile.zeros_like_grid(sched, correction="drift")
    est.tensors["variance"] = 0.01 * grid.b_next**2
    assert est.corrector(sched).coefficients.dtype == torch.float32
    on_meta = est.corrector(sched, device="meta", dtype=torch.float64)
    assert on_meta.coefficients.device.type == "meta" and on_meta.coefficients.dtype == torch.float64
    anc, g = _grid("euler-ancestral", 4)
    est = EstimatorFile.zeros_like_grid(anc, correction="drift")
    s = g.b_next * np.sqrt(g.b**2 - g.b_next**2) / g.b
    v = np.array([0.25 * s[0] ** 2, 2.0 * s[1] ** 2, 0.5 * s[2] ** 2, 0.0])
    est.tensors["variance"] = v
    corrector = est.corrector(anc, dtype=torch.float64)
    f = np.array([s[0] * (1 - np.sqrt(0.75)), s[1], s[2] * (1 - np.sqrt(0.5)), 0.0])
    np.testing.assert_allclose(corrector.noise_factor.numpy(), f, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(corrector.coefficients.numpy(), [0.0, s[1] ** 2 / (2 * g.b_next[1] ** 2), 0.0, 0.0])
    assert corrector.noise_active == [True, True, True, False]


def test_estimator_file_corrector_says_what_differs_with_the_samplers_call():
    from qdrift_stats.correct.estimator_file import EstimatorFile

    sched, _ = _grid("euler", 4)
    est = EstimatorFile.zeros_like_grid(sched, correction="drift")
    est.metadata["grid"] = {"set_timesteps": {"mu": 0.5}}
    other, _ = _grid("euler", 6)
    with pytest.raises(QDriftError, match=r"the sigma shift \(mu 0\.5 vs 0\.8: another image size\)"):
        est.corrector(other, call={"mu": 0.8})
    with pytest.raises(QDriftError, match=r"the sigma shift \(mu 0\.5 vs 0\.8: another image size\)"):
        est.coefficients(step_grid_of(other), call={"mu": 0.8})


def step_grid_of(sched):
    from qdrift_stats.schedulers.base import step_grid

    return step_grid(sched)


def test_coefficients_are_computed_in_float64_from_float32_inputs():
    """Both inputs are converted to float64 before any arithmetic: the result equals the float64 formula
    on the (exactly upcast) float32 values to rounding, where float32 arithmetic would be off by ~1e-8."""
    v32, b32 = np.float32([0.1, 0.3]), np.float32([0.7, 0.9])
    v, b = v32.astype(np.float64), b32.astype(np.float64)
    np.testing.assert_allclose(correction_coefficients(v32, b32, "drift", 3.0), 3.0 * v / b**2 / 2, rtol=1e-15)
    np.testing.assert_allclose(correction_coefficients(v32, b, "drift", 3.0), 3.0 * v / b**2 / 2, rtol=1e-15)
    np.testing.assert_allclose(correction_coefficients(v, b32, "drift", 3.0), 3.0 * v / b**2 / 2, rtol=1e-15)


def test_estimator_file_grid_match_tolerances_are_absolute_on_timesteps_and_tight_at_the_clean_level():
    from qdrift_stats.correct.estimator_file import EstimatorFile
    from qdrift_stats.schedulers.base import StepGrid

    sched, grid = _grid("euler", 4)
    est = EstimatorFile.zeros_like_grid(sched, correction="drift")
    assert grid.b_next[-1] == 0 and grid.timesteps[0] > 900

    def with_(timesteps=None, b_next=None):
        return StepGrid(
            grid.name,
            grid.timesteps if timesteps is None else timesteps,
            grid.a,
            grid.b,
            grid.a_next,
            grid.b_next if b_next is None else b_next,
            grid.prediction_type,
        )

    # timesteps: 1e-6 absolute, no relative part (a relative 5e-6 moves t ~ 999 by 5e-3)
    assert not est._same_grid(with_(timesteps=grid.timesteps * (1 + 5e-6)))
    assert est._same_grid(with_(timesteps=grid.timesteps + 5e-7))
    # b_next = 0 at the clean level: 1e-9 absolute
    assert not est._same_grid(with_(b_next=grid.b_next + np.array([0, 0, 0, 5e-9])))
    assert est._same_grid(with_(b_next=grid.b_next + np.array([0, 0, 0, 5e-10])))


def test_estimator_file_coefficients_read_the_files_strength_and_form():
    from qdrift_stats.correct.estimator_file import EstimatorFile

    sched, grid = _grid("euler", 4)
    est = EstimatorFile.zeros_like_grid(sched, correction="drift")
    est.tensors["variance"] = np.array([0.01, 0.02, 0.03, 0.04]) * grid.b_next**2
    est.metadata["correction"]["strength"] = 2.0
    np.testing.assert_allclose(est.coefficients(grid), [0.01, 0.02, 0.03, 0.0], rtol=1e-12)
    np.testing.assert_allclose(est.coefficients(grid, strength=1.0), [0.005, 0.01, 0.015, 0.0], rtol=1e-12)
    est.tensors["output_variance"] = np.array([0.4, 0.3, 0.2, 0.1])
    rule = est.tensors["output_variance"] * np.abs(grid.b_next - grid.b) / (2 * grid.b)
    np.testing.assert_allclose(est.coefficients(grid, correction="published"), 2.0 * rule, rtol=1e-12)
    est.metadata["correction"]["form"] = "published"
    np.testing.assert_allclose(est.coefficients(grid, strength=0.5), 0.5 * rule, rtol=1e-12)


def test_estimator_file_stochastic_corrector_keeps_form_strength_decomposition_and_channel_axis():
    from qdrift_stats.correct.estimator_file import EstimatorFile

    anc, g = _grid("euler-ancestral", 4)
    s = g.b_next * np.sqrt(g.b**2 - g.b_next**2) / g.b
    est = EstimatorFile.zeros_like_grid(anc, correction="drift")
    est.tensors["variance"] = np.array([s[0] ** 2, 0.25 * s[1] ** 2, 0.0, 0.0])  # x 2 (strength): 2 s0^2, s1^2 / 2
    est.tensors["k"] = np.array([0.25, 0.0, 0.0, 0.0])
    est.tensors["mu"] = np.array([0.0, 0.5, 0.0, 0.0])
    est.metadata["correction"]["strength"] = 2.0
    est.metadata["sample_dims"] = ["token", "channel"]
    corrector = est.corrector(anc, correction="shrink", dtype=torch.float64)
    assert corrector.channel_axis == -1
    np.testing.assert_allclose(corrector.noise_factor.numpy()[:2], [s[0], s[1] * (1 - np.sqrt(0.5))], rtol=1e-12)
    gamma0 = s[0] ** 2 / g.b_next[0] ** 2  # the rest, 2 s0^2 - s0^2, over b'^2
    np.testing.assert_allclose(corrector.coefficients.numpy(), [1 - 1 / np.sqrt(1 + gamma0), 0, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(corrector.scale.numpy(), [0.8, 1, 1, 1], rtol=1e-12)
    np.testing.assert_allclose(corrector.shift.numpy(), [0, 0.5, 0, 0])
    drift = est.corrector(anc, dtype=torch.float64)  # the file's form
    np.testing.assert_allclose(drift.coefficients.numpy()[0], gamma0 / 2, rtol=1e-12)
    sched, _ = _grid("euler", 4)
    det = EstimatorFile.zeros_like_grid(sched, correction="drift")
    det.metadata["sample_dims"] = ["token", "channel"]
    assert det.corrector(sched).channel_axis == -1


def test_heun_steps_two_calls_per_landing_with_the_effective_output_and_one_correction():
    """Heun written out by hand (epsilon model ``0.1 * input``, levels ``s_0 > s_1 > s_2 > 0``): a predictor Euler
    call to ``s'``, a corrector call at the predicted state, landing on ``x + (e1 + e2) / 2 (s' - s)``; the last
    step is one Euler call. The output map ``1 / (1 + k_i)`` acts on both calls of step ``i``; the pull, once per
    landing, uses the effective output ``(e1 + e2) / 2`` in ``x0_hat = x - s m``; the callback sees that output,
    the first call's input and timestep, and the model sees the timesteps in order."""
    from qdrift_stats.correct.corrector import Corrector
    from qdrift_stats.loop import advance_step, run_sampler

    sched, grid = _grid("heun", 3)
    levels = sched.sigmas.double().numpy()[[0, 1, 3, 5]]
    np.testing.assert_allclose(grid.b_next, levels[1:], rtol=1e-12)
    c, k = np.array([0.2, 0.1, 0.0]), np.array([0.25, 0.0, 0.0])
    corrector = Corrector(grid, c, torch.device("cpu"), torch.float64, k=k)
    seen_t, info = [], []

    def model(z, t, **cond):
        seen_t.append(float(t))
        return 0.1 * z

    x0 = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3) * float(levels[0])
    out = run_sampler(model, sched, x0, corrector=corrector, callback=info.append)
    assert seen_t == [float(t) for t in sched.timesteps]
    x = x0
    for i in range(3):
        s, s_next = float(levels[i]), float(levels[i + 1])
        e1 = 0.1 * x / (s**2 + 1) ** 0.5 / (1 + k[i])
        if s_next > 0:
            x_pred = x + e1 * (s_next - s)
            e2 = 0.1 * x_pred / (s_next**2 + 1) ** 0.5 / (1 + k[i])
            m = (e1 + e2) / 2
        else:
            m = e1
        x_next = x + m * (s_next - s)
        x_next = x_next - c[i] * (x_next - (x - s * m))  # a = 1: x0_hat = x - s m
        torch.testing.assert_close(info[i]["output"], m)
        torch.testing.assert_close(info[i]["model_input"], x / (s**2 + 1) ** 0.5)
        assert float(info[i]["t"]) == float(sched.timesteps[2 * i])
        x = x_next
    torch.testing.assert_close(out, x)
    # advance_step on its own: step 0 by default, no noise shown unless asked, a grid needed for two calls
    fresh, _ = _grid("heun", 3)
    state, m, first, noise = advance_step(lambda z, t: 0.1 * z, fresh, x0, [0, 1], {}, {}, grid=grid)
    s, s_next = float(levels[0]), float(levels[1])
    e1 = 0.1 * x0 / (s**2 + 1) ** 0.5
    e2 = 0.1 * (x0 + e1 * (s_next - s)) / (s_next**2 + 1) ** 0.5
    torch.testing.assert_close(m, (e1 + e2) / 2)
    torch.testing.assert_close(state, x0 + (e1 + e2) / 2 * (s_next - s))
    torch.testing.assert_close(first, x0 / (s**2 + 1) ** 0.5)
    assert noise is None
    again, _ = _grid("heun", 3)
    with pytest.raises(QDriftError, match=r"^a step with more than one model call needs the scheduler's step grid$"):
        advance_step(lambda z, t: 0.1 * z, again, x0, [0, 1], {}, {})


def test_ddpm_noise_lowering_removes_f_times_the_generators_draw_at_the_landing():
    """DDPM draws its step noise ``z_0`` as the generator's first standard normal; with noise lowering ``f_0`` on
    step 0 the landed state is the plain one minus ``f_0 z_0`` (same generator seed); without ``capture`` the
    step shows no noise."""
    from qdrift_stats.correct.corrector import Corrector
    from qdrift_stats.loop import advance_step, run_sampler

    _, grid = _grid("ddpm", 3)
    f = np.array([0.05, 0.0, 0.0])
    corrector = Corrector(grid, np.zeros(3), torch.device("cpu"), torch.float64, noise_factor=f)
    x0 = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 4)
    lowered, plain = [], []
    for target, corr in ((lowered, corrector), (plain, None)):
        sched, _ = _grid("ddpm", 3)
        run_sampler(
            lambda z, t: 0.1 * z,
            sched,
            x0,
            corrector=corr,
            callback=lambda s, target=target: target.append(s["x_next"]),
            generator=torch.Generator().manual_seed(11),
        )
    z0 = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    torch.testing.assert_close(plain[0] - lowered[0], 0.05 * z0)
    sched, _ = _grid("ddpm", 3)
    kw = {"generator": torch.Generator().manual_seed(11)}
    assert advance_step(lambda z, t: 0.1 * z, sched, x0, [0], {}, kw)[3] is None
    sched, _ = _grid("ddpm", 3)
    kw = {"generator": torch.Generator().manual_seed(11)}
    torch.testing.assert_close(advance_step(lambda z, t: 0.1 * z, sched, x0, [0], {}, kw, capture=True)[3], z0)


def test_stochastic_split_computes_in_float64_from_float32_inputs():
    from qdrift_stats.correct.coefficients import stochastic_split

    v32, s32 = np.float32([0.1, 0.3]), np.float32([0.7, 0.9])
    v, s = 3.0 * v32.astype(np.float64), s32.astype(np.float64)
    remaining, f = stochastic_split(v32, s32, 3.0)
    np.testing.assert_allclose(f, s * (1 - np.sqrt(np.clip(1 - v / s**2, 0, None))), rtol=1e-15)
    np.testing.assert_allclose(remaining, np.maximum(v - s**2, 0.0), rtol=1e-15, atol=0)
    assert f.dtype == remaining.dtype == np.float64


def test_noise_lowering_keeps_the_states_dtype():
    """The drawn noise is cast to the state's dtype: a float32 state stays float32 under a float64 noise."""
    from qdrift_stats.correct.corrector import Corrector

    _, grid = _grid("euler", 3)
    corrector = Corrector(grid, np.zeros(3), torch.device("cpu"), torch.float32, noise_factor=np.array([0.5, 0, 0]))
    x = torch.ones(2, 3)
    out = corrector(0, x, x, x, torch.full((2, 3), 2.0, dtype=torch.float64))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.zeros(2, 3))


def test_a_scheduler_without_adapter_takes_one_timestep_entry_per_step():
    from diffusers import KDPM2DiscreteScheduler

    from qdrift_stats.schedulers.base import call_steps, find_adapter
    from qdrift_stats.testbed import VP_SCHEDULER_CONFIG

    sched = KDPM2DiscreteScheduler.from_config(VP_SCHEDULER_CONFIG)
    sched.set_timesteps(3)
    assert find_adapter(sched) is None
    np.testing.assert_array_equal(call_steps(sched), np.arange(len(sched.timesteps)))


# ---- the pull with a local spread (residual fraction rho, residual error delta) ----------------------
def test_local_spread_shrink_solves_its_defining_equation_and_reduces_to_the_plain_forms():
    """With ``u = 1 / (1 + rho gamma)`` the shrink ``c`` solves ``(1 - c rho)^2 + c^2 rho delta u = u`` (the residual's
    spread brought back), smallest root; where no ``c`` reaches ``u`` it minimises the left side (``c = rho / A``,
    ``A = rho^2 + rho delta u``). The drift is ``min(gamma / 2, 1 / (rho + delta))``. ``rho = 1, delta = 0``: the
    plain forms. Per channel: the step's rho and delta for every channel."""
    v = np.array([0.02, 0.08, 0.5, 0.3, 0.1])
    b_next = np.array([0.5, 0.4, 0.3, 0.2, 0.0])
    rho = np.array([0.6, 0.9, 0.3, 1.0, 0.5])
    delta = np.array([0.05, 0.0, 2.0, 0.0, 0.1])
    gamma = np.where(b_next > 0, v / np.where(b_next > 0, b_next, 1) ** 2, 0.0)
    u = 1 / (1 + rho * gamma)
    c = correction_coefficients(v, b_next, "shrink", residual_fraction=rho, residual_error=delta)
    lhs = (1 - c * rho) ** 2 + c**2 * rho * delta * u
    A = rho**2 + rho * delta * u
    reachable = rho**2 - A * (1 - u) >= 0
    assert reachable[:2].all() and not reachable[2]  # step 2: no pull reaches u
    np.testing.assert_allclose(lhs[:2], u[:2], rtol=1e-12)
    np.testing.assert_allclose(c[3], 1 - 1 / np.sqrt(1 + gamma[3]), rtol=1e-12)  # rho = 1, delta = 0
    np.testing.assert_allclose(c[2], rho[2] / A[2], rtol=1e-12)
    assert c[4] == 0.0  # lands on b = 0
    # the smaller root: the other root 2 rho / A - c also solves the equation
    assert np.all(c[:2] < rho[:2] / A[:2])
    drift = correction_coefficients(v, b_next, "drift", 2.0, residual_fraction=rho, residual_error=delta)
    np.testing.assert_allclose(drift, np.minimum(gamma, 1 / (rho + delta)) * (b_next > 0) + 0.0, rtol=1e-12)
    plain = correction_coefficients(v, b_next, "shrink", residual_fraction=np.ones(5))
    np.testing.assert_allclose(plain, correction_coefficients(v, b_next, "shrink"), rtol=1e-12)
    only_rho = correction_coefficients(v, b_next, "shrink", residual_fraction=rho)
    u0 = 1 / (1 + rho * gamma)
    np.testing.assert_allclose(((1 - only_rho * rho) ** 2)[:4], u0[:4], rtol=1e-12)  # delta absent: 0
    vc = np.stack([v, 2 * v], axis=1)
    per_channel = correction_coefficients(vc, b_next, "shrink", residual_fraction=rho, residual_error=delta)
    np.testing.assert_allclose(per_channel[:, 0], c, rtol=1e-12)
    two = correction_coefficients(2 * v, b_next, "shrink", residual_fraction=rho, residual_error=delta)
    np.testing.assert_allclose(per_channel[:, 1], two, rtol=1e-12)


def test_residual_terms_are_checked_with_one_line():
    for bad in (np.array([0.5, 0.0]), np.array([0.5, 1.5]), np.array([0.5, np.nan]), np.array([0.5])):
        with pytest.raises(QDriftError, match=r"^residual fraction must be 2 numbers in \(0, 1\]$"):
            correction_coefficients(np.ones(2), np.ones(2), "shrink", residual_fraction=bad)
    for bad in (np.array([0.1, -0.1]), np.array([0.1, np.inf]), np.array([0.1])):
        with pytest.raises(QDriftError, match=r"^residual error must be 2 finite numbers >= 0$"):
            correction_coefficients(np.ones(2), np.ones(2), residual_fraction=np.ones(2), residual_error=bad)
    np.testing.assert_allclose(
        correction_coefficients(np.ones(2), np.ones(2), "drift", residual_fraction=np.ones(2)), [0.5, 0.5]
    )


def test_estimator_file_passes_its_residual_terms_to_the_pull():
    from qdrift_stats.correct.estimator_file import EstimatorFile

    sched, grid = _grid("euler", 4)
    est = EstimatorFile.zeros_like_grid(sched, correction="drift")
    est.tensors["variance"] = 0.1 * grid.b_next**2
    est.tensors["residual_fraction"] = np.array([0.5, 1.0, 1.0, 1.0])
    est.tensors["residual_error"] = np.array([0.0, 19.5, 0.0, 0.0])
    # drift: min(gamma / 2, 1 / (rho + delta)) with gamma = 0.1: 0.05 everywhere but where 1 / (rho + delta) < 0.05
    np.testing.assert_allclose(est.coefficients(grid), [0.05, 1 / 20.5, 0.05, 0.0], rtol=1e-12)
    corrector = est.corrector(sched, dtype=torch.float64)
    np.testing.assert_allclose(corrector.coefficients.numpy(), [0.05, 1 / 20.5, 0.05, 0.0], rtol=1e-12)


def test_t_interval_of_one_run_is_the_value_with_no_interval():
    from qdrift_stats.estimators.empirical import t_interval

    mean, low, high = t_interval(np.array([[1.0, 2.0]]), 0.95)
    np.testing.assert_array_equal(mean, [1.0, 2.0])
    assert low.shape == high.shape == (2,) and np.isnan(low).all() and np.isnan(high).all()


def test_local_spread_terms_are_used_in_float64():
    v, b = np.array([0.02, 0.08]), np.array([0.5, 0.4])
    rho32, delta32 = np.float32([0.6, 0.9]), np.float32([0.05, 0.3])
    exact = correction_coefficients(
        v, b, "shrink", residual_fraction=rho32.astype(np.float64), residual_error=delta32.astype(np.float64)
    )
    np.testing.assert_array_equal(
        correction_coefficients(v, b, "shrink", residual_fraction=rho32, residual_error=delta32), exact
    )


def test_loop_runs_a_scheduler_without_adapter_one_call_per_entry():
    from diffusers import KDPM2DiscreteScheduler

    from qdrift_stats.loop import run_sampler
    from qdrift_stats.testbed import VP_SCHEDULER_CONFIG

    sched = KDPM2DiscreteScheduler.from_config(VP_SCHEDULER_CONFIG)
    sched.set_timesteps(3)
    calls = []
    run_sampler(lambda z, t: calls.append(float(t)) or torch.zeros_like(z), sched, torch.ones(1, 2))
    assert calls == [float(t) for t in sched.timesteps]


def test_corrector_decomposition_checks_and_tensors():
    from qdrift_stats.correct.corrector import Corrector

    _, grid = _grid("euler", 3)
    c = np.zeros(3)
    with pytest.raises(QDriftError, match=r"^decomposition has 2 steps but the sampler has 3$"):
        Corrector(grid, c, torch.device("cpu"), torch.float64, k=np.zeros(2))
    with pytest.raises(QDriftError, match=r"^decomposition has 3 steps but the sampler has 3$"):
        Corrector(grid, c, torch.device("cpu"), torch.float64, mu=np.zeros(2))
    with pytest.raises(QDriftError, match=r"^decomposition coefficient k must be > -1 at every step$"):
        Corrector(grid, c, torch.device("cpu"), torch.float64, k=np.array([0.0, -1.0, 0.0]))
    with pytest.raises(QDriftError, match=r"^noise correction has 2 steps but the sampler has 3$"):
        Corrector(grid, c, torch.device("cpu"), torch.float64, noise_factor=np.zeros(2))
    only_mu = Corrector(grid, c, torch.device("meta"), torch.float32, mu=np.array([[0.0, 1.0], [0, 0], [0, 0]]))
    assert only_mu.scale.device.type == only_mu.shift.device.type == "meta"
    assert only_mu.scale.dtype == only_mu.shift.dtype == torch.float32 and only_mu.scale.shape == (3,)
    assert only_mu.output_active == [True, False, False] and only_mu.noise_factor is None
    plain = Corrector(grid, c, torch.device("cpu"), torch.float64)
    assert plain.scale is None and plain.shift is None and plain.output_active == [False] * 3
    near = Corrector(grid, c, torch.device("cpu"), torch.float64, k=np.array([-0.5, 0.0, 0.0]))
    np.testing.assert_allclose(near.scale.numpy(), [2.0, 1.0, 1.0])


def test_gain_on_uses_the_adapter_named_by_the_grid_and_the_generic_gain_otherwise():
    from dataclasses import replace

    from qdrift_stats.schedulers.base import first_order_gain, gain_on

    _, grid = _grid("euler-ancestral", 4)
    s = grid.b_next * np.sqrt(grid.b**2 - grid.b_next**2) / grid.b
    np.testing.assert_allclose(gain_on(grid), np.sqrt(grid.b_next**2 - s**2) - grid.b, rtol=1e-12)
    generic = first_order_gain(grid.prediction_type, grid.a, grid.b, grid.a_next, grid.b_next)
    np.testing.assert_allclose(gain_on(replace(grid, name="not-registered")), generic, rtol=1e-12)
    np.testing.assert_allclose(generic, grid.b_next - grid.b, rtol=1e-12)  # Euler on epsilon


def test_estimator_file_residual_terms_on_img2img_grids_pad_the_early_steps():
    from qdrift_stats.correct.estimator_file import EstimatorFile

    sched, _ = _grid("euler", 6)
    full = EstimatorFile.zeros_like_grid(sched, correction="drift")
    est = EstimatorFile({k: v[2:] for k, v in full.tensors.items()}, dict(full.metadata, steps=4))
    est.tensors["residual_fraction"] = np.array([0.5, 0.6, 0.7, 0.8])
    rho, delta = est.residual_terms_on(step_grid_of(sched))
    np.testing.assert_array_equal(rho, [1, 1, 0.5, 0.6, 0.7, 0.8])
    np.testing.assert_array_equal(delta, np.zeros(6))
    est.tensors["residual_error"] = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_array_equal(est.residual_terms_on(step_grid_of(sched))[1], [0, 0, 0.1, 0.2, 0.3, 0.4])
    other, _ = _grid("euler", 5)
    assert est.residual_terms_on(step_grid_of(other)) == (None, None)


def test_x0_slope_per_prediction_type_in_float64():
    """``d x0_hat / d output``: ``-b / a`` (epsilon), ``-b / sqrt(a^2 + b^2)`` (v: ``x0 = a x / r^2 - b v / r``),
    1 (sample), ``-b`` (flow velocity); float32 levels are converted first; unknown types refused."""
    from qdrift_stats.schedulers.base import x0_slope

    a32, b32 = np.float32([0.6, 0.3]), np.float32([1.7, 0.9])
    a, b = a32.astype(np.float64), b32.astype(np.float64)
    np.testing.assert_array_equal(x0_slope("v_prediction", a32, b32), -b / np.sqrt(a * a + b * b))
    np.testing.assert_array_equal(x0_slope("epsilon", a32, b32), -b / a)
    np.testing.assert_array_equal(x0_slope("sample", a32, b32), [1.0, 1.0])
    np.testing.assert_array_equal(x0_slope("flow_prediction", a32, b32), -b)
    np.testing.assert_allclose(x0_slope("v_prediction", 0.6, 1.7), -1.7 / np.sqrt(3.25), rtol=1e-15)
    with pytest.raises(QDriftError, match=r"^unsupported prediction_type 'bogus'$"):
        x0_slope("bogus", a, b)


def test_float32_levels_and_decomposition_are_used_in_float64():
    from qdrift_stats.correct.corrector import Corrector
    from qdrift_stats.schedulers.base import first_order_gain, x0_slope

    a32, b32, an32, bn32 = (
        np.float32([0.6, 0.7]),
        np.float32([0.8, 0.7]),
        np.float32([0.7, 0.9]),
        np.float32([0.7, 0.4]),
    )
    a, b, an, bn = (v.astype(np.float64) for v in (a32, b32, an32, bn32))
    np.testing.assert_array_equal(first_order_gain("epsilon", a32, b32, an32, bn32), (an - bn * a / b) * (-b / a))
    assert x0_slope("sample", a32, b32).shape == (2,)
    _, grid = _grid("euler", 3)
    k32 = np.float32([0.1, 0.3, 0.0])
    corrector = Corrector(grid, np.zeros(3), torch.device("cpu"), torch.float64, k=k32, mu=np.float32([0.1, 0, 0]))
    np.testing.assert_array_equal(corrector.scale.numpy(), 1.0 / (1.0 + k32.astype(np.float64)))


def test_estimator_file_stochastic_corrector_device_dtype_strength_and_residual_terms():
    from qdrift_stats.correct.estimator_file import EstimatorFile

    anc, g = _grid("euler-ancestral", 4)
    s = g.b_next * np.sqrt(g.b**2 - g.b_next**2) / g.b
    est = EstimatorFile.zeros_like_grid(anc, correction="drift")
    est.tensors["variance"] = np.array([s[0] ** 2, 0.0, 0.0, 0.0])  # x 2 (the file's strength): rest s0^2
    est.metadata["correction"]["strength"] = 2.0
    c = est.corrector(anc, device="meta")
    assert c.coefficients.device.type == "meta" and c.coefficients.dtype == torch.float32
    np.testing.assert_allclose(
        est.corrector(anc, dtype=torch.float64).coefficients.numpy()[0], s[0] ** 2 / (2 * g.b_next[0] ** 2), rtol=1e-12
    )
    est.tensors["residual_fraction"] = np.array([0.5, 1.0, 1.0, 1.0])
    est.tensors["residual_error"] = np.array([1.5, 0.0, 0.0, 0.0])
    # drift clipped at 1 / (rho + delta) = 0.5 when gamma / 2 is larger
    est.tensors["variance"] = np.array([s[0] ** 2 + 2 * g.b_next[0] ** 2, 0.0, 0.0, 0.0]) / 2
    np.testing.assert_allclose(est.corrector(anc, dtype=torch.float64).coefficients.numpy()[0], 0.5, rtol=1e-12)
    est.metadata["grid"] = {"set_timesteps": {"mu": 0.5}}
    other, _ = _grid("euler-ancestral", 6)
    with pytest.raises(QDriftError, match=r"the sigma shift \(mu 0\.5 vs 0\.8: another image size\)"):
        est.corrector(other, call={"mu": 0.8})
