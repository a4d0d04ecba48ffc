"""The data behind the figures, computed apart from drawing them: xarray Datasets that save and reload.

Everything that fits an estimator, re-samples a pair or reads a store lives here; the ``plot_*``
functions of :mod:`qdrift_stats.plots.figures` only draw what these return (or a Dataset saved
from them), so a figure can be redrawn without recomputing it.

- :func:`accumulation_dataset`: noise accumulation along sampling, with and without the correction;
- :func:`variance_dataset`: the per-step statistic of one fitted estimator or estimator file;
- :func:`store_variance_datasets`: the statistic of several registered estimators fitted on a store;
- :func:`runs_needed_dataset` and :func:`diagnostics_dataset`: the learning curve and the
  diagnostics of a store (from :mod:`qdrift_stats.validate`);
- :func:`plot_data`: what ``qdrift plot KIND SOURCE`` draws, read from a saved Dataset or computed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from qdrift_stats.errors import QDriftError

PLOT_KINDS: tuple[str, ...] = ("accumulation", "variance", "runs-needed", "diagnostics")
# Fitted by 'qdrift plot variance STORE' without --fit: cheap ones (no model calls), one of each kind.
DEFAULT_VARIANCE_FITS: tuple[str, ...] = ("empirical", "first-order", "decomposed", "smooth-glm", "robust")


# ---------------------------------------------------------------------------------------------
# noise accumulation
# ---------------------------------------------------------------------------------------------


def accumulation_dataset(
    pair: Any,
    store: xr.Dataset | str | Path,
    estimator: Any,
    *,
    correction: str | None = None,
    strength: float | None = None,
    runs: int | None = None,
) -> xr.Dataset:
    """How quantization noise accumulates along sampling, without and with Q-Drift, per run and step.

    For each run of ``store`` (recorded with ``--trajectories``) the corrected, free-running Q
    trajectory is re-sampled from the run's seed (same initial noise and conditions as the
    recording) with :func:`~qdrift_stats.loop.run_sampler` and the estimator's
    :class:`~qdrift_stats.correct.corrector.Corrector`; the stored ``traj_fp`` and ``traj_q`` give the FP
    and uncorrected Q trajectories. The first FP and Q steps of each run are recomputed and
    compared with the store (two extra model calls per run) so that a different pair is refused.
    One run is held in memory at a time.

    Args:
        pair: the model pair the store was recorded with, or its ``MODULE:FACTORY`` spec.
        store: calibration store path or Dataset with ``traj_fp`` and ``traj_q``.
        estimator: :class:`~qdrift_stats.correct.estimator_file.EstimatorFile` or its path, fitted on this grid.
        correction, strength: override the file's correction form and strength.
        runs: use only the first ``runs`` runs (default all).

    Returns:
        Dataset with, for the states after each step: ``dist_q``, ``dist_corrected``
        ``(run, step, sample)``, the pathwise distance to the paired FP state (RMS over the sample
        dims of ``x_q - x_fp``, resp. corrected; state units); ``var_fp``, ``var_q``,
        ``var_corrected`` ``(run, step)``, the spread of the states (variance over the run's
        samples averaged over the sample dims, state units^2; Q-Drift aims to make
        ``var_corrected`` equal ``var_fp``, not the paths equal); ``per_step_rms(step)``, the
        estimator's ``sqrt(v_i)`` (channel mean for a per-channel one), state units; coordinates
        ``seed(run)``, ``timestep, b, b_next(step)``; attributes pair, scheduler, steps,
        correction, strength, estimator.

    Raises:
        QDriftError: the store has no trajectories, or the pair does not reproduce its FP trajectory.
    """
    import torch

    from qdrift_stats.correct.estimator_file import EstimatorFile
    from qdrift_stats.estimators.base import as_dataset
    from qdrift_stats.loop import initial_noise, prepared_scheduler, run_sampler, scale_model_input
    from qdrift_stats.pair import check_pair, load_pair
    from qdrift_stats.schedulers.base import step_grid, step_kwargs

    ds = as_dataset(store)
    if any(v not in ds for v in ("traj_fp", "traj_q")):
        raise QDriftError("the store has no trajectories; record it with 'qdrift record ... --trajectories'")
    if isinstance(pair, str):
        pair = load_pair(pair)
    check_pair(pair)
    est = estimator if isinstance(estimator, EstimatorFile) else EstimatorFile.load(estimator)
    attrs = dict(ds.attrs)
    if tuple(pair.sample_shape) != tuple(ds["traj_fp"].shape[3:]):
        raise QDriftError(
            f"the pair's samples are {tuple(pair.sample_shape)}, the store's "
            f"{tuple(ds['traj_fp'].shape[3:])}: not the recorded pair"
        )
    if runs is not None:
        ds = ds.isel(run=slice(0, runs))
    scheduler_name, steps, batch = str(attrs["scheduler"]), int(attrs["steps"]), int(attrs["batch_size"])
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("dist_q", "dist_corrected", "var_fp", "var_q", "var_corrected")}
    for r, seed in enumerate(ds["seed"].values):
        scheduler = prepared_scheduler(pair, scheduler_name, steps)
        x, cond = initial_noise(pair, scheduler, batch, int(seed))
        traj_fp = ds["traj_fp"].isel(run=r).values
        traj_q = ds["traj_q"].isel(run=r).values
        with torch.no_grad():
            # The first FP and Q steps must reproduce the recorded trajectories, else the distances lie.
            for model, recorded in ((pair.fp, traj_fp), (pair.q, traj_q)):
                check = prepared_scheduler(pair, scheduler_name, steps)
                t0 = check.timesteps[0]
                first = check.step(
                    model(scale_model_input(check, x, t0), t0, **cond), t0, x, **step_kwargs(check), return_dict=False
                )[0]
                tol = 1e-2 if recorded.dtype == np.float16 else 1e-4
                if not np.allclose(
                    first.float().cpu().numpy(),
                    recorded[0].astype(np.float32),
                    rtol=tol,
                    atol=tol * float(np.abs(recorded[0]).max()),
                ):
                    raise QDriftError(
                        "the pair does not reproduce the store's trajectories at seed "
                        f"{int(seed)}: not the recorded pair or scheduler"
                    )
            corrector = est.corrector(
                scheduler, correction=correction, strength=strength, device=x.device, dtype=x.dtype
            )
            states: list[np.ndarray] = []
            run_sampler(
                pair.q,
                scheduler,
                x,
                cond,
                corrector=corrector,
                callback=lambda s, states=states: states.append(s["x_next"].float().cpu().numpy()),
            )
        flat = {  # (steps, batch, dim) float64
            "fp": traj_fp.reshape(steps, batch, -1).astype(np.float64),
            "q": traj_q.reshape(steps, batch, -1).astype(np.float64),
            "corrected": np.stack(states).reshape(steps, batch, -1).astype(np.float64),
        }
        for name in ("q", "corrected"):
            out[f"dist_{name}"].append(np.sqrt(((flat[name] - flat["fp"]) ** 2).mean(axis=2)))
        for name, value in flat.items():
            out[f"var_{name}"].append(value.var(axis=1).mean(axis=1))
    grid = step_grid(prepared_scheduler(pair, scheduler_name, steps))
    variance = est.variance_on(grid)
    per_step = np.sqrt(variance if variance.ndim == 1 else variance.mean(axis=1))
    form = correction or est.metadata["correction"]["form"]
    lam = est.metadata["correction"].get("strength", 1.0) if strength is None else strength
    data = {
        name: (("run", "step", "sample") if name.startswith("dist") else ("run", "step"), np.stack(values))
        for name, values in out.items()
    }
    data["per_step_rms"] = (("step",), per_step)
    acc = xr.Dataset(
        data,
        coords={
            "seed": ("run", ds["seed"].values),
            "step": ds["step"].values,
            "timestep": ("step", ds["timestep"].values),
            "b": ("step", ds["b"].values),
            "b_next": ("step", ds["b_next"].values),
        },
        attrs={
            "pair": attrs.get("pair", ""),
            "scheduler": scheduler_name,
            "steps": steps,
            "correction": form,
            "strength": float(lam),
            "estimator": str(est.metadata["estimator"].get("name")),
        },
    )
    for name in ("dist_q", "dist_corrected", "per_step_rms"):
        acc[name].attrs["units"] = "state units"
    for name in ("var_fp", "var_q", "var_corrected"):
        acc[name].attrs["units"] = "state units^2"
    return acc


# ---------------------------------------------------------------------------------------------
# the variance statistic
# ---------------------------------------------------------------------------------------------


def variance_dataset(estimate: Any) -> xr.Dataset:
    """A Dataset with ``variance`` (and CI bounds) over ``step`` [``channel``] with coordinate ``b_next``.

    Accepts a :class:`~qdrift_stats.estimators.base.FittedEstimator` (or anything with
    ``to_dataset()``), an :class:`~qdrift_stats.correct.estimator_file.EstimatorFile`, or such a Dataset.
    """
    from qdrift_stats.correct.estimator_file import EstimatorFile

    if isinstance(estimate, xr.Dataset):
        ds = estimate
    elif isinstance(estimate, EstimatorFile):
        t = estimate.tensors
        dims = ("step", "channel") if t["variance"].ndim == 2 else ("step",)
        data = {k: (dims, t[k]) for k in ("variance", "ci_low", "ci_high") if k in t}
        meta = estimate.metadata
        ds = xr.Dataset(
            data,
            coords={
                "step": np.arange(len(t["timesteps"])),
                "timestep": ("step", t["timesteps"]),
                "b_next": ("step", t["b_next"]),
            },
            attrs={
                "estimator": meta["estimator"].get("name"),
                "pair": meta.get("provenance", {}).get("pair", ""),
                "scheduler": meta["scheduler"].get("name"),
                "steps": meta.get("steps"),
            },
        )
    elif hasattr(estimate, "to_dataset"):
        ds = estimate.to_dataset()
        store_attrs = getattr(estimate, "store_attrs", {}) or {}
        ds.attrs.update({k: store_attrs[k] for k in ("pair", "scheduler", "steps") if k in store_attrs})
    else:
        raise QDriftError(f"cannot plot the variance of a {type(estimate).__name__}")
    if "variance" not in ds or "b_next" not in ds.coords:
        raise QDriftError("a variance Dataset needs the variable 'variance' and the coordinate 'b_next'")
    return ds


def store_variance_datasets(store: xr.Dataset | str | Path, fits: Sequence[str] = ()) -> list[xr.Dataset]:
    """The statistic of registered estimators fitted on a calibration store, one Dataset each.

    ``fits``: estimator names (:data:`~qdrift_stats.estimators.ESTIMATORS`); ``("all",)`` for every
    registered one; empty for :data:`DEFAULT_VARIANCE_FITS`. An estimator asked for by name must
    fit; a default or ``"all"`` one that does not apply to the store is left out.
    """
    from qdrift_stats.estimators import ESTIMATORS, get_estimator
    from qdrift_stats.estimators.base import as_dataset

    ds = as_dataset(store)
    everything = list(fits) == ["all"]
    names = list(ESTIMATORS) if everything else list(fits) or [n for n in DEFAULT_VARIANCE_FITS if n in ESTIMATORS]
    out = []
    for name in names:
        try:
            fitted = get_estimator(name).fit(ds)
        except QDriftError:
            if fits and not everything:
                raise
            continue  # an estimator that does not apply to this store (a default or 'all' choice)
        out.append(variance_dataset(fitted).assign_attrs(estimator=name))
    return out


# ---------------------------------------------------------------------------------------------
# runs needed and diagnostics of a store
# ---------------------------------------------------------------------------------------------


def runs_needed_dataset(store: xr.Dataset | str | Path, estimator: Any = "first-order", tolerance: float = 0.1):
    """The learning curve of a store (no strength search), with its ``runs_needed`` answer as attributes.

    See :func:`qdrift_stats.validate.crossval.runs_needed_dataset`.
    """
    from qdrift_stats.validate.crossval import runs_needed_dataset as compute

    return compute(store, estimator=estimator, tolerance=tolerance)


def diagnostics_dataset(store: xr.Dataset | str | Path) -> xr.Dataset:
    """The per-step diagnostics of a store (:func:`qdrift_stats.validate.diagnostics.diagnose`)."""
    from qdrift_stats.validate.diagnostics import diagnose

    return diagnose(store)


# ---------------------------------------------------------------------------------------------
# from files (the command line's ``qdrift plot``)
# ---------------------------------------------------------------------------------------------


def is_store(path: Path) -> bool:
    """Whether ``path`` is a calibration store (a zarr folder with the store's schema attribute)."""
    from qdrift_stats.record.store import SCHEMA

    if not path.is_dir():
        return False
    try:
        import zarr

        return zarr.open_group(path, mode="r").attrs.get("qdrift_schema") == SCHEMA
    except Exception:
        return False


def open_result(path: str | Path) -> xr.Dataset:
    """A results Dataset saved as zarr (a folder) or netCDF (a file)."""
    path = Path(path)
    if not path.exists():
        raise QDriftError(f"{path} does not exist")
    try:
        if not path.is_dir():
            return xr.open_dataset(path)
        with warnings.catch_warnings():  # results saved without consolidated metadata read fine
            warnings.simplefilter("ignore", RuntimeWarning)
            return xr.open_zarr(path)
    except Exception as exc:
        raise QDriftError(f"{path} is not a readable zarr or netCDF dataset ({type(exc).__name__})") from None


def plot_data(
    kind: str,
    source: str | Path,
    *,
    estimator: str | Path | None = None,
    pair: str | None = None,
    fits: Sequence[str] = (),
) -> Any:
    """What ``qdrift plot KIND SOURCE`` draws (see :func:`qdrift_stats.plots.figures.figure_for`).

    Returns an accumulation Dataset, a list of variance Datasets / estimator files, a runs-needed
    Dataset or a diagnostics Dataset: read from ``source`` when it is a saved Dataset, computed
    when it is a calibration store.
    """
    source = Path(source)
    if kind not in PLOT_KINDS:
        raise QDriftError(f"unknown plot kind {kind!r}; choose one of {', '.join(PLOT_KINDS)}")
    if not source.exists():
        raise QDriftError(f"{source} does not exist")
    if kind == "accumulation":
        from qdrift_stats.record.store import store_attrs

        if estimator is None:
            raise QDriftError("'qdrift plot accumulation' needs --estimator EST.safetensors (the correction to apply)")
        if not pair:  # a pair is code: never imported from the store's 'pair' attribute
            from qdrift_stats.pair import recorded_pair_hint

            raise QDriftError(recorded_pair_hint(store_attrs(source).get("pair"), "'qdrift plot accumulation'"))
        return accumulation_dataset(pair, source, estimator)
    if kind == "variance":
        from qdrift_stats.correct.estimator_file import EstimatorFile

        estimates: list[Any] = []
        if source.suffix == ".safetensors":
            estimates.append(EstimatorFile.load(source))
        else:
            from qdrift_stats.record.store import open_store

            estimates.extend(store_variance_datasets(open_store(source), fits))
        if estimator is not None:
            estimates.append(EstimatorFile.load(estimator))
        if not estimates:
            raise QDriftError(f"no estimator could be fitted to {source}")
        return estimates
    if not is_store(source):
        return open_result(source)
    return runs_needed_dataset(source) if kind == "runs-needed" else diagnostics_dataset(source)


__all__ = [
    "DEFAULT_VARIANCE_FITS",
    "PLOT_KINDS",
    "accumulation_dataset",
    "diagnostics_dataset",
    "is_store",
    "open_result",
    "plot_data",
    "runs_needed_dataset",
    "store_variance_datasets",
    "variance_dataset",
]
