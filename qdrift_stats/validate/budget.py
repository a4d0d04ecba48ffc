"""The error budget: where the quantized sampler's final deviation from FP comes from, and what can reach it.

A calibration store holds, per run, step and trajectory (sample, element), the lock-step
perturbation ``Delta_i`` (here its first-order form ``gain_i * e_i``, ``e = m_q - m_fp``). To first
order the free-running quantized sampler ends at

    x_N^q - x_N^fp ~= sum_i P_i Delta_i,        P_i = A_{i+1} A_{i+2} ... A_{N-1},

where ``A_j`` is the scheduler's coefficient on the state with the model output held fixed
(``x_{j+1} = A_j x_j + gain_j m_j``; measured by stepping the first-order twin of the scheduler
from the state 1 with the output 0). The model's own response to a perturbed state is left out:
this is the propagation "through the scheduler's coefficients". The budget splits the final mean
square deviation ``E |sum_i P_i Delta_i|^2 / dim`` (per trajectory, *not* demeaned along it) into

- ``bias``: the per-step mean of ``Delta_i`` per channel (over a run's samples), propagated and
  summed: ``|sum_i P_i mean_c Delta_i|^2``. A mean shift: a bias term removes it, a variance term
  cannot;
- ``explained``: the part of the centred error that the model output explains, PTQD's
  ``k_i m_fp + mu_i`` (``explained_ptqd``) and, separately, the published code's per-channel
  conditional mean ``E[e | m_q]`` (``explained_conditional``), propagated and summed;
- ``independent``: ``sum_i P_i^2 v_i`` of what is left (``r_i``, centred): what the per-step
  Q-Drift statistic models;
- ``persistence``: ``E |sum_i P_i r_i|^2 - sum_i P_i^2 v_i``: the cross-step covariance of the
  left-over perturbations along each trajectory, propagated. Positive when the error repeats from
  step to step (it is what the per-step statistic misses and :mod:`qdrift_stats.estimators.persistent`
  models);
- ``interaction``: the total minus the four parts above (cross terms between the parts).

``total`` is the predicted final mean square deviation; with a store recorded with trajectories
(``traj_q``, ``traj_fp``) the measured one is reported beside it (``measured``): where the two
differ, the model's response to the perturbed state (not in the budget) matters.

What a sampler-side correction can reach: the bias term (``bias``, ``explained``) by mapping the
model output, the variance terms (``independent`` + ``persistence``) by the Q-Drift correction, at
best. The final deviation is per trajectory: even a perfect distributional correction leaves it
(it moves the *distribution* back, not each sample), so the budget says which parts exist and how
large they are, not what the FD will be.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from qdrift_stats.estimators.base import as_dataset, check_finite_store, grid_of
from qdrift_stats.estimators.bias import channel_index, conditional_gaussian, residual
from qdrift_stats.estimators.decomposed import output_regression, state_gains, subsample_index
from qdrift_stats.record.store import storage_errors_as_qdrift
from qdrift_stats.schedulers.base import propagators, state_coefficients

PARTS: tuple[str, ...] = ("bias", "explained_ptqd", "independent", "persistence", "interaction")
__all__ = ["PARTS", "error_budget", "is_persistent", "propagators", "state_coefficients"]
#: Accumulated over independent variance above which the error counts as persistent.
PERSISTENT_RATIO = 1.5


def _centre_by_channel(values: np.ndarray, channel: np.ndarray, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(centred, mean)`` of ``(run, n)`` values: the mean per channel over a run's samples removed."""
    out = values.copy()
    mean = np.zeros_like(values)
    for c in np.unique(channel):
        sel = channel == c
        m = values[:, sel].mean(axis=1, keepdims=True)
        out[:, sel] -= m
        mean[:, sel] = m
    return out, mean


@storage_errors_as_qdrift
def error_budget(store: xr.Dataset | str | Path, max_points: int = 200_000, seed: int = 0) -> xr.Dataset:
    """The error budget of a calibration store (module docstring), as an xarray Dataset.

    Per step (``step``): ``A``, ``P``, ``v`` (residual per-step variance), ``bias_step``,
    ``explained_step``, ``cross_step`` (this step's propagated covariance with the earlier left-over
    perturbations, times 2), ``lag1_raw`` (lag-1 correlation of the left-over perturbation along
    trajectories, *not* demeaned per series). Scalars: ``total``, the parts in :data:`PARTS`,
    ``explained_conditional``, ``persistence_ratio`` (``(independent + persistence) / independent``:
    how much more the left-over perturbations accumulate than independent ones would),
    ``measured`` (NaN without trajectories), and the same parts as fractions of ``total``
    (``fraction_*``).
    """
    ds = as_dataset(store)
    grid = grid_of(ds)
    steps, runs = ds.sizes["step"], ds.sizes["run"]
    shape = tuple(ds["delta_out"].isel(step=0).shape)
    channel = channel_index(shape)
    samples = shape[1]
    notes = []
    if "gain" in ds.coords:
        gain = np.asarray(ds["gain"].values, dtype=np.float64)
    else:  # older stores: the gain read off the store (delta_x = gain * delta_out for one-step solvers)
        gain = np.array(
            [
                state_gains(
                    np.asarray(ds["delta_x"].isel(step=i).values, dtype=np.float64),
                    np.asarray(ds["delta_out"].isel(step=i).values, dtype=np.float64),
                    None,
                )[0]
                for i in range(steps)
            ]
        )
        notes.append("no 'gain' coordinate: gains fitted from delta_x on delta_out")
    prediction = ds.attrs.get("prediction_type")
    if prediction:
        A = state_coefficients(str(prediction), grid["a"], grid["b"], grid["a_next"], grid["b_next"])
    else:
        A = np.ones(steps)
        notes.append("no prediction type in the store: perturbations propagated unchanged (A = 1)")
    P = propagators(A)
    index = subsample_index(ds, max_points, seed)
    n = channel.size
    total_sum = np.zeros((runs, n))
    bias_sum = np.zeros((runs, n))
    expl_sum = np.zeros((runs, n))
    cond_sum = np.zeros((runs, n))
    res_sum = np.zeros((runs, n))
    per_step = {name: np.zeros(steps) for name in ("v", "bias_step", "explained_step", "cross_step", "lag1_raw")}
    previous = None
    for i in range(steps):
        e = np.asarray(ds["delta_out"].isel(step=i).values, dtype=np.float64).reshape(runs, -1)
        m_fp = np.asarray(ds["out_fp"].isel(step=i).values, dtype=np.float64).reshape(runs, -1)
        check_finite_store(np.stack([e, m_fp]), "delta_out or out_fp")
        delta = gain[i] * e
        centred, mean = _centre_by_channel(delta, channel, samples)
        ce, _ = _centre_by_channel(e, channel, samples)
        cm, _ = _centre_by_channel(m_fp, channel, samples)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sub = (lambda a: a) if index is None else (lambda a: a[:, index])
            k, mu, _, _, r2 = output_regression(sub(ce), sub(cm))
        if not np.isfinite(r2):
            k = 0.0
        left = gain[i] * residual(ce, cm, k, 0.0) * (1.0 + k)  # the centred error minus k m_fp
        explained = centred - left
        g = conditional_gaussian((m_fp + e).ravel(), e.ravel(), np.tile(channel, runs))
        beta = g.beta[channel][None]
        cond_expl = gain[i] * beta * (m_fp + e - g.mu_q[channel][None])
        total_sum += P[i] * delta
        bias_sum += P[i] * mean
        expl_sum += P[i] * explained
        cond_sum += P[i] * cond_expl
        per_step["v"][i] = float(np.mean(left**2))
        per_step["bias_step"][i] = float(np.mean(mean**2))
        per_step["explained_step"][i] = float(np.mean(explained**2))
        per_step["cross_step"][i] = float(2.0 * np.mean(res_sum * P[i] * left))
        if previous is not None:
            denom = np.sqrt(np.mean(previous**2) * np.mean(left**2))
            per_step["lag1_raw"][i] = float(np.mean(previous * left) / denom) if denom > 0 else np.nan
        else:
            per_step["lag1_raw"][i] = np.nan
        res_sum += P[i] * left
        previous = left
    total = float(np.mean(total_sum**2))
    bias = float(np.mean(bias_sum**2))
    explained_ptqd = float(np.mean(expl_sum**2))
    explained_conditional = float(np.mean(cond_sum**2))
    independent = float(np.sum(P**2 * per_step["v"]))
    accumulated = float(np.mean(res_sum**2))
    persistence = accumulated - independent
    interaction = total - (bias + explained_ptqd + independent + persistence)
    measured = float("nan")
    if "traj_q" in ds and "traj_fp" in ds:
        last = steps - 1
        d = np.asarray(ds["traj_q"].isel(step=last).values, dtype=np.float64) - np.asarray(
            ds["traj_fp"].isel(step=last).values, dtype=np.float64
        )
        measured = float(np.mean(d**2))
    scalars = {
        "total": total,
        "bias": bias,
        "explained_ptqd": explained_ptqd,
        "explained_conditional": explained_conditional,
        "independent": independent,
        "persistence": persistence,
        "interaction": interaction,
        "measured": measured,
        "persistence_ratio": accumulated / independent if independent > 0 else float("nan"),
    }
    for name in PARTS + ("explained_conditional",):
        scalars[f"fraction_{name}"] = scalars[name] / total if total > 0 else float("nan")
    data = {name: ("step", values) for name, values in per_step.items()}
    data.update({"A": ("step", A), "P": ("step", P)})
    data.update({name: ((), value) for name, value in scalars.items()})
    coords = {"step": np.arange(steps), "timestep": ("step", grid["timestep"]), "b_next": ("step", grid["b_next"])}
    attrs = {
        "pair": str(ds.attrs.get("pair")),
        "scheduler": str(ds.attrs.get("scheduler")),
        "steps": int(steps),
        "runs": int(runs),
        "batch_size": int(samples),
        "notes": json.dumps(notes),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def is_persistent(budget: xr.Dataset) -> bool:
    """Whether the left-over error accumulates clearly more than independent noise would."""
    ratio = float(budget["persistence_ratio"].values)
    return bool(np.isfinite(ratio) and ratio > PERSISTENT_RATIO)


def budget_report(budget: xr.Dataset) -> str:
    """The budget in words and numbers (fractions of the predicted final mean square deviation)."""
    g = lambda name: float(budget[name].values)  # noqa: E731
    total = g("total")
    lines = [
        f"Error budget (first order, propagated through the scheduler's coefficients): predicted final mean square "
        f"deviation from FP {total:.4g} per element"
        + (
            f" (measured on the recorded free-running trajectories: {g('measured'):.4g})"
            if np.isfinite(g("measured"))
            else ""
        ),
        f"  per-step mean bias (per channel)          {g('bias'):>11.4g}  "
        f"{g('fraction_bias'):>7.1%}   reached by a bias term",
        f"  explained by the output (PTQD k m_fp)     {g('explained_ptqd'):>11.4g}  "
        f"{g('fraction_explained_ptqd'):>7.1%}   "
        "reached by PTQD's output map",
        f"    (published conditional mean E[e|m_q]    {g('explained_conditional'):>11.4g}  "
        f"{g('fraction_explained_conditional'):>7.1%})",
        f"  independent per-step variance             {g('independent'):>11.4g}  {g('fraction_independent'):>7.1%}   "
        "what the per-step Q-Drift statistic models",
        f"  persistence (cross-step covariance)       {g('persistence'):>11.4g}  {g('fraction_persistence'):>7.1%}   "
        "missed by the per-step statistic; the 'persistent' estimator models it",
        f"  interaction between the parts             {g('interaction'):>11.4g}  {g('fraction_interaction'):>7.1%}",
        f"  accumulated / independent variance: {g('persistence_ratio'):.2f}"
        + (" -> persistent error" if is_persistent(budget) else ""),
    ]
    return "\n".join(lines)


def budget_to_json(budget: xr.Dataset) -> dict[str, Any]:
    """Scalars and per-step arrays of :func:`error_budget` as a JSON-able dict."""

    def clean(x):
        x = float(x)
        return x if np.isfinite(x) else None

    return {
        "store": dict(budget.attrs),
        "parts": {name: clean(var.values) for name, var in budget.data_vars.items() if var.ndim == 0},
        "per_step": {name: [clean(x) for x in var.values] for name, var in budget.data_vars.items() if var.ndim == 1},
        "persistent": is_persistent(budget),
    }
