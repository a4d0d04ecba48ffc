"""Instrumented paired recording: FP and Q schedulers in lock-step along the FP trajectory.

For each run (one seed, one batch) two schedulers of the same kind advance together. At every
step both models are evaluated on the same state ``x_i``; the FP scheduler is fed the FP output,
the Q scheduler the Q output (so a multistep solver keeps a Q history), and the trajectory
continues along the FP branch:

    x_{i+1}^fp = S_fp(x_i, m_fp(x_i)),   x_{i+1}^q = S_q(x_i, m_q(x_i)),   x_{i+1} := x_{i+1}^fp
    Delta_i    = x_{i+1}^q - x_{i+1}^fp

Each finished run is appended to the calibration store (see :mod:`qdrift_stats.record.store`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdrift_stats.errors import QDriftError
from qdrift_stats.loop import (
    advance_step,
    initial_noise,
    prepared_scheduler,
    run_sampler,
    step_generator,
    stochastic_step_kwargs,
)
from qdrift_stats.pair import check_pair
from qdrift_stats.record.store import STORAGE_DTYPES, StoreWriter, identity_attrs, step_coordinates
from qdrift_stats.schedulers.base import step_calls, step_grid


@dataclass(frozen=True)
class RecordingPlan:
    """What one ``record`` call asks for: the run seeds and their batch, on one step grid."""

    pair_name: str
    scheduler_name: str
    steps: int
    seeds: tuple[int, ...]
    batch_size: int
    trajectories: bool = False
    dtype: str = "float32"


def record_run(
    pair: Any, scheduler_name: str, steps: int, batch_size: int, seed: int, trajectories: bool = False
) -> tuple[dict[str, np.ndarray], Any]:
    """Record one paired run.

    Returns:
        ``(arrays, fp_scheduler)`` with arrays ``delta_x``, ``delta_out``, ``out_fp`` (and
        ``traj_fp``, ``traj_q`` if asked), each float32 ``(steps, batch, *sample_shape)``.

    Raises:
        QDriftError: if either model produces a non-finite value.
    """
    sched_fp = prepared_scheduler(pair, scheduler_name, steps)
    sched_q = prepared_scheduler(pair, scheduler_name, steps)
    kw_q = stochastic_step_kwargs(sched_q, step_generator(seed))  # Q draws the same step noise as FP
    x, cond = initial_noise(pair, sched_fp, batch_size, seed)
    x_start = x.clone()
    delta_x, delta_out, out_fp, traj_fp = [], [], [], []
    plan = step_calls(sched_q)
    grid = step_grid(sched_q) if len(plan) != len(sched_q.timesteps) else None

    def q_step(state: dict[str, Any]) -> None:
        """The lock-step Q scheduler: from the same state, with the Q output; the FP branch goes on.

        A two-call step (Heun) is the Q sampler's whole step from ``x_i``: its corrector call is
        evaluated at its own predicted state; ``m_q`` and ``m_fp`` are the steps' effective outputs."""
        i, t, x_i, m_fp, x_fp = state["i"], state["t"], state["x"], state["output"], state["x_next"]
        x_q, m_q, _, _ = advance_step(pair.q, sched_q, x_i, plan[i], cond, kw_q, i=i, grid=grid)
        for name, value in (("m_fp", m_fp), ("m_q", m_q), ("x_fp", x_fp), ("x_q", x_q)):
            if not bool(torch.isfinite(value).all()):
                raise QDriftError(
                    f"non-finite {name} at run seed {seed}, step {i} (timestep {float(t):g}); "
                    "nothing was written for this run"
                )
        delta_x.append(x_q - x_fp)
        delta_out.append(m_q - m_fp)
        out_fp.append(m_fp)
        traj_fp.append(x_fp)

    with torch.no_grad():
        run_sampler(pair.fp, sched_fp, x, cond, callback=q_step, generator=step_generator(seed))
        arrays = {
            "delta_x": _stack(delta_x),
            "delta_out": _stack(delta_out),
            "out_fp": _stack(out_fp),
        }
        if trajectories:
            arrays["traj_fp"] = _stack(traj_fp)
            sched_free = prepared_scheduler(pair, scheduler_name, steps)
            traj_q: list[torch.Tensor] = []
            run_sampler(
                pair.q,
                sched_free,
                x_start,
                cond,
                callback=lambda s: traj_q.append(s["x_next"]),
                generator=step_generator(seed),
            )
            arrays["traj_q"] = _stack(traj_q)
    return arrays, sched_fp


def _stack(tensors: list[torch.Tensor]) -> np.ndarray:
    return torch.stack(tensors).detach().float().cpu().numpy()


def recording_attrs(pair: Any, plan: RecordingPlan, scheduler) -> dict[str, Any]:
    """The attributes a store of this recording carries (:func:`qdrift_stats.record.store.identity_attrs`)."""
    return identity_attrs(
        plan.pair_name,
        scheduler,
        plan.steps,
        dtype=plan.dtype,
        trajectories=plan.trajectories,
        batch_size=plan.batch_size,
        sample_shape=tuple(pair.sample_shape),
    )


def check_recording_args(runs: int, batch_size: int, dtype: str) -> None:
    """One-line errors for the arguments every recording takes."""
    if runs < 1 or batch_size < 1:
        raise QDriftError("--runs and --batch must be positive")
    if dtype not in STORAGE_DTYPES:
        raise QDriftError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}")


def record(
    pair: Any,
    out: str | Path,
    *,
    pair_name: str,
    scheduler_name: str,
    steps: int,
    runs: int,
    batch_size: int,
    seed: int,
    trajectories: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: Callable[[Iterable], Iterator] | None = None,
) -> Path:
    """Record ``runs`` paired runs (seeds ``seed .. seed + runs - 1``) into the store ``out``.

    If ``out`` exists and was recorded with the same pair, scheduler, steps, batch and options,
    only the seeds it lacks are recorded and appended (an interrupted recording resumes this way;
    a partly written run is discarded first). A store of another configuration is refused unless
    ``overwrite`` is set. Returns the store path.
    """
    check_pair(pair, pair_name)
    check_recording_args(runs, batch_size, dtype)
    out = Path(out)
    plan = RecordingPlan(
        pair_name, scheduler_name, steps, tuple(range(seed, seed + runs)), batch_size, trajectories, dtype
    )
    scheduler = prepared_scheduler(pair, scheduler_name, steps)
    with StoreWriter(
        out, recording_attrs(pair, plan, scheduler), step_coordinates(scheduler), overwrite=overwrite
    ) as writer:
        todo = writer.todo(plan.seeds)
        for run_seed in progress(todo) if progress else todo:
            arrays, _ = record_run(pair, scheduler_name, steps, batch_size, run_seed, trajectories)
            writer.append(run_seed, arrays)
    return out
