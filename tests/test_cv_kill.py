"""``qdrift cv`` killed at every file write of its output resumes to the uninterrupted result.

The technique of ``tests/test_store_consistency.py`` / ``studies/crash_consistency.py`` for
``record``: the command runs once while the output's folder is copied just before each file write
zarr makes (every chunk and metadata document, each written whole by zarr: a temporary file
renamed into place). Each copy is exactly what a ``kill -9`` at that moment leaves behind, from
before the output exists to just before its final commit mark. For every copy:

- a reader (:func:`~qdrift_stats.validate.crossval.open_cv`) either refuses it in one line
  (``QDriftError``: missing or incomplete) or reads the finished result, never anything else;
- the same ``qdrift cv`` command, run again on the copy, exits 0 with the uninterrupted result
  (the Dataset identical, attributes included).

The first test kills at every write of ``qdrift cv --no-strength`` (the creation, every
calibration count's part, the combined result); the second at every write of the strength
search's part (``--pair``, its grid shrunk to keep the test quick). ``studies/robustness.py`` kills
the full command (learning curve and strength search, the command's own grid) at every write and
reports the counts (:func:`kill_trials`).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xarray as xr
import zarr.storage._local as zarr_local

from qdrift_stats import testbed
from qdrift_stats.errors import QDriftError
from qdrift_stats.record.lockstep import record
from qdrift_stats.validate.crossval import open_cv

PAIR = "qdrift_stats.testbed:mixture_vp_noise"


def make_store(path: Path, runs: int = 3) -> Path:
    """A tiny calibration store: 3 Euler steps, ``runs`` runs of batch 4."""
    record(
        testbed.mixture_vp_noise(),
        path,
        pair_name=PAIR,
        scheduler_name="euler",
        steps=3,
        runs=runs,
        batch_size=4,
        seed=0,
    )
    return path


def cv_args(store: Path, out: Path) -> list[str]:
    """The ``qdrift cv`` command of the trials: the learning curve and the strength search."""
    return [
        "cv",
        str(store),
        "--out",
        str(out),
        "--estimator",
        "empirical",
        "--splits",
        "3",
        "--pair",
        PAIR,
        "--samples",
        "16",
        "--quiet",
        "--json",
    ]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``qdrift ARGV`` in this process: (exit code, stdout, stderr)."""
    from qdrift_stats.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def snapshot_every_write(
    work: Path, snapshots: Path, only: Callable[[str], bool] | None = None
) -> Iterator[list[Path]]:
    """While active, copy the folder ``work`` to ``snapshots/NNNN`` just before each file zarr writes
    (``only``: just before the writes whose path, relative to ``work``, it accepts)."""
    taken: list[Path] = []
    real_put, serial = zarr_local._put, threading.Lock()  # zarr writes from threads: one at a time

    def put(path, value, exclusive=False):
        with serial:
            if exclusive and path.exists():  # zarr's "create the parent group if missing": changes nothing
                return real_put(path, value, exclusive=exclusive)
            if only is not None and not only(str(Path(path).relative_to(work))):
                return real_put(path, value, exclusive=exclusive)
            taken.append(snapshots / f"{len(taken):04d}")
            shutil.copytree(work, taken[-1], symlinks=True)
            return real_put(path, value, exclusive=exclusive)

    zarr_local._put = put
    try:
        yield taken
    finally:
        zarr_local._put = real_put


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def same_result(a: xr.Dataset, b: xr.Dataset) -> bool:
    try:
        xr.testing.assert_identical(a, b)
    except AssertionError:
        return False
    return True


def kill_trials(
    store: Path,
    root: Path,
    args: Callable[[Path, Path], list[str]] = cv_args,
    examples: list[str] | None = None,
    only: Callable[[str], bool] | None = None,
) -> Counter:
    """Kill ``qdrift cv`` at every file write of its output (see the module docstring); counts of outcomes.

    ``root`` must be an empty folder; ``reference`` is computed there first, uninterrupted.
    ``only``: kill only at the writes whose path (``cv.zarr/...``) it accepts.
    Keys: ``kill points``, ``output existed``, ``reads refused`` (one line), ``reads finished``,
    ``reader failures``, ``resumed identical``, ``resume failures``.
    """
    counts: Counter = Counter()
    (root / "reference").mkdir()
    code, _, err = run_cli(args(store, root / "reference" / "cv.zarr"))
    if code != 0:
        raise AssertionError(f"the uninterrupted cv failed: {err}")
    reference = open_cv(root / "reference" / "cv.zarr").dataset
    reference_files = files_of(root / "reference" / "cv.zarr")
    work, snaps = root / "work", root / "snapshots"
    work.mkdir()
    snaps.mkdir()
    with snapshot_every_write(work, snaps, only) as taken:
        code, _, err = run_cli(args(store, work / "cv.zarr"))
    if code != 0:
        raise AssertionError(f"the snapshotted cv failed: {err}")
    if not same_result(open_cv(work / "cv.zarr").dataset, reference):
        raise AssertionError("the snapshotted cv differs from the reference")
    for snapshot in taken:
        counts["kill points"] += 1
        out = snapshot / "cv.zarr"
        if out.exists() or out.is_symlink():
            counts["output existed"] += 1
        try:
            read = open_cv(out).dataset
            if same_result(read, reference):
                counts["reads finished"] += 1
            else:
                counts["reader failures"] += 1
                if examples is not None:
                    examples.append(f"{snapshot.name}: a reader saw a result that differs")
        except QDriftError:
            counts["reads refused"] += 1
        except Exception as exc:  # noqa: BLE001 - counted as a failure
            counts["reader failures"] += 1
            if examples is not None:
                examples.append(f"{snapshot.name}: read {type(exc).__name__}: {exc}"[:300])
        code, _, err = run_cli(args(store, out))
        try:  # the same files, byte for byte, as the uninterrupted run's (else: the same Dataset, as read)
            ok = code == 0 and (files_of(out) == reference_files or same_result(open_cv(out).dataset, reference))
        except Exception:  # noqa: BLE001 - an unreadable result is a failed resume
            ok = False
        leftovers = sorted(p.name for p in snapshot.iterdir() if p.name != "cv.zarr")
        if ok and leftovers:
            ok = False
            err = f"left {', '.join(leftovers)}"
        if ok:
            counts["resumed identical"] += 1
        else:
            counts["resume failures"] += 1
            if examples is not None:
                examples.append(f"{snapshot.name}: resume exit {code}: {' '.join(err.split())}"[:300])
        shutil.rmtree(snapshot, ignore_errors=True)
    return counts


@contextlib.contextmanager
def small_strength_grid(forms: tuple[str, ...] = ("shrink",), strengths: tuple[float, ...] = (0.0, 1.0)):
    """``qdrift cv``'s strength grid shrunk (its defaults: 2 forms x 7 strengths) to keep the trials quick."""
    from qdrift_stats.validate import crossval

    defaults = crossval.cross_validate.__wrapped__.__kwdefaults__
    saved = dict(defaults)
    defaults.update(forms=forms, strengths=strengths)
    try:
        yield
    finally:
        defaults.clear()
        defaults.update(saved)


@pytest.fixture
def scratch(tmp_path) -> Iterator[Path]:
    """A folder for the trials, in memory (/dev/shm) where there is one: the trials create and delete
    some 10,000 small files, which a disk mounted with ``discard`` makes slow."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="qdrift-cv-kill-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("cv-kill") / "calib.zarr", runs=2)


def without_strength(store: Path, out: Path) -> list[str]:
    args = cv_args(store, out)
    at = args.index("--pair")
    return [*args[:at], *args[at + 2 :], "--no-strength"]


def test_cv_killed_at_every_write_resumes_to_the_uninterrupted_result(store, scratch):
    """Every write of ``qdrift cv --no-strength``: the creation, each count's part, the combined result."""
    examples: list[str] = []
    counts = kill_trials(store, scratch, args=without_strength, examples=examples)
    assert examples == [], (dict(counts), examples[:5])
    assert counts["kill points"] > 20  # every part's arrays and marks, the root result, the creation
    assert 0 < counts["output existed"] < counts["kill points"]  # the first kill precedes the output
    assert counts["resumed identical"] == counts["kill points"]
    assert counts["reads finished"] == 0  # every copy predates the final commit mark
    assert counts["reads refused"] == counts["kill points"]


def test_cv_killed_at_every_write_of_the_strength_search_resumes_to_the_same_choice(store, scratch):
    """Every write of the strength search's part (with ``--pair``; the combined result's writes are
    the test above's code path, and the study kills at every write of this command)."""
    examples: list[str] = []
    with small_strength_grid():
        counts = kill_trials(
            store, scratch, examples=examples, only=lambda path: path.startswith("cv.zarr/parts/strength/")
        )
    assert examples == [], (dict(counts), examples[:5])
    assert counts["kill points"] > 10  # each array's metadata and chunks, the part's commit mark
    assert counts["output existed"] == counts["kill points"]
    assert counts["resumed identical"] == counts["reads refused"] == counts["kill points"]


def test_rerunning_a_finished_cv_writes_nothing(store, scratch):
    """A finished result is reused, not rewritten: a rerun leaves no moment for a kill to hit."""
    out = scratch / "cv.zarr"
    with small_strength_grid():
        assert run_cli(cv_args(store, out))[0] == 0
        before = files_of(out)
        with snapshot_every_write(scratch, scratch / "never") as taken:
            code, _, err = run_cli(cv_args(store, out))
    assert (code, err, taken) == (0, "", [])
    assert files_of(out) == before
