"""The persistence-aware statistic: per step, the increment of the accumulated excess variance.

The per-step statistic ``v_i = E Delta_i^2`` assumes that the perturbations of different steps are
independent. A quantization error that is a smooth function of a slowly moving input (a weight
error ``dW x``, a coarsely rounded activation) is not: it repeats along each trajectory, the
perturbations of neighbouring steps add coherently, and the excess variance the sampler
accumulates exceeds ``sum v_i``. A correction sized by ``v_i`` then removes only each step's own
share. (Derivation: ``docs/method.md``, "Persistent error".)

This estimator sizes the correction by the increment of the accumulated excess variance instead.
Along each recorded trajectory (run, sample, element; the lock-step recording keeps them on the FP
path) the perturbations of successive steps are summed after propagating each to the current
noise level through the scheduler's coefficients: a deviation that is part of the state's noise
component scales with ``b``, so in units of the current level ``b_{i+1}``

    U_i = sum_{j <= i} Delta_j / b_{j+1},      C_i = E U_i^2,
    w_i = b_{i+1}^2 (C_i - C_{i-1}) = v_i + 2 b_{i+1}^2 E[U_{i-1} Delta_i / b_{i+1}].

``w_i`` is ``v_i`` plus twice the covariance of this step's perturbation with everything the
earlier steps left in the state (in units of the current level): *not* demeaned per trajectory,
so an error that is constant along a trajectory counts fully. For independent perturbations the
cross term vanishes and ``w_i = v_i``; the sum telescopes, ``sum_i w_i / b_{i+1}^2``-weighted,
to the accumulated ``C`` at the last corrected level. ``C`` is made non-decreasing (isotonic
regression, :class:`sklearn.isotonic.IsotonicRegression`) before differencing, so that estimation
noise or anti-correlation never yields a negative increment.

``Delta_j`` is the first-order perturbation ``gain_j * r_j`` (``gain``: the store's first-order
coordinate, as the ``first-order`` statistic), where ``r_j`` is the output error left after an
optional bias term (:mod:`qdrift_stats.estimators.bias`): ``none``, ``ptqd`` (the per-step
regression ``k m_fp + mu``) or ``conditional`` (the published code's per-channel ``E[e | m_q]``).
The bias term is exported as the file's ``k``, ``mu`` and applied to the model output before the
scheduler steps; the statistic describes what is left.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.base import Estimator, FittedEstimator, as_dataset, check_finite_store, grid_of
from qdrift_stats.estimators.bias import (
    channel_index,
    check_bias,
    conditional_gaussian,
    conditional_output_map,
    residual,
)
from qdrift_stats.estimators.decomposed import output_regression, subsample_index
from qdrift_stats.estimators.empirical import t_interval
from qdrift_stats.record.store import storage_errors_as_qdrift

PROPAGATIONS: tuple[str, ...] = ("noise", "none")
SOURCES: tuple[str, ...] = ("lockstep", "free")


def _centred(values: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """``values`` (``(..., n)``) minus their mean within each label along the last axis."""
    if labels is None:
        return values
    out = values.copy()
    for label in np.unique(labels):
        sel = labels == label
        out[..., sel] -= values[..., sel].mean(axis=-1, keepdims=True)
    return out


def shrink_to_zero(estimate: np.ndarray, standard_error: np.ndarray) -> np.ndarray:
    """Positive-part James-Stein shrinkage of estimates towards 0: ``x * max(0, 1 - se^2 / x^2)``.

    An estimate within about one standard error of 0 is mostly noise and is pulled to 0; one many
    standard errors away is kept almost unchanged.
    """
    estimate = np.asarray(estimate, dtype=np.float64)
    se2 = np.asarray(standard_error, dtype=np.float64) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(estimate != 0, np.maximum(0.0, 1.0 - se2 / estimate**2), 0.0)
    return estimate * factor


def accumulated_cross_terms(
    delta: np.ndarray,
    b_next: np.ndarray,
    propagation: str = "noise",
    center: np.ndarray | None = None,
    units: np.ndarray | None = None,
    visibility: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-step second moments, cross terms with the accumulated perturbation, and their standard errors.

    Args:
        delta: ``(steps, groups, n)`` perturbations (state units) of ``n`` trajectories per group
            (one group for a scalar statistic, one per channel for a per-channel one).
        b_next: ``(steps,)`` the level each step lands on.
        propagation: ``"noise"`` (a perturbation scales with ``b`` as the state's noise does; the
            default) or ``"none"`` (it stays as it is).
        center: optional ``(n,)`` labels (e.g. channels): perturbations are centred on their mean
            within each label, so that a shift every sample shares (a bias, for the bias term) is
            not counted as spread.
        units: optional ``(n,)`` labels of the independent units (samples) for the standard errors;
            default: every trajectory is its own unit.

    Returns:
        ``v`` (``E Delta_i^2``), ``cross`` (``b_{i+1}^2 E[U_{i-1} Delta_i / b_{i+1}]`` for ``"noise"``,
        ``E[U_{i-1} Delta_i]`` for ``"none"``, state units), ``cross_se`` and ``accumulated``
        (``E U_i^2``, units of ``b_{i+1}^2`` for ``"noise"``), each ``(steps, groups)``. Steps that
        land on ``b = 0`` have no cross term (they are not corrected).
    """
    if propagation not in PROPAGATIONS:
        raise QDriftError(f"unknown propagation {propagation!r}; choose noise or none")
    delta = _centred(np.asarray(delta, dtype=np.float64), center)
    steps, groups, n = delta.shape
    unit_ids = np.arange(n) if units is None else np.unique(np.asarray(units), return_inverse=True)[1]
    n_units = int(unit_ids.max()) + 1
    counts = np.bincount(unit_ids, minlength=n_units)
    out = {name: np.zeros((steps, groups)) for name in ("v", "cross", "cross_se", "accumulated")}
    out["v"] = np.mean(delta**2, axis=-1)
    acc = np.zeros((groups, n))
    previous = np.zeros(groups)
    for i in range(steps):
        b = float(b_next[i])
        if b <= 0:
            out["accumulated"][i] = previous
            continue
        u = delta[i] / b if propagation == "noise" else delta[i]
        scale = b * b if propagation == "noise" else 1.0
        root = 1.0 if visibility is None else float(np.sqrt(np.clip(visibility[i], 0.0, 1.0)))
        product = root * acc * u  # (groups, n)
        per_unit = np.stack([np.bincount(unit_ids, weights=row, minlength=n_units) / counts for row in product])
        out["cross"][i] = scale * product.mean(axis=-1)
        if n_units > 1:
            out["cross_se"][i] = scale * per_unit.std(axis=-1, ddof=1) / np.sqrt(n_units)
        acc = acc + root * u
        out["accumulated"][i] = previous = np.mean(acc**2, axis=-1)
    return out


def persistent_statistic(v: np.ndarray, cross: np.ndarray, cross_se: np.ndarray, b_next: np.ndarray) -> np.ndarray:
    """``w_i = max(0, v_i + 2 * shrink(cross_i))``; ``v_i`` on steps that land on ``b = 0``."""
    w = np.maximum(0.0, v + 2.0 * shrink_to_zero(cross, cross_se))
    final = np.asarray(b_next) <= 0
    w[final] = v[final]
    return w


@dataclass
class PersistentFit(FittedEstimator):
    """A :class:`FittedEstimator` whose ``variance`` is the persistence-aware ``w_i``, with its parts.

    Attributes (``(steps[, channels])``): ``independent_variance`` (the per-step ``v_i`` of the same
    perturbations), ``cross`` and ``cross_se`` (the cross term with the accumulated perturbation and
    its standard error, before shrinkage), ``accumulated`` (``E U_i^2``); ``persistence_ratio``:
    ``sum w / sum v`` over the corrected steps (1 for independent errors).
    """

    independent_variance: np.ndarray | None = None
    cross: np.ndarray | None = None
    cross_se: np.ndarray | None = None
    accumulated: np.ndarray | None = None
    persistence_ratio: float = float("nan")

    def summary(self, max_rows: int = 12) -> str:
        return (
            super().summary(max_rows)
            + f"\naccumulated / independent (sum w / sum v over corrected steps): {self.persistence_ratio:.2f}"
        )


class PersistentEstimator(Estimator):
    """Per-step increments of the accumulated excess variance (see the module docstring).

    Args:
        bias: ``"none"``, ``"ptqd"`` (per-step ``k m_fp + mu``) or ``"conditional"`` (the
            published code's per-channel conditional mean).
        per_channel: one value per channel (first sample dim) instead of one per step.
        propagation: ``"noise"`` (default) or ``"none"``, see :func:`accumulated_increments`.
        center: count the accumulated perturbation's variance across samples (per channel), not
            its second moment: a shift every sample shares is a bias, not spread (default).
        confidence: level of the t interval over runs of the per-run increments.
        min_r2, min_scale: when the ``ptqd`` bias is applied at a step (as the decomposed estimator).
        max_points: most values per step for the bias regression (a fixed random subsample).
        seed: seed of that subsample.
    """

    name = "persistent"

    def __init__(
        self,
        bias: str = "none",
        per_channel: bool = False,
        propagation: str = "noise",
        center: bool = True,
        source: str = "lockstep",
        visibility: bool = False,
        confidence: float = 0.95,
        min_r2: float = 0.01,
        min_scale: float = 0.5,
        max_points: int = 200_000,
        seed: int = 0,
    ):
        self.bias = check_bias(bias)
        if propagation not in PROPAGATIONS:
            raise QDriftError(f"unknown propagation {propagation!r}; choose noise or none")
        self.per_channel = per_channel
        self.propagation = propagation
        self.center = bool(center)
        if source not in SOURCES:
            raise QDriftError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
        self.source = source
        self.visibility = bool(visibility)
        self.confidence = confidence
        self.min_r2 = min_r2
        self.min_scale = min_scale
        self.max_points = max_points
        self.seed = seed

    def bias_at_step(self, delta_out: np.ndarray, out_fp: np.ndarray, channel: np.ndarray, index):
        """``(k, mu, k_full, mu_full)``: the bias term at one step, per channel (``(channels,)``) and
        broadcast to the flattened positions (``(n,)``) or scalars."""
        if self.bias == "none":
            return 0.0, 0.0, 0.0, 0.0
        sub = (lambda a: a) if index is None else (lambda a: a[:, index])
        if self.bias == "ptqd":
            k, mu, _, _, r2 = output_regression(sub(delta_out), sub(out_fp))
            if not (np.isfinite(r2) and r2 >= self.min_r2 and 1.0 + k >= self.min_scale):
                k, mu = 0.0, 0.0
            return k, mu, k, mu
        m_q = out_fp + delta_out
        pos = np.tile(channel, delta_out.shape[0])
        g = conditional_gaussian(m_q.ravel(), delta_out.ravel(), pos)
        k, mu = conditional_output_map(g, self.min_scale)
        return k, mu, k[channel][None], mu[channel][None]

    @storage_errors_as_qdrift
    def fit(self, store: xr.Dataset | str | Path) -> FittedEstimator:
        ds = as_dataset(store)
        if "gain" not in ds.coords:
            raise QDriftError("the store has no 'gain' coordinate (recorded by an older qdrift-stats); re-record it")
        grid = grid_of(ds)
        gain = np.asarray(ds["gain"].values, dtype=np.float64)
        steps, runs = ds.sizes["step"], ds.sizes["run"]
        shape = tuple(ds["delta_out"].isel(step=0).shape)  # (run, sample, *sample_shape)
        channel = channel_index(shape)
        channels = int(channel.max()) + 1
        per_sample = channel.size // shape[1]
        sample_of = np.repeat(np.arange(shape[1]), per_sample)
        index = subsample_index(ds, self.max_points, self.seed)
        # trajectories: (run, position); for a per-channel statistic grouped by channel
        if self.per_channel:
            order = np.argsort(channel, kind="stable")
            groups, n = channels, channel.size // channels
        else:
            order, groups, n = np.arange(channel.size), 1, channel.size
        labels = (channel[order] if not self.per_channel else np.zeros(channel.size, dtype=np.int64)).reshape(
            groups, n
        )[0]
        samples = sample_of[order].reshape(groups, n)[0]
        delta = np.zeros((steps, runs, groups, n))
        visible = np.ones(steps)
        eps_model = str(ds.attrs.get("prediction_type")) == "epsilon"
        ks, mus = [], []
        for i in range(steps):
            delta_out = np.asarray(ds["delta_out"].isel(step=i).values, dtype=np.float64).reshape(runs, -1)
            out_fp = np.asarray(ds["out_fp"].isel(step=i).values, dtype=np.float64).reshape(runs, -1)
            check_finite_store(np.stack([delta_out, out_fp]), "delta_out or out_fp")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                k, mu, k_full, mu_full = self.bias_at_step(delta_out, out_fp, channel, index)
            ks.append(k)
            mus.append(mu)
            r = residual(delta_out, out_fp, k_full, mu_full)
            if self.visibility and eps_model:
                centred = out_fp.reshape(runs, shape[1], -1)
                visible[i] = float(np.mean((centred - centred.mean(axis=1, keepdims=True)) ** 2))
            delta[i] = (gain[i] * r[:, order]).reshape(runs, groups, n)
        center = labels if self.center else None
        if self.source == "free":
            return self._fit_free(ds, grid, delta, center, runs, groups, n, order, ks, mus)
        # pooled over runs (each run's samples are independent units), and per run for the interval
        pooled = np.moveaxis(delta, 1, 2).reshape(steps, groups, runs * n)
        units = (np.arange(runs)[:, None] * shape[1] + samples[None]).ravel()
        if center is not None:  # centred within each run (its own batch mean)
            delta = np.stack([_centred(delta[:, r_], center) for r_ in range(runs)], axis=1)
            pooled = np.moveaxis(delta, 1, 2).reshape(steps, groups, runs * n)
        vis = visible if self.visibility else None
        terms = accumulated_cross_terms(pooled, grid["b_next"], self.propagation, None, units, vis)
        w = persistent_statistic(terms["v"], terms["cross"], terms["cross_se"], grid["b_next"])
        per_run = np.stack(
            [
                (lambda t: np.maximum(0.0, t["v"] + 2.0 * t["cross"]))(
                    accumulated_cross_terms(delta[:, r_], grid["b_next"], self.propagation, None, None, vis)
                )
                for r_ in range(runs)
            ]
        )
        squeeze = (lambda a: a[..., 0]) if not self.per_channel else (lambda a: a)
        _, low, high = t_interval(squeeze(per_run), self.confidence)
        fields = {}
        if self.bias == "ptqd":
            fields["k"], fields["mu"] = np.asarray(ks, dtype=np.float64), np.asarray(mus, dtype=np.float64)
        elif self.bias == "conditional":
            fields["k"], fields["mu"] = np.stack(ks), np.stack(mus)
        variance, independent = squeeze(w), squeeze(terms["v"])
        active = grid["b_next"] > 0
        total_w = float(np.sum(variance[active]))
        total_v = float(np.sum(independent[active]))
        return PersistentFit.on_store(
            ds,
            self,
            variance,
            low,
            high,
            squeeze(per_run),
            **fields,
            independent_variance=independent,
            cross=squeeze(terms["cross"]),
            cross_se=squeeze(terms["cross_se"]),
            accumulated=squeeze(terms["accumulated"]),
            persistence_ratio=total_w / total_v if total_v > 0 else float("nan"),
        )

    def _fit_free(self, ds, grid, delta, center, runs, groups, n, order, ks, mus) -> FittedEstimator:
        """The statistic from free-running trajectories: increments of ``E (D_i / b_{i+1})^2``, ``D = x^q - x^fp``."""
        if "traj_q" not in ds or "traj_fp" not in ds:
            raise QDriftError("source='free' needs a store recorded with trajectories (qdrift record --trajectories)")
        steps = ds.sizes["step"]
        b_next = grid["b_next"]
        acc = np.zeros((runs, steps, groups))
        for i in range(steps):
            d = np.asarray(ds["traj_q"].isel(step=i).values, dtype=np.float64) - np.asarray(
                ds["traj_fp"].isel(step=i).values, dtype=np.float64
            )
            d = d.reshape(runs, -1)[:, order].reshape(runs, groups, n)
            d = _centred(d, center)
            scale = b_next[i] ** 2 if (self.propagation == "noise" and b_next[i] > 0) else 1.0
            acc[:, i] = np.mean(d**2, axis=-1) / scale
        v_run = np.mean(delta**2, axis=-1).transpose(1, 0, 2)  # (run, step, groups)
        w_run = np.zeros_like(acc)
        previous = np.zeros((runs, groups))
        for i in range(steps):
            if b_next[i] <= 0:
                w_run[:, i] = v_run[:, i]
                continue
            scale = b_next[i] ** 2 if self.propagation == "noise" else 1.0
            w_run[:, i] = scale * (acc[:, i] - previous)
            previous = acc[:, i]
        w = np.maximum(0.0, w_run.mean(axis=0))
        squeeze = (lambda a: a[..., 0]) if not self.per_channel else (lambda a: a)
        _, low, high = t_interval(squeeze(np.maximum(w_run, 0.0)), self.confidence)
        fields = {}
        if self.bias == "ptqd":
            fields["k"], fields["mu"] = np.asarray(ks, dtype=np.float64), np.asarray(mus, dtype=np.float64)
        elif self.bias == "conditional":
            fields["k"], fields["mu"] = np.stack(ks), np.stack(mus)
        variance, independent = squeeze(w), squeeze(v_run.mean(axis=0))
        active = b_next > 0
        total_v = float(np.sum(independent[active]))
        return PersistentFit.on_store(
            ds,
            self,
            variance,
            low,
            high,
            squeeze(w_run),
            **fields,
            independent_variance=independent,
            accumulated=squeeze(acc.mean(axis=0)),
            persistence_ratio=float(np.sum(variance[active])) / total_v if total_v > 0 else float("nan"),
        )
