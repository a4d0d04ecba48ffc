"""The decomposed estimator: PTQD's split of the output error into a signal-correlated part and a residual.

Per step ``i``, pooled over runs, samples and sample elements (a random subsample of at most
``max_points`` values when a step holds more), an ordinary least-squares regression (statsmodels
``OLS``) of the output error on the FP output,

    delta_out = m_q - m_fp = k_i * m_fp + mu_i + r,

gives ``k_i`` (a scale error), ``mu_i`` (a bias, output units) and the residual ``r``. Their
confidence intervals are cluster-robust with runs as clusters (CR1 sandwich) referred to Student-t
with ``runs - 1`` degrees of freedom (plain OLS intervals with one run),
and ``R^2_i`` says how much of the output error the signal explains (used by
:mod:`qdrift_stats.validate.diagnostics`).

A step is decomposed only where the signal explains something (``R^2_i >= min_r2``, default 0.01)
and the scale error leaves the output usable (``1 + k_i >= 0.5``); elsewhere ``k_i = mu_i = 0``
and the step is corrected as plain noise. Without this, a step where the FP output barely varies
(the last Euler step) gets a large, meaningless ``k`` from noise, and a step whose Q output is
constant (rounding to 0) would divide by ``1 + k = 0``. Such steps are listed in the fit's ``notes``.

The sampler first maps the Q output to ``(m_q - mu_i) / (1 + k_i)`` (:class:`qdrift_stats.correct.corrector.Corrector`),
which equals ``m_fp + r / (1 + k_i)``; Q-Drift then corrects what is left. So the variance
statistic this estimator exports is that of the *residual* perturbation in state units.

Output units to state units. The store holds both ``delta_x`` (state) and ``delta_out`` (output).
For a one-step solver (Euler, DDIM, flow Euler) ``delta_x = c_i * delta_out`` exactly, with a
per-step gain ``c_i`` that is read off the store by a least-squares fit of ``delta_x`` on
``delta_out`` through the origin. For a multistep solver (DPM-Solver++ 2M, VP or flow) the
lock-step recording feeds the Q scheduler its own Q history, so ``delta_x`` is exactly linear in
the current *and the previous* step's output error, ``delta_x_i = c_i delta_out_i + d_i delta_out_{i-1}``
(same run, sample and element); both gains are fitted jointly (``d_i`` is 0 on first-order steps,
which the fit finds by itself). The residual perturbation of step ``i`` is then

    e_i = c_i * r_i / (1 + k_i) + d_i * r_{i-1} / (1 + k_{i-1}),

and ``v_i`` is its mean square: per run, then averaged over runs with a Student-t interval over
runs, as for :class:`~qdrift_stats.estimators.empirical.EmpiricalEstimator`. That is the
``statistic="lockstep"`` variant (the method's literal definition). The default,
``statistic="first-order"`` (as for ``qdrift fit``), is ``c_i^2 E (r_i / (1 + k_i))^2`` with the
solver's first-order gain (:func:`qdrift_stats.schedulers.base.first_order_gain`): what a fresh
residual injects at step ``i``, each error counted once. The two agree for one-step solvers (the
fitted gain equals the first-order one there; both are reported in the fit's ``gain`` and ``gain_previous``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import statsmodels.api as sm
import xarray as xr

from qdrift_stats.estimators.base import (
    Estimator,
    FittedEstimator,
    as_dataset,
    check_finite_store,
    check_statistic,
)
from qdrift_stats.estimators.empirical import t_interval
from qdrift_stats.record.store import storage_errors_as_qdrift, store_grid
from qdrift_stats.schedulers.base import gain_on, is_multistep


def pooled_step_values(
    ds: xr.Dataset, variables: tuple[str, ...], step: int, index: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Values of store variables at one step, flattened to ``(run, n)`` (float64).

    ``index`` (into the flattened ``sample x elements`` axis) selects a subsample; the same
    positions are used for every variable, so values stay paired.
    """
    out = {}
    for name in variables:
        values = np.asarray(ds[name].isel(step=step).values, dtype=np.float64)
        values = values.reshape(values.shape[0], -1)
        out[name] = values if index is None else values[:, index]
    return out


def subsample_index(ds: xr.Dataset, max_points: int, seed: int) -> np.ndarray | None:
    """Positions (per run) to keep so that one step pools at most ``max_points`` values; None keeps all."""
    runs = ds.sizes["run"]
    per_run = int(np.prod([n for d, n in ds["delta_x"].sizes.items() if d not in ("run", "step")]))
    if runs * per_run <= max_points:
        return None
    keep = max(1, max_points // runs)
    return np.sort(np.random.default_rng(seed).choice(per_run, size=keep, replace=False))


def output_regression(delta_out: np.ndarray, out_fp: np.ndarray, confidence: float = 0.95):
    """OLS of ``delta_out`` on ``out_fp`` with an intercept; ``(run, n)`` arrays pooled over runs.

    Returns ``(k, mu, k_ci, mu_ci, r2)``. Degenerate steps (no output error, or a constant FP
    output) give ``k = 0`` and ``mu`` the mean error, with NaN intervals and ``R^2``.
    """
    y, x = delta_out.ravel(), out_fp.ravel()
    nan2 = np.array([np.nan, np.nan])
    if not np.any(y != y[0]) or not np.any(x != x[0]):
        return 0.0, float(y.mean()), nan2, nan2, float("nan")
    groups = np.repeat(np.arange(delta_out.shape[0]), delta_out.shape[1])
    model = sm.OLS(y, sm.add_constant(x, has_constant="add"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if delta_out.shape[0] >= 2:
            # t with runs - 1 df (statsmodels' df for a cluster covariance with use_t): with few runs the
            # sandwich is itself noisy and the normal quantile is too narrow (tests/test_pinned.py)
            result = model.fit(cov_type="cluster", cov_kwds={"groups": groups}, use_t=True)
        else:
            result = model.fit()
        ci = np.asarray(result.conf_int(alpha=1 - confidence))
    mu, k = (float(p) for p in result.params)
    return k, mu, ci[1], ci[0], float(result.rsquared)


def state_gains(delta_x: np.ndarray, delta_out: np.ndarray, previous_out: np.ndarray | None) -> tuple[float, float]:
    """Least-squares gains ``(c, d)`` of ``delta_x = c delta_out + d previous_out`` (no intercept).

    ``previous_out`` is the previous step's output error at the same positions (multistep
    solvers), or None (one-step solvers, then ``d = 0``). Exact when the relation is linear.
    """
    y = delta_x.ravel()
    cols = [delta_out.ravel()] + ([previous_out.ravel()] if previous_out is not None else [])
    design = np.stack(cols, axis=1)
    if not np.any(design):
        return 0.0, 0.0
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(coef[0]), float(coef[1]) if len(coef) > 1 else 0.0


@dataclass
class DecomposedFit(FittedEstimator):
    """A :class:`FittedEstimator` whose ``variance`` is that of the residual after the output correction.

    Attributes (beside the base ones; ``(steps,)`` unless said):
        k_ci, mu_ci: ``(steps, 2)`` confidence intervals of the fitted ``k`` and ``mu``.
        r2: ``R^2`` of the output regression per step.
        fitted_k: ``k`` as fitted (``k`` itself is 0 where the decomposition is not applied).
        applied: whether the step's ``k, mu`` are applied (``R^2`` and ``1 + k`` large enough).
        gain, gain_previous: the state gains ``c_i`` and ``d_i`` (module docstring).
        multistep: whether the store's scheduler is multistep.
        notes: readable notes on steps left undecomposed.
    """

    k_ci: np.ndarray | None = None
    mu_ci: np.ndarray | None = None
    r2: np.ndarray | None = None
    fitted_k: np.ndarray | None = None
    applied: np.ndarray | None = None
    gain: np.ndarray | None = None
    gain_previous: np.ndarray | None = None
    multistep: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self, max_rows: int = 12) -> str:
        """The base table, then per step ``k``, ``mu``, ``R^2`` and the state gain ``c``."""
        level = int(round(self.confidence * 100))
        lines = [
            super().summary(max_rows),
            f"{'step':>5} {'k':>9} {f'k {level}% CI':>21} {'mu':>10} {'R^2':>6} {'gain c':>10} {'gain d':>10}",
        ]
        rows = np.arange(self.num_steps)
        if self.num_steps > max_rows:
            rows = np.unique(np.linspace(0, self.num_steps - 1, max_rows).round().astype(int))
        k_ci, r2, c, d = self.k_ci, self.r2, self.gain, self.gain_previous
        fitted, applied = self.fitted_k, self.applied
        for i in rows:
            mark = "" if applied[i] else f"  (fitted k {fitted[i]:.4f} not applied)"
            lines.append(
                f"{i:>5} {self.k[i]:>9.4f} [{k_ci[i, 0]:>8.4f},{k_ci[i, 1]:>8.4f}]  "
                f"{self.mu[i]:>10.3e} {r2[i]:>6.3f} {c[i]:>10.3e} {d[i]:>10.3e}{mark}"
            )
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


class DecomposedEstimator(Estimator):
    """Per-step ``delta_out = k m_fp + mu + r`` regression; the statistic is the residual's, in state units.

    Args:
        confidence: nominal level of the intervals (``k``, ``mu`` and ``v``).
        max_points: most values pooled per step (a fixed random subsample beyond that).
        seed: seed of that subsample.
        min_r2: smallest ``R^2`` for which a step's ``k, mu`` are applied.
        min_scale: smallest ``1 + k`` for which they are applied.
        statistic: ``"lockstep"`` (the residual of the recorded perturbation, module docstring) or
            ``"first-order"`` (``c_i^2 E r_i^2 / (1 + k_i)^2`` with the first-order gain, what a fresh
            residual injects; as the empirical ``first-order`` statistic). Equal for one-step solvers.
    """

    name = "decomposed"

    def __init__(
        self,
        confidence: float = 0.95,
        max_points: int = 200_000,
        seed: int = 0,
        min_r2: float = 0.01,
        min_scale: float = 0.5,
        statistic: str = "first-order",
    ):
        self.statistic = check_statistic(statistic)
        self.confidence = confidence
        self.max_points = max_points
        self.seed = seed
        self.min_r2 = min_r2
        self.min_scale = min_scale

    @storage_errors_as_qdrift
    def fit(self, store: xr.Dataset | str | Path) -> DecomposedFit:
        ds = as_dataset(store)
        steps = ds.sizes["step"]
        multistep = is_multistep(str(ds.attrs.get("scheduler")))
        first_gain = gain_on(store_grid(ds))
        index = subsample_index(ds, self.max_points, self.seed)
        k, mu, r2 = np.zeros(steps), np.zeros(steps), np.full(steps, np.nan)
        k_ci, mu_ci = np.full((steps, 2), np.nan), np.full((steps, 2), np.nan)
        gain, gain_prev = np.zeros(steps), np.zeros(steps)
        per_run = np.zeros((ds.sizes["run"], steps))
        fitted_k, applied = np.zeros(steps), np.zeros(steps, dtype=bool)
        notes: list[str] = []
        previous: dict[str, np.ndarray] | None = None
        for i in range(steps):
            values = pooled_step_values(ds, ("delta_x", "delta_out", "out_fp"), i, index)
            check_finite_store(np.stack(list(values.values())), "delta_x, delta_out or out_fp")
            fitted_k[i], mu[i], k_ci[i], mu_ci[i], r2[i] = output_regression(
                values["delta_out"], values["out_fp"], self.confidence
            )
            k[i] = fitted_k[i]
            applied[i] = bool(np.isfinite(r2[i]) and r2[i] >= self.min_r2 and 1.0 + k[i] >= self.min_scale)
            if not applied[i]:
                if np.isfinite(r2[i]) and r2[i] >= self.min_r2:
                    notes.append(
                        f"step {i}: 1 + k = {1 + k[i]:.3f} < {self.min_scale}; not decomposed (the "
                        "Q output barely follows the FP output)"
                    )
                k[i] = mu[i] = 0.0
            residual = (values["delta_out"] - k[i] * values["out_fp"] - mu[i]) / (1.0 + k[i])
            prev_out = previous["delta_out"] if (multistep and previous is not None) else None
            if self.statistic == "first-order":
                gain[i], prev_out = first_gain[i], None
            else:
                gain[i], gain_prev[i] = state_gains(values["delta_x"], values["delta_out"], prev_out)
            e = gain[i] * residual
            if prev_out is not None:
                e = e + gain_prev[i] * previous["residual"]
            per_run[:, i] = np.mean(e**2, axis=1)
            previous = {"delta_out": values["delta_out"], "residual": residual}
        variance, low, high = t_interval(per_run, self.confidence)
        return DecomposedFit.on_store(
            ds,
            self,
            variance,
            low,
            high,
            per_run,
            k=k,
            mu=mu,
            k_ci=k_ci,
            mu_ci=mu_ci,
            r2=r2,
            fitted_k=fitted_k,
            applied=applied,
            gain=gain,
            gain_previous=gain_prev,
            multistep=multistep,
            notes=notes,
        )
