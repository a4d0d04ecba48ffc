"""Crash consistency of the calibration store: a kill at every file write, readers at every moment.

What it does: records ``--runs`` runs (3-step Euler, batch 2, the analytic testbed pair) while
copying the store's folder just before each file write zarr makes (every chunk and metadata
document). Each copy is exactly what a ``kill -9`` at that moment leaves behind. For every copy it

- opens the store as a reader would (``open_store``) if it exists, and checks that it shows only
  complete runs, equal to a reference recording's first runs (a "reader failure" otherwise);
- runs the same ``record`` command on it and checks that the result equals the reference store
  (a "resume failure" otherwise).

Run: ``python studies/crash_consistency.py [--runs 3]`` (about a minute). It prints one line of
counts; docs/store-format.md quotes it. With ``PYTHONPATH`` pointing at an older checkout it
measures that one instead (the writer before the single-writer refactor, commit 3311e9e: 106 of 108
reads failed and 48 of 108 resumes, with 3 runs; this one: 0 of 87 and 0 of 87).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

import xarray as xr
import zarr.storage._local as zarr_local

from qdrift_stats import testbed
from qdrift_stats.record.lockstep import record
from qdrift_stats.record.store import open_store

SETTINGS = dict(
    pair_name="qdrift_stats.testbed:mixture_vp_noise", scheduler_name="euler", steps=3, batch_size=2, seed=0
)


def record_runs(path: Path, runs: int) -> None:
    record(testbed.mixture_vp_noise(), path, runs=runs, **SETTINGS)


def scratch_parent() -> str | None:
    """/dev/shm where there is one (the trials copy and delete thousands of small files, which a disk
    mounted with ``discard`` makes slow); else the default temporary folder."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def kill_trials(runs: int, root: Path) -> dict[str, int]:
    """Kill ``record`` at every file write (see the module docstring) in the empty folder ``root``; the counts."""
    record_runs(root / "reference.zarr", runs)
    reference = open_store(root / "reference.zarr").load()
    work = root / "work"
    work.mkdir()
    snapshots: list[Path] = []
    real_put, serial = zarr_local._put, threading.Lock()

    def put(path, value, exclusive=False):
        with serial:
            snapshots.append(root / f"snap{len(snapshots):04d}")
            shutil.copytree(work, snapshots[-1])
            return real_put(path, value, exclusive=exclusive)

    zarr_local._put = put
    try:
        record_runs(work / "s.zarr", runs)
    finally:
        zarr_local._put = real_put
    visible = read_failures = resume_failures = before_first_run = 0
    for snapshot in snapshots:
        store = snapshot / "s.zarr"
        if store.exists():
            visible += 1
            try:
                ds = open_store(store).load()
                n = ds.sizes["run"]
                xr.testing.assert_identical(ds, reference.isel(run=slice(0, n)).assign_attrs(runs_complete=n))
            except Exception:
                read_failures += 1
        else:
            before_first_run += 1  # the creation window: the store is written aside, then renamed
        try:
            record_runs(store, runs)
            xr.testing.assert_identical(open_store(store).load(), reference)
        except Exception:
            resume_failures += 1
        shutil.rmtree(snapshot, ignore_errors=True)
    return {
        "kill points": len(snapshots),
        "store existed": visible,
        "before the store existed": before_first_run,
        "reader failures": read_failures,
        "resume failures": resume_failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp(dir=scratch_parent()))
    try:
        c = kill_trials(args.runs, root)
        print(
            f"{c['kill points']} kill points over {args.runs} runs; the store existed at {c['store existed']}; "
            f"reader failures {c['reader failures']}; resume failures {c['resume failures']}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
