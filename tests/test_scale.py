"""Scale: distributed recording equals serial recording; fitting streams through the store's chunks."""

import numpy as np
import pytest
import xarray as xr

from qdrift_stats import testbed
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import EmpiricalEstimator
from qdrift_stats.record.distributed import record_distributed
from qdrift_stats.record.lockstep import record
from qdrift_stats.record.store import open_store

from .conftest import VP_PAIR

dask = pytest.importorskip("dask")  # the 'scale' extra
distributed = pytest.importorskip("distributed")
from dask.callbacks import Callback  # noqa: E402

SETTINGS = dict(scheduler_name="euler", steps=6, batch_size=8, seed=3)


@pytest.fixture(scope="module")
def client():
    """One in-process LocalCluster (2 single-threaded workers) for the module: starts in about a second."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as cluster:
        with distributed.Client(cluster) as c:
            yield c


def serial(path, runs, **kw):
    record(testbed.mixture_vp_noise(), path, pair_name=VP_PAIR, runs=runs, **{**SETTINGS, **kw})
    return open_store(path).load()


def test_local_cluster_recording_equals_serial_recording_bit_for_bit(tmp_path, client):
    kw = dict(trajectories=True, dtype="float16")
    record_distributed(VP_PAIR, tmp_path / "dist.zarr", runs=5, client=client, max_in_flight=3, **SETTINGS, **kw)
    dist = open_store(tmp_path / "dist.zarr").load()
    xr.testing.assert_identical(dist, serial(tmp_path / "serial.zarr", 5, **kw))
    assert list(dist["seed"].values) == [3, 4, 5, 6, 7] and dist.attrs["runs_complete"] == 5


def test_a_local_cluster_started_by_the_call_gives_the_same_store(tmp_path):
    record_distributed(VP_PAIR, tmp_path / "dist.zarr", runs=2, n_workers=2, processes=False, **SETTINGS)
    xr.testing.assert_identical(open_store(tmp_path / "dist.zarr").load(), serial(tmp_path / "serial.zarr", 2))


def test_distributed_recording_resumes_a_serial_store(tmp_path, client):
    path = tmp_path / "resumed.zarr"
    serial(path, 2)
    commits = []
    record_distributed(
        VP_PAIR, path, runs=4, client=client, on_commit=lambda seed, done: commits.append((seed, done)), **SETTINGS
    )
    assert commits == [(5, 3), (6, 4)]  # only the missing seeds, in order
    xr.testing.assert_identical(open_store(path).load(), serial(tmp_path / "serial.zarr", 4))


def pair_failing_at_seed_5():
    """A pair whose run of seed 5 fails (its conditions hook sees the run's seeded generator)."""
    pair = testbed.mixture_vp_noise()

    def conditions(batch_size, generator):
        if generator.initial_seed() == 5:
            raise QDriftError("seed 5 fails")
        return {}

    pair.conditions = conditions
    return pair


def test_a_failing_run_raises_and_keeps_the_earlier_runs_like_a_serial_recording(tmp_path, client):
    path = tmp_path / "failing.zarr"
    with pytest.raises(QDriftError, match="seed 5 fails"):
        record_distributed(f"{__name__}:pair_failing_at_seed_5", path, runs=5, client=client, **SETTINGS)
    done = open_store(path).load()
    assert list(done["seed"].values) == [3, 4]
    xr.testing.assert_identical(done.drop_attrs(), serial(tmp_path / "serial.zarr", 2).drop_attrs())


def test_bad_input_is_refused_before_any_work(tmp_path, client):
    with pytest.raises(QDriftError, match="positive"):
        record_distributed(VP_PAIR, tmp_path / "x.zarr", runs=0, client=client, **SETTINGS)
    with pytest.raises(QDriftError, match="cannot import pair module"):
        record_distributed("no_such_module:pair", tmp_path / "x.zarr", runs=1, client=client, **SETTINGS)
    with pytest.raises(QDriftError, match="not both"):
        record_distributed(
            VP_PAIR, tmp_path / "x.zarr", runs=1, client=client, scheduler_address="tcp://127.0.0.1:1", **SETTINGS
        )


class LargestResult(Callback):
    """Records the largest array any dask task returns."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def _posttask(self, key, result, dsk, state, worker_id):
        self.nbytes = max(self.nbytes, int(getattr(result, "nbytes", 0)))


@pytest.mark.parametrize("per_channel", [False, True])
def test_fitting_streams_one_run_and_step_at_a_time_and_equals_numpy(tmp_path, per_channel):
    pair = testbed.MixturePair(
        testbed.default_mixture(), kind="vp", error=testbed.NoiseLikeError(8, amplitude=0.5), sample_shape=(2, 2, 2)
    )
    path = tmp_path / "image.zarr"
    record(
        pair,
        path,
        pair_name="image-shaped",
        scheduler_name="euler",
        steps=5,
        runs=3,
        batch_size=16,
        seed=0,
        dtype="float16",
    )
    ds = open_store(path)
    chunk = ds["delta_x"].data.chunksize
    assert chunk == (1, 1, 16, 2, 2, 2)  # the store is read lazily, one (run, step) per chunk
    with (
        dask.config.set(scheduler="threads"),
        LargestResult() as largest,
    ):  # a local scheduler, whose tasks the callback sees
        fitted = EmpiricalEstimator(per_channel=per_channel).fit(ds)
    assert 0 < largest.nbytes <= np.prod(chunk) * 8  # no task held more than one chunk (as float64)
    x = ds["delta_x"].values.astype(np.float64) ** 2
    want = x.mean(axis=(2, 4, 5)) if per_channel else x.mean(axis=(2, 3, 4, 5))
    np.testing.assert_allclose(fitted.per_run, want, rtol=1e-12)
    np.testing.assert_allclose(fitted.variance, want.mean(axis=0), rtol=1e-12)
