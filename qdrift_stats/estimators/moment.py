"""The moment-matching estimator: choose ``v_i`` so the corrected Q sampler keeps the FP second moments.

The other estimators measure the per-step perturbation and trust the derivation to turn it into a
correction. This one asks the end-to-end question instead: which ``v_i`` makes the *free-running*,
corrected Q trajectory have, after every step, the same second moment as the FP trajectory from
the same seeds? It needs the model pair: both samplers are re-run (the store supplies the seeds,
batch size, scheduler and step count).

Algorithm (per run; one pass over the steps, two model calls per step). Start the FP and the Q
samplers from the run's seed. At step ``i`` both step to their ``x_{i+1}``; write the Q state as
``a_{i+1} x0_hat_i + r``. Both correction forms move it to ``a_{i+1} x0_hat_i + s r`` with a
scalar ``s`` (shrink: ``s = b / sqrt(b^2 + v)``; drift: ``s = 1 - v / (2 b^2)``; ``b = b_{i+1}``),
so the corrected state's mean square over the run's samples and elements is a quadratic in ``s``,

    M(s) = A + 2 s B + s^2 C,   A = mean (a x0_hat)^2,  B = mean (a x0_hat * r),  C = mean r^2.

Solve ``M(s) = T`` (``T``: the FP state's mean square after step ``i``) in closed form: the
larger root (the branch on which shrinking the residual lowers ``M``), clipped to
``[min_factor, 1 / min_factor]``. The solution is *signed*: ``s > 1`` (a negative per-run ``v_i``,
the residual expanded) where the run's Q state ended up with a smaller mean square than the FP
one. ``s = 1`` (``v_i = 0``) where ``|M(1) - T|`` is within float32 resolution or ``b_{i+1} = 0``.
Where no ``s`` in the interval reaches ``T`` (a bound, or ``T`` below the parabola's minimum,
then the closest ``s``) the step is flagged in the fit's ``capped``. Map ``s`` to ``v_i`` (shrink
``b^2 (1/s^2 - 1)``, drift ``2 b^2 (1 - s)``; both negative for ``s > 1``), correct the Q state
with the signed ``s`` and go on to step ``i + 1``. The estimate is the mean over runs of the
signed per-run ``v_i`` with a Student-t interval over runs; only the final estimate and interval
are floored at 0 (``per_run`` keeps the signed values).

Why signed: with one batch per run (e.g. 64 samples x 8 elements) the run's excess ``M(1) - T``
carries the sampling noise of its cross term ``2 mean(x * Delta)``; where the true excess is small
(the late steps) that noise is larger than the excess itself, and flooring every run at
``v_i = 0`` (``s <= 1``, the earlier version) biased the mean over runs upwards. The signed
solutions average that noise out. (On the testbed it was not the main reason why this estimator
missed ``v_i``: see the next paragraph.)

What it estimates (its estimand ``v*_i``, the population solution of the match as the batch
grows) is not the per-step perturbation variance ``v_i`` of :mod:`.empirical`: it is the
correction that keeps the trajectory's second moment on the FP one's, including what the per-step
derivation leaves out (error accumulated over earlier steps, correlation across steps, and the
part of the error that the Q model's ``x0_hat`` carries into the anchor ``a_{i+1} x0_hat_i``, which
the correction does not move: to remove the excess second moment it must then shrink the residual
further). On the testbed's sine pairs at 10 steps (``studies/coverage.py``) ``v*_i / v_i`` over
the correctable steps is 4.4, 2.1, 1.6, 1.4, 1.2, 1.1, 1.2, 2.5, 0 for VP Euler (the anchor
carries ``-b_i`` times the output error, and ``b_i`` is large early) and 0.98, 1.02, 1.03, 1.09,
1.3, 1.9, 11, 0, 0 for flow Euler (the anchor carries ``(1 - sigma_{i+1}) sigma_i`` times it, small
early); 0 where the match is out of reach and its signed solution negative. Its interval covers
``v*_i`` at 90-94% over all steps, ``v_i`` at 55-79%.

Late in sampling the residual ``r`` is small, so a small mismatch in the clean part asks for a
large ``s`` change: the bounds (``min_factor``, default 0.5: at most halving, or doubling, the
residual in one step) keep that from exploding. There, at the last two or three correctable
steps, half or more of the per-run solutions sit at a bound, the match may be out of reach even
for the population (``v*_i`` is then the bound's value), and the mean over runs is biased.
Export it with the form it was solved for (``params["form"]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from qdrift_stats.correct.coefficients import CORRECTION_FORMS
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.base import Estimator, FittedEstimator, as_dataset
from qdrift_stats.estimators.empirical import t_interval
from qdrift_stats.loop import advance_step, initial_noise, prepared_scheduler, run_sampler
from qdrift_stats.pair import check_pair, recorded_pair_hint
from qdrift_stats.record.store import storage_errors_as_qdrift
from qdrift_stats.schedulers.base import step_calls, step_grid, step_kwargs

_FLOAT_RESOLUTION = 1e-6  # relative: differences below it are float32 rounding, not excess
_CAP_TOLERANCE = 1e-4  # relative miss of the target above which a step counts as capped


def solve_shrink_factor(
    A: float, B: float, C: float, target: float, min_factor: float = 0.5, max_factor: float | None = None
) -> float:
    """The ``s`` in ``[min_factor, max_factor]`` with ``A + 2 s B + s^2 C = target`` (the larger root).

    ``max_factor`` defaults to ``1 / min_factor`` (``s > 1``: the residual is expanded; pass 1 for the
    one-sided match). 1 if ``M(1)`` equals ``target`` to a relative ``1e-6`` (float32 rounding) or
    ``C <= 0``; the clipped root, or where ``target`` is below the parabola's minimum the clipped
    minimiser ``-B / C``, if no ``s`` in the interval reaches ``target``.
    """
    if max_factor is None:
        max_factor = 1.0 / min_factor
    if C <= 0 or abs(A + 2 * B + C - target) <= target * _FLOAT_RESOLUTION:  # no excess above float32 resolution
        return 1.0
    disc = B * B - C * (A - target)
    root = (-B + np.sqrt(disc)) / C if disc >= 0 else -B / C
    return float(np.clip(root, min_factor, max_factor))


def variance_from_factor(s: float, b_next: float, form: str) -> float:
    """The ``v`` whose correction of ``form`` scales the residual by ``s`` at level ``b_next``.

    Signed: negative for ``s > 1`` (shrink ``b^2 (1/s^2 - 1)``, drift ``2 b^2 (1 - s)``); 0 where
    ``b_next <= 0`` (no correction).
    """
    if b_next <= 0 or s == 1.0:
        return 0.0
    if form == "shrink":
        return b_next**2 * (1.0 / s**2 - 1.0)
    return 2.0 * b_next**2 * (1.0 - s)


def matched_run(
    pair: Any, scheduler_name: str, steps: int, batch_size: int, seed: int, form: str, min_factor: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Per-step signed ``v`` of one run by the sequential moment match (module docstring).

    Returns ``(v, capped)``, each ``(steps,)``; ``capped`` marks the steps where no factor in
    ``[min_factor, 1 / min_factor]`` reaches the FP mean square.
    """
    sched_fp = prepared_scheduler(pair, scheduler_name, steps)
    sched_q = prepared_scheduler(pair, scheduler_name, steps)
    grid = step_grid(sched_q)
    x_fp, cond = initial_noise(pair, sched_fp, batch_size, seed)
    kw_q = step_kwargs(sched_q)
    plan = step_calls(sched_q)  # Heun: two calls per step, the effective output
    v, capped = np.zeros(steps), np.zeros(steps, dtype=bool)
    q_state = {"x": x_fp.clone()}

    def matched_q_step(state: dict[str, Any]) -> None:
        """The free-running, corrected Q sampler, advanced beside the FP sampler's step ``i``."""
        i, next_fp = state["i"], state["x_next"]
        x_q = q_state["x"]
        next_q, out_q, _, _ = advance_step(pair.q, sched_q, x_q, plan[i], cond, kw_q, i=i, grid=grid)
        b_next = float(grid.b_next[i])
        if b_next > 0:
            anchor = float(grid.a_next[i]) * grid.x0_from_output(i, x_q, out_q).double()
            r = next_q.double() - anchor
            target = float((next_fp.double() ** 2).mean())
            A, B, C = float((anchor**2).mean()), float((anchor * r).mean()), float((r**2).mean())
            s = solve_shrink_factor(A, B, C, target, min_factor)
            capped[i] = abs(A + 2 * s * B + s * s * C - target) > target * _CAP_TOLERANCE
            v[i] = variance_from_factor(s, b_next, form)
            next_q = (anchor + s * r).to(next_q.dtype)
        if not bool(torch.isfinite(next_q).all() and torch.isfinite(next_fp).all()):
            raise QDriftError(f"non-finite state while moment matching run seed {seed}, step {i}")
        q_state["x"] = next_q

    with torch.no_grad():
        run_sampler(pair.fp, sched_fp, x_fp, cond, callback=matched_q_step)
    return v, capped


@dataclass
class MomentFit(FittedEstimator):
    """A :class:`FittedEstimator` of the moment estimator.

    Attributes (beside the base ones):
        correction_form: the correction form the ``v_i`` were solved for (export with it).
        capped: ``(runs, steps)`` whether a run's solution at a step sat at a bound (module docstring).
    """

    correction_form: str = "shrink"
    capped: np.ndarray | None = None


class MomentEstimator(Estimator):
    """Per-step ``v_i`` that keeps the corrected Q trajectory's second moment equal to the FP one.

    Its estimand is the population solution of that match (module docstring), not the per-step
    perturbation variance of the other estimators. ``per_run`` holds the signed per-run solutions;
    the estimate is their mean, and it and its Student-t interval are floored at 0.

    Args:
        pair: the model pair; if None, the store's ``pair`` attribute is loaded (``MODULE:FACTORY``).
        form: the correction form the ``v_i`` are solved for (``"shrink"`` or ``"drift"``).
        min_factor: smallest residual scale one step may apply; the largest is ``1 / min_factor``
            (module docstring).
        confidence: nominal level of the t-interval over runs.
    """

    name = "moment"
    unrecorded_params = ("pair",)

    def __init__(self, pair: Any = None, form: str = "shrink", min_factor: float = 0.5, confidence: float = 0.95):
        if form not in CORRECTION_FORMS:
            raise QDriftError(f"unknown correction form {form!r}; choose drift or shrink")
        self.pair = pair
        if not 0 < min_factor <= 1:
            raise QDriftError(f"min_factor must be in (0, 1], got {min_factor}")
        self.form = form
        self.min_factor = min_factor
        self.confidence = confidence

    def _pair(self, ds: xr.Dataset) -> Any:
        if self.pair is not None:
            return check_pair(self.pair)
        # A pair is code: never imported from the store's 'pair' attribute (a data file).
        raise QDriftError(recorded_pair_hint(ds.attrs.get("pair"), "the moment estimator"))

    @storage_errors_as_qdrift
    def fit(self, store: xr.Dataset | str | Path) -> MomentFit:
        ds = as_dataset(store)
        pair = self._pair(ds)
        scheduler_name, steps, batch = str(ds.attrs["scheduler"]), int(ds.attrs["steps"]), int(ds.attrs["batch_size"])
        seeds = np.asarray(ds["seed"].values)
        per_run, capped = np.zeros((len(seeds), steps)), np.zeros((len(seeds), steps), dtype=bool)
        for r, seed in enumerate(seeds):
            per_run[r], capped[r] = matched_run(
                pair, scheduler_name, steps, batch, int(seed), self.form, self.min_factor
            )
        variance, low, high = t_interval(per_run, self.confidence)  # low already floored at 0
        variance, high = np.maximum(variance, 0.0), np.maximum(high, 0.0)
        return MomentFit.on_store(
            ds, self, variance, low, high, per_run, seeds=seeds, correction_form=self.form, capped=capped
        )
