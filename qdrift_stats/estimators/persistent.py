"""The persistence-aware statistic: per step, the increment of the accumulated excess variance.

The per-step statistic ``v_i = E Delta_i^2`` assumes that the perturbations of different steps are
independent. A quantization error that is a smooth function of a slowly moving input (a weight
error ``dW x``, a coarsely rounded activation) is not: it repeats along each trajectory, the
perturbations of neighbouring steps add coherently, and the excess variance the sampler
accumulates exceeds ``sum v_i``. A correction sized by ``v_i`` then removes only each step's own
share. (Derivation and measurements: ``docs/method.md``, "Persistent error".)

This estimator sizes the correction by the increment of the accumulated excess variance instead.
Along each trajectory (run, sample, element) the perturbations of successive steps are summed after
propagating each to the current noise level: a deviation that is part of the state's noise
component scales with ``b``, so in units of the current level ``b_{i+1}``

    U_i = sum_{j <= i} Delta_j / b_{j+1},
    w_i = b_{i+1}^2 (E U_i^2 - E U_{i-1}^2) = v_i + 2 b_{i+1}^2 E[U_{i-1} Delta_i / b_{i+1}].

``w_i`` is ``v_i`` plus twice the covariance of this step's perturbation with everything the earlier
steps left in the state, *not* demeaned per trajectory (an error constant along a trajectory
counts fully; a shift shared by all samples of a channel is removed, it is a bias). For
independent perturbations the cross term vanishes and ``w_i = v_i``. The cross term is shrunk
towards 0 by its standard error over samples (positive-part James-Stein), so estimation noise
does not masquerade as persistence, and ``w_i >= 0``.

Where the persistence is measured matters. The store's lock-step recording keeps both models on
the FP trajectory; at high noise that trajectory barely moves, so *any* deterministic error
repeats along it. The quantized sampler's own trajectory moves away from it, and an error that is
a rough function of the state (a high-frequency sine, a finely rounded activation) stops repeating.
So the persistence factor ``w_i / v_i`` is measured on the same seeds re-run in lock-step along the
sampler's own path (:func:`quantized_path_errors`), and applied to the store's per-step ``v_i``:
``w_i = v_i * (w_i / v_i)_path``. By default (``path="mapped"``) that path is the one the corrected
sampler follows before its pull: the quantized output put through the affine output map at every
step, the plain quantized path where no map applies. ``path="quantized"`` (the default before) always
advances with the uncorrected quantized output; where the map repairs most of a strong error, that path
runs far from the corrected sampler's and the pull over-shrinks (the testbed's strong weight error:
corrected within-mode variance 7-27% of FP's). ``path="fp"`` uses the store alone (no model calls).

By default (``cross="carried"``, with the model pair and the pull sized by the local spread), the cross term is
taken with the deviation the state *carries* where the step lands, not with the earlier perturbations alone
(:func:`carried_cross_terms`): it adds the first-order coupling of an error that is a
function of the state with the state's own deviation (a weight error ``dW x`` dilates or contracts each mode),
carries deviations as the local spread ``S = b / sqrt(rho)`` is carried (not as ``b``), and leaves out shifts that
a whole local component shares (measured against the error at a sibling of each state). ``docs/method.md``,
"The cross term with the carried deviation". ``cross="accumulated"`` keeps the earlier perturbations only (the
formula above); ``cross="auto"`` (the default before) takes the carried term only where the affine output map
applies. Measured over independent calibration draws on the testbed (``studies/calibration_draws.py``), the carried
term reaches the 80% target on average on every persistent cell; the ``auto`` rule misses one
(``docs/results.md``).

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
from typing import Any

import numpy as np
import torch
import xarray as xr

from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.base import Estimator, FittedEstimator, as_dataset, check_finite_store, grid_of
from qdrift_stats.estimators.bias import (
    BIAS_TERMS,
    channel_index,
    check_bias,
    conditional_gaussian,
    conditional_output_map,
    residual,
)
from qdrift_stats.estimators.decomposed import output_regression, subsample_index
from qdrift_stats.estimators.empirical import t_interval
from qdrift_stats.estimators.output_map import DEFAULT_CANDIDATES, STATE_CANDIDATES, OutputMap, select_output_map
from qdrift_stats.record.store import storage_errors_as_qdrift
from qdrift_stats.schedulers.base import propagators, state_coefficients

PROPAGATIONS: tuple[str, ...] = ("noise", "none")
#: The output terms this estimator can apply: ``"map"`` (the affine output map chosen on held-out runs,
#: :mod:`qdrift_stats.estimators.output_map`) beside the bias terms of :mod:`qdrift_stats.estimators.bias`.
PERSISTENT_BIASES: tuple[str, ...] = ("map",) + BIAS_TERMS
PATHS: tuple[str, ...] = ("mapped", "quantized", "fp")
#: How the pull coefficient sees the spread it acts on (see :class:`PersistentEstimator`).
SPREADS: tuple[str, ...] = ("local", "noise", "landing")
#: What a step's perturbation is correlated with (see :class:`PersistentEstimator`).
CROSS_TERMS: tuple[str, ...] = ("carried", "accumulated", "auto")
#: Smallest residual fraction used (a level where the noise estimate is numerically 0).
RHO_FLOOR = 1e-6


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
    if propagation not in ("noise", "none"):
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
        product = acc * u  # (groups, n)
        per_unit = np.stack([np.bincount(unit_ids, weights=row, minlength=n_units) / counts for row in product])
        out["cross"][i] = scale * product.mean(axis=-1)
        if n_units > 1:
            out["cross_se"][i] = scale * per_unit.std(axis=-1, ddof=1) / np.sqrt(n_units)
        acc = acc + u
        out["accumulated"][i] = previous = np.mean(acc**2, axis=-1)
    return out


def explained_by_sibling(deviation: np.ndarray, delta: np.ndarray, sibling: np.ndarray) -> np.ndarray:
    """Products ``deviation * delta`` less the part the sibling's error explains: ``d Delta - beta d Delta'``.

    ``beta`` (per group, in ``[0, 1]``) is the least-squares coefficient of ``d Delta`` on ``d Delta'`` over the
    trajectories: the share of the error that the state's local component has in common (the sibling meets it
    too). Near 1 for an error smooth in the state (a weight error: its component-wide part is removed, with its
    noise); near 0 for an error rough in the state (the sibling's error is unrelated; subtracting it would only
    add noise).
    """
    p, q = deviation * delta, deviation * sibling
    qc = q - q.mean(axis=-1, keepdims=True)
    qq = np.sum(qc * qc, axis=-1, keepdims=True)
    pq = np.sum(qc * (p - p.mean(axis=-1, keepdims=True)), axis=-1, keepdims=True)
    beta = np.clip(np.where(qq > 0, pq / np.where(qq > 0, qq, 1.0), 0.0), 0.0, 1.0)
    return p - beta * q


def carried_cross_terms(
    delta: np.ndarray,
    sibling_delta: np.ndarray,
    residual: np.ndarray,
    rho: np.ndarray,
    b: np.ndarray,
    b_next: np.ndarray,
    units: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-step cross terms of each perturbation with the local deviation the state carries where it lands.

    For data locally ``N(mu, s^2)`` the marginal at level ``(a, b)`` has spread ``S^2 = a^2 s^2 + b^2 = b^2 / rho``
    around ``a mu``; the FP residual is ``x - a x0_hat = rho y`` with ``y = x - a mu`` the local deviation, and the
    probability-flow ODE carries ``y`` from level ``i`` to ``i + 1`` by ``S_{i+1} / S_i``. A step's perturbation
    ``Delta_i`` adds ``2 E[y_{i+1} Delta_i] + E Delta_i^2`` to the local spread, with the covariance taken *within*
    the local component (a shift that all samples of a component share is not spread). Along the quantized path
    ``y`` is the FP deviation plus what earlier steps left, ``D``, so the cross term has two parts
    (``docs/method.md``, "The cross term with the carried deviation"):

    - ``accumulated``: ``E[D_{i+1} Delta_i]``, ``D_{i+1} = sum_{j <= i} Delta_j S_{i+1} / S_{j+1}`` (the earlier
      perturbations, carried as the local spread is): a low-noise product of perturbations.
    - ``state``: ``E[(y_hat_{i+1} - D_{i+1}) Delta_i]`` with ``y_hat_{i+1} = (S_{i+1} / S_i) res_i / rho_i``: the
      first-order coupling of an error that is a function of the state with the state's FP deviation (a weight
      error ``dW x`` dilates or contracts the spread). Noisy (a product with the whole deviation): the estimator
      shrinks it by the James-Stein factor of its total over the steps.

    Both are taken within the component: ``Delta'_i`` is the perturbation at a *sibling* of the state (same local
    mean, fresh deviation, :func:`quantized_path_errors`), which meets the component's mean error and none of the
    state's deviation; each product is reduced by the part the sibling's explains (:func:`explained_by_sibling`),
    which removes the products of shifts that a whole component shares (a weight error moves each mode's mean,
    step after step: that is not spread).

    Args:
        delta, sibling_delta: ``(steps, groups, n)`` perturbations at the quantized path's states and at their siblings.
        residual: ``(steps, groups, n)`` the FP residual ``x_i - a_i x0_hat_i`` at each step's input, same order.
        rho: ``(steps,)`` residual fractions in ``(0, 1]`` (:func:`residual_fraction`).
        b, b_next: ``(steps,)`` the level of each step's input and the level it lands on.
        units: optional ``(n,)`` labels of the independent units for the standard errors.

    Returns:
        ``accumulated``, ``accumulated_se``, ``state``, ``state_se``, each ``(steps, groups)`` (0 on steps that start
        or land on ``b = 0``), and ``state_total``, ``state_total_se`` (``(groups,)``): the state term summed over the
        steps in units of the landing spread, ``sum_i state_i rho_{i+1} / b_{i+1}^2``, and its standard error over
        the units. Where step ``i + 1`` has no residual fraction (the grid's last step) ``rho_i`` is used.
    """
    delta = np.asarray(delta, dtype=np.float64)
    sibling = np.asarray(sibling_delta, dtype=np.float64)
    residual = np.asarray(residual, dtype=np.float64)
    rho = np.asarray(rho, dtype=np.float64)
    steps, groups, n = delta.shape
    unit_ids = np.arange(n) if units is None else np.unique(np.asarray(units), return_inverse=True)[1]
    n_units = int(unit_ids.max()) + 1
    counts = np.bincount(unit_ids, minlength=n_units)
    names = ("accumulated", "accumulated_se", "state", "state_se")
    out = {name: np.zeros((steps, groups)) for name in names}
    total = np.zeros((groups, n_units))  # per unit: sum over steps of the state term relative to S_{i+1}^2

    def per_unit_means(product: np.ndarray) -> np.ndarray:
        return np.stack([np.bincount(unit_ids, weights=row, minlength=n_units) / counts for row in product])

    def mean_and_se(product: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if n_units < 2:
            return product.mean(axis=-1), np.zeros(groups)
        return product.mean(axis=-1), per_unit_means(product).std(axis=-1, ddof=1) / np.sqrt(n_units)

    acc = np.zeros((groups, n))  # D at the current step's input level
    for i in range(steps):
        if b_next[i] <= 0 or b[i] <= 0:
            continue
        rho_next = rho[i + 1] if i + 1 < steps else rho[i]
        carry = (float(b_next[i]) / float(b[i])) * np.sqrt(rho[i] / rho_next)  # S_{i+1} / S_i
        carried = carry * acc
        deviation = carry * residual[i] / rho[i]
        out["accumulated"][i], out["accumulated_se"][i] = mean_and_se(
            explained_by_sibling(carried, delta[i], sibling[i])
        )
        state = explained_by_sibling(deviation - carried, delta[i], sibling[i])
        out["state"][i], out["state_se"][i] = mean_and_se(state)
        total += per_unit_means(state) * (rho_next / float(b_next[i]) ** 2)
        acc = carried + delta[i]
    out["state_total"] = total.mean(axis=-1)
    out["state_total_se"] = total.std(axis=-1, ddof=1) / np.sqrt(n_units) if n_units > 1 else np.zeros(groups)
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
    ``sum w / sum v`` over the corrected steps (1 for independent errors); ``cross_used``: ``"carried"`` or
    ``"accumulated"``, the cross term the fit took; ``map_shares`` and ``map_share_errors``: each output-map
    candidate's held-out share and its jackknife standard error over the calibration runs, ``map_threshold`` the
    share a map must reach to be applied.
    """

    independent_variance: np.ndarray | None = None
    cross: np.ndarray | None = None
    cross_se: np.ndarray | None = None
    accumulated: np.ndarray | None = None
    persistence_ratio: float = float("nan")
    path_used: str = "fp"
    path_note: str = ""
    residual_fraction: np.ndarray | None = None
    residual_error: np.ndarray | None = None
    output_map_shares: tuple[float, float] = (float("nan"), float("nan"))
    output_terms: tuple[str, ...] = ()
    output_map: OutputMap | None = None
    map_shares: dict[str, float] | None = None
    map_share_errors: dict[str, float] | None = None
    map_threshold: float = 0.1
    cross_used: str = "accumulated"

    @property
    def map_choice_unsure(self) -> bool:
        """Whether the output map's choice rests on the runs drawn: the best candidate's held-out share lies within
        two jackknife standard errors (over the calibration runs) of the threshold ``map_threshold``."""
        if not self.map_shares or not self.map_share_errors:
            return False
        best = max(self.map_shares, key=self.map_shares.get)
        error = self.map_share_errors.get(best, float("nan"))
        return bool(np.isfinite(error) and abs(self.map_shares[best] - self.map_threshold) <= 2.0 * error)

    def _map_choice_caveat(self) -> str:
        """The summary's line where :attr:`map_choice_unsure` (empty otherwise)."""
        if not self.map_choice_unsure:
            return ""
        best = max(self.map_shares, key=self.map_shares.get)
        share, error = self.map_shares[best], self.map_share_errors[best]
        return (
            f"\ncaveat: the best output map's held-out share, {share:.1%} (jackknife standard error {error:.1%} over "
            f"the runs), is within two standard errors of the {self.map_threshold:.0%} threshold: whether the map is "
            'applied depends on which runs were recorded; record more runs (docs/results.md, "More calibration runs '
            'where the gap is small")'
        )

    def export_tensors(self) -> dict[str, np.ndarray]:
        """``residual_fraction`` and ``residual_error`` per step, when measured (the pull then accounts for the
        local spread and for the model error in the residual); the affine output map's tensors, when applied."""
        out = {}
        if self.residual_fraction is not None:
            out["residual_fraction"] = np.asarray(self.residual_fraction, dtype=np.float64)
            out["residual_error"] = np.asarray(self.residual_error, dtype=np.float64)
            if self.params.get("spread") == "landing":
                out["independent_variance"] = np.asarray(self.independent_variance, dtype=np.float64)
        if self.output_map is not None:
            out.update(self.output_map.tensors())
        return out

    def export_metadata(self) -> dict[str, Any]:
        """The affine output map's structure, kernel, ridge and held-out share (``output_map``), when applied."""
        return {} if self.output_map is None else {"output_map": self.output_map.metadata()}

    def summary(self, max_rows: int = 12) -> str:
        text = (
            super().summary(max_rows)
            + f"\naccumulated / independent (sum w / sum v over corrected steps): {self.persistence_ratio:.2f}, "
            + "persistence measured along the "
            + {"quantized": "quantized", "mapped": "output-mapped quantized"}.get(self.path_used, "FP")
            + " path, "
            + (
                "cross term with the deviation the state carries"
                if self.cross_used == "carried"
                else "cross term with the earlier perturbations"
            )
        )
        if self.residual_fraction is not None:
            rho = np.asarray(self.residual_fraction)
            text += (
                f"\npull sized by the local spread: residual fraction {rho.max():.3g} to {rho.min():.3g} over the "
                f"steps, model error in the residual up to {float(np.max(self.residual_error)):.3g} (docs/method.md)"
            )
        else:
            text += "\npull as for a state that is all noise (no residual fraction measured)"
        if self.map_shares is not None:
            best = max(self.map_shares, key=self.map_shares.get) if self.map_shares else None
            if self.output_map is not None:
                text += (
                    f"\naffine output map: {self.output_map.name} explains {self.output_map.share:.1%} of the "
                    "predicted final deviation on held-out runs; applied"
                )
            elif best is not None:
                text += (
                    f"\naffine output map: the best candidate, {best}, explains {self.map_shares[best]:.1%} of the "
                    "predicted final deviation on held-out runs; not applied"
                )
            else:
                text += "\naffine output map: needs at least 2 runs to be chosen on held-out runs; not applied"
            text += self._map_choice_caveat()
        mean_share, slope_share = self.output_map_shares
        if np.isfinite(slope_share):
            applied = {(): "neither is applied", ("mean",): "each step's mean error is removed"}.get(
                self.output_terms, "PTQD's slope and intercept are applied"
            )
            text += (
                f"\nPTQD output map: each step's mean error explains {mean_share:.1%} and the slope k m_fp "
                f"{slope_share:.1%} of the predicted final deviation; {applied}"
            )
        return text + (f"\nnote: {self.path_note}" if self.path_note else "")


def quantized_path_errors(
    pair: Any,
    scheduler_name: str,
    steps: int,
    seeds: list[int],
    batch: int,
    residuals: bool = False,
    correct_output: Any = None,
    states: bool = False,
) -> tuple[np.ndarray, ...]:
    """Output errors along the quantized sampler's own path, and what the pull's residual holds there.

    The lock-step recording (:mod:`qdrift_stats.record.lockstep`) evaluates both models on the FP
    trajectory. Here the two schedulers advance in lock-step along the *Q* branch instead
    (``x_{i+1} := S_q(x_i, m_q(x_i))``), so ``e_i = m_q(x_i) - m_fp(x_i)`` is the error the quantized
    sampler actually meets from step to step. For an error that is a rough function of the state
    this differs from the FP path: the quantized trajectory's own deviation changes the error, so
    an error that repeats along the (barely moving) FP path may not repeat along the Q path.
    Same seeds and batch as the store's runs (same initial noise and conditions).

    ``correct_output``: optional ``(i, m_q, x) -> m`` applied to the quantized output before its scheduler step
    (``x`` the scheduler's sample it was computed from; the affine output map, ``path="mapped"``): the path is then
    the one the corrected sampler follows before its pull, and ``e`` is the error the corrected output keeps there
    (``m - m_fp``).

    Returns:
        ``e`` and ``m_fp``, each ``(run, step, sample, *shape)``; ``eps_power`` and ``eps_error``, each
        ``(step,)``: at each step's input, the mean square of the FP model's noise estimate
        ``eps_hat = (x_i - a_i x0_hat_i) / b_i`` (1 where the state is mostly noise, below 1 where the data's
        own spread dominates) and the mean square difference of the quantized and FP noise estimates
        (the model error in the residual the pull acts on). See ``docs/method.md``, "The pull where the
        data's spread dominates". With ``residuals=True`` also, each ``(run, step, sample, *shape)``: the FP
        residual ``x_i - a_i x0_hat_i`` at each step's input (0 where ``b_i = 0``), and the output error and FP
        output at a *sibling* of each state (:func:`_sibling_errors`: the same local mean, a fresh deviation drawn
        from a generator seeded with ``seed + SIBLING_SEED_OFFSET``), for :func:`carried_cross_terms`. For a step
        with two model calls (Heun) the sibling is evaluated at the step's first call only.
        With ``states=True`` two more at the end: the state at each step's input ``(run, step, sample, *shape)`` and,
        with ``residuals``, the siblings' states (else ``None``), the inputs a state-aware output map needs.
    """
    from qdrift_stats.loop import advance_step, initial_noise, prepared_scheduler
    from qdrift_stats.schedulers.base import step_calls, step_grid, step_kwargs

    errors, outputs, powers, noise, kept, sib_e, sib_m, xs, sib_xs = [], [], [], [], [], [], [], [], []
    with torch.no_grad():
        for seed in seeds:
            sched_fp = prepared_scheduler(pair, scheduler_name, steps)
            sched_q = prepared_scheduler(pair, scheduler_name, steps)
            kw_fp, kw_q = step_kwargs(sched_fp), step_kwargs(sched_q)
            x, cond = initial_noise(pair, sched_q, batch, seed)
            e_run, m_run, p_run, n_run, r_run, se_run, sm_run, x_run, sx_run = [], [], [], [], [], [], [], [], []
            sibling_noise = torch.Generator().manual_seed(int(seed) + SIBLING_SEED_OFFSET)
            plan = step_calls(sched_q)  # a two-call step (Heun) gives its effective outputs
            levels = step_grid(sched_q)
            grid = levels if len(plan) != len(sched_q.timesteps) else None
            for i, calls in enumerate(plan):
                # the FP step keeps the FP history in step
                _, m_fp, _, _ = advance_step(pair.fp, sched_fp, x, calls, cond, kw_fp, i=i, grid=grid)
                fix = None if correct_output is None else (lambda m, state, i=i: correct_output(i, m, state))
                x_q, m_q, _, _ = advance_step(pair.q, sched_q, x, calls, cond, kw_q, i=i, grid=grid, correct_output=fix)
                e_run.append((m_q - m_fp).double().cpu().numpy())
                m_run.append(m_fp.double().cpu().numpy())
                a, b = float(levels.a[i]), float(levels.b[i])
                if b > 0:
                    res_fp = (x - a * levels.x0_from_output(i, x, m_fp)).double()
                    eps_fp = res_fp / b
                    eps_q = (x - a * levels.x0_from_output(i, x, m_q)).double() / b
                    p_run.append(float(torch.mean(eps_fp**2)))
                    n_run.append(float(torch.mean((eps_q - eps_fp) ** 2)))
                else:
                    res_fp = torch.zeros_like(x, dtype=torch.float64)
                    p_run.append(float("nan"))
                    n_run.append(float("nan"))
                if residuals:
                    r_run.append(res_fp.cpu().numpy())
                    e_sib, m_sib, x_sib = _sibling_errors(
                        pair, sched_q, sched_q.timesteps[calls[0]], x, res_fp, b, cond, sibling_noise
                    )
                    se_run.append(e_sib)
                    sm_run.append(m_sib)
                    sx_run.append(x_sib)
                if states:
                    x_run.append(x.double().cpu().numpy())
                x = x_q
            errors.append(np.stack(e_run))
            outputs.append(np.stack(m_run))
            powers.append(p_run)
            noise.append(n_run)
            if residuals:
                kept.append(np.stack(r_run))
                sib_e.append(np.stack(se_run))
                sib_m.append(np.stack(sm_run))
                sib_xs.append(np.stack(sx_run))
            if states:
                xs.append(np.stack(x_run))
    e, m = np.stack(errors), np.stack(outputs)
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(m))):
        raise QDriftError("non-finite model output along the quantized path")
    out = (
        e,
        m,
        np.mean(np.asarray(powers, dtype=np.float64), axis=0),
        np.mean(np.asarray(noise, dtype=np.float64), axis=0),
    )
    if residuals:
        out = out + (np.stack(kept), np.stack(sib_e), np.stack(sib_m))
    if states:
        out = out + (np.stack(xs), np.stack(sib_xs) if residuals else None)
    return out


def fp_path_states(
    pair: Any, scheduler_name: str, steps: int, seeds: list[int], batch: int, reproduce: list[np.ndarray] | None = None
) -> np.ndarray:
    """``(step, run, batch * D)`` the FP sampler's state at each step's input (its scheduler sample), re-run from the
    store's seeds with the recording's initial and step noise: one FP model call per step and calibration sample.

    ``reproduce``: per step, the store's FP outputs ``(run, batch * D)``; the re-run must give them (up to the
    store's float rounding, 1% of their RMS), else the pair is not the one that was recorded and a one-line
    :class:`QDriftError` says so.
    """
    from qdrift_stats.loop import initial_noise, prepared_scheduler, run_sampler, step_generator

    states, outputs = [], []
    with torch.no_grad():
        for seed in seeds:
            sched = prepared_scheduler(pair, scheduler_name, steps)
            x, cond = initial_noise(pair, sched, batch, seed)
            run_x, run_m = [], []

            def keep(s: dict, run_x=run_x, run_m=run_m) -> None:
                run_x.append(s["x"].double().cpu().numpy().reshape(batch, -1))
                run_m.append(s["output"].double().cpu().numpy().reshape(batch, -1))

            run_sampler(pair.fp, sched, x, cond, callback=keep, generator=step_generator(seed))
            states.append(np.stack(run_x))
            outputs.append(np.stack(run_m))
    x = np.stack(states, axis=1).reshape(steps, len(seeds), -1)
    if reproduce is not None:
        m = np.stack(outputs, axis=1).reshape(steps, len(seeds), -1)
        want = np.stack([np.asarray(r, dtype=np.float64) for r in reproduce])
        scale = float(np.sqrt(np.mean(want**2))) or 1.0
        if m.shape != want.shape or float(np.sqrt(np.mean((m - want) ** 2))) > 0.01 * scale:
            raise QDriftError(
                "the model pair does not reproduce the store's FP outputs from its seeds: pass the pair it was "
                "recorded with (the state-aware map needs the FP states)"
            )
    return x


#: Offset of the seed of the siblings' noise from the run's seed (a fixed, documented stream).
SIBLING_SEED_OFFSET = 7919


def _sibling_errors(pair, scheduler, t, x, res_fp, b, cond, generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Output error and FP output at a sibling of each state: the same local mean, a fresh local deviation.

    With ``rho`` the batch's residual fraction, the local mean is ``x - res / rho`` and the local spread
    ``S = b / sqrt(rho)``; the sibling is ``x - res / rho + S z``. Returns the output error, the FP output and the
    sibling states; zeros and the states themselves where ``b = 0``.
    """
    from qdrift_stats.loop import scale_model_input

    if b <= 0:
        zero = np.zeros(tuple(x.shape))
        return zero, zero, x.double().cpu().numpy()
    rho = float(np.clip(float(torch.mean(res_fp**2)) / (b * b), RHO_FLOOR, 1.0))
    z = torch.randn(tuple(x.shape), generator=generator, dtype=torch.float32).to(device=x.device, dtype=torch.float64)
    sibling = (x.double() - res_fp / rho + (b / np.sqrt(rho)) * z).to(x.dtype)
    model_input = scale_model_input(scheduler, sibling, t)
    m_fp = pair.fp(model_input, t, **cond)
    m_q = pair.q(model_input, t, **cond)
    return (m_q - m_fp).double().cpu().numpy(), m_fp.double().cpu().numpy(), sibling.double().cpu().numpy()


def residual_fraction(eps_power: np.ndarray) -> np.ndarray:
    """``(steps,)`` ``rho_i`` in ``(0, 1]``: the FP noise estimate's mean square at each step's input, clipped.

    An exact denoiser has ``E |eps_hat|^2 <= 1`` per dim; a value above 1 is sampling noise and is clipped
    to 1 (the pull as if the state were all noise); a step without a value (a level of 0) gets 1.
    """
    rho = np.asarray(eps_power, dtype=np.float64).copy()
    rho[~np.isfinite(rho)] = 1.0
    return np.clip(rho, RHO_FLOOR, 1.0)


def trajectory_weights(gain: np.ndarray, grid: dict[str, np.ndarray], prediction_type: str | None) -> np.ndarray:
    """``(steps,)`` ``P_i gain_i``: how much of a step's output error reaches the final state (first order),
    with the propagators of the scheduler's coefficients on the state (1 without a prediction type)."""
    steps = len(gain)
    if prediction_type:
        A = state_coefficients(str(prediction_type), grid["a"], grid["b"], grid["a_next"], grid["b_next"])
    else:
        A = np.ones(steps)
    return propagators(A) * np.asarray(gain, dtype=np.float64)


def output_map_shares(
    errors: list[np.ndarray],
    outputs: list[np.ndarray],
    k: np.ndarray,
    gain: np.ndarray,
    grid: dict[str, np.ndarray],
    prediction_type: str | None,
) -> tuple[float, float]:
    """``(mean_share, slope_share)``: the shares of the predicted final deviation PTQD's two terms explain.

    As the error budget (:mod:`qdrift_stats.validate.budget`): each step's first-order perturbation
    ``gain_i e_i`` is carried to the final state by ``P_i`` (:func:`~qdrift_stats.schedulers.base.propagators`
    of the scheduler's coefficients on the state; 1 without a prediction type). With
    ``T = sum_i P_i gain_i e_i`` the predicted final deviation (per run and position),

        mean_share  = |sum_i P_i gain_i E e_i|^2 / E T^2              (each step's mean error, pooled),
        slope_share = E |sum_i P_i gain_i k_i (m_fp,i - mean)|^2 / E T^2.

    A term that explains little of each step's error (``R^2`` of 0.1) can still explain much of the final
    deviation, because it repeats coherently from step to step: this decides whether it is worth applying.

    Args:
        errors, outputs: per step, ``(run, n)`` output errors ``e_i`` and FP outputs ``m_fp,i``.
        k: ``(steps,)`` the slope per step (0 where not applied).
        gain: ``(steps,)`` the first-order gains. grid: the store's step grid (``a``, ``b``, ``a_next``, ``b_next``).
    """
    steps = len(errors)
    if prediction_type:
        A = state_coefficients(str(prediction_type), grid["a"], grid["b"], grid["a_next"], grid["b_next"])
    else:
        A = np.ones(steps)
    P = propagators(A)
    total = np.zeros_like(errors[0])
    explained = np.zeros_like(errors[0])
    shift = 0.0
    for i in range(steps):
        total += P[i] * gain[i] * errors[i]
        explained += P[i] * gain[i] * k[i] * (outputs[i] - outputs[i].mean(axis=1, keepdims=True))
        shift += P[i] * gain[i] * float(np.mean(errors[i]))
    denom = float(np.mean(total**2))
    if denom <= 0:
        return 0.0, 0.0
    return shift**2 / denom, float(np.mean(explained**2)) / denom


class PersistentEstimator(Estimator):
    """Per-step increments of the accumulated excess variance (see the module docstring).

    Args:
        bias: ``"map"`` (default): the affine output map, PTQD's decomposition with structure: the error's
            regression ``offset_i + K_i (m_fp - c_i)`` on the FP output (plus ``L_i (x_i - xbar_i)`` on the sampler
            state where ``map_state``, the default with the pair), inverted at sampling time, whose structure
            (each element's mean, a local convolution, a dense matrix) and ridge explain the most of the predicted
            final deviation on held-out calibration runs, applied where that share reaches ``min_explained``
            (:mod:`~qdrift_stats.estimators.output_map`); the statistic is then fitted to the error the corrected
            output keeps. ``"ptqd"``: PTQD's per-step ``k m_fp + mu``; the slope ``k``
            only where the FP output explains at least ``min_explained`` of the predicted final deviation, see
            :func:`output_map_shares`, else the step's mean error alone where that explains as much, else
            nothing. ``"none"`` or ``"conditional"`` (the published code's per-channel conditional mean).
        per_channel: one value per channel (first sample dim) instead of one per step.
        path: where persistence is measured. ``"mapped"`` (default): the per-step size ``v_i`` comes
            from the store (the FP path, as every estimator), the persistence factor ``w_i / v_i`` from
            the same seeds re-run in lock-step along the path the corrected sampler follows before its pull, the
            quantized output put through the affine output map at every step (the quantized sampler's own path
            where no map applies; :func:`quantized_path_errors`; needs the model pair, ``pair=`` or
            ``qdrift fit --pair``, never taken from the store; without it the FP path is used and the fit says so in
            ``path_note``). ``"quantized"`` (the default before): along the uncorrected quantized path even where the
            map applies. ``"fp"``: everything from the store (no model calls; overstates the persistence of an error
            that is rough in the state, see ``docs/method.md``).
        propagation: ``"noise"`` (default) or ``"none"``, see :func:`accumulated_cross_terms`.
        center: count the accumulated perturbation's variance across samples (per channel), not
            its second moment: a shift every sample shares is a bias, not spread (default).
        confidence: level of the t interval over runs of the per-run values.
        min_explained: the share of the predicted final mean square deviation that a term of PTQD's map must
            explain, summed along the trajectory (:func:`output_map_shares`), to be applied: the slope
            ``k_i m_fp`` (with the regression's intercept), else each step's mean error ``E e_i`` alone (a
            shift, which the centred variance statistic cannot see), else nothing. Default 0.1: the testbed's
            slopes measure at most 6.6%, where applying them costs the flow weight pair half its repair; the
            digits U-Net's w4a4 and w3a4 slopes measure 22% and 48%, where they are most of the repair
            (``docs/method.md``).
        min_r2, min_scale: where the slope is applied, a step takes ``k, mu`` from the regression only if
            ``R^2 >= min_r2`` and ``1 + k >= min_scale``; otherwise its mean error alone.
        max_points: most values per step for the bias regression (a fixed random subsample).
        seed: seed of that subsample.
        spread: ``"local"`` (default): the pull coefficient accounts for the spread of the marginal around
            the clean estimate, measured along the quantized path as the residual fraction
            ``rho_i = E |x - a x0_hat|^2 / (b^2 dim)`` at each level and exported as the file's
            ``residual_fraction`` (needs the pair; see ``docs/method.md``); ``"noise"``: the pull as derived
            for a state that is all noise (``rho = 1``); ``"landing"``: as ``"local"``, and the file also carries the
            per-step ``v_i`` (``independent_variance``), with which the pull solves the condition at the landing level
            that models how it acts on the step's own error
            (:func:`qdrift_stats.correct.coefficients.landing_coefficients`; an option, ``docs/method.md``).
        cross: with ``spread="local"`` or ``"landing"`` and the pair: ``"carried"``: the cross term of each
            perturbation with the local deviation the state carries where it lands, estimated from the FP residual
            along the quantized path (:func:`carried_cross_terms`; it holds the first-order coupling of an error that
            is a function of the state as well as persistence; the default); ``"accumulated"``: with the earlier
            perturbations only, propagated as the state's noise (:func:`accumulated_cross_terms`); ``"auto"`` (the
            default before): the carried one where the affine output map is applied (the error is then measurably a
            function of the state), else the accumulated one. The carried term costs one more evaluation of both
            models per step and calibration sample (a sibling state). Without the pair or with ``spread="noise"`` the
            accumulated one is used.
        map_state: with ``bias="map"``, also try maps that regress on the sampler state beside the FP output,
            ``offset_i + K_i (m_fp - c_i) + L_i (x_i - xbar_i)``
            (:data:`~qdrift_stats.estimators.output_map.STATE_CANDIDATES`), chosen by the same held-out share; the
            FP states are re-run from the store's seeds with the pair (:func:`fp_path_states`: one FP model call per
            step and calibration sample; the FP outputs must reproduce the store's) and the exported file needs
            format version 4 where a state-aware map is chosen. ``None`` (default): ``True`` with ``bias="map"``
            (the default since the flip; ``docs/method.md``, "A map that sees the state"), else ``False``;
            ``False``: the map on the FP output only (the default before). Without the pair the plain map is fitted
            and the fit says so in its note.
        pair: the model pair for ``path="mapped"`` or ``"quantized"`` (a pair is code: it is never imported from the
            store).
    """

    name = "persistent"
    unrecorded_params = ("pair",)

    def __init__(
        self,
        bias: str = "map",
        per_channel: bool = False,
        path: str = "mapped",
        propagation: str = "noise",
        center: bool = True,
        confidence: float = 0.95,
        min_r2: float = 0.01,
        min_scale: float = 0.5,
        min_explained: float = 0.1,
        max_points: int = 200_000,
        seed: int = 0,
        spread: str = "local",
        cross: str = "carried",
        map_state: bool | None = None,
        pair: Any = None,
    ):
        if bias not in PERSISTENT_BIASES:
            raise QDriftError(f"unknown bias term {bias!r}; choose one of {', '.join(PERSISTENT_BIASES)}")
        self.bias = check_bias(bias) if bias != "map" else bias
        if propagation not in PROPAGATIONS:
            raise QDriftError(f"unknown propagation {propagation!r}; choose {', '.join(PROPAGATIONS)}")
        if path not in PATHS:
            raise QDriftError(f"unknown path {path!r}; choose {', '.join(PATHS)}")
        self.per_channel = per_channel
        self.path = path
        self.propagation = propagation
        self.center = bool(center)
        self.confidence = confidence
        self.min_r2 = min_r2
        self.min_scale = min_scale
        if not 0.0 <= float(min_explained) <= 1.0:
            raise QDriftError(f"min_explained must be in [0, 1], got {min_explained}")
        self.min_explained = float(min_explained)
        self.max_points = max_points
        self.seed = seed
        if spread not in SPREADS:
            raise QDriftError(f"unknown spread {spread!r}; choose {', '.join(SPREADS)}")
        self.spread = spread
        if cross not in CROSS_TERMS:
            raise QDriftError(f"unknown cross term {cross!r}; choose {', '.join(CROSS_TERMS)}")
        self.cross = cross
        self.map_state = None if map_state is None else bool(map_state)  # as given (clone, with_params)
        if self.map_state and bias != "map":
            raise QDriftError("map_state needs bias='map' (the state-aware output map)")
        self.pair = pair

    @property
    def uses_state_map(self) -> bool:
        """Whether the fit tries state-aware output maps: ``map_state``, or where it is ``None``, ``bias == "map"``."""
        return self.bias == "map" if self.map_state is None else self.map_state

    @property
    def params(self) -> dict[str, Any]:
        """The recorded parameters, with ``map_state`` resolved (``None`` recorded as what it meant)."""
        return {**super().params, "map_state": self.uses_state_map}

    def bias_at_step(self, delta_out: np.ndarray, out_fp: np.ndarray, channel: np.ndarray, index):
        """``(k, mu, k_full, mu_full)``: the bias term at one step, per channel (``(channels,)``) and
        broadcast to the flattened positions (``(n,)``) or scalars."""
        if self.bias in ("none", "map"):  # the map is fitted for the whole trajectory in fit
            return 0.0, 0.0, 0.0, 0.0
        sub = (lambda a: a) if index is None else (lambda a: a[:, index])
        if self.bias == "ptqd":  # the raw regression; the slope is decided for the whole trajectory in fit
            k, mu, _, _, r2 = output_regression(sub(delta_out), sub(out_fp))
            if not (np.isfinite(r2) and r2 >= self.min_r2 and 1.0 + k >= self.min_scale):
                k = float("nan")  # this step keeps only its mean error, even where the slope is applied
            return k, mu, k, mu
        m_q = out_fp + delta_out
        pos = np.tile(channel, delta_out.shape[0])
        g = conditional_gaussian(m_q.ravel(), delta_out.ravel(), pos)
        k, mu = conditional_output_map(g, self.min_scale)
        return k, mu, k[channel][None], mu[channel][None]

    def _pair(self, ds: xr.Dataset):
        from qdrift_stats.pair import check_pair, recorded_pair_hint

        if self.pair is not None:
            return check_pair(self.pair)
        # A pair is code: never imported from the store's 'pair' attribute (a data file).
        raise QDriftError(recorded_pair_hint(ds.attrs.get("pair"), "measuring persistence along the quantized path"))

    @storage_errors_as_qdrift
    def fit(self, store: xr.Dataset | str | Path) -> PersistentFit:
        ds = as_dataset(store)
        if "gain" not in ds.coords:
            raise QDriftError("the store has no 'gain' coordinate (recorded by an older qdrift-stats); re-record it")
        grid = grid_of(ds)
        b_next = grid["b_next"]
        gain = np.asarray(ds["gain"].values, dtype=np.float64)
        steps, runs = ds.sizes["step"], ds.sizes["run"]
        shape = tuple(ds["delta_out"].isel(step=0).shape)  # (run, sample, *sample_shape)
        channel = channel_index(shape)
        channels = int(channel.max()) + 1
        sample_of = np.repeat(np.arange(shape[1]), channel.size // shape[1])
        index = subsample_index(ds, self.max_points, self.seed)
        if self.per_channel:  # trajectories grouped by channel
            order = np.argsort(channel, kind="stable")
            groups, n = channels, channel.size // channels
            labels = np.zeros(n, dtype=np.int64)
        else:
            order, groups, n = np.arange(channel.size), 1, channel.size
            labels = channel
        samples = sample_of[order].reshape(groups, n)[0]
        units = (np.arange(runs)[:, None] * shape[1] + samples[None]).ravel()
        center = labels if self.center else None

        def perturbations(errors: np.ndarray, outputs: np.ndarray, biases) -> np.ndarray:
            """``(steps, run, groups, n)`` first-order perturbations of the residual, centred within each run."""
            out = np.zeros((steps, runs, groups, n))
            for i in range(steps):
                r = residual(errors[i], outputs[i], biases[i][0], biases[i][1])
                out[i] = (gain[i] * r[:, order]).reshape(runs, groups, n)
            if center is not None:
                out = np.stack([_centred(out[:, r_], center) for r_ in range(runs)], axis=1)
            return out

        errors, outputs, biases, ks, mus = [], [], [], [], []
        for i in range(steps):
            delta_out = np.asarray(ds["delta_out"].isel(step=i).values, dtype=np.float64).reshape(runs, -1)
            out_fp = np.asarray(ds["out_fp"].isel(step=i).values, dtype=np.float64).reshape(runs, -1)
            check_finite_store(np.stack([delta_out, out_fp]), "delta_out or out_fp")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                k, mu, k_full, mu_full = self.bias_at_step(delta_out, out_fp, channel, index)
            errors.append(delta_out)
            outputs.append(out_fp)
            biases.append((k_full, mu_full))
            ks.append(k)
            mus.append(mu)
        shares = (float("nan"), float("nan"))
        out_map, map_shares, map_share_errors = None, None, None
        sample_shape = shape[2:]
        # the store's sampler and seeds, for the model re-runs (the FP states, the quantized path)
        scheduler_name, seeds = str(ds.attrs.get("scheduler")), [int(s) for s in ds["seed"].values]
        fp_states, state_note = None, ""
        if self.bias == "map":
            state_pair = None
            if self.uses_state_map:
                try:
                    state_pair = self._pair(ds)
                except QDriftError as exc:
                    state_note = f"no model pair given ({exc}); the state-aware output maps were not tried"
            if state_pair is not None:
                fp_states = fp_path_states(
                    state_pair,
                    scheduler_name,
                    steps,
                    seeds,
                    shape[1],
                    reproduce=outputs,
                )  # (step, run, samples * D)
            out_map, map_shares, map_share_errors = select_output_map(
                [outputs[i].reshape(runs, shape[1], *sample_shape) for i in range(steps)],
                [errors[i].reshape(runs, shape[1], *sample_shape) for i in range(steps)],
                trajectory_weights(gain, grid, ds.attrs.get("prediction_type")),
                self.min_explained,
                candidates=DEFAULT_CANDIDATES + (STATE_CANDIDATES if self.uses_state_map else ()),
                states=None
                if fp_states is None
                else [fp_states[i].reshape(runs, shape[1], *sample_shape) for i in range(steps)],
            )

        def mapped(e: np.ndarray, m_fp: np.ndarray, step: int, state: np.ndarray | None = None) -> np.ndarray:
            """The error the corrected output keeps, ``map(m_q) - m_fp``, in ``e``'s shape (``e``, ``m_fp`` and the
            states the outputs were evaluated at: ``(..., samples * D)`` or shaped)."""
            if out_map is None:
                return e
            m_q = (e + m_fp).reshape(-1, *sample_shape)
            x = None if state is None else state.reshape(m_q.shape)
            return out_map.apply(step, m_q, x).reshape(e.shape) - m_fp

        errors = [mapped(errors[i], outputs[i], i, None if fp_states is None else fp_states[i]) for i in range(steps)]
        if self.bias == "ptqd":
            raw_k = np.asarray(ks, dtype=np.float64)
            shares = output_map_shares(
                errors, outputs, np.nan_to_num(raw_k), gain, grid, ds.attrs.get("prediction_type")
            )
            mean_on, slope_on = (share >= self.min_explained for share in shares)
            ks, mus = [], []
            for i in range(steps):
                if slope_on and np.isfinite(raw_k[i]):  # the regression's slope and intercept
                    k_i, mu_i = float(raw_k[i]), float(biases[i][1])
                elif mean_on:  # the step's mean error alone
                    k_i, mu_i = 0.0, float(np.mean(errors[i] if index is None else errors[i][:, index]))
                else:
                    k_i, mu_i = 0.0, 0.0
                ks.append(k_i)
                mus.append(mu_i)
                biases[i] = (k_i, mu_i)
        delta = perturbations(errors, outputs, biases)

        def pooled(d: np.ndarray) -> np.ndarray:
            return np.moveaxis(d, 1, 2).reshape(steps, groups, runs * n)

        terms = accumulated_cross_terms(pooled(delta), b_next, self.propagation, None, units)
        w_path = persistent_statistic(terms["v"], terms["cross"], terms["cross_se"], b_next)
        v = terms["v"]
        pair, path_note, rho, rho_error, carried, on_mapped = None, "", None, None, False, False
        if self.path in ("quantized", "mapped"):
            try:
                pair = self._pair(ds)
            except QDriftError as exc:
                path_note = (
                    f"no model pair given ({exc}); persistence was measured along the FP path, which "
                    "overstates it for errors that are rough in the state, and the pull takes the state for all "
                    "noise (no residual fraction; docs/method.md)"
                )
        if pair is not None:
            # "carried" (the default) everywhere; "auto" only where the affine map applies, i.e. where the error is
            # measurably a function of the state (docs/method.md, "The cross term with the carried deviation")
            carried = self.spread != "noise" and (
                self.cross == "carried" or (self.cross == "auto" and out_map is not None)
            )
            on_mapped = self.path == "mapped" and out_map is not None

            def apply_map(i: int, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                state = x.detach().double().cpu().numpy() if out_map.uses_state else None
                fixed = out_map.apply(i, m.detach().double().cpu().numpy(), state)
                return torch.as_tensor(fixed, dtype=m.dtype, device=m.device)

            with_states = out_map is not None and out_map.uses_state
            e_q, m_q, eps_power, eps_error, *res_q = quantized_path_errors(
                pair,
                scheduler_name,
                steps,
                seeds,
                shape[1],
                residuals=carried,
                correct_output=apply_map if on_mapped else None,
                states=with_states,
            )
            x_q, sib_x = (None, None)
            if with_states:  # the states the path's and the siblings' outputs were evaluated at
                x_q, sib_x = res_q[-2], res_q[-1]
                res_q = res_q[:-2]
                x_q = np.moveaxis(x_q, 1, 0).reshape(steps, runs, -1)
            if self.spread != "noise":
                rho = residual_fraction(eps_power)
                rho_error = np.where(np.isfinite(eps_error), eps_error, 0.0)
            e_q = np.moveaxis(e_q, 1, 0).reshape(steps, runs, -1)
            m_q = np.moveaxis(m_q, 1, 0).reshape(steps, runs, -1)
            if not on_mapped:  # on the mapped path the error is already that of the corrected output
                e_q = np.stack([mapped(e_q[i], m_q[i], i, None if x_q is None else x_q[i]) for i in range(steps)])
            if carried and out_map is not None:
                sib_e, sib_m = np.moveaxis(res_q[1], 1, 0), np.moveaxis(res_q[2], 1, 0)
                sib_s = None if sib_x is None else np.moveaxis(sib_x, 1, 0)
                res_q[1] = np.moveaxis(
                    np.stack(
                        [mapped(sib_e[i], sib_m[i], i, None if sib_s is None else sib_s[i]) for i in range(steps)]
                    ),
                    0,
                    1,
                )
            delta_q = pooled(perturbations(e_q, m_q, biases))
            terms_q = accumulated_cross_terms(delta_q, b_next, self.propagation, None, units)
            if carried:

                def flat(a: np.ndarray) -> np.ndarray:
                    return np.moveaxis(a, 1, 0).reshape(steps, runs, -1)

                def ordered(a: np.ndarray) -> np.ndarray:
                    a = flat(a)
                    return pooled(np.stack([a[i][:, order].reshape(runs, groups, n) for i in range(steps)]))

                delta_sib = pooled(perturbations(flat(res_q[1]), flat(res_q[2]), biases))
                parts = carried_cross_terms(delta_q, delta_sib, ordered(res_q[0]), rho, grid["b"], b_next, units)
                # the state term is noisy step by step; its total over the steps is better determined:
                # every step's value is shrunk by the total's James-Stein factor
                with np.errstate(divide="ignore", invalid="ignore"):
                    keep = np.where(
                        parts["state_total"] != 0,
                        shrink_to_zero(parts["state_total"], parts["state_total_se"]) / parts["state_total"],
                        0.0,
                    )
                terms_q["cross"] = shrink_to_zero(parts["accumulated"], parts["accumulated_se"]) + keep * parts["state"]
                terms_q["cross_se"] = np.zeros_like(terms_q["cross"])  # already shrunk, part by part
            w_path = persistent_statistic(terms_q["v"], terms_q["cross"], terms_q["cross_se"], b_next)
            ratio = np.where(terms_q["v"] > 0, w_path / np.where(terms_q["v"] > 0, terms_q["v"], 1.0), 1.0)
            terms["cross"], terms["cross_se"] = terms_q["cross"], terms_q["cross_se"]
        else:
            ratio = np.where(v > 0, w_path / np.where(v > 0, v, 1.0), 1.0)
        ratio[b_next <= 0] = 1.0
        w = v * ratio
        per_run_v = np.stack([np.mean(delta[:, r_] ** 2, axis=-1) for r_ in range(runs)])  # (run, steps, groups)
        per_run = per_run_v * ratio[None]
        squeeze = (lambda a: a[..., 0]) if not self.per_channel else (lambda a: a)
        _, low, high = t_interval(squeeze(per_run), self.confidence)
        fields = {}
        if self.bias == "ptqd":
            fields["k"], fields["mu"] = np.asarray(ks, dtype=np.float64), np.asarray(mus, dtype=np.float64)
        elif self.bias == "conditional":
            fields["k"], fields["mu"] = np.stack(ks), np.stack(mus)
        variance, independent = squeeze(w), squeeze(v)
        active = b_next > 0
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
            persistence_ratio=float(np.sum(variance[active])) / total_v if total_v > 0 else float("nan"),
            path_used=("mapped" if on_mapped else "quantized") if pair is not None else "fp",
            path_note="; ".join(note for note in (path_note, state_note) if note),
            residual_fraction=rho,
            residual_error=rho_error,
            output_map_shares=shares,
            output_terms=tuple(
                name
                for name, share in zip(("mean", "slope"), shares)
                if self.bias == "ptqd" and share >= self.min_explained
            )
            + ((f"map:{out_map.name}",) if out_map is not None else ()),
            output_map=out_map,
            map_shares=map_shares,
            map_share_errors=map_share_errors,
            map_threshold=self.min_explained,
            cross_used="carried" if carried else "accumulated",
        )
