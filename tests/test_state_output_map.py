"""The state-aware output map: ``e_i = offset_i + K_i (m_fp - c_i) + L_i (x_i - xbar_i) + r_i``, inverted at sampling.

Pinned against maps the test builds itself (known dense matrices and convolution kernels of the output and of the
state): the fit recovers them, the inverse returns the FP output exactly, the torch corrector and the diffusers
wrapper apply the same map with the state they see, the file carries it as format version 4, and the persistent
estimator fits it from a store with the pair (the FP states re-run from the store's seeds).
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from diffusers import EulerDiscreteScheduler
from safetensors.numpy import save_file

from qdrift_stats import testbed
from qdrift_stats.correct.corrector import AffineOutputMap
from qdrift_stats.correct.diffusers import QDriftScheduler
from qdrift_stats.correct.estimator_file import FORMAT_VERSION_STATE_MAP, EstimatorFile
from qdrift_stats.correct.sample import sample
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import get_estimator, registered_name
from qdrift_stats.estimators.output_map import MAX_STATE_MAP_GAIN, fit_output_map, local_norm, state_map_gain
from qdrift_stats.estimators.persistent import PersistentEstimator, fp_path_states, quantized_path_errors
from qdrift_stats.loop import initial_noise, prepared_scheduler, run_sampler
from qdrift_stats.record.lockstep import record
from qdrift_stats.schedulers.base import step_grid

SHAPE = (2, 5, 6)  # channels, height, width
WEIGHT_PAIR = "qdrift_stats.testbed:mixture_vp_weight"


def conv(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return F.conv2d(torch.from_numpy(x), torch.from_numpy(kernel), padding=kernel.shape[-1] // 2).numpy()


def test_a_dense_state_map_recovers_both_matrices_and_its_inverse_returns_the_fp_output():
    rng = np.random.default_rng(0)
    n, d = 400, 6
    K, L = rng.normal(size=(d, d)) * 0.2, rng.normal(size=(d, d)) * 0.3  # row vectors: e = dm K + ds L
    m_fp, x = rng.normal(size=(n, d)) + 0.5, rng.normal(size=(n, d)) - 0.25
    offset = rng.normal(size=d) * 0.1
    errors = offset + (m_fp - m_fp.mean(0)) @ K + (x - x.mean(0)) @ L
    fitted = fit_output_map([m_fp], [errors], "full", ridge=1e-12, states=[x])
    assert fitted.uses_state and fitted.name == "full@1e-12+state"
    inverse = np.linalg.inv(np.eye(d) + K)
    np.testing.assert_allclose(fitted.weight[0], np.eye(d) - inverse, atol=1e-8)
    np.testing.assert_allclose(fitted.state_weight[0], L @ inverse, atol=1e-8)
    np.testing.assert_allclose(fitted.state_center[0], x.mean(0), atol=1e-12)
    np.testing.assert_allclose(fitted.offset[0], offset, atol=1e-12)
    # the quantized output of an unseen sample at an unseen state is mapped back to its FP output exactly
    m_new, x_new = rng.normal(size=(3, d)), rng.normal(size=(3, d))
    m_q = m_new + offset + (m_new - m_fp.mean(0)) @ K + (x_new - x.mean(0)) @ L
    np.testing.assert_allclose(fitted.apply(0, m_q, x_new), m_new, atol=1e-8)
    # the same map without its state part leaves exactly the state's share of the error
    plain = replace(fitted, state_center=None, state_weight=None)
    np.testing.assert_allclose(plain.apply(0, m_q) - m_new, (x_new - x.mean(0)) @ L @ inverse, atol=1e-8)
    with pytest.raises(QDriftError, match="sampler state"):
        fitted.apply(0, m_q)


def test_a_step_whose_state_map_would_amplify_beyond_the_bound_keeps_its_mean_error_only():
    # step 0: a well-conditioned map; step 1: the quantized output has lost almost all of the FP output
    # (e = -0.999 m_fp, so (I + K)^{-1} = 1000 I): inverting it would multiply the output's noise by 1000
    rng = np.random.default_rng(7)
    n, d = 300, 5
    m_fp, x = [rng.normal(size=(n, d)) for _ in range(2)], [rng.normal(size=(n, d)) for _ in range(2)]
    errors = [0.1 * m_fp[0] + 0.2 * x[0] + 0.3, -0.999 * m_fp[1] + 0.05]
    fitted = fit_output_map(m_fp, errors, "full", ridge=1e-12, states=x)
    assert fitted.mean_only_steps == (1,)
    assert MAX_STATE_MAP_GAIN == 4.0
    assert state_map_gain("full", np.eye(d) - np.eye(d) / 1.1, 0.2 * np.eye(d) / 1.1, (d,)) == pytest.approx(1 / 1.1)
    np.testing.assert_allclose(fitted.weight[0], np.eye(d) - np.eye(d) / 1.1, atol=1e-8)
    np.testing.assert_allclose(fitted.state_weight[0], 0.2 * np.eye(d) / 1.1, atol=1e-8)
    assert not fitted.weight[1].any() and not fitted.state_weight[1].any()
    m_q = rng.normal(size=(2, d))
    np.testing.assert_allclose(fitted.apply(1, m_q, rng.normal(size=(2, d))), m_q - fitted.offset[1], atol=1e-12)
    np.testing.assert_allclose(fitted.offset[1], errors[1].mean(0), atol=1e-12)
    assert fitted.metadata()["mean_only_steps"] == [1]


def test_a_local_state_map_recovers_both_kernels_and_inverts_by_its_fixed_point():
    rng = np.random.default_rng(1)
    n = 96
    K = rng.normal(size=(2, 2, 3, 3)) * 0.02  # small: the fixed point converges
    L = rng.normal(size=(2, 2, 3, 3)) * 0.2
    assert local_norm(K, SHAPE[1:]) < 0.5
    m_fp, x = rng.normal(size=(n, *SHAPE)), rng.normal(size=(n, *SHAPE))
    errors = conv(m_fp - m_fp.mean(0), K) + conv(x - x.mean(0), L)
    fitted = fit_output_map([m_fp], [errors], "local", kernel=3, ridge=1e-12, states=[x])
    np.testing.assert_allclose(fitted.weight[0], K, atol=1e-8)
    np.testing.assert_allclose(fitted.state_weight[0], L, atol=1e-8)
    m_new, x_new = rng.normal(size=(2, *SHAPE)), rng.normal(size=(2, *SHAPE))
    m_q = m_new + conv(m_new - m_fp.mean(0), K) + conv(x_new - x.mean(0), L)
    # six fixed-point steps of a map with norm < 0.05 leave less than 0.05^7 of its size
    np.testing.assert_allclose(fitted.apply(0, m_q, x_new), m_new, atol=1e-7)


@pytest.mark.parametrize("structure", ["full", "local"])
def test_the_torch_corrector_applies_the_same_state_map_in_the_samplers_dtype(structure):
    rng = np.random.default_rng(2)
    n = 64
    m_fp, x = rng.normal(size=(n, *SHAPE)), rng.normal(size=(n, *SHAPE))
    errors = 0.1 * m_fp + conv(x, rng.normal(size=(2, 2, 3, 3)) * 0.1) + 0.05 * rng.normal(size=(n, *SHAPE))
    fitted = fit_output_map([m_fp, m_fp], [errors, 2 * errors], structure, 3, 0.1, states=[x, x])
    tensors = fitted.tensors()
    assert set(tensors) == {"map_center", "map_offset", "map_weight", "map_state_center", "map_state_weight"}
    device_map = AffineOutputMap(
        structure,
        tensors["map_center"],
        tensors["map_offset"],
        tensors["map_weight"],
        dtype=torch.float64,
        state_center=tensors["map_state_center"],
        state_weight=tensors["map_state_weight"],
    )
    m_q, state = rng.normal(size=(3, *SHAPE)), rng.normal(size=(3, *SHAPE))
    for i in (0, 1):
        got = device_map(i, torch.from_numpy(m_q), torch.from_numpy(state)).numpy()
        np.testing.assert_allclose(got, fitted.apply(i, m_q, state), rtol=1e-12, atol=1e-12)
    half = device_map.to("cpu", torch.float32)(1, torch.from_numpy(m_q).float(), torch.from_numpy(state).float())
    assert half.dtype == torch.float32
    np.testing.assert_allclose(half.numpy(), fitted.apply(1, m_q, state), atol=1e-4)
    with pytest.raises(QDriftError, match="sampler state"):
        device_map(0, torch.from_numpy(m_q))
    with pytest.raises(QDriftError, match="both state tensors"):
        AffineOutputMap(structure, tensors["map_center"], tensors["map_offset"], tensors["map_weight"], state_center=x)


@pytest.fixture(scope="module")
def weight_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("statemap") / "weight.zarr"
    record(testbed.mixture_vp_weight(), path, pair_name=WEIGHT_PAIR, scheduler_name="euler", steps=8, runs=3,
           batch_size=16, seed=0)  # fmt: skip
    return path


def test_the_fp_states_are_re_run_from_the_stores_seeds_and_checked_against_its_outputs(weight_store):
    pair, ds = testbed.mixture_vp_weight(), xr.open_zarr(weight_store).load()
    seeds = [int(s) for s in ds["seed"].values]
    outputs = [ds["out_fp"].values[:, i].reshape(3, -1) for i in range(8)]
    states = fp_path_states(pair, "euler", 8, seeds, 16, reproduce=outputs)
    assert states.shape == (8, 3, 16 * 8)
    for r, seed in enumerate(seeds):  # step 0's input is the run's initial noise
        x0, _ = initial_noise(pair, prepared_scheduler(pair, "euler", 8), 16, seed)
        np.testing.assert_array_equal(states[0, r], x0.double().numpy().reshape(-1))
    with pytest.raises(QDriftError, match="does not reproduce the store's FP outputs"):
        fp_path_states(pair, "euler", 8, seeds, 16, reproduce=[1.5 * o for o in outputs])


def test_the_quantized_path_returns_the_states_its_outputs_were_evaluated_at(weight_store):
    pair = testbed.mixture_vp_weight()
    plain = quantized_path_errors(pair, "euler", 8, [0, 1], 16)
    seen = []
    out = quantized_path_errors(
        pair, "euler", 8, [0, 1], 16, correct_output=lambda i, m, x: seen.append(x.clone()) or m, states=True
    )
    for a, b in zip(plain, out[:4]):
        np.testing.assert_array_equal(a, b)
    states, siblings = out[4], out[5]
    assert states.shape == (2, 8, 16, 8) and siblings is None
    np.testing.assert_array_equal(states[1, 3], seen[8 + 3].double().numpy())  # run 1, step 3: what the map saw
    with_siblings = quantized_path_errors(pair, "euler", 8, [0], 16, residuals=True, states=True)
    assert with_siblings[-1].shape == (1, 8, 16, 8)
    assert not np.allclose(with_siblings[-1][0, 2], with_siblings[-2][0, 2])  # a sibling is another state


def test_the_persistent_estimator_fits_and_exports_a_state_map_as_format_version_4(weight_store, tmp_path):
    pair = testbed.mixture_vp_weight()
    fitted = PersistentEstimator(pair=pair).fit(weight_store)  # the default: the map may see the state
    plain = PersistentEstimator(pair=pair, map_state=False).fit(weight_store)
    # the testbed's weight error is a fixed linear map of the model input: the state explains more of it
    assert fitted.output_map.uses_state and fitted.output_map.name.endswith("+state")
    assert fitted.output_map.share > plain.output_map.share
    assert fitted.map_shares[plain.output_map.name] == pytest.approx(plain.output_map.share, rel=1e-12)
    path = tmp_path / "e.safetensors"
    fitted.export(path)
    est = EstimatorFile.load(path)
    assert est.metadata["format_version"] == FORMAT_VERSION_STATE_MAP == 4
    assert est.metadata["estimator"]["output_map"]["state"] is True
    # the file's corrector maps the output with the state as the fit does
    sched = prepared_scheduler(pair, "euler", 8)
    device_map = est.output_map_on(step_grid(sched))
    rng = np.random.default_rng(3)
    m_q, x = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    np.testing.assert_allclose(
        device_map.to("cpu", torch.float64)(5, torch.from_numpy(m_q), torch.from_numpy(x)).numpy(),
        fitted.output_map.apply(5, m_q, x),
        rtol=1e-10,
        atol=1e-12,
    )
    # the default is the state-aware map (also named explicitly); the plain map is the option named for it
    assert get_estimator("persistent").uses_state_map and get_estimator("persistent-state-map").uses_state_map
    assert fitted.params == get_estimator("persistent-state-map").params  # recorded resolved: map_state True
    assert registered_name(PersistentEstimator(map_state=False)) == "persistent-plain-map"
    assert not PersistentEstimator(bias="none").uses_state_map and not PersistentEstimator(bias="ptqd").uses_state_map
    assert not get_estimator("persistent-landing").uses_state_map
    # parameters as given, so a changed bias does not inherit a resolved map_state (scikit-learn's convention)
    assert PersistentEstimator().map_state is None
    assert not PersistentEstimator().with_params(bias="none").uses_state_map
    # without the pair the state-aware maps are not tried, and the fit says so
    no_pair = PersistentEstimator(map_state=True).fit(weight_store)
    assert not no_pair.output_map.uses_state and "state-aware output maps were not tried" in no_pair.path_note
    with pytest.raises(QDriftError, match="map_state needs bias='map'"):
        PersistentEstimator(bias="none", map_state=True)


def test_the_summary_warns_when_the_map_choice_rests_on_the_runs_drawn(weight_store):
    fitted = PersistentEstimator(pair=testbed.mixture_vp_weight()).fit(weight_store)
    best = max(fitted.map_shares, key=fitted.map_shares.get)
    assert np.isfinite(fitted.map_share_errors[best]) and fitted.map_threshold == 0.1
    assert "caveat" not in fitted.summary() and not fitted.map_choice_unsure  # the map explains far more than 10%
    # the best share 0.13 with a standard error of 0.02 is within two of 0.1; with 0.01 it is not
    near = dict.fromkeys(fitted.map_shares, 0.0) | {best: 0.13}
    close = replace(fitted, map_shares=near, map_share_errors={best: 0.02})
    assert "caveat: the best output map's held-out share, 13.0% (jackknife standard error 2.0%" in close.summary()
    assert close.map_choice_unsure
    assert "caveat" not in replace(close, map_share_errors={best: 0.01}).summary()
    assert "caveat" not in replace(close, map_share_errors={best: float("nan")}).summary()


def test_a_state_map_file_is_refused_without_its_version_or_either_state_tensor(weight_store, tmp_path):
    fitted = PersistentEstimator(pair=testbed.mixture_vp_weight(), map_state=True).fit(weight_store)
    path = tmp_path / "e.safetensors"
    fitted.export(path)
    est = EstimatorFile.load(path)
    for change, message in (
        (lambda t, m: m.update(format_version=3), "format version 4"),
        (lambda t, m: t.pop("map_state_weight"), "map_state_center and map_state_weight"),
        (lambda t, m: m["estimator"]["output_map"].pop("state"), "output_map.state true"),
        (lambda t, m: t.update(map_state_weight=t["map_state_weight"][:, :3]), "must agree"),
    ):
        tensors, metadata = dict(est.tensors), json.loads(json.dumps(est.metadata))
        change(tensors, metadata)
        bad = tmp_path / "bad.safetensors"
        save_file(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(bad),
            metadata={"qdrift": json.dumps(metadata)},
        )
        with pytest.raises(QDriftError, match=message):
            EstimatorFile.load(bad)


def test_the_diffusers_wrapper_gives_the_map_the_state_as_the_sampling_loop_does(weight_store):
    pair = testbed.mixture_vp_weight()
    est = EstimatorFile.from_fitted(PersistentEstimator(pair=pair, map_state=True).fit(weight_store))
    reference = prepared_scheduler(pair, "euler", 8)
    x, cond = initial_noise(pair, reference, 16, 7)
    with torch.no_grad():
        expected = run_sampler(pair.q, reference, x, cond, est.corrector(reference, device="cpu", dtype=x.dtype))
        wrapped = QDriftScheduler(EulerDiscreteScheduler.from_config(reference.config), est)
        wrapped.set_timesteps(8)
        state = x.clone()
        for t in wrapped.timesteps:
            state = wrapped.step(pair.q(wrapped.scale_model_input(state, t), t, **cond), t, state).prev_sample
    torch.testing.assert_close(state, expected, rtol=0, atol=0)
    without_state = est.corrector(reference, device="cpu", dtype=x.dtype)
    without_state.output_map = AffineOutputMap(
        "full", est.tensors["map_center"], est.tensors["map_offset"], est.tensors["map_weight"]
    )
    with torch.no_grad():
        other = run_sampler(pair.q, prepared_scheduler(pair, "euler", 8), x, cond, without_state)
    assert not torch.allclose(other, expected, atol=1e-4)


def test_qdrift_fit_and_sample_with_the_state_map_from_the_command_line(weight_store, tmp_path, capsys):
    from qdrift_stats.cli import main

    out = tmp_path / "state.safetensors"
    args = ["fit", weight_store, "--estimator", "persistent-state-map", "--pair", WEIGHT_PAIR, "--out", out]
    assert main([str(a) for a in args]) == 0
    text = capsys.readouterr().out
    assert "+state" in text  # the fit reports the chosen map by name
    est = EstimatorFile.load(out)
    assert est.metadata["format_version"] == 4 and est.metadata["estimator"]["name"] == "persistent"
    assert est.metadata["estimator"]["params"]["map_state"] is True
    samples = tmp_path / "s.npy"
    args = ["sample", "--pair", WEIGHT_PAIR, "--scheduler", "euler", "--steps", "8", "--num-samples", "8"]
    args += ["--batch", "8", "--seed", "3", "--model", "q", "--estimator", out, "--out", samples]
    assert main([str(a) for a in args]) == 0
    # the command applies the file's state-aware map: the same samples as the library's loop with that file
    expected = sample(testbed.mixture_vp_weight(), "euler", 8, 8, 8, 3, model="q", estimator=est)
    np.testing.assert_array_equal(np.load(samples), expected)
    plain = sample(testbed.mixture_vp_weight(), "euler", 8, 8, 8, 3, model="q")
    assert not np.allclose(expected, plain, atol=1e-4)
