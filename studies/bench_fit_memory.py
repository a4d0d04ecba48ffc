"""Peak memory and time of fitting a calibration store larger than the memory a naive fit needs.

    python studies/bench_fit_memory.py [--runs 50] [--steps 50] [--batch 2] [--shape 4 128 128]
                                       [--estimators empirical per-channel first-order]
                                       [--store /tmp/qdrift_bench_fit.zarr] [--keep]

1. Writes a synthetic store in the exact calibration-store schema (:mod:`qdrift_stats.record.store`),
   one run at a time with the package's one store writer (:class:`~qdrift_stats.record.store.StoreWriter`),
   so the writer never holds more than one run (``steps x batch x shape`` per variable). The
   variables are float16 ``(run, step, sample, channel, height, width)``, one zarr chunk per
   ``(run, step)``; ``delta_x`` of step ``i`` is Gaussian with variance ``v_i`` (log-spaced from
   1e-2 down to 1e-5 state units^2), ``delta_out`` and ``out_fp`` are Gaussian. The step grid (and
   its ``gain``) is a real Euler grid of the testbed's VP config. While writing, the exact
   per-(run, step) mean squares of the float16 ``delta_x`` and ``delta_out`` are accumulated in
   float64: the references the fits must reproduce.
   The defaults give 50 x 50 x 2 x 4 x 128 x 128 float16 = 0.66 GB per variable, 1.97 GB for the
   three (a fit reads one of them, ``delta_x`` or ``delta_out``; cast to float64 in one piece
   that one would be 2.6 GB).
2. Fits it with registered estimators (default ``empirical``, ``per-channel`` and ``first-order``,
   which reads ``delta_out`` and the ``gain`` coordinate), each in a fresh child process (this
   file with ``--fit-child``), which reports its own peak resident set
   size (``VmHWM``) after the imports (baseline) and after the fit (peak), and the fit's wall time.
   (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` is printed too, but on Linux a child inherits its
   parent's ``ru_maxrss`` at fork, so it is at least the writer's own peak: an upper bound only.)
3. Checks the fitted per-run values against the references (relative error < 1e-9; estimators
   this script has no reference for are timed only), prints a markdown table and deletes the
   store unless ``--keep``.

Results: docs/results/scale.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIABLES = ("delta_x", "delta_out", "out_fp")


def _maxrss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """``ru_maxrss`` in MB (Linux reports KiB). Inherited over fork + exec: see :func:`_hwm_mb`."""
    return resource.getrusage(who).ru_maxrss / 1024.0


def _hwm_mb() -> float:
    """This process's own peak resident set size in MB (``VmHWM`` of ``/proc/self/status``).

    Unlike ``ru_maxrss``, which Linux carries from the parent into a forked and exec'ed child (so a
    child of a 500 MB parent reports at least 500 MB), ``VmHWM`` belongs to the current address
    space and starts afresh at exec.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return _maxrss_mb()


def step_variances(steps: int) -> np.ndarray:
    """``(steps,)`` the generating ``v_i``: log-spaced from 1e-2 to 1e-5 (state units^2)."""
    return np.logspace(-2, -5, steps)


def write_store(
    path: Path, runs: int, steps: int, batch: int, shape: tuple[int, ...], seed: int = 0
) -> dict[str, np.ndarray]:
    """Write the synthetic store run by run; return the exact reference statistics.

    Returns:
        ``{"delta_x": ref, "delta_out": ref, "gain": (steps,)}`` with float64 ``ref`` of shape
        ``(runs, steps, 1 + channels)``: ``[..., 0]`` the mean square over samples and all sample
        dims, ``[..., 1:]`` the same per channel.
    """
    from qdrift_stats.loop import prepared_scheduler
    from qdrift_stats.record.store import StoreWriter, identity_attrs, step_coordinates
    from qdrift_stats.testbed import VP_SCHEDULER_CONFIG

    class _ShapeOnly:
        """Just enough of a pair for the store attributes: sample shape and a VP scheduler config."""

        sample_shape = tuple(shape)
        scheduler_config = dict(VP_SCHEDULER_CONFIG)

    pair = _ShapeOnly()
    scheduler = prepared_scheduler(pair, "euler", steps)
    attrs = identity_attrs(
        "synthetic:bench_fit_memory",
        scheduler,
        steps,
        dtype="float16",
        trajectories=False,
        batch_size=batch,
        sample_shape=tuple(shape),
    )
    coords = step_coordinates(scheduler)
    gain = coords["gain"]
    std = np.sqrt(step_variances(steps)).astype(np.float32).reshape((steps, 1) + (1,) * len(shape))
    channels = shape[0]
    refs = {name: np.zeros((runs, steps, 1 + channels)) for name in ("delta_x", "delta_out")}
    rng = np.random.default_rng(seed)
    with StoreWriter(path, attrs, coords) as writer:
        for r in range(runs):
            arrays = {}
            for name in VARIABLES:
                values = rng.standard_normal((steps, batch, *shape), dtype=np.float32)
                if name == "delta_x":
                    values *= std
                arrays[name] = values.astype(np.float16)
                del values
                if name in refs:
                    sq = arrays[name].astype(np.float64) ** 2
                    refs[name][r, :, 0] = sq.reshape(steps, -1).mean(axis=1)
                    refs[name][r, :, 1:] = sq.swapaxes(1, 2).reshape(steps, channels, -1).mean(axis=2)
                    del sq
            writer.append(seed + r, arrays)
    return {**refs, "gain": gain}


def reference_for(name: str, refs: dict[str, np.ndarray]) -> np.ndarray | None:
    """The exact per-run statistic a registered estimator must return, where this script knows it."""
    gain2 = refs["gain"][None, :, None] ** 2
    table = {
        "empirical": refs["delta_x"][..., 0],
        "per-channel": refs["delta_x"][..., 1:],
        "first-order": (gain2 * refs["delta_out"])[..., 0],
        "first-order-per-channel": (gain2 * refs["delta_out"])[..., 1:],
    }
    return table.get(name)


def fit_child(store: str, name: str) -> None:
    """Runs in a fresh process: fit and print ``{baseline_mb, peak_mb, seconds, per_run}`` as JSON."""
    from qdrift_stats.estimators import get_estimator
    from qdrift_stats.record.store import open_store

    baseline = _hwm_mb()
    start = time.perf_counter()
    fitted = get_estimator(name).fit(open_store(store))
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {"baseline_mb": baseline, "peak_mb": _hwm_mb(), "seconds": seconds, "per_run": fitted.per_run.tolist()}
        )
    )


def measure(store: Path, name: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fit-child", str(store), "--estimators", name]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 128, 128])
    parser.add_argument(
        "--estimators",
        nargs="+",
        default=["empirical", "per-channel", "first-order"],
        help="Registered estimator names to fit.",
    )
    parser.add_argument("--store", type=Path, default=Path("/tmp/qdrift_bench_fit.zarr"))
    parser.add_argument("--keep", action="store_true", help="Keep the store afterwards.")
    parser.add_argument("--fit-child", metavar="STORE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fit_child:
        fit_child(args.fit_child, args.estimators[0])
        return

    shape = tuple(args.shape)
    if args.store.exists():
        shutil.rmtree(args.store)
    try:
        start = time.perf_counter()
        refs = write_store(args.store, args.runs, args.steps, args.batch, shape)
        write_s = time.perf_counter() - start
        per_var = args.runs * args.steps * args.batch * int(np.prod(shape)) * 2
        disk = dir_size(args.store)
        print(
            f"store {args.store}: {args.runs} runs x {args.steps} steps x {args.batch} x "
            f"{'x'.join(map(str, shape))} float16; "
            f"{len(VARIABLES) * per_var / 1e9:.2f} GB uncompressed ({per_var / 1e9:.2f} GB per variable), "
            f"{disk / 1e9:.2f} GB on disk; written in {write_s:.0f} s"
        )
        rows = []
        for name in args.estimators:
            result = measure(args.store, name)
            want = reference_for(name, refs)
            rel = float("nan")
            if want is not None:
                rel = float(np.max(np.abs(np.asarray(result["per_run"]) - want) / want))
                if rel > 1e-9:
                    raise SystemExit(f"{name}: fit disagrees with the reference: max relative error {rel:.2e}")
            rows.append((name, result, rel))
        print()
        print("| estimator | peak RSS (MB) | RSS after imports (MB) | fit time (s) | max rel. error vs reference |")
        print("|---|---|---|---|---|")
        for name, result, rel in rows:
            print(
                f"| {name} | {result['peak_mb']:.0f} | {result['baseline_mb']:.0f} | "
                f"{result['seconds']:.1f} | {rel:.1e} |"
            )
        print(
            f"\nwriter (this process) ru_maxrss {_maxrss_mb():.0f} MB; largest child ru_maxrss (RUSAGE_CHILDREN, "
            f"an upper bound, inherited from the writer at fork) {_maxrss_mb(resource.RUSAGE_CHILDREN):.0f} MB; "
            f"a float64 copy of one variable would be {per_var * 4 / 1e9:.2f} GB"
        )
    finally:
        if not args.keep and args.store.exists():
            shutil.rmtree(args.store)


if __name__ == "__main__":
    main()
