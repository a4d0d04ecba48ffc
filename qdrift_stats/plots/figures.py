"""Figures of the Q-Drift statistics: noise accumulation, the variance statistic, runs needed, diagnostics.

Every ``plot_*`` function takes xarray inputs (or objects with a ``to_dataset()``), draws on a new
:class:`matplotlib.figure.Figure` (no pyplot, so no global backend is touched; ``savefig``
renders with Agg) and returns it. :func:`save_figure` writes a PNG. Nothing here fits an
estimator, re-samples a pair or reads a store: the data come from :mod:`qdrift_stats.plots.datasets`
(or a Dataset saved from there).

Input layouts:

- accumulation: :func:`~qdrift_stats.plots.datasets.accumulation_dataset` (from a store recorded
  with ``--trajectories``, the pair and an estimator file);
- variance: :meth:`FittedEstimator.to_dataset() <qdrift_stats.estimators.base.FittedEstimator.to_dataset>`
  of any estimator (``variance``, optional ``ci_low``/``ci_high`` over ``step`` [``channel``],
  coordinate ``b_next``), or an :class:`~qdrift_stats.correct.estimator_file.EstimatorFile`;
- runs needed: a cross-validation Dataset (see :func:`plot_runs_needed`);
- diagnostics: a per-step diagnostics Dataset (see :func:`plot_diagnostics`).

Steps that land on ``b = 0`` (the usual last step) cannot sit on a log-``b`` axis; the plots over
``b`` leave them out and say so on the figure.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from qdrift_stats.errors import QDriftError
from qdrift_stats.plots.datasets import plot_data, variance_dataset

BAND = (0.1, 0.9)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
STYLES = ("-", "--", "-.", ":")
P_FLOOR = 1e-16  # p-values below are drawn at this floor


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` as an image (format from the suffix, PNG by default); returns the path."""
    path = Path(path)
    fig.savefig(path, dpi=dpi, format=path.suffix[1:] or "png")
    return path


def _title_from(attrs: dict[str, Any]) -> str:
    parts = [str(attrs[k]) for k in ("pair",) if attrs.get(k)]
    if attrs.get("scheduler"):
        parts.append(f"{attrs['scheduler']}, {attrs.get('steps', '?')} steps")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# noise accumulation
# ---------------------------------------------------------------------------------------------


def _quantiles(values: xr.DataArray, over: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median and the :data:`BAND` quantiles over the dims ``over`` (those present)."""
    dims = [d for d in over if d in values.dims]
    if not dims:
        v = values.values
        return v, v, v
    with warnings.catch_warnings():  # an all-NaN column (e.g. a test undefined at the last step) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        q = values.quantile([0.5, *BAND], dim=dims, skipna=True).values
    return q[0], q[1], q[2]


def _mean_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over axis 0 with a Student-t interval (NaN bounds with fewer than 2 rows)."""
    from scipy import stats

    n = values.shape[0]
    mean = values.mean(axis=0)
    if n < 2:
        return mean, np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    half = stats.t.ppf(0.5 + confidence / 2, df=n - 1) * values.std(axis=0, ddof=1) / np.sqrt(n)
    return mean, mean - half, mean + half


def plot_accumulation(acc: xr.Dataset, x: str = "b") -> Figure:
    """Noise accumulation along sampling, without and with the correction (two panels).

    Left, the paths: RMS distance of the Q (and corrected Q) state to the paired FP state after
    each step; median over runs and samples with a 10-90% band; the dashed line is one step's
    perturbation ``sqrt(v_i)`` for scale. Right, the spread: relative excess variance of the states
    over the FP sampler's, ``(var_x - var_fp) / var_fp`` in percent, mean over runs with a 95%
    t-interval over runs (what Q-Drift corrects: it restores the FP marginals, not the FP paths).

    Args:
        acc: from :func:`accumulation_dataset` (``dist_q`` required; ``dist_corrected``,
            ``var_*`` and ``per_step_rms`` drawn when present).
        x: ``"b"`` (the noise level each step lands on, log axis, decreasing left to right as
            sampling proceeds; the final step to ``b = 0`` is given in the legend) or ``"step"``.
    """
    if x not in ("b", "step"):
        raise QDriftError(f"x must be 'b' or 'step', got {x!r}")
    spread = all(v in acc for v in ("var_fp", "var_q"))
    fig = Figure(figsize=(12.0 if spread else 7.0, 4.6), layout="constrained")
    axes = fig.subplots(1, 2) if spread else [fig.add_subplot()]
    ax = axes[0]
    b_next = acc["b_next"].values
    keep = b_next > 0 if x == "b" else np.ones_like(b_next, dtype=bool)
    final = x == "b" and not keep.all()
    xs = b_next[keep] if x == "b" else acc["step"].values + 1
    form = acc.attrs.get("correction", "?")
    series = [("q", "quantized", COLORS[1], "-"), ("corrected", f"quantized + Q-Drift ({form})", COLORS[0], "--")]
    for name, label, color, style in series:
        if f"dist_{name}" not in acc:
            continue
        med, lo, hi = _quantiles(acc[f"dist_{name}"], ("run", "sample"))
        text = label + (f"; final step (b=0): {med[~keep][-1]:.3g}" if final else "")
        ax.plot(xs, med[keep], color=color, linestyle=style, label=text)
        ax.fill_between(xs, lo[keep], hi[keep], color=color, alpha=0.15, linewidth=0)
        ax.plot(xs, lo[keep], color=color, linewidth=0.5, linestyle=style, alpha=0.6)
        ax.plot(xs, hi[keep], color=color, linewidth=0.5, linestyle=style, alpha=0.6)
    if "per_step_rms" in acc:
        ax.plot(
            xs,
            acc["per_step_rms"].values[keep],
            color="0.4",
            linestyle=":",
            label=r"one step's perturbation $\sqrt{v_i}$",
        )
    ax.set_yscale("log")
    ax.set_ylabel("RMS distance to the paired FP state (state units)")
    ax.set_title("Paths: distance to the FP trajectory", fontsize=10)
    ax.legend(
        fontsize=8,
        title=f"median, {int(BAND[0] * 100)}-{int(BAND[1] * 100)}% band over runs x samples",
        title_fontsize=8,
    )
    if spread:
        ax = axes[1]
        var_fp = acc["var_fp"].values
        for name, label, color, style in series:
            if f"var_{name}" not in acc:
                continue
            rel = 100.0 * (acc[f"var_{name}"].values - var_fp) / var_fp
            mean, lo, hi = _mean_ci(rel)
            text = label + (f"; final step (b=0): {mean[~keep][-1]:+.2g}%" if final else "")
            ax.plot(xs, mean[keep], color=color, linestyle=style, label=text)
            if np.isfinite(lo).any():
                ax.fill_between(xs, lo[keep], hi[keep], color=color, alpha=0.15, linewidth=0)
        ax.axhline(0.0, color="0.3", linewidth=0.8, label="FP spread")
        ax.set_ylabel(r"excess spread $(\mathrm{var}_x - \mathrm{var}_{fp}) / \mathrm{var}_{fp}$ (%)")
        ax.set_title("Spread: variance over samples vs the FP sampler's", fontsize=10)
        ax.legend(fontsize=8, title=f"mean, 95% t-band over {acc.sizes['run']} runs", title_fontsize=8)
    for ax in axes:
        if x == "b":
            ax.set_xscale("log")
            ax.invert_xaxis()
            ax.set_xlabel(r"noise level after the step $b_{i+1}$ (sampling runs left to right)")
        else:
            ax.set_xlabel("steps done")
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle("Noise accumulation along sampling: " + _title_from(acc.attrs), fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# the variance statistic
# ---------------------------------------------------------------------------------------------


def _style(k: int) -> tuple[str, str]:
    """Colour and line style of the ``k``-th estimate: distinct pairs for the first 32."""
    return COLORS[k % len(COLORS)], STYLES[(k + k // len(COLORS)) % len(STYLES)]


def _label_of(ds: xr.Dataset, channels: bool) -> str:
    label = str(ds.attrs.get("estimator", "estimate"))
    if "channel" in ds["variance"].dims:
        label += f" (mean of {ds.sizes['channel']} channels" + ("; thin: each)" if channels else ")")
    return label


def plot_variance(estimates: Any | Sequence[Any], labels: Sequence[str] | None = None) -> Figure:
    """The per-step variance statistic ``v_i`` against ``b_{i+1}`` (log-log), one line per estimator.

    Args:
        estimates: one or several fitted estimators / estimator files / Datasets (see
            :func:`variance_dataset`). A per-channel estimate is drawn as its channel mean (the
            scalar-equivalent statistic) with its mean CI, and, when it is the only estimate,
            each channel as a thin line.
        labels: legend labels (default: the estimator names).

    Left panel: ``v_i`` with its confidence band (state units^2). Right panel: the relative
    strength ``gamma_i = v_i / b_{i+1}^2``; the drift form's pull coefficient ``gamma/2`` reaches 1
    (divergence) at ``gamma = 2`` (dotted line). Steps with ``b_{i+1} = 0`` are not shown (no
    correction there). Lower CI bounds of 0 are drawn at the bottom of the axis.
    """
    items = list(estimates) if isinstance(estimates, (list, tuple)) else [estimates]
    datasets = [variance_dataset(e) for e in items]
    if labels is not None and len(labels) != len(datasets):
        raise QDriftError(f"{len(labels)} labels for {len(datasets)} estimates")
    outside = len(datasets) > 4  # then one legend below both panels
    fig = Figure(figsize=(10.0, 4.4 + (0.25 * ((len(datasets) + 3) // 4) if outside else 0.0)), layout="constrained")
    ax_v, ax_g = fig.subplots(1, 2)
    floor = floor_g = np.inf
    dropped = 0
    for k, ds in enumerate(datasets):
        color, style = _style(k)
        b = ds["b_next"].values
        keep = b > 0
        dropped = max(dropped, int((~keep).sum()))
        per_channel = "channel" in ds["variance"].dims
        v = ds["variance"].values
        mean = v.mean(axis=1) if per_channel else v
        label = labels[k] if labels is not None else _label_of(ds, channels=len(datasets) == 1)
        positive = keep & (mean > 0)
        if not positive.any():
            continue
        floor = min(floor, float(mean[positive].min()))
        floor_g = min(floor_g, float((mean[positive] / b[positive] ** 2).min()))
        ax_v.plot(b[positive], mean[positive], color=color, linestyle=style, marker=".", markersize=3, label=label)
        ax_g.plot(
            b[positive],
            mean[positive] / b[positive] ** 2,
            color=color,
            linestyle=style,
            marker=".",
            markersize=3,
            label=label,
        )
        if per_channel and len(datasets) == 1:
            for c in range(v.shape[1]):
                ok = keep & (v[:, c] > 0)
                ax_v.plot(b[ok], v[ok, c], color=color, linewidth=0.5, alpha=0.35)
        if "ci_low" in ds and "ci_high" in ds:
            lo, hi = ds["ci_low"].values, ds["ci_high"].values
            if per_channel:
                lo, hi = lo.mean(axis=1), hi.mean(axis=1)
            band = positive & np.isfinite(lo) & np.isfinite(hi)
            if band.any():
                lo_shown = np.where(
                    lo[band] > 0, lo[band], mean[band] * 1e-3
                )  # a bound at 0 would be -inf on a log axis
                ax_v.fill_between(b[band], lo_shown, hi[band], color=color, alpha=0.2, linewidth=0)
                ax_g.fill_between(
                    b[band], lo_shown / b[band] ** 2, hi[band] / b[band] ** 2, color=color, alpha=0.2, linewidth=0
                )
    if not np.isfinite(floor):
        raise QDriftError("nothing to plot: every estimate is 0 or lands on b = 0")
    ax_v.set_ylim(bottom=floor / 3)  # a wide band of a noisy estimate does not squash the others
    ax_g.set_ylim(bottom=floor_g / 3)
    ax_g.axhline(2.0, color="0.3", linestyle=":", linewidth=1, label=r"$\gamma = 2$: drift pull $\gamma/2 = 1$")
    confidence = datasets[0].attrs.get("confidence")
    band_text = f"{int(round(float(confidence) * 100))}% CI band" if confidence else "CI band"
    for ax in (ax_v, ax_g):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel(r"noise level the step lands on $b_{i+1}$ (sampling runs left to right)")
    ax_v.set_ylabel(r"$v_i = E\,\|\Delta_i\|^2 / \mathrm{dim}$ (state units$^2$)")
    ax_g.set_ylabel(r"$\gamma_i = v_i / b_{i+1}^2$ (dimensionless)")
    ax_v.set_title(f"Variance statistic per step ({band_text})", fontsize=10)
    ax_g.set_title("Relative strength of the correction", fontsize=10)
    if outside:
        handles, texts = ax_v.get_legend_handles_labels()
        fig.legend(handles, texts, loc="outside lower center", ncols=4, fontsize=8)
        ax_g.legend(*[x[-1:] for x in ax_g.get_legend_handles_labels()], fontsize=8, loc="center left")
    else:
        ax_v.legend(fontsize=8, loc="upper right")
        ax_g.legend(fontsize=8, loc="center left")
    head = _title_from(datasets[0].attrs)
    if dropped:
        head += f"  ({dropped} step(s) landing on b = 0 not shown)"
    if head:
        fig.suptitle(head, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# runs needed (cross-validation over calibration runs)
# ---------------------------------------------------------------------------------------------


def plot_runs_needed(cv: xr.Dataset, tolerance: float | None = None) -> Figure:
    """Relative error of the fitted statistic against the number of calibration runs (a learning curve).

    Layout (what :func:`qdrift_stats.validate.crossval.cross_validate` writes): dims ``n_runs`` (coordinate:
    the number of calibration runs fitted) and ``repeat`` (random subsets of that many runs;
    NaN-padded), and the variable ``rel_error(n_runs, repeat[, ...])``, the relative error of an
    ``n_runs``-run estimate (dimensionless; further dims such as ``step`` are averaged). Optional
    attributes: ``tolerance`` (used when ``tolerance`` is not given, default 0.1), ``runs_needed``
    (the validating module's answer, which may lie beyond the curve by extrapolation),
    ``estimator``.

    Drawn (log-log): the median over repeats with a 10-90% band, a ``1/sqrt(n)`` guide through the
    first median, the ``confidence`` quantile over repeats (attribute ``confidence``, default 0.95) that
    decides, the tolerance line and the runs needed: the ``runs_needed`` attribute (with its interval
    ``runs_needed_low/high`` and "not enough runs to tell" when ``runs_needed_decided`` is 0), else the
    same rule, :func:`qdrift_stats.validate.runs_needed.needed_from_quantiles`, on the drawn quantile.
    """
    from qdrift_stats.validate.runs_needed import needed_from_quantiles

    if "rel_error" not in cv or "n_runs" not in cv["rel_error"].dims:
        raise QDriftError("a runs-needed Dataset needs the variable rel_error over the dims n_runs and repeat")
    err = cv["rel_error"]
    extra = [d for d in err.dims if d not in ("n_runs", "repeat")]
    if extra:
        err = err.mean(dim=extra)
    n = np.asarray(cv["n_runs"].values, dtype=float)
    med, lo, hi = _quantiles(err.transpose("n_runs", ...), ("repeat",))
    tol = float(tolerance if tolerance is not None else cv.attrs.get("tolerance", 0.1))
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(n, med, color=COLORS[0], marker="o", markersize=4, label="median over repeats")
    ax.fill_between(
        n,
        lo,
        hi,
        color=COLORS[0],
        alpha=0.2,
        linewidth=0,
        label=f"{int(BAND[0] * 100)}-{int(BAND[1] * 100)}% of repeats",
    )
    if np.isfinite(med[0]) and med[0] > 0:
        ax.plot(n, med[0] * np.sqrt(n[0] / n), color="0.5", linestyle="--", linewidth=1, label=r"$\propto 1/\sqrt{n}$")
    confidence = float(cv.attrs.get("confidence", 0.95))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-NaN padding rows
        decides = np.nanquantile(
            np.asarray(err.transpose("n_runs", ...).values).reshape(len(n), -1), confidence, axis=1
        )
    ax.plot(n, decides, color=COLORS[0], linestyle="-.", linewidth=1, label=f"{confidence:.0%} quantile (decides)")
    ax.axhline(tol, color=COLORS[1], linestyle=":", label=f"tolerance {tol:g}")
    same = tolerance is None or float(cv.attrs.get("tolerance", tol)) == tol
    given = cv.attrs.get("runs_needed") if same else None
    needed = int(given) if given is not None else needed_from_quantiles(n.astype(int), decides, tol)[0]
    undecided = same and int(cv.attrs.get("runs_needed_decided", 1)) == 0
    if same and "runs_needed_low" in cv.attrs:
        span = f"interval over the recorded runs {int(cv.attrs['runs_needed_low'])}-{int(cv.attrs['runs_needed_high'])}"
        prefix = "not enough runs to tell; " if undecided else ""
        ax.text(0.02, 0.02, prefix + span, transform=ax.transAxes, ha="left", va="bottom", color=COLORS[1], fontsize=8)
    if needed is not None and needed <= n[-1]:
        ax.axvline(needed, color=COLORS[1], linewidth=0.8, alpha=0.6)
        ax.annotate(
            f"{needed} run{'s' if needed > 1 else ''} needed",
            (needed, tol),
            xytext=(4, -12),
            textcoords="offset points",
            color=COLORS[1],
            fontsize=9,
        )
    else:
        text = (
            f"about {needed} runs needed (beyond the curve, extrapolated)"
            if needed is not None
            else f"not within {tol:g} up to {int(n[-1])} runs"
        )
        ax.text(0.98, 0.98, text, transform=ax.transAxes, ha="right", va="top", color=COLORS[1], fontsize=9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(n)
    ax.set_xticklabels([str(int(v)) for v in n])
    ax.set_xlabel("calibration runs fitted")
    ylabel = "relative error of the fitted statistic"
    if extra:
        ylabel += f" (mean over {', '.join(extra)})"
    ax.set_ylabel(ylabel)
    head = "Runs needed" + (f" ({cv.attrs['estimator']} estimator)" if cv.attrs.get("estimator") else "")
    sub = _title_from(cv.attrs)
    ax.set_title(head + (f"\n{sub}" if sub else ""), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    # below the axes: inside, the legend would cover the band it explains
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="outside lower center", ncols=3, frameon=False)
    return fig


# ---------------------------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------------------------


def _thresholds() -> dict[str, float]:
    """The regime thresholds of :mod:`qdrift_stats.validate.diagnostics` (its constants)."""
    from qdrift_stats.validate import diagnostics

    names = ("HEAVY_KURTOSIS", "CORRELATED_R2", "PARTLY_CORRELATED_R2", "LATTICE_FRACTION", "AUTOCORRELATED_REJECT")
    return {k: float(getattr(diagnostics, k)) for k in names}


# Per-step panels: (accepted variable names, title, y scale, y limits, reference lines [(value, label)]).
def _step_panels(t: dict[str, float]) -> tuple:
    return (
        (
            ("kurtosis", "excess_kurtosis"),
            "excess kurtosis of the per-step error",
            "linear",
            None,
            [
                (0.0, "0: Gaussian (sinusoid -1.5)"),
                (t["HEAVY_KURTOSIS"], f"{t['HEAVY_KURTOSIS']:g}: heavy-tailed above"),
            ],
        ),
        (
            ("jb_pvalue", "jarque_bera_pvalue"),
            "Jarque-Bera normality p-value",
            "log",
            None,
            [(0.05, "0.05: not Gaussian below")],
        ),
        (
            ("ljung_box_pvalue", "lb_pvalue"),
            "Ljung-Box p-value (autocorrelation)",
            "log",
            None,
            [(0.05, "0.05: autocorrelated below")],
        ),
        (
            ("r2", "r_squared"),
            r"$R^2$ of $m_q - m_{fp}$ on $m_{fp}$ (signal explains)",
            "linear",
            (0.0, 1.0),
            [
                (t["CORRELATED_R2"], f"{t['CORRELATED_R2']:g}: signal-correlated above"),
                (t["PARTLY_CORRELATED_R2"], f"{t['PARTLY_CORRELATED_R2']:g}: partly"),
            ],
        ),
        (
            ("lattice",),
            "distinct Q output values per value",
            "linear",
            (0.0, 1.05),
            [(t["LATTICE_FRACTION"], f"{t['LATTICE_FRACTION']:g}: rounded to a grid below")],
        ),
    )


# The y label of each per-step panel (units: the panels' titles say what is tested).
_PANEL_YLABELS = {
    "kurtosis": "excess kurtosis (0: Gaussian)",
    "excess_kurtosis": "excess kurtosis (0: Gaussian)",
    "jb_pvalue": "p-value (log scale)",
    "jarque_bera_pvalue": "p-value (log scale)",
    "ljung_box_pvalue": "p-value (log scale)",
    "lb_pvalue": "p-value (log scale)",
    "r2": "$R^2$ (fraction of variance)",
    "r_squared": "$R^2$ (fraction of variance)",
    "lattice": "distinct values / values",
}


def _verdict_lines(diag: xr.Dataset, width: int = 70) -> list[str]:
    """The diagnostics' reasons and caveats (JSON lists in the attributes), wrapped for a text panel."""
    import json
    import textwrap

    lines: list[str] = []
    for key, head in (("reasons", "Why"), ("caveats", "Caveats")):
        try:
            items = json.loads(diag.attrs.get(key, "[]"))
        except (TypeError, ValueError):
            continue
        if items:
            lines.append(f"{head}:")
            for item in items:
                lines.extend(textwrap.wrap(str(item), width, initial_indent="- ", subsequent_indent="  "))
    return lines


def plot_diagnostics(diag: xr.Dataset, x: str = "step") -> Figure:
    """Panels of the diagnostics of Q-Drift's noise assumption, one per diagnostic found.

    Layout: what :func:`qdrift_stats.validate.diagnostics.diagnose` returns. Per-step variables over
    ``step`` (coordinate ``b_next`` for ``x="b"``): ``kurtosis`` (excess kurtosis of the per-step
    error; 0 Gaussian), ``jb_pvalue`` (Jarque-Bera), ``r2`` (R^2 of ``m_q - m_fp`` on ``m_fp``),
    ``lattice`` (distinct Q output values per value), optionally ``ljung_box_pvalue`` per step.
    Ljung-Box across steps as the scalars ``lb_reject`` (fraction of sample trajectories whose
    standardised per-step errors the test rejects at 5%) and ``lag1_autocorr``: drawn as bars
    against the 5% a test rejects by chance. Further dims of a per-step variable (``run``,
    ``channel``, ...) are summarised by the median and a 10-90% band. Reference lines: the regime
    thresholds of :mod:`qdrift_stats.validate.diagnostics`. The attributes ``regime``, ``estimator`` and
    ``correction``, when present, are the figure's title; ``reasons`` and ``caveats`` (JSON lists)
    fill a free panel.

    Args:
        x: ``"step"`` or ``"b"`` (``b_next``, log axis; steps landing on 0 left out).
    """
    if x not in ("b", "step"):
        raise QDriftError(f"x must be 'b' or 'step', got {x!r}")
    if x == "b" and "b_next" not in diag.coords:
        raise QDriftError("x='b' needs the coordinate b_next")
    t = _thresholds()
    panels = []
    for names, title, scale, ylim, refs in _step_panels(t):
        name = next((n for n in names if n in diag and "step" in diag[n].dims), None)
        if name is not None:
            panels.append((name, title, scale, ylim, refs))
    across = [n for n in ("lb_reject", "lag1_autocorr") if n in diag and diag[n].ndim == 0]
    if not panels and not across:
        raise QDriftError(
            "the diagnostics Dataset has none of the variables kurtosis, jb_pvalue, r2, lattice, "
            "ljung_box_pvalue, lb_reject"
        )
    count = len(panels) + (1 if across else 0)
    ncols = 2 if count > 1 else 1
    nrows = (count + 1) // 2
    fig = Figure(figsize=(5.2 * ncols, 3.3 * nrows), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel()))
    for ax, (name, title, scale, ylim, refs) in zip(axes, panels):
        values = diag[name].transpose("step", ...)
        med, lo, hi = _quantiles(values, [d for d in values.dims if d != "step"])
        if x == "b":
            keep = diag["b_next"].values > 0
            xs = diag["b_next"].values[keep]
        else:
            keep = np.ones(values.sizes["step"], dtype=bool)
            xs = diag["step"].values if "step" in diag.coords else np.arange(values.sizes["step"])
        clipped = False
        if scale == "log":  # p-values: tiny ones are drawn at the floor
            finite = np.concatenate([med, lo])[np.isfinite(np.concatenate([med, lo]))]
            clipped = bool(finite.size and finite.min() < P_FLOOR)
            med, lo, hi = (np.where(np.isnan(a), np.nan, np.maximum(a, P_FLOOR)) for a in (med, lo, hi))
        ax.plot(
            xs, med[keep], color=COLORS[0], marker=".", markersize=3, label="median" if values.ndim > 1 else "per step"
        )
        if values.ndim > 1:
            others = " x ".join(f"{values.sizes[d]} {d}s" for d in values.dims if d != "step")
            ax.fill_between(
                xs,
                lo[keep],
                hi[keep],
                color=COLORS[0],
                alpha=0.2,
                linewidth=0,
                label=f"{int(BAND[0] * 100)}-{int(BAND[1] * 100)}% over {others}",
            )
        for k, (value, label) in enumerate(refs):
            ax.axhline(value, color=COLORS[1], linestyle=(":", "--")[k % 2], linewidth=1, label=label)
        ax.set_yscale(scale)
        if ylim is not None:
            ax.set_ylim(*ylim)
        if x == "b":
            ax.set_xscale("log")
            ax.invert_xaxis()
            ax.set_xlabel(r"noise level the step lands on $b_{i+1}$")
        else:
            ax.set_xlabel("step")
        ax.set_title(title + (f" (floored at {P_FLOOR:g})" if clipped else ""), fontsize=9)
        ax.set_ylabel(_PANEL_YLABELS.get(name, name), fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if across:
        ax = axes[len(panels)]
        # Two quantities of different units: the fraction of trajectories the test rejects (left axis,
        # 0..1) and the mean lag-1 autocorrelation (right axis, -1..1), each bar on its own scale.
        heights = {n: float(diag[n].values) for n in across}
        ticks: list[tuple[int, str]] = []
        if "lb_reject" in heights:
            h = heights["lb_reject"]
            ax.bar([0], [h], color=COLORS[0], width=0.5)
            ax.annotate(f"{h:.2f}", (0, h), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
            ax.axhline(
                0.05, color="0.3", linestyle=":", linewidth=1, label="0.05: rejected by chance under independence"
            )
            ax.axhline(
                t["AUTOCORRELATED_REJECT"],
                color=COLORS[1],
                linestyle="--",
                linewidth=1,
                label=f"{t['AUTOCORRELATED_REJECT']:g}: rejections above this: autocorrelated",
            )
            ticks.append((0, "Ljung-Box rejects\n(left axis)"))
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("fraction of trajectories rejected at 5%", fontsize=8)
        if "lag1_autocorr" in heights:
            h = heights["lag1_autocorr"]
            right = ax.twinx()
            right.bar([1], [h], color=COLORS[2], width=0.5)
            right.annotate(f"{h:.2f}", (1, h), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
            right.axhline(0.0, color="0.6", linewidth=0.8)
            right.set_ylim(-1.0, 1.0)
            right.set_ylabel("mean lag-1 autocorrelation (0: independent)", fontsize=8)
            ticks.append((1, "lag-1 autocorrelation\n(right axis)"))
        ax.set_xticks([x for x, _ in ticks])
        ax.set_xticklabels([label for _, label in ticks], fontsize=8)
        ax.set_xlim(-0.6, 1.6)
        lags = diag.attrs.get("lb_lags")
        ax.set_title(
            "Across steps: Ljung-Box test of each trajectory's errors" + (f" ({lags} lags)" if lags else ""), fontsize=9
        )
        ax.grid(True, axis="y", alpha=0.3)
        if "lb_reject" in heights:
            ax.legend(fontsize=7, loc="upper left")
    notes = _verdict_lines(diag)
    if count < len(axes) and notes:
        ax = axes[count]
        ax.axis("off")
        ax.text(0.0, 1.0, "\n".join(notes), va="top", ha="left", fontsize=7.5, transform=ax.transAxes, wrap=True)
        count += 1
    for ax in axes[count:]:
        ax.set_visible(False)
    head = "Diagnostics of the noise assumption"
    if diag.attrs.get("regime"):
        head += (
            f": {diag.attrs['regime']} (use the {diag.attrs.get('estimator', '?')} estimator, "
            f"{diag.attrs.get('correction', '?')} form)"
        )
    sub = _title_from(diag.attrs)
    fig.suptitle(head + (f"\n{sub}" if sub else ""), fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# from files (the command line's ``qdrift plot``)
# ---------------------------------------------------------------------------------------------


def plot_budget(budget: xr.Dataset) -> Figure:
    """The error budget (:func:`qdrift_stats.validate.budget.error_budget`): its parts, and where they arise.

    Left: each part's share of the predicted final mean square deviation from FP (bias, explained
    by the output, independent per-step variance, persistence, interaction). Right, per step: the
    propagated per-step mean bias ``P_i^2 * bias_i``, the independent variance ``P_i^2 v_i`` and the
    persistence cross term (``cross_step``), on a symmetric log scale.
    """
    needed = ("total", "bias", "explained_ptqd", "independent", "persistence", "interaction", "P", "v")
    missing = [n for n in needed if n not in budget]
    if missing:
        raise QDriftError(f"not an error budget: lacks {', '.join(missing)}")
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, 2])
    labels = ["bias", "explained\n(PTQD)", "independent", "persistence", "interaction"]
    names = ["bias", "explained_ptqd", "independent", "persistence", "interaction"]
    total = float(budget["total"].values)
    shares = [float(budget[n].values) / total if total > 0 else np.nan for n in names]
    left.bar(labels, shares, color=["C3", "C1", "C0", "C2", "0.6"])
    left.axhline(0, color="0.3", lw=0.8)
    left.set_ylabel("share of the final mean square deviation")
    left.tick_params(axis="x", labelsize=8, labelrotation=35)
    ratio = float(budget["persistence_ratio"].values) if "persistence_ratio" in budget else float("nan")
    left.set_title(f"accumulated / independent = {ratio:.2f}", fontsize=9)
    step = budget["step"].values
    P2 = budget["P"].values ** 2
    right.plot(step, P2 * budget["bias_step"].values, label="mean bias (propagated)", color="C3")
    right.plot(step, P2 * budget["v"].values, label="independent variance", color="C0")
    right.plot(step, budget["cross_step"].values, label="persistence (cross term)", color="C2")
    right.set_yscale("symlog", linthresh=max(1e-12, float(np.nanmax(P2 * budget["v"].values)) * 1e-3))
    right.set_xlabel("step")
    right.set_ylabel("contribution (final-state units$^2$)")
    right.legend(fontsize=8)
    a = budget.attrs
    fig.suptitle(f"error budget: {a.get('pair')}, {a.get('scheduler')}, {a.get('steps')} steps", fontsize=10)
    return fig


def figure_for(
    kind: str,
    source: str | Path,
    *,
    estimator: str | Path | None = None,
    pair: str | None = None,
    fits: Sequence[str] = (),
    x: str | None = None,
) -> Figure:
    """The figure ``qdrift plot KIND SOURCE`` draws: :func:`~qdrift_stats.plots.datasets.plot_data`, then ``plot_*``.

    Args:
        kind: one of :data:`~qdrift_stats.plots.datasets.PLOT_KINDS`.
        source: ``accumulation``: a store recorded with ``--trajectories``; ``variance``: a store
            (fitted with the registered estimators named in ``fits``, ``("all",)`` for every one,
            default :data:`~qdrift_stats.plots.datasets.DEFAULT_VARIANCE_FITS`) or an estimator file;
            ``runs-needed`` / ``diagnostics``: a saved Dataset, or a store (computed).
        estimator: an estimator file; required for ``accumulation`` (the correction), added to
            the comparison for ``variance``.
        pair: ``MODULE:FACTORY`` for ``accumulation`` (required: a pair is never loaded from the store).
        x: ``"b"`` or ``"step"`` for the plots that offer both.
    """
    if kind == "budget":
        from qdrift_stats.validate.budget import error_budget

        return plot_budget(error_budget(source))
    data = plot_data(kind, source, estimator=estimator, pair=pair, fits=fits)
    if kind == "accumulation":
        return plot_accumulation(data, x=x or "b")
    if kind == "variance":
        return plot_variance(data)
    if kind == "runs-needed":
        return plot_runs_needed(data)
    return plot_diagnostics(data, x=x or "step")


__all__ = [
    "plot_accumulation",
    "plot_variance",
    "plot_runs_needed",
    "plot_diagnostics",
    "plot_budget",
    "save_figure",
    "figure_for",
]
