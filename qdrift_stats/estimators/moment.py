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

Solve ``M(s) = T`` (``T``: the FP state's mean square after step ``i``) in closed form for the
largest root in ``[min_factor, 1]`` (the equation is quadratic, so no bisection is needed);
``s = 1`` (``v_i = 0``) where ``M(1) <= T`` already (the correction can only shrink) or
``b_{i+1} = 0``; ``s = min_factor`` where ``T`` is out of reach above it (the step is flagged in
``extra["capped"]``). Map ``s`` to ``v_i`` (shrink ``b^2 (1/s^2 - 1)``, drift ``2 b^2 (1 - s)``),
correct the Q state with it and go on to step ``i + 1``. The estimate is the mean over runs of the
per-run ``v_i``, with a Student-t interval over runs.

What it estimates is not the per-step perturbation variance of :mod:`.empirical`: it is the
correction that keeps the trajectory's second moment on the FP one's, including what the per-step
derivation leaves out (error accumulated over earlier steps, correlation across steps). Late in
sampling the residual ``r`` is small, so a small mismatch in the clean part asks for a large
``s`` change: the cap ``min_factor`` (default 0.5, at most halving the residual in one step)
keeps that from exploding. With one batch per run the per-run solutions are noisy and, floored
at 0, biased upwards where the true excess is near 0. Export it with the form it was solved for
(``params["form"]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..store import storage_errors_as_qdrift
from ..correction import CORRECTION_FORMS
from ..errors import QDriftError
from ..pair import check_pair, load_pair
from ..sampling import initial_noise, prepared_scheduler, scale_model_input
from ..schedulers import step_grid, step_kwargs
from .base import FittedEstimator, as_dataset
from .empirical import t_interval


_FLOAT_RESOLUTION = 1e-6  # relative: differences below it are float32 rounding, not excess


def solve_shrink_factor(A: float, B: float, C: float, target: float, min_factor: float = 0.5) -> float:
    """Largest ``s`` in ``[min_factor, 1]`` with ``A + 2 s B + s^2 C = target``.

    1 if ``M(1) <= target`` (to a relative ``1e-6``, float32 rounding); ``min_factor`` if no ``s`` in
    the interval reaches ``target``.
    """
    if A + 2 * B + C <= target * (1 + _FLOAT_RESOLUTION) or C <= 0:  # no excess above float32 resolution
        return 1.0
    disc = B * B - C * (A - target)
    if disc < 0:
        return float(min_factor)
    root = (-B + np.sqrt(disc)) / C
    return float(np.clip(root, min_factor, 1.0))


def variance_from_factor(s: float, b_next: float, form: str) -> float:
    """The ``v`` whose correction of ``form`` scales the residual by ``s`` at level ``b_next``."""
    if b_next <= 0 or s >= 1.0:
        return 0.0
    if form == "shrink":
        return b_next**2 * (1.0 / s**2 - 1.0)
    return 2.0 * b_next**2 * (1.0 - s)


def matched_run(pair: Any, scheduler_name: str, steps: int, batch_size: int, seed: int, form: str,
                min_factor: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-step ``v`` of one run by the sequential moment match (module docstring).

    Returns ``(v, capped)``, each ``(steps,)``; ``capped`` marks the steps that hit ``min_factor``.
    """
    sched_fp = prepared_scheduler(pair, scheduler_name, steps)
    sched_q = prepared_scheduler(pair, scheduler_name, steps)
    grid = step_grid(sched_q)
    x_fp, cond = initial_noise(pair, sched_fp, batch_size, seed)
    x_q = x_fp.clone()
    kw_fp, kw_q = step_kwargs(sched_fp), step_kwargs(sched_q)
    v, capped = np.zeros(steps), np.zeros(steps, dtype=bool)
    with torch.no_grad():
        for i, t in enumerate(sched_q.timesteps):
            out_fp = pair.fp(scale_model_input(sched_fp, x_fp, t), t, **cond)
            out_q = pair.q(scale_model_input(sched_q, x_q, t), t, **cond)
            next_fp = sched_fp.step(out_fp, t, x_fp, **kw_fp, return_dict=False)[0]
            next_q = sched_q.step(out_q, t, x_q, **kw_q, return_dict=False)[0]
            b_next = float(grid.b_next[i])
            if b_next > 0:
                anchor = float(grid.a_next[i]) * grid.x0_from_output(i, x_q, out_q).double()
                r = next_q.double() - anchor
                target = float((next_fp.double() ** 2).mean())
                s = solve_shrink_factor(float((anchor**2).mean()), float((anchor * r).mean()), float((r**2).mean()), target, min_factor)
                capped[i] = s <= min_factor
                v[i] = variance_from_factor(s, b_next, form)
                next_q = (anchor + s * r).to(next_q.dtype)
            if not bool(torch.isfinite(next_q).all() and torch.isfinite(next_fp).all()):
                raise QDriftError(f"non-finite state while moment matching run seed {seed}, step {i}")
            x_fp, x_q = next_fp, next_q
    return v, capped


class MomentEstimator:
    """Per-step ``v_i`` that keeps the corrected Q trajectory's second moment equal to the FP one.

    Args:
        pair: the model pair; if None, the store's ``pair`` attribute is loaded (``MODULE:FACTORY``).
        form: the correction form the ``v_i`` are solved for (``"shrink"`` or ``"drift"``).
        min_factor: smallest residual scale one step may apply (module docstring).
        confidence: nominal level of the t-interval over runs.
    """

    name = "moment"

    def __init__(self, pair: Any = None, form: str = "shrink", min_factor: float = 0.5, confidence: float = 0.95):
        if form not in CORRECTION_FORMS:
            raise QDriftError(f"unknown correction form {form!r}; choose drift or shrink")
        self.pair = pair
        if not 0 < min_factor <= 1:
            raise QDriftError(f"min_factor must be in (0, 1], got {min_factor}")
        self.form = form
        self.min_factor = min_factor
        self.confidence = confidence

    @property
    def params(self) -> dict:
        return {"form": self.form, "min_factor": self.min_factor, "confidence": self.confidence}

    def _pair(self, ds: xr.Dataset) -> Any:
        if self.pair is not None:
            return check_pair(self.pair)
        name = ds.attrs.get("pair")
        if not name or ":" not in str(name):
            raise QDriftError("the moment estimator re-samples the pair; the store names none, pass the pair")
        return load_pair(str(name))

    @storage_errors_as_qdrift
    def fit(self, store: xr.Dataset | str | Path) -> FittedEstimator:
        ds = as_dataset(store)
        pair = self._pair(ds)
        scheduler_name, steps, batch = str(ds.attrs["scheduler"]), int(ds.attrs["steps"]), int(ds.attrs["batch_size"])
        seeds = np.asarray(ds["seed"].values)
        per_run, capped = np.zeros((len(seeds), steps)), np.zeros((len(seeds), steps), dtype=bool)
        for r, seed in enumerate(seeds):
            per_run[r], capped[r] = matched_run(pair, scheduler_name, steps, batch, int(seed), self.form, self.min_factor)
        variance, low, high = t_interval(per_run, self.confidence)
        return FittedEstimator.on_store(
            ds, self, variance, low, high, per_run,
            seeds=seeds,
            extra={"correction_form": self.form, "capped": capped},
        )
