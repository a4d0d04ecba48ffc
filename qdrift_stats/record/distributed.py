"""Recording at scale: paired calibration runs sharded over a dask.distributed cluster.

:func:`record_distributed` records the same runs as :func:`qdrift_stats.record.lockstep.record` (seeds
``seed .. seed + runs - 1``), but each run is computed by a cluster worker. The resulting store
equals a serial ``record()`` of the same seeds bit for bit (values, coordinates, attributes and
run order), provided the pair computes the same outputs in a worker as in the client process (true
for the analytic testbed; a model whose CPU kernels depend on the thread count needs the same
``torch.set_num_threads`` in both, since dask's nanny starts workers with ``OMP_NUM_THREADS=1``).

Design: workers compute, the client writes.

- A worker rebuilds the pair from its ``MODULE:FACTORY`` spec (once per worker thread, then
  cached), runs :func:`~qdrift_stats.record.lockstep.record_run` for one seed, casts to the storage dtype
  and returns the arrays ``(steps, batch, *sample_shape)``. Workers never touch the store, so they
  need no shared filesystem and cannot corrupt it by writing concurrently.
- The client is the only writer. It appends finished runs with the same
  :class:`~qdrift_stats.record.store.StoreWriter` that ``record()`` uses, strictly in seed order: a run that
  finishes before an earlier seed waits in client memory. So the store's layout, its ``run``
  order and its commit point (``runs_complete`` + consolidated metadata, updated after each
  appended run) are exactly those of a serial recording, and resuming works the same way (an
  existing compatible store is repaired and only the missing seeds are recorded).
- At most ``max_in_flight`` runs are submitted but not yet committed (computing on a worker or
  waiting for an earlier seed). That bounds the client's memory and is what an interrupted
  recording can lose: every run before the first unfinished seed is already committed.
- If a run fails (e.g. a non-finite model output), the runs of earlier seeds are still committed,
  as a serial recording would have, the later ones are cancelled, and the error is raised.

The alternatives were rejected: region writes into a pre-sized store need a filesystem shared by
all workers and leave holes whose commit point no longer is a simple run count; per-run temporary
stores cost a second copy of every run on disk. The cost of this design is that every run crosses
the network once to the client, which is small next to the model evaluations that produce it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qdrift_stats.errors import QDriftError

_local = threading.local()


@dataclass(frozen=True)
class RunFailure:
    """A :class:`QDriftError` raised on a worker, returned as a value so the worker logs no traceback."""

    message: str


def _returning_failures(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QDriftError as exc:
            return RunFailure(str(exc))

    return wrapped


def _worker_pair(pair_spec: str) -> Any:
    """The pair named ``pair_spec``, built once per worker thread (pairs need not be thread-safe)."""
    pairs = getattr(_local, "pairs", None)
    if pairs is None:
        pairs = _local.pairs = {}
    if pair_spec not in pairs:
        from qdrift_stats.pair import load_pair

        pairs[pair_spec] = load_pair(pair_spec)
    return pairs[pair_spec]


@_returning_failures
def describe_recording(
    pair_spec: str,
    scheduler_name: str,
    steps: int,
    runs: int,
    batch_size: int,
    seed: int,
    trajectories: bool,
    dtype: str,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Store attributes and per-step coordinates of a recording (runs where the pair can be built).

    Returns:
        ``(attrs, coords)``: the store attributes ``record()`` would write, and its per-step
        coordinates ``timestep, a, b, a_next, b_next, gain``, each float64 ``(steps,)``.
    """
    from qdrift_stats.loop import prepared_scheduler
    from qdrift_stats.record.lockstep import RecordingPlan, recording_attrs
    from qdrift_stats.record.store import step_coordinates

    pair = _worker_pair(pair_spec)
    plan = RecordingPlan(
        pair_spec, scheduler_name, steps, tuple(range(seed, seed + runs)), batch_size, trajectories, dtype
    )
    scheduler = prepared_scheduler(pair, scheduler_name, steps)
    return recording_attrs(pair, plan, scheduler), step_coordinates(scheduler)


@_returning_failures
def record_one_run(
    pair_spec: str, scheduler_name: str, steps: int, batch_size: int, seed: int, trajectories: bool, dtype: str
) -> dict[str, np.ndarray]:
    """One paired run computed where it is called (a worker): name -> ``(steps, batch, *sample_shape)`` in ``dtype``."""
    from qdrift_stats.record.lockstep import record_run
    from qdrift_stats.record.store import STORAGE_DTYPES

    arrays, _ = record_run(_worker_pair(pair_spec), scheduler_name, steps, batch_size, seed, trajectories)
    return {name: value.astype(STORAGE_DTYPES[dtype]) for name, value in arrays.items()}


def _connect(
    client: Any, scheduler_address: str | None, n_workers: int, processes: bool
) -> tuple[Any, Callable[[], None]]:
    """A ``distributed.Client`` and a function that closes what this call opened."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise QDriftError("distributed recording needs dask.distributed: pip install 'qdrift-stats[scale]'") from None
    if client is not None and scheduler_address is not None:
        raise QDriftError("give either a client or a scheduler address, not both")
    if client is not None:
        return client, lambda: None
    if scheduler_address is not None:
        try:
            remote = Client(scheduler_address, timeout=30)
        except (OSError, TimeoutError) as exc:
            raise QDriftError(
                f"cannot reach the dask scheduler at {scheduler_address} ({type(exc).__name__})"
            ) from None
        return remote, remote.close
    if n_workers < 1:
        raise QDriftError(f"--workers must be at least 1, got {n_workers}")
    cluster = LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=processes, dashboard_address=":0"
    )  # any free port: never clashes
    local = Client(cluster)

    def close() -> None:
        local.close()
        cluster.close()

    return local, close


def record_distributed(
    pair_spec: str,
    out: str | Path,
    *,
    scheduler_name: str,
    steps: int,
    runs: int,
    batch_size: int,
    seed: int,
    trajectories: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    client: Any = None,
    scheduler_address: str | None = None,
    n_workers: int = 2,
    processes: bool = True,
    max_in_flight: int | None = None,
    on_commit: Callable[[int, int], None] | None = None,
) -> Path:
    """Record ``runs`` paired runs (seeds ``seed .. seed + runs - 1``) on a dask cluster into ``out``.

    Same arguments and store as :func:`qdrift_stats.record.lockstep.record`, with the pair given by its
    ``MODULE:FACTORY`` spec (it is built on the workers; the client never loads the models).

    Args:
        client: an existing ``distributed.Client`` (left open), or
        scheduler_address: the address of a running scheduler (``tcp://host:8786``), or neither:
            a ``LocalCluster`` of ``n_workers`` single-threaded workers (worker processes if
            ``processes``, else threads of this process) is started and closed.
        max_in_flight: most runs submitted but not yet committed (default: twice the cluster's
            worker threads); bounds the client's memory and what an interruption can lose.
        on_commit: called as ``on_commit(seed, runs_complete)`` after each run is committed.

    Returns:
        The store path. Raises :class:`QDriftError` for bad input, a failing run or an unreachable
        scheduler (runs of earlier seeds stay committed).
    """
    from qdrift_stats.record.lockstep import check_recording_args
    from qdrift_stats.record.store import StoreWriter

    check_recording_args(runs, batch_size, dtype)
    out = Path(out)
    client, close = _connect(client, scheduler_address, n_workers, processes)
    futures: dict[Any, int] = {}
    try:
        described = client.submit(
            describe_recording,
            pair_spec,
            scheduler_name,
            steps,
            runs,
            batch_size,
            seed,
            trajectories,
            dtype,
            pure=False,
        ).result()
        if isinstance(described, RunFailure):
            raise QDriftError(described.message)
        attrs, coords = described
        with StoreWriter(out, attrs, coords, overwrite=overwrite) as writer:
            todo = writer.todo(range(seed, seed + runs))
            if not todo:
                return out
            window = max_in_flight or 2 * max(1, sum(client.nthreads().values()))

            def submit(s: int):
                return client.submit(
                    record_one_run, pair_spec, scheduler_name, steps, batch_size, s, trajectories, dtype, pure=False
                )

            def commit(k: int, s: int, arrays: dict[str, np.ndarray]) -> None:
                runs_complete = writer.append(s, arrays)
                if on_commit is not None:
                    on_commit(s, runs_complete)

            _commit_in_seed_order(todo, window, submit, commit, futures)
    finally:
        for future in futures:
            future.cancel()
        close()
    return out


def _commit_in_seed_order(
    todo: list[int],
    window: int,
    submit: Callable[[int], Any],
    commit: Callable[[int, int, dict], None],
    futures: dict[Any, int],
) -> None:
    """Run ``submit(seed)`` for every seed of ``todo`` with at most ``window`` uncommitted, and call
    ``commit(k, seed, arrays)`` for ``todo[k]`` in order as soon as ``todo[:k+1]`` have all finished.

    On a failed seed: later seeds are cancelled, earlier ones are still committed, then the error is
    raised. ``futures`` (future -> seed) holds what is outstanding, for the caller to cancel.
    """
    from distributed import as_completed

    pending = iter(todo)
    finished: dict[int, dict[str, np.ndarray]] = {}
    failed: tuple[int, BaseException] | None = None
    ready = as_completed()

    def submit_next() -> None:
        s = next(pending, None)
        if s is not None and failed is None:
            future = submit(s)
            futures[future] = s
            ready.add(future)

    for _ in range(min(window, len(todo))):
        submit_next()
    committed = 0
    for future in ready:
        s = futures.pop(future, None)
        if s is None:  # cancelled below
            continue
        result = future.result() if future.status != "error" else RunFailure("")
        if isinstance(result, RunFailure):
            error = QDriftError(result.message) if result.message else future.exception()
            if failed is None or s < failed[0]:
                failed = (s, error)
            for other, other_seed in list(futures.items()):
                if other_seed > failed[0]:  # a serial recording would never have reached these
                    futures.pop(other)
                    other.cancel()
        elif failed is None or s < failed[0]:
            finished[s] = result
        future.release()
        while committed < len(todo) and todo[committed] in finished:
            commit(committed, todo[committed], finished.pop(todo[committed]))
            committed += 1
        if failed is not None and not any(other_seed < failed[0] for other_seed in futures.values()):
            break
        submit_next()
    if failed is not None:
        raise failed[1]


# --------------------------------------------------------------------------------------------------
# diffusers pipelines: calibrate_pipeline on a cluster


def _worker_pipelines(spec: Any) -> tuple[Any, Any]:
    """``(fp_pipe, q_pipe)`` from a ``MODULE:FACTORY`` spec (or a picklable no-argument callable, e.g. a
    ``functools.partial`` of a module-level function), built once per worker thread."""
    cache = getattr(_local, "pipelines", None)
    if cache is None:
        cache = _local.pipelines = {}
    key = spec if isinstance(spec, str) else repr(spec)
    if key not in cache:
        if callable(spec):
            factory = spec
        else:
            import importlib

            module_name, _, name = str(spec).partition(":")
            if not module_name or not name:
                raise QDriftError(f"pipelines must be given as MODULE:FACTORY, got {spec!r}")
            try:
                factory = getattr(importlib.import_module(module_name), name)
            except (ImportError, AttributeError) as exc:
                raise QDriftError(f"cannot import {spec} ({type(exc).__name__})") from None
        pipes = factory()
        if not (isinstance(pipes, tuple) and len(pipes) == 2):
            raise QDriftError(f"{spec}() must return (fp_pipe, q_pipe)")
        cache[key] = pipes
    return cache[key]


@_returning_failures
def describe_pipeline_calibration(spec: str, options: dict[str, Any]) -> Any:
    """The :class:`~qdrift_stats.record.pipelines.CalibrationPlan` of a calibration (on a worker)."""
    from qdrift_stats.record.pipelines import calibration_plan

    fp_pipe, q_pipe = _worker_pipelines(spec)
    return calibration_plan(fp_pipe, q_pipe, **options)


@_returning_failures
def record_pipeline_seed(
    spec: str,
    call: dict[str, Any],
    images: int | None,
    seed: int,
    trajectories: bool,
    dtype: str,
    fingerprint: bool,
    existing: dict[str, Any] | None,
) -> tuple[Any, str | None]:
    """One paired pipeline run of ``seed`` where it is called (a worker), and the store fingerprint if asked."""
    from qdrift_stats.record.pipelines import fingerprint_attr, record_pipeline_run

    fp_pipe, q_pipe = _worker_pipelines(spec)
    run = record_pipeline_run(fp_pipe, q_pipe, call, seed, images, trajectories, dtype)
    return run, (fingerprint_attr(run, fp_pipe, q_pipe, existing) if fingerprint else None)


def calibrate_pipeline_distributed(
    pipelines: Any,
    out: str | Path,
    *,
    seeds: Any,
    num_inference_steps: int,
    guidance_scale: float | None = None,
    prompts: Any = None,
    class_labels: Any = None,
    pipeline_kwargs: dict[str, Any] | None = None,
    pair_name: str | None = None,
    model_id: str | None = None,
    recipe: str | None = None,
    trajectories: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    client: Any = None,
    scheduler_address: str | None = None,
    n_workers: int = 2,
    processes: bool = True,
    max_in_flight: int | None = None,
    on_commit: Callable[[int, int], None] | None = None,
) -> Path:
    """:func:`~qdrift_stats.record.pipelines.calibrate_pipeline` with the runs computed on a dask cluster.

    ``pipelines`` is a ``MODULE:FACTORY`` whose ``FACTORY()`` returns ``(fp_pipe, q_pipe)`` (or such a
    factory itself, picklable: ``qdrift calibrate --workers`` passes a partial of
    :func:`qdrift_stats.record.folder.folder_pipelines`): each worker
    builds (loads) the pipelines once and records the seeds it is given; the client appends the
    runs in seed order with the same store writer as the serial calibration
    (:class:`~qdrift_stats.record.pipelines.PipelineStoreWriter`, under the store lock), so the store
    is bit-identical to a serial one when the workers compute what the client would. The other
    arguments are :func:`calibrate_pipeline`'s, and ``client`` / ``scheduler_address`` / ``n_workers``
    / ``processes`` / ``max_in_flight`` / ``on_commit`` are :func:`record_distributed`'s. See
    ``docs/howto/dask.md`` for GPU clusters (one worker per GPU).
    """
    from qdrift_stats.record.pipelines import PipelineStoreWriter

    options = {
        "seeds": [int(s) for s in seeds],
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "prompts": prompts,
        "class_labels": class_labels,
        "pipeline_kwargs": pipeline_kwargs,
        "pair_name": pair_name,
        "model_id": model_id,
        "recipe": recipe,
        "trajectories": trajectories,
        "dtype": dtype,
    }
    client, close = _connect(client, scheduler_address, n_workers, processes)
    futures: dict[Any, int] = {}
    try:
        plan = client.submit(describe_pipeline_calibration, pipelines, options, pure=False).result()
        if isinstance(plan, RunFailure):
            raise QDriftError(plan.message)
        with PipelineStoreWriter(out, plan, overwrite) as writer:
            todo = list(writer.todo)
            if not todo:
                return Path(out)
            first = todo[0]
            window = max_in_flight or 2 * max(1, sum(client.nthreads().values()))

            def submit(s: int):
                return client.submit(
                    record_pipeline_seed,
                    pipelines,
                    plan.call,
                    plan.images,
                    s,
                    trajectories,
                    dtype,
                    s == first,
                    writer.existing if s == first else None,
                    pure=False,
                )

            def commit(k: int, s: int, result: tuple[Any, str | None]) -> None:
                run, fingerprint_json = result
                done = writer.commit(s, run, fingerprint_json)
                if on_commit is not None:
                    on_commit(s, done)

            _commit_in_seed_order(todo, window, submit, commit, futures)
    finally:
        for future in futures:
            future.cancel()
        close()
    return Path(out)


__all__ = [
    "RunFailure",
    "calibrate_pipeline_distributed",
    "describe_recording",
    "record_distributed",
    "record_one_run",
]
