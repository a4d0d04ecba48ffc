"""Smooth estimators: the variance statistic as a smooth function of the noise level ``log b``.

Why smooth, and over what. The per-step statistic ``v_i`` depends on the step size: for a one-step
solver ``Delta_i = c_i * delta_out_i`` with a gain ``c_i`` fixed by the step grid, so halving the
step count roughly quadruples ``v_i``. What does not depend on the grid is the output-space error
at a noise level, ``u(b) = E (m_q - m_fp)^2`` (per element, output units^2) of the model evaluated
at level ``b``. The store records it directly (``delta_out``), so both estimators here model

    log u_i   against   log b_i       (b_i: the level of the state the model sees at step i)

and map back to state units with the solver's gains:

- one-step solvers (Euler, DDIM, flow Euler): ``v_i = c_i^2 u(b_i)``, exact in expectation;
  ``c_i`` is the first-order gain (:func:`qdrift_stats.schedulers.base.first_order_gain`: Euler eps
  ``b_next - b``, flow Euler ``b_next - b``, DDIM eps ``b_next - a_next b / a``);
- multistep solvers (DPM-Solver++ 2M), ``statistic="first-order"`` (the default, as for
  ``qdrift fit``): ``v_i = c_i^2 u(b_i)`` with the first-order gain, the variance a fresh output
  error injects at step ``i`` (see :mod:`qdrift_stats.estimators.empirical`); exact in expectation.
- multistep solvers, ``statistic="lockstep"`` (the method's literal definition): the lock-step
  perturbation also carries the previous step's output error, ``Delta_i = c_i delta_out_i +
  d_i delta_out_{i-1}`` (``c_i`` here the 2M step's own weight on the current output), so

      v_i = c_i^2 u(b_i) + d_i^2 u(b_{i-1}) + 2 c_i d_i rho_i sqrt(u(b_i) u(b_{i-1})),

  where ``rho_i`` is the correlation of consecutive output errors. It matters (at high noise the
  model input barely moves between steps and ``rho`` nears 1, which the opposite-signed ``c, d``
  cancel). It is modelled as decaying with the distance in log level,
  ``rho_i = exp(-kappa(b_i) * (log b_{i-1} - log b_i))``, ``log kappa`` smoothed by LOWESS over
  ``log b``: an assumption (an Ornstein-Uhlenbeck correlation in ``log b``). On the mixture
  testbed going from 10 to 25 DPM-Solver++ steps it keeps ``v`` within about 0.7-1.4 of a direct
  fit (VP) and 0.9-1.1 (flow), where leaving the correlation out is off by up to 4.5x.

The lock-step gains ``c_i, d_i`` are read off the diffusers scheduler itself (:func:`solver_gains`:
one pass of ``scheduler.step`` on unit probes, exact because every supported step is linear in the
model outputs), so nothing re-implements a solver. The exported file stores the curves
(``curve_log_b``, ``curve_log_u`` and, for the lock-step statistic of a multistep solver,
``curve_log_kappa``) and
:meth:`qdrift_stats.correct.estimator_file.EstimatorFile.variance_on` evaluates them on another step count of the
same scheduler (:func:`variance_from_curves`).

- :class:`SmoothGLMEstimator`: a Gamma GLM with log link (statsmodels ``GLM``) of the per-run
  ``u_{r,i}`` on a cubic B-spline basis in ``log b`` (``df`` basis functions, knots at quantiles
  of the levels). The Gamma family suits a mean of squares (variance growing as the mean
  squared); the interval is the GLM's interval of the mean. The exported curve joins the fitted
  ``log u`` at the recorded levels linearly: a cubic piece spanning a wide gap between levels
  (DDIM's last steps) can overshoot where no data constrain it, linear interpolation cannot.
- :class:`SmoothLowessEstimator`: LOWESS (statsmodels ``lowess``) of ``log u_i`` (mean over runs)
  against ``log b_i``, joined linearly between the levels; the interval is a bootstrap over runs
  (its standard error of ``log u``, widened by ``sqrt(R / (R - 1))`` and a Student-t quantile
  with ``R - 1`` degrees of freedom for ``R`` runs).

Both curves are constant beyond the fitted range of levels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import statsmodels.api as sm
import torch
import xarray as xr
from scipy import stats
from scipy.interpolate import BSpline
from statsmodels.nonparametric.smoothers_lowess import lowess

from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.bands import linear_predictor_band
from qdrift_stats.estimators.base import (
    STATISTICS,
    Estimator,
    FittedEstimator,
    as_dataset,
    check_finite_store,
    check_statistic,
    grid_of,
    reduce_dims,
)
from qdrift_stats.loop import run_sampler
from qdrift_stats.record.store import storage_errors_as_qdrift, store_grid
from qdrift_stats.schedulers.base import call_steps, gain_on, is_multistep, scheduler_from_identity, step_grid

CURVE_POINTS = 256
_LOG_ZERO = -700.0  # log of a curve that is zero everywhere (exp underflows to 0)
_RHO_CLIP = (1e-3, 1.0 - 1e-6)


def solver_gains(scheduler) -> tuple[np.ndarray, np.ndarray]:
    """``(c, d)``, each ``(steps,)``: ``d x_{i+1} / d output_i`` and ``d x_{i+1} / d output_{i-1}``.

    ``scheduler``: a diffusers scheduler after ``set_timesteps`` (it is stepped through once, so
    pass a fresh one). Probe ``j`` of a batch of ``steps`` probes has output 1 at step ``j`` and 0
    elsewhere, and the state is held at 0, so step ``i`` returns ``c_i`` for probe ``i`` and ``d_i``
    for probe ``i - 1``. ``d`` is 0 for one-step solvers. The probe is a run of
    :func:`qdrift_stats.loop.run_sampler` whose "model" returns the unit outputs.
    """
    steps_of = [int(i) for i in call_steps(scheduler)]  # a two-call step (PLMS' first) gets its probe twice
    n = max(steps_of) + 1
    c, d = np.zeros(n), np.zeros(n)
    step = iter(steps_of)

    def unit_outputs(model_input: torch.Tensor, t: Any) -> torch.Tensor:
        probe = torch.zeros(n, 1, dtype=torch.float64)
        probe[next(step)] = 1.0
        return probe

    def read_gains(state: dict[str, Any]) -> torch.Tensor:
        i, x_next = state["i"], state["x_next"][:, 0].double().numpy()
        c[i] = x_next[i]
        d[i] = x_next[i - 1] if i > 0 else 0.0
        return state["x"]  # hold the state at 0

    run_sampler(unit_outputs, scheduler, torch.zeros(n, 1, dtype=torch.float64), callback=read_gains)
    return c, d


def combine_variance(
    c: np.ndarray, d: np.ndarray, u: np.ndarray, log_b: np.ndarray, kappa: np.ndarray | None
) -> np.ndarray:
    """State-space ``v_i`` from output-space ``u_i`` (``(steps,)``), gains and the correlation model."""
    v = c**2 * u
    if kappa is None or not np.any(d != 0):
        return v
    u_prev = np.concatenate([[0.0], u[:-1]])
    spacing = np.concatenate([[0.0], log_b[:-1] - log_b[1:]])
    rho = np.exp(-kappa * np.abs(spacing))
    return v + d**2 * u_prev + 2 * c * d * rho * np.sqrt(u * u_prev)


def variance_from_curves(tensors: dict[str, np.ndarray], identity: dict[str, Any], grid) -> np.ndarray:
    """The statistic on another step grid of the same scheduler from an exported smooth model.

    ``tensors``: ``curve_log_b`` (increasing), ``curve_log_u`` and optionally ``curve_log_kappa``,
    each ``(points,)``; ``identity``: the file's scheduler metadata; ``grid``: the sampler's
    :class:`~qdrift_stats.schedulers.base.StepGrid`. Curves are constant beyond their range. One-step
    solvers and the first-order statistic take their gains from the grid (the adapter's first-order gain);
    the lock-step statistic of a multistep solver (a ``curve_log_kappa`` is stored) from the
    recorded scheduler rebuilt with the grid's step count (:func:`solver_gains`).
    """
    if "curve_log_kappa" in tensors and is_multistep(str(identity.get("name"))):  # lock-step statistic
        scheduler = scheduler_from_identity(identity, grid.num_steps)
        if not np.allclose(step_grid(scheduler).timesteps, grid.timesteps, rtol=0, atol=1e-4):
            raise QDriftError(
                f"the sampler's {grid.num_steps}-step grid is not the one the recorded "
                f"{identity.get('name')} config gives; "
                "a multistep solver's gains are only known on that grid"
            )
        c, d = solver_gains(scheduler)
    else:
        c = gain_on(grid)
        d = np.zeros_like(c)
    log_b = np.log(grid.b)
    curve_b = tensors["curve_log_b"]
    log_u = np.interp(log_b, curve_b, tensors["curve_log_u"])
    u = np.where(log_u <= _LOG_ZERO / 2, 0.0, np.exp(log_u))  # a zero curve stays exactly zero
    kappa = np.exp(np.interp(log_b, curve_b, tensors["curve_log_kappa"])) if "curve_log_kappa" in tensors else None
    return combine_variance(c, d, u, log_b, kappa)


def spline_knots(log_b: np.ndarray, df: int) -> np.ndarray:
    """Knots of a clamped B-spline basis with ``df`` functions over the points ``log_b``.

    Cubic (degree ``df - 1`` below 4); interior knots at quantiles of the distinct points, so
    that clustered levels (the first VP steps, where ``b`` is near 1) do not leave a basis
    function without data.
    """
    degree = min(3, df - 1)
    x = np.unique(np.asarray(log_b, dtype=np.float64))
    low, high = float(x[0]), float(x[-1])
    interior = np.quantile(x, np.linspace(0, 1, df - degree + 1)[1:-1]) if degree > 0 else np.array([])
    return np.concatenate([[low] * (degree + 1), interior, [high] * (degree + 1)])


def log_b_basis(log_b: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """``(n, df)`` B-spline basis on :func:`spline_knots`; rows sum to 1.

    Points outside the knots' range are clamped to it, so a model on this basis is constant beyond it.
    """
    degree = int(np.sum(knots == knots[0])) - 1
    low, high = float(knots[0]), float(knots[-1])
    x = np.clip(np.asarray(log_b, dtype=np.float64), low, high)
    if degree == 0 or high <= low:
        return np.ones((len(x), 1))
    return BSpline.design_matrix(x, knots, degree).toarray()


def _lowess(x: np.ndarray, y: np.ndarray, at: np.ndarray, frac: float, iterations: int) -> np.ndarray:
    """LOWESS of ``y`` on ``x``, evaluated at ``at`` by linear interpolation between the fitted points.

    Constant beyond ``x``'s range; plain interpolation below 3 points. (Interpolating the fit at
    the data rather than using statsmodels' ``xvals`` avoids NaNs ``xvals`` gives with robustifying
    iterations when the ``x`` are clustered, as DDIM's first levels are.)
    """
    order = np.argsort(x)
    if len(x) < 3:
        return np.interp(at, x[order], y[order])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = lowess(y, x, frac=frac, it=iterations, return_sorted=False)
        if not np.all(np.isfinite(fitted)):
            fitted = lowess(y, x, frac=frac, it=0, return_sorted=False)
    return np.interp(at, x[order], fitted[order])


@dataclass
class SmoothFit(FittedEstimator):
    """A :class:`FittedEstimator` from a smooth model of the output-space variance over ``log b``.

    Attributes (beside the base ones; ``(steps,)`` unless said):
        curve_log_b, curve_log_u: ``(points,)`` the fitted curve ``log u`` over ``log b`` (exported).
        curve_log_kappa: ``(points,)`` the correlation decay ``log kappa`` over ``curve_log_b``, for
            the lock-step statistic of a multistep solver (exported); None otherwise.
        smooth_model: what the curves model (recorded in the estimator file's metadata).
        gain, gain_previous: the solver gains ``c_i`` and ``d_i`` (module docstring).
        u: the output-space variance per step, mean over runs (output units squared).
        u_fit: the smooth model's ``u`` at the recorded levels.
        usable: the steps with a positive ``u`` in every run (the ones fitted).
        df_used: basis functions used (GLM only).
        dispersion: the GLM's dispersion (GLM only).
    """

    curve_log_b: np.ndarray | None = None
    curve_log_u: np.ndarray | None = None
    curve_log_kappa: np.ndarray | None = None
    smooth_model: dict[str, Any] = field(default_factory=dict)
    gain: np.ndarray | None = None
    gain_previous: np.ndarray | None = None
    u: np.ndarray | None = None
    u_fit: np.ndarray | None = None
    usable: np.ndarray | None = None
    df_used: int | None = None
    dispersion: float | None = None

    def export_tensors(self) -> dict[str, np.ndarray]:
        """The curves (``curve_log_b``, ``curve_log_u``, optional ``curve_log_kappa``)."""
        curves = {"curve_log_b": self.curve_log_b, "curve_log_u": self.curve_log_u}
        if self.curve_log_kappa is not None:
            curves["curve_log_kappa"] = self.curve_log_kappa
        return {k: v for k, v in curves.items() if v is not None}

    def export_metadata(self) -> dict[str, Any]:
        return {"smooth_model": self.smooth_model} if self.smooth_model else {}


class _SmoothBase(Estimator):
    """What both smooth estimators share: output-space data, gains, correlation model and the result."""

    name = "smooth"

    STATISTICS = STATISTICS

    def __init__(self, confidence: float = 0.95, statistic: str = "first-order"):
        check_statistic(statistic)
        self.confidence = confidence
        self.statistic = statistic

    def _prepare(self, ds: xr.Dataset) -> dict[str, Any]:
        dims = reduce_dims(ds, per_channel=False)
        u = (ds["delta_out"].astype("float64") ** 2).mean(dim=dims).values  # (run, step), output units^2
        grid = grid_of(ds)
        multistep = is_multistep(str(ds.attrs.get("scheduler")))
        if self.statistic == "lockstep" and multistep:
            identity = {
                "name": ds.attrs.get("scheduler"),
                "class": ds.attrs.get("scheduler_class"),
                "config": ds.attrs.get("scheduler_config"),
            }
            scheduler = scheduler_from_identity(identity, ds.sizes["step"])
            if not np.allclose(step_grid(scheduler).timesteps, grid["timestep"], rtol=0, atol=1e-4):
                raise QDriftError(
                    "the store's timesteps differ from what its recorded scheduler config gives; "
                    "cannot compute the solver gains"
                )
            c, d = solver_gains(scheduler)
            per_run = (ds["delta_x"].astype("float64") ** 2).mean(dim=dims).values  # (run, step), state units^2
        else:  # one-step solvers (where both statistics agree) and the first-order statistic
            c = gain_on(store_grid(ds))
            d = np.zeros_like(c)
            per_run = u * c**2
        check_finite_store(np.stack([per_run, u]), "delta_x or delta_out")
        usable = np.all(u > 0, axis=0)
        log_b = np.log(grid["b"])
        kappa_points = None
        if np.any(d != 0):
            kappa_points = self._kappa_points(ds, u, log_b, d)
        return {
            "per_run": per_run,
            "u": u,
            "grid": grid,
            "c": c,
            "d": d,
            "usable": usable,
            "log_b": log_b,
            "kappa_points": kappa_points,
        }

    @staticmethod
    def _kappa_points(
        ds: xr.Dataset, u: np.ndarray, log_b: np.ndarray, d: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """``(log b_i, log kappa_i)`` at the steps with a history gain, from the pooled lag-1 correlation."""
        xs, ys = [], []
        previous = None
        for i in range(ds.sizes["step"]):
            current = np.asarray(ds["delta_out"].isel(step=i).values, dtype=np.float64).reshape(-1)
            if previous is not None and d[i] != 0 and u[:, i].mean() > 0 and u[:, i - 1].mean() > 0:
                rho = np.mean(current * previous) / np.sqrt(np.mean(current**2) * np.mean(previous**2))
                spacing = abs(log_b[i - 1] - log_b[i])
                if spacing > 0:
                    xs.append(log_b[i])
                    ys.append(np.log(-np.log(np.clip(rho, *_RHO_CLIP)) / spacing))
            previous = current
        return (np.array(xs), np.array(ys)) if xs else None

    def _kappa_at(self, prep: dict[str, Any], at: np.ndarray) -> np.ndarray | None:
        if prep["kappa_points"] is None:
            return None
        x, y = prep["kappa_points"]
        return np.exp(_lowess(x, y, at, frac=2 / 3, iterations=1))

    def _result(
        self,
        ds: xr.Dataset,
        prep: dict[str, Any],
        u_fit: np.ndarray,
        u_low: np.ndarray,
        u_high: np.ndarray,
        curve_log_b: np.ndarray,
        curve_log_u: np.ndarray,
        extra: dict[str, Any],
    ) -> SmoothFit:
        """The fit; ``extra``: further :class:`SmoothFit` fields (``usable``, ``df_used``, ``dispersion``)."""
        c, d, log_b, grid = prep["c"], prep["d"], prep["log_b"], prep["grid"]
        kappa = self._kappa_at(prep, log_b)
        bounds = np.sort(
            np.stack([combine_variance(c, d, u_low, log_b, kappa), combine_variance(c, d, u_high, log_b, kappa)]),
            axis=0,
        )
        return SmoothFit(
            name=self.name,
            params=self.params,
            variance=np.maximum(combine_variance(c, d, u_fit, log_b, kappa), 0.0),
            ci_low=np.maximum(bounds[0], 0.0),
            ci_high=bounds[1],
            confidence=self.confidence,
            per_run=prep["per_run"],
            timesteps=grid["timestep"],
            a_next=grid["a_next"],
            b_next=grid["b_next"],
            store_attrs=dict(ds.attrs),
            seeds=np.asarray(ds["seed"].values),
            smooth=True,
            curve_log_b=curve_log_b,
            curve_log_u=curve_log_u,
            curve_log_kappa=np.log(self._kappa_at(prep, curve_log_b)) if kappa is not None else None,
            smooth_model={
                "space": "output",
                "covariate": "log b",
                "gains": "solver probes",
                "multistep_correlation": "exp(-kappa(b) dlog b)" if kappa is not None else None,
            },
            gain=c,
            gain_previous=d,
            u=prep["u"].mean(axis=0),
            u_fit=u_fit,
            **extra,
        )

    def _fit_zero(self, ds: xr.Dataset, prep: dict[str, Any]) -> SmoothFit:
        zeros = np.zeros(len(prep["c"]))
        curve_b = np.array([prep["log_b"].min(), prep["log_b"].max()])
        prep = dict(prep, kappa_points=None)
        return self._result(ds, prep, zeros, zeros, zeros, curve_b, np.full(2, _LOG_ZERO), {})

    @staticmethod
    def _curve_grid(log_b: np.ndarray) -> np.ndarray:
        return np.linspace(log_b.min(), log_b.max(), CURVE_POINTS)


class SmoothGLMEstimator(_SmoothBase):
    """Gamma GLM (log link) of the output-space variance on a B-spline basis in ``log b``.

    Args:
        df: number of basis functions (capped at the number of usable steps).
        confidence: nominal level of the interval of the mean.
        cov_type: ``"cluster"`` (the default: runs as clusters, a sandwich covariance referred to t with
            ``runs - 1`` df; it stays honest when runs differ, as prompts, classes and seeds make them differ)
            or ``"nonrobust"`` (the GLM's own covariance, dispersion from Pearson's chi^2: it treats every
            (run, step) value as independent, and covered 78% at nominal 95% on runs with run-level effects,
            ``studies/coverage.py``). With one run the cluster covariance is undefined and the GLM's own is used.
        statistic: ``"first-order"`` or ``"lockstep"`` (module docstring; they differ for multistep solvers only).
    """

    name = "smooth-glm"
    fixed_params = {"model": "gamma-glm-log-link-bspline"}

    def __init__(
        self, df: int = 6, confidence: float = 0.95, cov_type: str = "cluster", statistic: str = "first-order"
    ):
        super().__init__(confidence, statistic)
        if df < 1:
            raise QDriftError(f"df must be >= 1, got {df}")
        if cov_type not in ("nonrobust", "cluster"):
            raise QDriftError(f"cov_type must be nonrobust or cluster, got {cov_type!r}")
        self.df = df
        self.cov_type = cov_type

    @storage_errors_as_qdrift
    def fit(self, store: xr.Dataset | str | Path) -> SmoothFit:
        ds = as_dataset(store)
        prep = self._prepare(ds)
        u, usable, log_b = prep["u"], prep["usable"], prep["log_b"]
        if not usable.any():
            return self._fit_zero(ds, prep)
        df = int(min(self.df, len(np.unique(log_b[usable]))))
        knots = spline_knots(log_b[usable], df)
        runs = u.shape[0]
        exog = np.tile(log_b_basis(log_b[usable], knots), (runs, 1))
        endog = u[:, usable].ravel()
        fit_kwargs: dict[str, Any] = {}
        if self.cov_type == "cluster" and runs >= 2:
            fit_kwargs = {"cov_type": "cluster", "cov_kwds": {"groups": np.repeat(np.arange(runs), usable.sum())}}
        unit = float(np.exp(np.mean(np.log(endog))))  # work near 1 whatever the units; undone below
        model = sm.GLM(endog / unit, exog, family=sm.families.Gamma(link=sm.families.links.Log()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = model.fit(**fit_kwargs)
            prediction = result.get_prediction(log_b_basis(log_b, knots))
            u_fit = np.asarray(prediction.predicted_mean) * unit
            exog_all = log_b_basis(log_b, knots)
            if "cov_type" in fit_kwargs:
                ci = self._cluster_interval(result, exog_all, runs) * unit
            else:
                ci = np.asarray(prediction.conf_int(alpha=1 - self.confidence)) * unit
            # simultaneous max-t band over the steps (studentized over the runs for the clustered covariance)
            try:
                band = (
                    np.exp(
                        np.stack(
                            linear_predictor_band(
                                exog_all,
                                np.asarray(result.params),
                                np.asarray(result.cov_params()),
                                runs if "cov_type" in fit_kwargs else None,
                                self.confidence,
                            ),
                            axis=1,
                        )
                    )
                    * unit
                )
            except np.linalg.LinAlgError:  # a degenerate covariance (e.g. one run of a few steps): no band
                band = np.full((len(exog_all), 2), np.nan)
            curve_b = self._curve_grid(log_b[usable])
            at_levels = np.log(np.asarray(result.predict(log_b_basis(log_b[usable], knots))) * unit)
            order = np.argsort(log_b[usable])
            curve_u = np.interp(curve_b, log_b[usable][order], at_levels[order])
        extra = {"df_used": df, "dispersion": float(result.scale), "usable": usable}
        fit = self._result(ds, prep, u_fit, ci[:, 0], ci[:, 1], curve_b, curve_u, extra)
        kappa = self._kappa_at(prep, prep["log_b"])
        bounds = np.sort(
            np.stack([combine_variance(prep["c"], prep["d"], band[:, j], prep["log_b"], kappa) for j in (0, 1)]), axis=0
        )
        fit.band_low, fit.band_high = np.maximum(bounds[0], 0.0), bounds[1]
        return fit

    def _cluster_interval(self, result, exog: np.ndarray, runs: int) -> np.ndarray:
        """``(steps, 2)`` interval of the mean from the run-clustered covariance, referred to t with ``runs - 1`` df.

        With 5 clusters the sandwich covariance is itself a noisy estimate; the normal quantile that
        statsmodels' prediction uses (it ignores the fit's ``df_resid_inference`` of ``runs - 1``) gave
        90-92% coverage for a nominal 95% on the testbed (``studies/coverage.py``). The interval is
        built on the link scale and mapped through ``exp``, as statsmodels does for the GLM's own one.
        """
        eta = exog @ np.asarray(result.params)
        se = np.sqrt(np.einsum("ij,jk,ik->i", exog, np.asarray(result.cov_params()), exog))
        q = stats.t.ppf(0.5 + self.confidence / 2, max(runs - 1, 1))
        return np.exp(np.stack([eta - q * se, eta + q * se], axis=1))


class SmoothLowessEstimator(_SmoothBase):
    """LOWESS of ``log u`` (output-space variance) against ``log b``, with a bootstrap over runs.

    Args:
        frac: LOWESS span (fraction of the usable steps in each local fit).
        iterations: LOWESS robustifying iterations (statsmodels ``it``).
        bootstrap: number of run resamples for the interval (0: no interval).
        confidence: nominal level of the interval.
        seed: seed of the bootstrap.
        statistic: ``"first-order"`` or ``"lockstep"`` (module docstring; they differ for multistep solvers only).
    """

    name = "smooth-lowess"

    def __init__(
        self,
        frac: float = 0.5,
        iterations: int = 1,
        bootstrap: int = 400,
        confidence: float = 0.95,
        seed: int = 0,
        statistic: str = "first-order",
    ):
        super().__init__(confidence, statistic)
        self.frac = frac
        self.iterations = iterations
        self.bootstrap = bootstrap
        self.seed = seed

    @storage_errors_as_qdrift
    def fit(self, store: xr.Dataset | str | Path) -> SmoothFit:
        ds = as_dataset(store)
        prep = self._prepare(ds)
        u, usable, log_b = prep["u"], prep["usable"], prep["log_b"]
        if not usable.any():
            return self._fit_zero(ds, prep)
        x = log_b[usable]
        log_u = np.log(u[:, usable].mean(axis=0))
        u_fit = np.exp(_lowess(x, log_u, log_b, self.frac, self.iterations))
        curve_b = self._curve_grid(x)
        curve_u = _lowess(x, log_u, curve_b, self.frac, self.iterations)
        runs = u.shape[0]
        low = high = np.full(len(log_b), np.nan)
        if runs >= 2 and self.bootstrap > 0:
            rng = np.random.default_rng(self.seed)
            draws = np.empty((self.bootstrap, len(log_b)))
            for j in range(self.bootstrap):
                pick = rng.integers(0, runs, runs)
                draws[j] = np.exp(
                    _lowess(x, np.log(u[pick][:, usable].mean(axis=0)), log_b, self.frac, self.iterations)
                )
            # Bootstrap standard error of log u, widened for few runs: the bootstrap's variance of a
            # mean over R runs is (R-1)/R of the unbiased one, and a Student-t quantile with R-1 df
            # replaces the normal one (a percentile interval covered ~87% at nominal 95% with 5 runs).
            se = np.std(np.log(draws), axis=0, ddof=1) * np.sqrt(runs / (runs - 1))
            half = stats.t.ppf(0.5 + self.confidence / 2, df=runs - 1) * se
            low, high = u_fit * np.exp(-half), u_fit * np.exp(half)
        return self._result(ds, prep, u_fit, low, high, curve_b, curve_u, {"usable": usable})
