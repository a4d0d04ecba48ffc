import json

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from qdrift_stats import testbed
from qdrift_stats.errors import QDriftError
from qdrift_stats.record.lockstep import record
from qdrift_stats.record.store import SCHEMA, SCHEMA_VERSION, open_store

from .conftest import VP_PAIR


def test_store_opens_with_xarray_with_named_dims_coords_and_attrs(small_store):
    ds = xr.open_zarr(small_store)
    assert ds["delta_x"].dims == ("run", "step", "sample", "channel")
    assert dict(ds.sizes) == {"run": 3, "step": 8, "sample": 16, "channel": 8}
    for name in ("delta_x", "delta_out", "out_fp"):
        assert name in ds.data_vars
    for coord, dim in (("seed", "run"), ("timestep", "step"), ("a", "step"), ("b", "step"), ("b_next", "step")):
        assert ds[coord].dims == (dim,)
    assert list(ds["seed"].values) == [0, 1, 2]
    attrs = ds.attrs
    assert attrs["qdrift_schema"] == SCHEMA and attrs["qdrift_schema_version"] == SCHEMA_VERSION
    assert attrs["scheduler"] == "euler" and attrs["scheduler_class"] == "EulerDiscreteScheduler"
    assert json.loads(attrs["scheduler_config"])["num_train_timesteps"] == 1000
    assert attrs["steps"] == 8 and attrs["prediction_type"] == "epsilon" and attrs["pair"] == VP_PAIR
    assert attrs["runs_complete"] == 3 and "package_version" in attrs


def test_lock_step_perturbation_of_a_one_step_solver_is_its_coefficient_times_the_output_error(small_store):
    """Euler: Delta_i = (sigma_{i+1} - sigma_i) * (m_q - m_fp)."""
    ds = open_store(small_store).load()
    coef = (ds["b_next"] - ds["b"]).values
    np.testing.assert_allclose(ds["gain"].values, coef, rtol=1e-6)
    # delta_x is a difference of float32 states of size up to ~sigma_max (157): allow their rounding
    np.testing.assert_allclose(
        ds["delta_x"].values, coef[None, :, None, None] * ds["delta_out"].values, rtol=1e-4, atol=1e-4
    )


def test_recording_is_reproducible(tmp_path, vp_pair, small_store):
    again = tmp_path / "again.zarr"
    record(vp_pair, again, pair_name=VP_PAIR, scheduler_name="euler", steps=8, runs=3, batch_size=16, seed=0)
    xr.testing.assert_identical(open_store(small_store).load(), open_store(again).load())


class Interrupt(Exception):
    pass


def test_a_recording_killed_mid_run_resumes_to_the_same_data(tmp_path, vp_pair, small_store):
    path = tmp_path / "resumed.zarr"
    calls = {"n": 0}
    original = vp_pair.q

    def dies_in_the_third_run(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 8 + 5:
            raise Interrupt()
        return original(*args, **kwargs)

    vp_pair.q = dies_in_the_third_run
    with pytest.raises(Interrupt):
        record(vp_pair, path, pair_name=VP_PAIR, scheduler_name="euler", steps=8, runs=3, batch_size=16, seed=0)
    assert open_store(path).sizes["run"] == 2  # the run in flight is the only loss
    vp_pair.q = original
    record(vp_pair, path, pair_name=VP_PAIR, scheduler_name="euler", steps=8, runs=3, batch_size=16, seed=0)
    xr.testing.assert_identical(open_store(path).load(), open_store(small_store).load())


def test_a_run_interrupted_while_being_written_is_discarded_on_resume(tmp_path, vp_pair, small_store):
    path = tmp_path / "partial.zarr"
    record(vp_pair, path, pair_name=VP_PAIR, scheduler_name="euler", steps=8, runs=2, batch_size=16, seed=0)
    group = zarr.open_group(path, mode="r+")
    arr = group["delta_x"]  # as if the third run's first array had been extended before the kill
    arr.resize((3,) + arr.shape[1:])
    arr[2] = 1e9
    assert open_store(path).sizes["run"] == 2  # readers see only committed runs
    record(vp_pair, path, pair_name=VP_PAIR, scheduler_name="euler", steps=8, runs=3, batch_size=16, seed=0)
    xr.testing.assert_identical(open_store(path).load(), open_store(small_store).load())


def test_appending_runs_extends_the_store_with_new_seeds(tmp_path, vp_pair):
    path = tmp_path / "grow.zarr"
    record(vp_pair, path, pair_name=VP_PAIR, scheduler_name="ddim", steps=4, runs=2, batch_size=4, seed=0)
    record(vp_pair, path, pair_name=VP_PAIR, scheduler_name="ddim", steps=4, runs=2, batch_size=4, seed=10)
    record(
        vp_pair, path, pair_name=VP_PAIR, scheduler_name="ddim", steps=4, runs=2, batch_size=4, seed=0
    )  # nothing new
    assert list(open_store(path)["seed"].values) == [0, 1, 10, 11]


def test_a_store_of_other_settings_is_not_overwritten_without_being_asked(tmp_path, vp_pair, small_store):
    with pytest.raises(QDriftError, match="steps=8.*--overwrite"):
        record(vp_pair, small_store, pair_name=VP_PAIR, scheduler_name="euler", steps=9, runs=1, batch_size=16, seed=0)
    assert open_store(small_store).sizes["run"] == 3
    record(
        vp_pair,
        small_store,
        pair_name=VP_PAIR,
        scheduler_name="euler",
        steps=9,
        runs=1,
        batch_size=16,
        seed=0,
        overwrite=True,
    )
    assert open_store(small_store).sizes["step"] == 9


def test_trajectories_are_recorded_on_request(tmp_path, vp_pair):
    path = tmp_path / "traj.zarr"
    record(
        vp_pair,
        path,
        pair_name=VP_PAIR,
        scheduler_name="euler",
        steps=5,
        runs=1,
        batch_size=4,
        seed=0,
        trajectories=True,
    )
    ds = open_store(path).load()
    assert ds["traj_fp"].shape == ds["traj_q"].shape == (1, 5, 4, 8)
    # the free-running Q trajectory drifts away from the FP one
    assert float(abs(ds["traj_q"] - ds["traj_fp"]).isel(step=-1).mean()) > 0


def test_non_finite_model_output_is_refused_and_nothing_is_written(tmp_path, vp_pair):
    original = vp_pair.q
    vp_pair.q = lambda s, t, **c: original(s, t) * torch.tensor(float("nan"))
    with pytest.raises(QDriftError, match="non-finite m_q"):
        record(
            vp_pair,
            tmp_path / "nan.zarr",
            pair_name=VP_PAIR,
            scheduler_name="euler",
            steps=3,
            runs=1,
            batch_size=2,
            seed=0,
        )
    assert not (tmp_path / "nan.zarr").exists()


def test_image_shaped_samples_get_channel_height_width_dims(tmp_path):
    pair = testbed.MixturePair(
        testbed.default_mixture(), kind="flow", sample_shape=(2, 2, 2), error=testbed.NoiseLikeError(8, 0.5)
    )
    path = tmp_path / "img.zarr"
    record(
        pair, path, pair_name="img", scheduler_name="flow-euler", steps=3, runs=1, batch_size=2, seed=0, dtype="float16"
    )
    ds = xr.open_zarr(path)
    assert ds["delta_x"].dims == ("run", "step", "sample", "channel", "height", "width")
    assert ds["delta_x"].dtype == np.float16


def test_a_second_writer_is_refused_while_the_first_holds_the_store(tmp_path, vp_pair):
    from qdrift_stats.record.store import writer_lock

    path = tmp_path / "busy.zarr"
    with writer_lock(path):
        with pytest.raises(QDriftError, match="another process is writing"):
            record(vp_pair, path, pair_name=VP_PAIR, scheduler_name="euler", steps=3, runs=1, batch_size=2, seed=0)
    record(vp_pair, path, pair_name=VP_PAIR, scheduler_name="euler", steps=3, runs=1, batch_size=2, seed=0)
    assert open_store(path).sizes["run"] == 1 and not (tmp_path / "busy.zarr.lock").exists()


def test_a_writer_killed_hard_leaves_no_stale_lock(tmp_path, vp_pair):
    import subprocess
    import sys

    path = tmp_path / "killed.zarr"
    code = (
        "import sys, time; from qdrift_stats.record.store import writer_lock\n"
        f"with writer_lock({str(path)!r}):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(QDriftError, match="another process"):
        record(vp_pair, path, pair_name=VP_PAIR, scheduler_name="euler", steps=3, runs=1, batch_size=2, seed=0)
    proc.kill()
    proc.wait()
    record(vp_pair, path, pair_name=VP_PAIR, scheduler_name="euler", steps=3, runs=1, batch_size=2, seed=0)
    assert open_store(path).sizes["run"] == 1


def test_a_store_recorded_by_another_process_can_be_extended(tmp_path, vp_pair):
    """diffusers' config carries a set-ordered key; the identity check must not depend on it."""
    import os
    import subprocess
    import sys

    path = tmp_path / "other_process.zarr"
    args = ["--pair", VP_PAIR, "--scheduler", "dpmpp-2m", "--steps", "4", "--batch", "2", "--out", str(path)]
    for hash_seed, runs in (("1", "1"), ("2", "2")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run(
            [sys.executable, "-m", "qdrift_stats.cli", "record", *args, "--runs", runs, "--seed", "0"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
    assert list(open_store(path)["seed"].values) == [0, 1]
