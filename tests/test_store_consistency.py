"""Crash consistency of the calibration store: kill at every write, readers during appends, the lock race.

The store is written by one writer (``qdrift_stats.record.store.StoreWriter``). These tests stop a
recording at every single file write zarr makes (by snapshotting the folder just before each write:
the snapshot is exactly what a ``kill -9`` at that moment leaves behind), and check that

- a reader opening any snapshot sees only complete runs, equal to the reference recording's, and
- the same ``record`` command, run again on any snapshot, finishes with the reference store.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr.storage._local as zarr_local

from qdrift_stats import testbed
from qdrift_stats.errors import QDriftError
from qdrift_stats.record.lockstep import record
from qdrift_stats.record.store import StoreLock, creating_path, open_store, upgrade_store, writer_lock

from .conftest import VP_PAIR

SETTINGS = dict(pair_name=VP_PAIR, scheduler_name="euler", steps=3, batch_size=2, seed=0)
ROOT = Path(__file__).resolve().parents[1]


def record_runs(path: Path, runs: int, **extra) -> None:
    record(testbed.mixture_vp_noise(), path, runs=runs, **SETTINGS, **extra)


def loaded(path: Path) -> xr.Dataset:
    return open_store(path).load()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> xr.Dataset:
    path = tmp_path_factory.mktemp("reference") / "s.zarr"
    record_runs(path, 3)
    return loaded(path)


def snapshot_every_write(tmp_path: Path, monkeypatch, runs: int) -> list[Path]:
    """Record ``runs`` runs into ``tmp_path/work/s.zarr``, copying ``work/`` before every file zarr writes."""
    work = tmp_path / "work"
    work.mkdir()
    snapshots: list[Path] = []
    real_put = zarr_local._put
    serial = threading.Lock()  # zarr writes from worker threads: one at a time, so each copy is a moment

    def put(path, value, exclusive=False):
        with serial:
            snapshot = tmp_path / f"snap{len(snapshots):04d}"
            shutil.copytree(work, snapshot)
            snapshots.append(snapshot)
            return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(zarr_local, "_put", put)
    record_runs(work / "s.zarr", runs)
    monkeypatch.undo()
    snapshots.append(tmp_path / "final")
    shutil.copytree(work, snapshots[-1])
    return snapshots


def test_a_record_killed_at_any_write_resumes_and_readers_only_ever_see_complete_runs(tmp_path, monkeypatch, reference):
    snapshots = snapshot_every_write(tmp_path, monkeypatch, runs=3)
    assert len(snapshots) > 30  # every chunk and metadata write of three runs
    seen_runs = set()
    for snapshot in snapshots:
        store = snapshot / "s.zarr"
        # A reader at this moment: nothing yet, or complete runs equal to the reference's first ones.
        if store.exists():
            ds = loaded(store)
            n = ds.sizes["run"]
            seen_runs.add(n)
            xr.testing.assert_identical(ds, reference.isel(run=slice(0, n)).assign_attrs(runs_complete=n))
        # The writer killed at this moment: the same command resumes to the reference store.
        record_runs(store, 3)
        xr.testing.assert_identical(loaded(store), reference)
        assert not creating_path(store).exists()
    assert seen_runs == {1, 2, 3}  # readers saw the store grow run by run


def test_a_record_killed_by_sigkill_during_creation_and_append_resumes(tmp_path, reference):
    """Real kills (SIGKILL from inside zarr's k-th file write) at points of the first and a later run."""
    code = (
        "import os, signal, sys\n"
        "import zarr.storage._local as local\n"
        "from qdrift_stats import testbed\n"
        "from qdrift_stats.record.lockstep import record\n"
        "k, count, real = int(sys.argv[2]), [0], local._put\n"
        "def put(path, value, exclusive=False):\n"
        "    count[0] += 1\n"
        "    if count[0] == k:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(path, value, exclusive=exclusive)\n"
        "local._put = put\n"
        f"record(testbed.mixture_vp_noise(), sys.argv[1], runs=3, **{SETTINGS!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in (1, 20, 50, 60, 80):  # of 86 writes: 55 create the store with its first run, 16 append each next run
        store = tmp_path / f"k{k}" / "s.zarr"
        store.parent.mkdir()
        proc = subprocess.run([sys.executable, "-c", code, str(store), str(k)], env=env, capture_output=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-500:]
        record_runs(store, 3)
        xr.testing.assert_identical(loaded(store), reference)


class SimulatedKill(Exception):
    pass


def test_the_dask_path_killed_at_a_write_resumes_to_the_serial_store(tmp_path, monkeypatch, reference):
    pytest.importorskip("distributed")
    from qdrift_stats.record.distributed import record_distributed

    settings = {k: v for k, v in SETTINGS.items() if k != "pair_name"}
    real_put = zarr_local._put
    for k in (3, 40, 62):
        store = tmp_path / f"k{k}" / "s.zarr"
        count = [0]

        def put(path, value, exclusive=False, k=k, count=count):
            count[0] += 1
            if count[0] == k:
                raise SimulatedKill(f"write {k}")
            return real_put(path, value, exclusive=exclusive)

        monkeypatch.setattr(zarr_local, "_put", put)
        with pytest.raises(Exception):  # noqa: B017  (the simulated kill, however the client wraps it)
            record_distributed(VP_PAIR, store, runs=3, n_workers=1, processes=False, **settings)
        monkeypatch.undo()
        record_distributed(VP_PAIR, store, runs=3, n_workers=1, processes=False, **settings)
        xr.testing.assert_identical(loaded(store), reference)


def test_a_store_an_older_version_left_half_created_is_started_again(tmp_path, reference):
    """Before the atomic creation a killed first write left a store with attributes and no committed run."""
    store = tmp_path / "s.zarr"
    record_runs(store, 1)
    import zarr

    zarr.open_group(store, mode="r+", use_consolidated=False).attrs["runs_complete"] = 0
    shutil.rmtree(store / "seed")
    record_runs(store, 3)
    xr.testing.assert_identical(loaded(store), reference)


def test_the_lock_race_of_a_contender_that_opened_the_file_before_it_was_removed(tmp_path, monkeypatch):
    """A holds the lock; B opens the lock file, then A finishes (removes it and unlocks); C locks anew.
    B's lock on the removed file must not count: B is refused while C holds the store."""
    import fcntl

    store = tmp_path / "s.zarr"
    real_flock = fcntl.flock
    b_opened, a_done = threading.Event(), threading.Event()

    def flock(fd, op):
        if threading.current_thread().name == "B" and not b_opened.is_set():
            b_opened.set()  # B has opened the file A is about to remove
            assert a_done.wait(10)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    outcome: dict[str, object] = {}

    def contender_b():
        try:
            with writer_lock(store):
                outcome["b"] = "locked"
        except QDriftError as exc:
            outcome["b"] = str(exc)

    a = StoreLock(store).acquire()
    b = threading.Thread(target=contender_b, name="B")
    b.start()
    assert b_opened.wait(10)
    a.release()
    c = StoreLock(store).acquire()  # C arrives after A: a new lock file
    a_done.set()
    b.join(10)
    try:
        assert "another process is writing" in str(outcome["b"])
    finally:
        c.release()
    assert not (tmp_path / "s.zarr.lock").exists()


def test_a_store_without_gain_is_upgraded_and_then_fits_with_the_defaults(tmp_path, reference):
    import zarr

    from qdrift_stats.estimators.empirical import EmpiricalEstimator

    store = tmp_path / "old.zarr"
    record_runs(store, 3)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    del group["gain"]
    for _, array in group.arrays():
        names = str(array.attrs.get("coordinates", "")).split()
        if "gain" in names:
            array.attrs["coordinates"] = " ".join(n for n in names if n != "gain")
    from qdrift_stats.record.store import commit_store

    commit_store(store, 3)
    old = loaded(store)
    assert "gain" not in old.coords
    with pytest.raises(QDriftError, match="upgrade_store") as err:
        EmpiricalEstimator(statistic="first-order").fit(store)
    assert "\n" not in str(err.value)
    assert upgrade_store(store) is True
    assert upgrade_store(store) is False  # already there
    upgraded = loaded(store)
    np.testing.assert_array_equal(upgraded["gain"].values, reference["gain"].values)
    xr.testing.assert_identical(upgraded, reference)
    EmpiricalEstimator(statistic="first-order").fit(store)
