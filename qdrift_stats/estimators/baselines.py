"""The peers as estimators, fitted on the same calibration stores: the published Q-Drift code and PTQD.

- :class:`PublishedEstimator` (``qdrift fit --estimator published``): what the authors' public code
  fits and applies (``sooyoung-ryu/Q-Drift``; re-implemented from its description, not copied):
  per step (keyed by the timestep, linearly interpolated between keys on another grid) and per
  channel, a 2-D Gaussian of ``(m_q, e)`` after trimming errors beyond 4 standard deviations
  (:func:`qdrift_stats.estimators.bias.conditional_gaussian`); the correction uses the conditional
  variance ``V = Var(e) (1 - rho^2)`` in output units, through the published step-size rescaling
  (:func:`qdrift_stats.correct.coefficients.published_coefficients`, form ``published``). The
  conditional-mean bias ``E[e | m_q]`` is off by default, as in the paper's runs (``bias=True``
  turns it on).
- :class:`PTQDEstimator` (``qdrift fit --estimator ptqd``): PTQD's correction for a deterministic
  sampler (He et al., NeurIPS 2023): per step, ``e = k m_fp + mu + r`` by least squares and the
  output mapped to ``(m_q - mu) / (1 + k)`` (correlated-noise and bias correction). PTQD's third part,
  removing the quantization variance from the injected noise, exists only for stochastic samplers;
  with the deterministic samplers here there is no noise to reduce, so the exported variance is 0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from qdrift_stats.estimators.base import Estimator, FittedEstimator, as_dataset, check_finite_store
from qdrift_stats.estimators.bias import TRIM_STD, channel_index, conditional_gaussian, conditional_output_map
from qdrift_stats.estimators.decomposed import output_regression, pooled_step_values, subsample_index
from qdrift_stats.record.store import storage_errors_as_qdrift


@dataclass
class PublishedFit(FittedEstimator):
    """A :class:`FittedEstimator` carrying the conditional output variance ``(steps, channels)`` (output units).

    Its estimator file asks for the ``published`` correction form by default and carries the
    ``output_variance`` tensor; ``variance`` is the first-order state-space equivalent
    ``gain_i^2 V_i``, for summaries and plots only.
    """

    output_variance: np.ndarray | None = None
    default_correction = "published"

    def export_tensors(self) -> dict[str, np.ndarray]:
        return {"output_variance": np.asarray(self.output_variance, dtype=np.float64)}


class PublishedEstimator(Estimator):
    """The published Q-Drift statistic: per-step, per-channel conditional variance of the output error.

    Args:
        bias: also export the conditional-mean bias (the published ``bias_scale = 1``); default off.
        trim: outlier rule, in standard deviations of the error.
        max_points: most values per step (a fixed random subsample beyond that).
        seed: seed of that subsample.
    """

    name = "published"
    confidence = 0.95

    def __init__(self, bias: bool = False, trim: float = TRIM_STD, max_points: int = 400_000, seed: int = 0):
        self.bias = bool(bias)
        self.trim = float(trim)
        self.max_points = max_points
        self.seed = seed

    @storage_errors_as_qdrift
    def fit(self, store: xr.Dataset | str | Path) -> FittedEstimator:
        ds = as_dataset(store)
        steps, runs = ds.sizes["step"], ds.sizes["run"]
        shape = tuple(ds["delta_out"].isel(step=0).shape)
        channel = channel_index(shape)
        index = subsample_index(ds, self.max_points, self.seed)
        if index is not None:
            channel = channel[index]
        pos = np.tile(channel, runs)
        V, ks, mus = [], [], []
        for i in range(steps):
            values = pooled_step_values(ds, ("delta_out", "out_fp"), i, index)
            check_finite_store(np.stack([values["delta_out"], values["out_fp"]]), "delta_out or out_fp")
            e = values["delta_out"].ravel()
            g = conditional_gaussian(values["out_fp"].ravel() + e, e, pos, self.trim)
            V.append(g.conditional_variance)
            k, mu = conditional_output_map(g)
            ks.append(k)
            mus.append(mu)
        V = np.stack(V)
        gain = np.asarray(ds["gain"].values, dtype=np.float64) if "gain" in ds.coords else np.ones(steps)
        variance = V * gain[:, None] ** 2  # the first-order state-space equivalent, for summaries
        nan = np.full_like(variance, np.nan)
        fields = {"k": np.stack(ks), "mu": np.stack(mus)} if self.bias else {}
        return PublishedFit.on_store(
            ds,
            self,
            variance,
            nan,
            nan.copy(),
            np.empty((0,)),
            smooth=True,  # timestep-keyed, linearly interpolated onto another grid, as published
            output_variance=V,
            **fields,
        )


class PTQDEstimator(Estimator):
    """PTQD for deterministic samplers: per-step ``k``, ``mu`` applied to the output, no variance term.

    Args:
        min_scale: smallest ``1 + k`` applied (below it the step is left uncorrected).
        max_points, seed: the regression's subsample (as the decomposed estimator).
    """

    name = "ptqd"
    confidence = 0.95

    def __init__(self, min_scale: float = 0.5, max_points: int = 200_000, seed: int = 0):
        self.min_scale = min_scale
        self.max_points = max_points
        self.seed = seed

    @storage_errors_as_qdrift
    def fit(self, store: xr.Dataset | str | Path) -> FittedEstimator:
        ds = as_dataset(store)
        steps = ds.sizes["step"]
        index = subsample_index(ds, self.max_points, self.seed)
        k, mu = np.zeros(steps), np.zeros(steps)
        for i in range(steps):
            values = pooled_step_values(ds, ("delta_out", "out_fp"), i, index)
            check_finite_store(np.stack([values["delta_out"], values["out_fp"]]), "delta_out or out_fp")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                k[i], mu[i], _, _, _ = output_regression(values["delta_out"], values["out_fp"])
            if 1.0 + k[i] < self.min_scale:
                k[i] = mu[i] = 0.0
        zeros = np.zeros(steps)
        return FittedEstimator.on_store(ds, self, zeros, zeros.copy(), zeros.copy(), np.empty((0,)), k=k, mu=mu)
