"""The peers in the same harness: the published Q-Drift correction and PTQD, and the bias terms they use."""

import json

import numpy as np
import pytest
import torch

from qdrift_stats import testbed
from qdrift_stats.correct.coefficients import published_coefficients
from qdrift_stats.correct.corrector import IncrementCorrector
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import PTQDEstimator, PublishedEstimator
from qdrift_stats.estimators.bias import conditional_gaussian, conditional_output_map
from qdrift_stats.loop import prepared_scheduler
from qdrift_stats.schedulers.base import scheduler_identity, step_grid

from .conftest import VP_PAIR
from .test_cli import one_line_error, record_args, run
from .test_estimators_more import memory_store, one_torch_thread  # noqa: F401 (autouse fixture)


def test_conditional_gaussian_recovers_a_known_bivariate_normal():
    rng = np.random.default_rng(0)
    n = 400_000
    m_q = 2.0 + 1.5 * rng.standard_normal(n)
    e = 0.1 + 0.3 * (m_q - 2.0) + 0.5 * rng.standard_normal(n)  # beta 0.3, Var(e | m_q) 0.25
    g = conditional_gaussian(m_q, e, np.zeros(n, dtype=np.int64))
    assert g.beta[0] == pytest.approx(0.3, abs=0.005)
    # trimming at 4 std of a Gaussian drops 6e-5 of the mass: the variance shrinks by about 0.1%
    assert g.conditional_variance[0] == pytest.approx(0.25, rel=0.01)
    k, mu = conditional_output_map(g)
    x = np.array([0.0, 1.0, 5.0])
    expected = x - (g.mu_e[0] + g.beta[0] * (x - g.mu_q[0]))  # m_q - E[e | m_q]
    np.testing.assert_allclose((x - mu[0]) / (1 + k[0]), expected, rtol=1e-12)


def test_ptqd_recovers_the_scale_error_of_the_correlated_family_at_every_step():
    ds = memory_store(testbed.mixture_vp_correlated(), "ddim", 8, 3, 32, 0)
    fitted = PTQDEstimator().fit(ds)
    # m_q = 0.95 m_fp exactly: e = -0.05 m_fp, so k = -0.05 and mu = 0 at every step
    np.testing.assert_allclose(fitted.k, -0.05, atol=1e-6)
    np.testing.assert_allclose(fitted.mu, 0.0, atol=1e-6)
    assert np.all(fitted.variance == 0)


def test_published_euler_correction_is_the_step_size_rescaling_of_the_published_code():
    pair = testbed.mixture_vp_noise()
    sched = prepared_scheduler(pair, "euler", 10)
    grid = step_grid(sched)
    V = np.full((10, 8), 0.03)
    c, ratio = published_coefficients("euler", grid.a, grid.b, grid.a_next, grid.b_next, V)
    corrector = IncrementCorrector(grid, c, ratio, torch.device("cpu"), torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64) * float(grid.b[3])
    eps = torch.randn(4, 8, dtype=torch.float64)
    sigma, sigma_next = float(grid.b[3]), float(grid.b_next[3])
    x_next = x + (sigma_next - sigma) * eps  # Euler (VE) with epsilon prediction
    dt = sigma_next - sigma
    # the published step: x + derivative * dt * (1 + V |dt| / (2 sigma)), derivative = (x - x0_hat) / sigma = eps
    expected = x + eps * dt * (1 + 0.03 * abs(dt) / (2 * sigma))
    torch.testing.assert_close(corrector(3, x, eps, x_next), expected)
    # on the last step (sigma_next = 0) the rule gives c = V / 2: the published code overshoots x0_hat
    assert c[-1, 0] == pytest.approx(0.015)


def test_published_dpm_correction_matches_the_variance_of_the_step_in_y():
    pair = testbed.mixture_flow_noise()
    sched = prepared_scheduler(pair, "flow-dpmpp-2m", 6)
    grid = step_grid(sched)
    V = np.full((6, 1), 0.2)
    gain, gain_prev = np.full(6, 0.5), np.full(6, 0.25)
    c, ratio = published_coefficients("flow-dpmpp-2m", grid.a, grid.b, grid.a_next, grid.b_next, V, gain, gain_prev)
    i = 2
    var_dy = (0.25 * 0.2 + 0.0625 * 0.2) / grid.a_next[i] ** 2
    sbar, sbar_next = grid.b[i] / grid.a[i], grid.b_next[i] / grid.a_next[i]
    assert c[i, 0] == pytest.approx(var_dy / (sbar**2 - sbar_next**2))
    assert ratio[i] == pytest.approx(grid.a_next[i] / grid.a[i])
    assert c[0, 0] == pytest.approx(
        0.25 * 0.2 / grid.a_next[0] ** 2 / ((grid.b[0] / grid.a[0]) ** 2 - (grid.b_next[0] / grid.a_next[0]) ** 2)
    )  # no previous output at the first step


def test_published_file_round_trip_interpolates_over_timesteps(tmp_path):
    ds = memory_store(testbed.mixture_vp_noise(), "euler", 8, 2, 16, 0)
    pair = testbed.mixture_vp_noise()
    ident = scheduler_identity(prepared_scheduler(pair, "euler", 8))
    ds = ds.assign_attrs(
        scheduler="euler", scheduler_class=ident["class"], scheduler_config=json.dumps(ident["config"]), pair="p"
    )
    fitted = PublishedEstimator().fit(ds)
    est = fitted.export(tmp_path / "pub.safetensors")
    assert est.form == "published"
    loaded = EstimatorFile.load(tmp_path / "pub.safetensors")
    assert loaded.form == "published" and loaded.tensors["output_variance"].shape == (8, 8)
    corrector = loaded.corrector(prepared_scheduler(pair, "euler", 12))  # another grid: interpolated
    assert isinstance(corrector, IncrementCorrector) and corrector.coefficients.shape == (12, 8)
    with pytest.raises(QDriftError):
        PTQDEstimator().fit(ds).export(tmp_path / "bad.safetensors", correction="published")


def test_fit_published_and_sample_from_the_command_line(tmp_path, capsys):
    store, est, out = tmp_path / "c.zarr", tmp_path / "p.safetensors", tmp_path / "s.npy"
    assert run(capsys, *record_args(store))[0] == 0
    code, text, _ = run(capsys, "fit", str(store), "--out", str(est), "--estimator", "published", "--json")
    assert code == 0 and '"correction": "published"' in text
    args = ["sample", "--pair", VP_PAIR, "--scheduler", "euler", "--steps", "6", "--num-samples", "6"]
    args += ["--batch", "3", "--seed", "1", "--model", "q", "--estimator", str(est), "--out", str(out)]
    assert run(capsys, *args)[0] == 0
    assert np.all(np.isfinite(np.load(out)))
    code, _, err = run(capsys, "fit", str(store), "--out", str(tmp_path / "x.safetensors"), "--correction", "published")
    one_line_error(code, err, "published")
