"""The analytic ground truth itself, and the correction checked against it."""

import math

import numpy as np
import pytest
import torch

from qdrift_stats import testbed
from qdrift_stats.metrics import energy_distance
from qdrift_stats.testbed import GaussianMixture, MixturePair, gap_closed, within_mode_variance
from qdrift_stats.testbed.evaluate import evaluate_correction


def test_posterior_mean_of_one_gaussian_is_the_linear_shrinkage():
    mix = GaussianMixture(torch.tensor([[1.0, -2.0]], dtype=torch.float64), 0.5, torch.ones(1, dtype=torch.float64))
    x = torch.randn(7, 2, dtype=torch.float64)
    a, b = 0.8, 0.6
    expected = mix.means + a * 0.25 / (a * a * 0.25 + b * b) * (x - a * mix.means)
    torch.testing.assert_close(mix.posterior_mean(x, a, b), expected)


def test_posterior_mean_is_the_conditional_expectation_by_monte_carlo():
    mix = testbed.default_mixture()
    x0 = mix.sample(200_000, seed=3)
    a, b = 0.9, 0.5
    x = a * x0 + b * torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    # E[x0 - E[x0|x]] = 0 and the residual is uncorrelated with x (projection property)
    residual = x0 - mix.posterior_mean(x, a, b)
    assert residual.mean(0).abs().max() < 0.01
    assert (residual * x).mean(0).abs().max() < 0.02


def test_exact_samples_have_the_true_within_mode_variance_and_log_density():
    mix = testbed.default_mixture()
    samples = mix.sample(20_000, seed=1)
    assert within_mode_variance(samples, mix) == pytest.approx(mix.std**2, rel=0.03)
    entropy_bound = 0.5 * mix.dim * math.log(2 * math.pi * math.e * mix.std**2)  # per-mode entropy
    assert -mix.log_prob(samples).mean() == pytest.approx(entropy_bound + math.log(4), abs=0.1)


@pytest.mark.parametrize("kind,scheduler", [("vp", "ddim"), ("flow", "flow-euler")])
def test_fp_sampler_with_the_exact_denoiser_approaches_the_data(kind, scheduler):
    from qdrift_stats.correct.sample import sample

    pair = MixturePair(testbed.default_mixture(), kind=kind)
    coarse = sample(pair, scheduler, 10, 3000, 3000, 0, model="fp")
    fine = sample(pair, scheduler, 100, 3000, 3000, 0, model="fp")
    exact = pair.mixture.sample(3000, seed=9).numpy()
    assert energy_distance(fine, exact) < energy_distance(coarse, exact)
    assert within_mode_variance(fine, pair.mixture) == pytest.approx(pair.mixture.std**2, rel=0.15)


def test_energy_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    x = np.random.default_rng(0).normal(size=(500, 4))
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert energy_distance(x, x + 0.5) > energy_distance(x, x + 0.1) > 0


def test_gap_closed_is_one_at_fp_and_zero_at_q():
    assert gap_closed(1.0, 2.0, 1.0) == 1.0 and gap_closed(1.0, 2.0, 2.0) == 0.0 and gap_closed(1.0, 2.0, 2.5) == -0.5


@pytest.mark.parametrize(
    "pair_name,scheduler", [("mixture_vp_noise", "euler"), ("mixture_flow_noise", "flow-dpmpp-2m")]
)
def test_shrink_correction_closes_most_of_the_variance_gap_on_noise_like_error(pair_name, scheduler):
    """The method's claim on its own assumptions: a noise-like error, 5 calibration runs, 50 steps."""
    torch.set_num_threads(1)
    pair = getattr(testbed, pair_name)()
    result = evaluate_correction(pair, scheduler, 50, num_samples=3000, forms=("shrink",))
    m = result.metrics
    assert m["q"]["within_var"] > m["fp"]["within_var"]  # the error family degrades FP at all
    assert result.closed("shrink") > 0.5
    assert abs(m["shrink"]["within_var"] - m["fp"]["within_var"]) < abs(m["q"]["within_var"] - m["fp"]["within_var"])


def test_signal_correlated_error_is_not_what_the_plain_correction_repairs():
    """A 0.95 output scale is not noise (method.md): the plain correction cannot restore FP."""
    torch.set_num_threads(1)
    pair = testbed.mixture_vp_correlated()
    result = evaluate_correction(pair, "ddim", 25, num_samples=2000, forms=("shrink",))
    assert (
        result.closed("shrink") < 0.3
    )  # "drift alone fixed little" (method.md); the decomposed estimator is the remedy


# ---- the Gaussian-marginal noise-like error ----------------------------------------------------------
def test_gaussian_noise_error_has_an_exactly_gaussian_marginal_of_the_sine_variance():
    """``A / sqrt(2) Phi^-1(u)``, ``u`` a triangle wave of a high-frequency phase: N(0, A^2 / 2), deterministic."""
    from scipy import stats

    from qdrift_stats.testbed.errors import GaussianNoiseError, NoiseLikeError

    amplitude = 0.5
    gauss, sine = GaussianNoiseError(testbed.DIM, amplitude=amplitude), NoiseLikeError(testbed.DIM, amplitude=amplitude)
    z = torch.randn(25_000, testbed.DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    zero = torch.zeros_like(z)
    err = gauss(zero, z, None).flatten().numpy()
    # 200k values: se of the mean A/sqrt(2n) = 0.0008, of the variance ~0.3%, of the kurtosis ~0.011
    assert abs(err.mean()) < 0.004
    assert err.var() == pytest.approx(amplitude**2 / 2, rel=0.015)
    assert stats.kurtosis(err, fisher=False) == pytest.approx(3.0, abs=0.06)
    assert stats.kstest(err / (amplitude / math.sqrt(2)), "norm").pvalue > 0.001
    assert stats.kurtosis(sine(zero, z, None).flatten().numpy(), fisher=False) == pytest.approx(
        1.5, abs=0.06
    )  # arcsine
    torch.testing.assert_close(gauss(zero, z, None), gauss(zero, z, None))  # deterministic


@pytest.mark.parametrize(
    "factory,scheduler", [(testbed.mixture_vp_gauss, "euler"), (testbed.mixture_flow_gauss, "flow-euler")]
)
def test_gaussian_pairs_are_noise_like_along_the_trajectory(factory, scheduler):
    """Perturbations are Gaussian (excess kurtosis ~0) and decorrelated across steps (lag-1 ~ -1/steps, the
    centring bias of a 10-step series), and the lock-step variance is ``c_i^2 A^2 / 2`` as for the sine pairs."""
    from qdrift_stats.estimators import EmpiricalEstimator
    from qdrift_stats.validate.diagnostics import classify, diagnose

    from .test_estimators_more import memory_store

    torch.set_num_threads(1)
    ds = memory_store(factory(), scheduler, 10, 4, 32, 3).assign_attrs(pair="gauss", scheduler=scheduler, batch_size=32)
    diag = diagnose(ds, max_series=128)
    assert classify(diag)["regime"] == "noise-like"
    assert abs(float(diag["lag1_autocorr"])) < 0.2
    kurt = diag["kurtosis"].values[ds["b_next"].values > 0]
    assert abs(kurt.mean()) < 0.15 and np.all(np.abs(kurt) < 0.6)  # se per step ~0.15 (1024 values); the sine: -1.5
    kind = "vp" if scheduler == "euler" else "flow"
    truth = (ds["b_next"].values - ds["b"].values) ** 2 * testbed.NOISE_AMPLITUDE[kind] ** 2 / 2
    keep = ds["b_next"].values > 0
    ratio = EmpiricalEstimator().fit(ds).variance[keep] / truth[keep]
    assert abs(ratio.mean() - 1) < 0.05  # 9 steps x 1024 values: se of the mean ratio ~1.5%
