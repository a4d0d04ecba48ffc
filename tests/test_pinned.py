"""The correction path and the intervals pinned per step and per index against hand-derived values.

Every expected value here is computed in the test from first principles (the scheduler's own
sigma / alpha tables, the closed-form Euler / DDIM / flow-Euler updates, textbook t quantiles,
an OLS fitted with ``numpy.polyfit``), never from the function under test. Each test is meant to
fail on a specific plausible bug: a wrong step index, the wrong noise level, the wrong divisor
or quantile. ``studies/bug_injection.py`` patches such bugs in and checks that they fail here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from qdrift_stats.correct.coefficients import correction_coefficients
from qdrift_stats.correct.corrector import Corrector
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.loop import run_sampler
from qdrift_stats.schedulers.base import make_scheduler, output_gains, step_grid
from qdrift_stats.testbed import FLOW_SCHEDULER_CONFIG, VP_SCHEDULER_CONFIG

# Student-t 0.975 quantiles from printed tables (e.g. Abramowitz & Stegun 26.10), not from scipy.
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 9: 2.262157163}
Z975 = 1.959963985


# ---- the step grid read off diffusers' own tables -------------------------------------------------
def levels_by_hand(name: str, steps: int):
    """``(a, b, a_next, b_next)`` straight from the scheduler's public tables (no adapter code)."""
    config = FLOW_SCHEDULER_CONFIG if name.startswith("flow") else VP_SCHEDULER_CONFIG
    sched = make_scheduler(name, config)
    sched.set_timesteps(steps)
    if name == "ddim":
        abar = sched.alphas_cumprod.double().numpy()
        t = sched.timesteps.numpy().astype(int)
        stride = config["num_train_timesteps"] // steps
        abar_t = abar[t]
        abar_n = np.array([abar[p] if p >= 0 else float(sched.final_alpha_cumprod) for p in t - stride])
        return np.sqrt(abar_t), np.sqrt(1 - abar_t), np.sqrt(abar_n), np.sqrt(1 - abar_n)
    s = sched.sigmas.double().numpy()
    if name == "euler":  # state x0 + sigma eps
        return np.ones(steps), s[:-1], np.ones(steps), s[1:]
    if name == "dpmpp-2m":  # state alpha x0 + sigma_t eps, with alpha = 1/sqrt(1+s^2)
        al = 1 / np.sqrt(1 + s**2)
        return al[:-1], (s * al)[:-1], al[1:], (s * al)[1:]
    return 1 - s[:-1], s[:-1], 1 - s[1:], s[1:]  # flow: (1 - s) x0 + s eps


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp-2m", "flow-euler", "flow-dpmpp-2m"])
def test_step_grid_levels_equal_the_schedulers_own_tables(name):
    grid = step_grid(_scheduler(name, 7))
    a, b, a_next, b_next = levels_by_hand(name, 7)
    np.testing.assert_allclose(grid.a, a, rtol=1e-12)
    np.testing.assert_allclose(grid.b, b, rtol=1e-12)
    np.testing.assert_allclose(grid.a_next, a_next, rtol=1e-12)
    np.testing.assert_allclose(grid.b_next, b_next, rtol=1e-12, atol=1e-15)


def _scheduler(name: str, steps: int):
    sched = make_scheduler(name, FLOW_SCHEDULER_CONFIG if name.startswith("flow") else VP_SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    return sched


# ---- coefficients: index and level ---------------------------------------------------------------
def test_coefficients_pin_the_target_level_per_step():
    """``c_i`` uses ``b_{i+1}`` (the level step ``i`` lands on), with distinct values at every step."""
    v = np.array([0.02, 0.03, 0.05, 0.07])
    b_next = np.array([0.9, 0.6, 0.3, 0.0])
    gamma = np.array([0.02 / 0.81, 0.03 / 0.36, 0.05 / 0.09, 0.0])
    np.testing.assert_allclose(correction_coefficients(v, b_next, "drift"), gamma / 2, rtol=1e-14)
    np.testing.assert_allclose(correction_coefficients(v, b_next, "shrink"), 1 - 1 / np.sqrt(1 + gamma), rtol=1e-14)
    np.testing.assert_allclose(correction_coefficients(v, b_next, "drift", 3.0), 3 * gamma / 2, rtol=1e-14)
    # per channel: each channel's own variance, the step's own level
    vc = np.stack([v, 2 * v], axis=1)
    np.testing.assert_allclose(correction_coefficients(vc, b_next, "drift")[:, 1], gamma, rtol=1e-14)


@pytest.mark.parametrize("name", ["euler", "ddim", "flow-euler", "dpmpp-2m"])
def test_estimator_file_coefficients_use_the_level_each_step_lands_on(name):
    """The production path (estimator file -> corrector) divides step ``i``'s variance by ``b_{i+1}^2``."""
    steps = 6
    sched = _scheduler(name, steps)
    _, _, _, b_next = levels_by_hand(name, steps)
    est = EstimatorFile.zeros_like_grid(sched, correction="drift")
    # distinct per step, and far from the drift clip at c = 1 (v / (2 b'^2) = 0.01 (i + 1))
    v = 0.02 * np.arange(1, steps + 1, dtype=np.float64) * np.where(b_next > 0, b_next, 1.0) ** 2
    est.tensors["variance"] = v
    expected = np.where(b_next > 0, v / (2 * np.where(b_next > 0, b_next, 1) ** 2), 0.0)
    np.testing.assert_allclose(est.coefficients(step_grid(sched)), expected, rtol=1e-12)
    corrector = est.corrector(sched, dtype=torch.float64)
    np.testing.assert_allclose(corrector.coefficients.numpy(), expected, rtol=1e-12)
    shrink = est.corrector(sched, correction="shrink", strength=2.0, dtype=torch.float64)
    gamma = np.where(b_next > 0, 2.0 * v / np.where(b_next > 0, b_next, 1) ** 2, 0.0)
    np.testing.assert_allclose(shrink.coefficients.numpy(), 1 - 1 / np.sqrt(1 + gamma), rtol=1e-12)
    grid = step_grid(sched)
    np.testing.assert_allclose(
        Corrector.from_variance(grid, v, "drift", 1.0, torch.device("cpu"), torch.float64).coefficients.numpy(),
        expected,
        rtol=1e-12,
    )


# ---- the corrected loop, step by step -------------------------------------------------------------
def _toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic model whose output differs per element and per step."""
    return 0.3 * x + 0.05 * torch.sin(x * 3.0 + float(t) / 100.0) + 0.1


def _plain_step_by_hand(name: str, a, b, a_next, b_next, x, out):
    """The scheduler's update in closed form, from the level table (one-step solvers)."""
    if name == "euler":  # Euler on the sigma ODE, epsilon prediction: x + (sigma' - sigma) eps
        return x + (b_next - b) * out
    if name == "ddim":  # eta = 0: a' x0_hat + b' eps
        x0 = (x - b * out) / a
        return a_next * x0 + b_next * out
    return x + (b_next - b) * out  # flow Euler: x + (s' - s) v


@pytest.mark.parametrize("name", ["euler", "ddim", "flow-euler"])
def test_corrected_loop_step_by_step_matches_the_hand_derivation(name):
    """Each corrected step: ``x' - c_i (x' - a_{i+1} x0_hat_i)``, ``x0_hat_i`` from the level ``(a_i, b_i)``
    of the state the model saw, ``c_i`` the step's own coefficient, ``x'`` the plain scheduler update."""
    steps = 5
    sched = _scheduler(name, steps)
    a, b, a_next, b_next = levels_by_hand(name, steps)
    coefficients = np.array([0.11, 0.23, 0.37, 0.41, 0.53])  # distinct: any index shift shows
    corrector = Corrector(step_grid(sched), coefficients, torch.device("cpu"), torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64) * float(getattr(sched, "init_noise_sigma", 1.0))
    trace = []
    run_sampler(_toy_model, sched, x, corrector=corrector, callback=lambda info: trace.append(info))
    assert [info["i"] for info in trace] == list(range(steps))
    for i, info in enumerate(trace):
        x_i, out = info["x"], info["output"]
        plain = _plain_step_by_hand(name, a[i], b[i], a_next[i], b_next[i], x_i, out)
        x0_hat = x_i - b[i] * out if name == "flow-euler" else (x_i - b[i] * out) / a[i]
        expected = plain - coefficients[i] * (plain - a_next[i] * x0_hat)
        # diffusers steps in float32 internally: agreement to float32 rounding
        torch.testing.assert_close(info["x_next"], expected, rtol=1e-6, atol=1e-6)


def test_output_decomposition_divides_by_one_plus_k_at_the_steps_own_index():
    sched = _scheduler("euler", 3)
    k = np.array([0.25, -0.2, 0.5])
    mu = np.array([0.1, 0.0, -0.3])
    corrector = Corrector(step_grid(sched), np.zeros(3), torch.device("cpu"), torch.float64, k=k, mu=mu)
    m = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    for i in range(3):
        torch.testing.assert_close(corrector.correct_output(i, m), (m - mu[i]) / (1 + k[i]))


# ---- first-order gain ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["euler", "ddim", "flow-euler", "dpmpp-2m", "flow-dpmpp-2m"])
def test_first_order_gain_is_the_closed_form_per_step(name):
    """``d x_{i+1} / d m_i`` of a first-order step: Euler ``b' - b``; DDIM / DPM-Solver 1 (VP, eps)
    ``b' - a' b / a``; flow ``s' - s``."""
    from qdrift_stats.schedulers.base import first_order_gain

    steps = 6
    a, b, a_next, b_next = levels_by_hand(name, steps)
    if name in ("euler", "flow-euler", "flow-dpmpp-2m"):
        expected = b_next - b
    else:
        expected = b_next - a_next * b / a
    np.testing.assert_allclose(output_gains(name, _config(name), steps), expected, rtol=1e-6, atol=1e-9)
    prediction = "flow_prediction" if name.startswith("flow") else "epsilon"
    np.testing.assert_allclose(first_order_gain(prediction, a, b, a_next, b_next), expected, rtol=1e-12)


def _config(name):
    return FLOW_SCHEDULER_CONFIG if name.startswith("flow") else VP_SCHEDULER_CONFIG


# ---- intervals, exactly -------------------------------------------------------------------------
def test_t_interval_uses_the_sample_sd_and_the_t_quantile_with_runs_minus_one_df():
    from qdrift_stats.estimators.empirical import t_interval

    per_run = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [4.0, 10.0], [5.0, 40.0]])
    mean, low, high = t_interval(per_run, 0.95)
    sd = np.array([np.sqrt(2.5), np.sqrt(180.0)])  # sum of squares / (5 - 1)
    half = T975[4] * sd / np.sqrt(5)
    np.testing.assert_allclose(mean, [3.0, 16.0])
    np.testing.assert_allclose(high, mean + half, rtol=1e-9)
    np.testing.assert_allclose(low, np.maximum(mean - half, 0.0), rtol=1e-9)
    assert low[1] == 0.0  # floored: 16 - 2.776 * 6 < 0
    # two runs: t with 1 df
    mean, low, high = t_interval(np.array([[1.0], [3.0]]), 0.95)
    np.testing.assert_allclose(high, 2 + T975[1] * np.sqrt(2) / np.sqrt(2), rtol=1e-9)


def _hand_store(delta_out, out_fp, gain, b, b_next, scheduler="euler"):
    """A store built by hand: ``delta_out, out_fp`` ``(run, step, sample, channel)``, ``delta_x = gain delta_out``."""
    runs, steps = delta_out.shape[:2]
    dims = ("run", "step", "sample", "channel")
    a = np.ones(steps)
    return xr.Dataset(
        {
            "delta_out": (dims, delta_out),
            "out_fp": (dims, out_fp),
            "delta_x": (dims, delta_out * gain[None, :, None, None]),
        },
        coords={
            "run": np.arange(runs),
            "seed": ("run", np.arange(runs)),
            "step": np.arange(steps),
            "timestep": ("step", np.linspace(900, 100, steps)),
            "a": ("step", a),
            "b": ("step", b),
            "a_next": ("step", a),
            "b_next": ("step", b_next),
            "gain": ("step", gain),
        },
        attrs={"scheduler": scheduler, "prediction_type": "epsilon", "pair": "hand", "batch_size": delta_out.shape[2]},
    )


def test_empirical_first_order_statistic_and_interval_on_a_hand_store():
    from qdrift_stats.estimators import get_estimator

    rng = np.random.default_rng(0)
    b = np.array([3.0, 2.0, 1.0])
    b_next = np.array([2.0, 1.0, 0.0])
    gain = b_next - b
    d = rng.normal(size=(4, 3, 50, 2)) * np.array([0.1, 0.2, 0.3])[None, :, None, None]
    ds = _hand_store(d, rng.normal(size=d.shape), gain, b, b_next)
    fitted = get_estimator("first-order").fit(ds)
    per_run = gain**2 * (d**2).mean(axis=(2, 3))  # (run, step)
    mean = per_run.mean(axis=0)
    half = T975[3] * per_run.std(axis=0, ddof=1) / 2
    np.testing.assert_allclose(fitted.variance, mean, rtol=1e-12)
    np.testing.assert_allclose(fitted.ci_high, mean + half, rtol=1e-9)
    np.testing.assert_allclose(fitted.ci_low, np.maximum(mean - half, 0), rtol=1e-9)
    lockstep = get_estimator("empirical").fit(ds)  # delta_x = gain delta_out exactly here
    np.testing.assert_allclose(lockstep.variance, mean, rtol=1e-12)


def test_decomposed_residual_is_divided_by_one_plus_k_and_k_is_the_ols_slope():
    """``delta_out = k m_fp + mu + r`` with k = 0.25: the residual statistic is ``c^2 E (r/(1+k))^2``,
    with k, mu the pooled OLS fit (here from ``numpy.polyfit``)."""
    from qdrift_stats.estimators import DecomposedEstimator

    rng = np.random.default_rng(1)
    runs, steps, n = 3, 2, 400
    out_fp = rng.normal(size=(runs, steps, n, 1))
    r = 0.2 * rng.normal(size=out_fp.shape)
    d = 0.25 * out_fp + 0.05 + r
    b, b_next = np.array([2.0, 1.0]), np.array([1.0, 0.5])
    gain = b_next - b
    fitted = DecomposedEstimator().fit(_hand_store(d, out_fp, gain, b, b_next))
    for i in range(steps):
        k, mu = np.polyfit(out_fp[:, i].ravel(), d[:, i].ravel(), 1)
        assert fitted.k[i] == pytest.approx(k, rel=1e-9) and fitted.mu[i] == pytest.approx(mu, rel=1e-9, abs=1e-12)
        residual = (d[:, i] - k * out_fp[:, i] - mu) / (1 + k)
        per_run = gain[i] ** 2 * (residual**2).reshape(runs, -1).mean(axis=1)
        assert fitted.variance[i] == pytest.approx(per_run.mean(), rel=1e-9)
        assert fitted.ci_high[i] == pytest.approx(per_run.mean() + T975[2] * per_run.std(ddof=1) / np.sqrt(3), rel=1e-7)


def test_decomposed_k_interval_is_run_clustered_on_t_with_runs_minus_one_df():
    """CR1 sandwich (Stata's small-sample factor ``G/(G-1) (N-1)/(N-K)``) written out by hand."""
    from qdrift_stats.estimators import DecomposedEstimator

    rng = np.random.default_rng(2)
    runs, n = 4, 100
    out_fp = rng.normal(size=(runs, 1, n, 1))
    run_effect = rng.normal(size=(runs, 1, 1, 1)) * 0.1
    d = (0.1 + run_effect) * out_fp + 0.2 * rng.normal(size=out_fp.shape)
    fitted = DecomposedEstimator().fit(_hand_store(d, out_fp, np.array([-1.0]), np.array([2.0]), np.array([1.0])))
    x, y = out_fp.reshape(runs, n), d.reshape(runs, n)
    design = np.stack([np.ones(runs * n), x.ravel()], axis=1)
    beta, *_ = np.linalg.lstsq(design, y.ravel(), rcond=None)
    e = (y.ravel() - design @ beta).reshape(runs, n)
    bread = np.linalg.inv(design.T @ design)
    meat = np.zeros((2, 2))
    for g in range(runs):
        s = design.reshape(runs, n, 2)[g].T @ e[g]
        meat += np.outer(s, s)
    N, K, G = runs * n, 2, runs
    cov = bread @ meat @ bread * G / (G - 1) * (N - 1) / (N - K)
    se_k = np.sqrt(cov[1, 1])
    k_ci = fitted.k_ci[0]
    np.testing.assert_allclose(k_ci, [beta[1] - T975[G - 1] * se_k, beta[1] + T975[G - 1] * se_k], rtol=1e-8)


def test_smooth_glm_covariate_is_the_level_the_model_saw():
    """Output error ``u(b) = 0.01 b^2`` exactly (log-linear in log b, inside the spline's span): the GLM
    reproduces it at every step, and ``v_i = c_i^2 u(b_i)`` with ``b_i`` the level of the state at step i."""
    from qdrift_stats.estimators import SmoothGLMEstimator

    b = np.array([4.0, 2.5, 1.6, 1.0, 0.6, 0.3, 0.1])
    b_next = np.concatenate([b[1:], [0.0]])
    gain = b_next - b
    rng = np.random.default_rng(4)
    z = rng.normal(size=(3, len(b), 64, 1))
    z /= np.sqrt((z**2).mean(axis=(2, 3), keepdims=True))  # every (run, step) mean square exactly 1
    d = z * 0.1 * b[None, :, None, None]
    fitted = SmoothGLMEstimator().fit(_hand_store(d, np.zeros_like(d), gain, b, b_next))
    np.testing.assert_allclose(fitted.u_fit, 0.01 * b**2, rtol=1e-6)
    np.testing.assert_allclose(fitted.variance, gain**2 * 0.01 * b**2, rtol=1e-6)


def test_smooth_glm_default_interval_is_run_clustered_on_t_with_runs_minus_one_df():
    """The default interval is statsmodels' run-clustered GLM prediction interval (normal quantile) with
    the quantile replaced by t(R-1): on the log scale its half-width is exactly ``t_{R-1} / z`` times wider."""
    import statsmodels.api as sm

    from qdrift_stats.estimators import SmoothGLMEstimator
    from qdrift_stats.estimators.smooth import log_b_basis, spline_knots

    b = np.array([4.0, 2.5, 1.6, 1.0, 0.6, 0.3, 0.1])
    b_next = np.concatenate([b[1:], [0.0]])
    rng = np.random.default_rng(5)
    runs = 4
    scale = np.exp(0.3 * rng.normal(size=(runs, 1, 1, 1)))  # run-level effects
    d = rng.normal(size=(runs, len(b), 32, 1)) * 0.1 * b[None, :, None, None] * scale
    fitted = SmoothGLMEstimator().fit(_hand_store(d, np.zeros_like(d), b_next - b, b, b_next))
    assert fitted.params["cov_type"] == "cluster"
    u = (d**2).mean(axis=(2, 3))
    log_b = np.log(b)
    basis = log_b_basis(log_b, spline_knots(log_b, 6))
    glm = sm.GLM(u.ravel(), np.tile(basis, (runs, 1)), family=sm.families.Gamma(link=sm.families.links.Log()))
    result = glm.fit(cov_type="cluster", cov_kwds={"groups": np.repeat(np.arange(runs), len(b))})
    pred = result.get_prediction(basis)
    normal_half = np.log(np.asarray(pred.conf_int(alpha=0.05))[:, 1] / pred.predicted_mean)
    np.testing.assert_allclose(fitted.u_fit, pred.predicted_mean, rtol=1e-6)
    ours_half = np.log(fitted.ci_high / fitted.variance)
    np.testing.assert_allclose(ours_half[:-1], normal_half[:-1] * T975[runs - 1] / Z975, rtol=1e-5)


def test_simultaneous_band_is_the_t_interval_when_steps_move_together_and_wider_otherwise():
    """Steps that are exact multiples of one run-level value: ``max_i |T_i| = |T|``, so the band's critical
    value is t_{R-1}'s 97.5% point (2.776 for 5 runs, tables) up to simulation error; with independent
    steps it exceeds it."""
    from qdrift_stats.estimators.bands import run_mean_band
    from qdrift_stats.estimators.empirical import t_interval

    rng = np.random.default_rng(7)
    base = rng.gamma(4.0, size=(5, 1))
    together = base * np.linspace(1.0, 3.0, 12)[None, :]
    mean, _, high = t_interval(together, 0.95)
    _, band_high = run_mean_band(together, 0.95)
    crit = (band_high - mean) / (together.std(axis=0, ddof=1) / np.sqrt(5))
    np.testing.assert_allclose(crit, T975[4], rtol=0.06)  # 20000 draws: simulation sd about 1.6%
    independent = rng.gamma(4.0, size=(5, 12))
    mean, _, high = t_interval(independent, 0.95)
    _, band_high = run_mean_band(independent, 0.95)
    assert np.all(band_high - mean > 1.2 * (high - mean))


def test_clustered_glm_band_critical_value_is_that_of_studentized_steps():
    """The band of ``exog @ params`` under a covariance estimated from ``R`` clusters: each step's statistic is a
    t with ``R - 1`` df studentized by its own standard error. Steps moving together: the critical value is
    t_{R-1}'s 97.5% point (tables). Independent steps (identity design and covariance): ``max_i |T_i|`` of
    ``k`` independent t_{R-1}, whose 95% quantile solves ``(2 F(c) - 1)^k = 0.95``; a common chi-square
    divisor (multivariate t) would give a smaller value. Known covariance (``runs=None``): the normal 1.96."""
    from scipy import stats

    from qdrift_stats.estimators.bands import linear_predictor_band

    k = 12
    params, eta = np.array([0.5]), np.full(k, 0.5)
    together = np.ones((k, 1))
    for runs, expected in ((5, T975[4]), (None, Z975)):
        low, high = linear_predictor_band(together, params, np.array([[0.04]]), runs, 0.95)
        np.testing.assert_allclose((high - eta) / 0.2, expected, rtol=0.05)  # 20000 draws: sd about 1.6%
        np.testing.assert_allclose(eta - low, high - eta, rtol=1e-12)
    exact = stats.t.ppf(1 - (1 - 0.95 ** (1 / k)) / 2, 4)  # 5.85 for k = 12
    low, high = linear_predictor_band(np.eye(k), np.zeros(k), 0.25 * np.eye(k), 5, 0.95)
    np.testing.assert_allclose(high / 0.5, exact, rtol=0.06)
    w = np.random.default_rng(3).chisquare(4, 200_000)
    z = np.abs(np.random.default_rng(4).standard_normal((200_000, k))).max(axis=1)
    assert np.quantile(z / np.sqrt(w / 4), 0.95) < 0.9 * exact  # the multivariate t (4.96): what the band is not
