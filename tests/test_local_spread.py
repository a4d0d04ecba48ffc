"""The pull sized by the local spread: residual fraction, coefficients, estimator file (issue 12).

Expected values are derived here from the Gaussian closed forms, not read from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdrift_stats.correct.coefficients import correction_coefficients
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.persistent import quantized_path_errors, residual_fraction
from qdrift_stats.loop import initial_noise, prepared_scheduler, run_sampler
from qdrift_stats.schedulers.base import step_grid
from qdrift_stats.testbed.errors import ZeroError
from qdrift_stats.testbed.mixture import GaussianMixture, MixturePair

S = 0.3  # the data's std (one Gaussian mode)


def one_mode_pair(kind: str) -> MixturePair:
    mixture = GaussianMixture(torch.zeros(1, 4, dtype=torch.float64), S, torch.ones(1, dtype=torch.float64))
    return MixturePair(mixture, kind=kind, error=ZeroError())


@pytest.mark.parametrize(("kind", "scheduler"), [("vp", "ddim"), ("flow", "flow-euler")])
def test_residual_fraction_is_the_exact_noise_estimates_power_at_each_landing_level(kind, scheduler):
    # For data N(0, S^2) the exact noise estimate at x = a x0 + b eps is eps_hat = b x / (a^2 S^2 + b^2),
    # so the residual's power in units of b^2 is b^2 E[x^2] / (a^2 S^2 + b^2)^2 over the sampler's states
    # (= b^2 / (a^2 S^2 + b^2) where they follow the marginal). Step i's fraction
    # is taken at its own input (the pull's residual is b_{i+1} eps_hat_i, built from step i's output).
    pair = one_mode_pair(kind)
    steps, seeds, batch = 12, [0, 1], 256
    _, _, power, error = quantized_path_errors(pair, scheduler, steps, seeds, batch)
    np.testing.assert_array_equal(error, 0.0)  # an exact pair: no model error in the residual
    grid = step_grid(prepared_scheduler(pair, scheduler, steps))
    second_moment = np.zeros(steps)
    for seed in seeds:
        scheduler_ = prepared_scheduler(pair, scheduler, steps)
        x, cond = initial_noise(pair, scheduler_, batch, seed)
        states = []
        run_sampler(pair.fp, scheduler_, x, cond, callback=lambda info, states=states: states.append(info["x"]))
        second_moment += np.array([float(torch.mean(s.double() ** 2)) for s in states]) / len(seeds)
    level = grid.a**2 * S**2 + grid.b**2
    expected_power = grid.b**2 * second_moment / level**2
    rho = residual_fraction(power)
    for i in range(steps):
        # clipped at 1: an exact denoiser's noise estimate has E eps_hat^2 <= 1; above 1 is sampling noise
        assert rho[i] == pytest.approx(min(expected_power[i], 1.0), rel=1e-4, abs=1e-7), i  # float32 model
    # close to the marginal's b^2 / (a^2 S^2 + b^2), and well below 1 once b is below the data's spread
    marginal = grid.b**2 / (grid.a**2 * S**2 + grid.b**2)
    np.testing.assert_allclose(rho, marginal, rtol=0.15, atol=0.01)
    assert rho[0] > 0.95 and rho[-1] < 0.5


def test_residual_fraction_clips_to_the_unit_interval_and_fills_missing_levels():
    np.testing.assert_array_equal(residual_fraction(np.array([1.3, 0.5, np.nan, 0.0])), [1.0, 0.5, 1.0, 1e-6])


@pytest.mark.parametrize("rho", [1.0, 0.5, 0.1, 0.01])
@pytest.mark.parametrize("gamma", [0.01, 0.5, 3.0, 40.0])
def test_shrink_with_a_residual_fraction_undoes_a_gaussian_convolution(rho, gamma):
    # Local spread S^2 = b^2 / rho; the residual is rho * y for y = x - a mu; after
    # the pull y' = (1 - c rho) y. A variance w = gamma b^2 added to S^2 is removed exactly when
    # (1 - c rho)^2 (S^2 + w) = S^2.
    b = 0.7
    w = gamma * b * b
    s2 = b * b / rho
    c = correction_coefficients(np.array([w]), np.array([b]), "shrink", 1.0, np.array([rho]))[0]
    assert (1.0 - c * rho) ** 2 * (s2 + w) == pytest.approx(s2, rel=1e-12)
    assert 0.0 <= c * rho < 1.0  # never moves the deviation past the clean estimate


@pytest.mark.parametrize("delta", [0.0, 0.05, 0.5, 5.0])
@pytest.mark.parametrize("gamma", [0.3, 2.0, 40.0])
def test_the_pull_accounts_for_the_model_error_in_the_residual(delta, gamma):
    # The residual is rho * y + n with an independent model error n of variance b^2 delta; after the pull
    # Var(y') = (1 - c rho)^2 (S^2 + w) + c^2 b^2 delta must be S^2 (S^2 = b^2 / rho), or as small as a pull
    # can make it where no pull reaches S^2.
    b, rho = 0.3, 0.2
    w, s2 = gamma * b * b, b * b / rho
    c = correction_coefficients(np.array([w]), np.array([b]), "shrink", 1.0, np.array([rho]), np.array([delta]))[0]
    spread = lambda c_: (1 - c_ * rho) ** 2 * (s2 + w) + c_**2 * b * b * delta  # noqa: E731
    best = rho * (s2 + w) / (rho * rho * (s2 + w) + b * b * delta)  # the pull that minimises the spread
    if spread(best) <= s2:
        assert spread(c) == pytest.approx(s2, rel=1e-10)
        assert c <= best  # the smaller of the two pulls that reach S^2
    else:
        assert c == pytest.approx(best, rel=1e-10)
        assert spread(c) > s2


def test_fraction_one_is_the_plain_forms_and_first_order_is_the_drift():
    v, b = np.array([0.02, 0.3, 5.0]), np.array([1.0, 0.5, 0.1])
    for form in ("shrink", "drift"):
        np.testing.assert_allclose(
            correction_coefficients(v, b, form, 1.0, np.ones(3)), correction_coefficients(v, b, form, 1.0), rtol=1e-12
        )
    small = correction_coefficients(np.array([1e-8]), np.array([1.0]), "shrink", 1.0, np.array([0.05]))
    assert small[0] == pytest.approx(1e-8 / 2, rel=1e-6)
    # the drift is clipped at 1 / (rho + delta) instead of 1: 1 / 0.1 = 10 here, above gamma / 2 = 8
    drift = correction_coefficients(np.array([4.0, 4.0]), np.array([0.5, 0.5]), "drift", 1.0, np.array([0.1, 0.1]))
    np.testing.assert_allclose(drift, [8.0, 8.0])
    clipped = correction_coefficients(
        np.array([4.0, 4.0]), np.array([0.5, 0.5]), "drift", 1.0, np.array([0.1, 0.1]), np.array([0.9, 0.9])
    )
    np.testing.assert_allclose(clipped, [1.0] * 2)  # 1 / (rho + delta)


@pytest.mark.parametrize("bad", [np.array([0.0, 1.0]), np.array([1.2, 1.0]), np.array([np.nan, 1.0]), np.ones(3)])
def test_bad_residual_fractions_are_refused(bad):
    with pytest.raises(QDriftError, match="residual fraction"):
        correction_coefficients(np.array([0.1, 0.1]), np.array([1.0, 0.5]), "shrink", 1.0, bad)


def test_a_negative_residual_error_is_refused():
    with pytest.raises(QDriftError, match="residual error"):
        correction_coefficients(
            np.array([0.1, 0.1]), np.array([1.0, 0.5]), "shrink", 1.0, np.ones(2), np.array([0.1, -1])
        )


def _file(rho, error=None):
    scheduler = prepared_scheduler(one_mode_pair("flow"), "flow-euler", 4)
    est = EstimatorFile.zeros_like_grid(scheduler)
    est.tensors["variance"] = np.array([0.01, 0.02, 0.03, 0.04])
    if rho is not None:
        est.tensors["residual_fraction"] = rho
    if error is not None:
        est.tensors["residual_error"] = error
    return est, scheduler


def test_estimator_file_uses_its_residual_fraction_per_step(tmp_path):
    rho = np.array([0.9, 0.6, 0.2, 0.05])
    error = np.array([0.0, 0.1, 0.0, 0.3])
    est, scheduler = _file(rho, error)
    loaded = EstimatorFile.load(est.save(tmp_path / "e.safetensors"))
    grid = step_grid(scheduler)
    got = loaded.coefficients(grid)
    gamma = np.where(grid.b_next > 0, loaded.variance / np.where(grid.b_next > 0, grid.b_next, 1) ** 2, 0)
    for i in range(4):
        if grid.b_next[i] == 0:
            assert got[i] == 0.0
            continue
        r, u = rho[i], 1 / (1 + rho[i] * gamma[i])
        # (1 - c rho)^2 + c^2 rho delta u = u with this step's rho and delta: the smaller root (or the minimiser)
        A = r * r + r * error[i] * u
        disc = r * r - A * (1 - u)
        expected = (r - np.sqrt(disc)) / A if disc >= 0 else r / A
        assert got[i] == pytest.approx(expected, rel=1e-12), i
    # without the tensors: the plain shrink
    plain, _ = _file(None)
    np.testing.assert_allclose(plain.coefficients(grid), np.where(grid.b_next > 0, 1 - 1 / np.sqrt(1 + gamma), 0))


@pytest.mark.parametrize(
    ("rho", "error", "what"),
    [
        (np.array([0.5, 0.0, 0.5, 1.0]), None, "residual_fraction"),
        (np.array([0.5, 2.0, 0.5, 1.0]), None, "residual_fraction"),
        (np.ones(3), None, "residual_fraction"),
        (np.ones(4), np.array([0.0, -0.1, 0.0, 0.0]), "residual_error"),
        (None, np.zeros(4), "residual_error"),  # an error term without the fraction it belongs to
    ],
)
def test_estimator_file_refuses_bad_residual_terms(tmp_path, rho, error, what):
    est, _ = _file(rho, error)
    with pytest.raises(QDriftError, match=what):
        EstimatorFile.load(est.save(tmp_path / "e.safetensors"))
