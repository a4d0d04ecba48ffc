"""Plots: each figure function draws the expected axes and lines from small inputs; ``qdrift plot`` writes them."""

import importlib.util

import numpy as np
import pytest
import xarray as xr

from qdrift_stats import plots, testbed
from qdrift_stats.cli import main
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators import EmpiricalEstimator, FittedEstimator
from qdrift_stats.record.lockstep import record
from qdrift_stats.record.store import open_store

from .conftest import VP_PAIR

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def traj_store(tmp_path_factory):
    """3 runs x 16 samples, 8 Euler steps, with trajectories; and its drift estimator file."""
    folder = tmp_path_factory.mktemp("plots")
    store, est = folder / "calib.zarr", folder / "est.safetensors"
    record(
        testbed.mixture_vp_noise(),
        store,
        pair_name=VP_PAIR,
        scheduler_name="euler",
        steps=8,
        runs=3,
        batch_size=16,
        seed=0,
        trajectories=True,
    )
    EmpiricalEstimator().fit(store).export(est, correction="drift")
    return store, est


def legend_texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_accumulation_dataset_measures_the_stored_trajectories(traj_store):
    store, est = traj_store
    acc = plots.accumulation_dataset(VP_PAIR, store, est)
    assert acc["dist_q"].dims == ("run", "step", "sample") and acc["dist_q"].shape == (3, 8, 16)
    assert acc["var_q"].dims == ("run", "step") and acc["per_step_rms"].dims == ("step",)
    ds = open_store(store).load()
    want = np.sqrt(((ds["traj_q"].astype("float64") - ds["traj_fp"].astype("float64")) ** 2).mean("channel")).values
    np.testing.assert_allclose(acc["dist_q"].values, want, rtol=1e-12)
    np.testing.assert_allclose(
        acc["var_fp"].values, ds["traj_fp"].astype("float64").var("sample").mean("channel").values, rtol=1e-12
    )
    # strength 0: the corrected sampler is the plain Q sampler, so it reproduces the stored Q trajectory
    zero = plots.accumulation_dataset(VP_PAIR, store, est, strength=0.0)
    np.testing.assert_allclose(zero["dist_corrected"].values, zero["dist_q"].values, rtol=1e-6, atol=1e-7)


def test_accumulation_figure_has_the_path_and_spread_panels(traj_store):
    store, est = traj_store
    acc = plots.accumulation_dataset(VP_PAIR, store, est)
    fig = plots.plot_accumulation(acc)
    paths, spread = fig.axes
    assert paths.get_xscale() == "log" and paths.get_yscale() == "log" and paths.xaxis_inverted()
    labels = legend_texts(paths)
    assert (
        any(t.startswith("quantized;") for t in labels)
        and any("Q-Drift (drift)" in t for t in labels)
        and any("sqrt" in t for t in labels)
    )
    assert "final step (b=0)" in labels[0]
    assert "state units" in paths.get_ylabel() and "%" in spread.get_ylabel()
    assert len(legend_texts(spread)) == 3
    by_step = plots.plot_accumulation(acc, x="step")
    assert by_step.axes[0].get_xscale() == "linear" and by_step.axes[0].get_xlabel() == "steps done"


def test_accumulation_needs_trajectories_and_the_recorded_pair(small_store, traj_store):
    _, est = traj_store
    with pytest.raises(QDriftError, match="--trajectories"):
        plots.accumulation_dataset(VP_PAIR, small_store, est)
    with pytest.raises(QDriftError, match="not the recorded pair"):
        plots.accumulation_dataset("qdrift_stats.testbed:mixture_vp_exact", traj_store[0], est)


def test_variance_figure_draws_any_fitted_estimator_with_its_band(traj_store):
    store, est = traj_store
    scalar = EmpiricalEstimator().fit(store)
    per_channel = EmpiricalEstimator(per_channel=True).fit(store)
    # any FittedEstimator works, e.g. one without an interval
    bare = FittedEstimator(
        name="custom",
        params={},
        variance=scalar.variance * 2,
        ci_low=np.full(8, np.nan),
        ci_high=np.full(8, np.nan),
        confidence=0.9,
        per_run=np.empty((0,)),
        timesteps=scalar.timesteps,
        a_next=scalar.a_next,
        b_next=scalar.b_next,
        store_attrs=scalar.store_attrs,
        seeds=scalar.seeds,
    )
    fig = plots.plot_variance([scalar, per_channel, bare, EstimatorFile.load(est)])
    ax_v, ax_g = fig.axes
    for ax in (ax_v, ax_g):
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    labels = legend_texts(ax_v)
    assert labels == ["empirical", "empirical (mean of 8 channels)", "custom", "empirical"]
    assert len(ax_v.collections) == 3  # CI bands: all but the estimate without an interval
    assert any("gamma" in t for t in legend_texts(ax_g))
    assert "not shown" in fig._suptitle.get_text()  # the last step lands on b = 0
    alone = plots.plot_variance(per_channel)
    assert len(alone.axes[0].lines) == 1 + 8  # the channel mean and each channel


def cv_dataset():
    n = np.array([1, 2, 4, 8, 16])
    rng = np.random.default_rng(0)
    err = 0.3 / np.sqrt(n)[:, None] * rng.lognormal(0, 0.2, size=(5, 20))
    return xr.Dataset(
        {"rel_error": (("n_runs", "repeat"), err)},
        coords={"n_runs": n, "repeat": np.arange(20)},
        attrs={"tolerance": 0.1},
    )


def test_runs_needed_figure_marks_the_tolerance_and_the_runs_needed():
    fig = plots.plot_runs_needed(cv_dataset())
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    (legend,) = fig.legends  # below the axes, so that it covers neither the band nor the curve
    labels = [t.get_text() for t in legend.get_texts()]
    assert "median over repeats" in labels and "tolerance 0.1" in labels
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    # the rule of validate.runs_needed, written out: smallest n from which on the 95% quantile <= 0.1
    cv = cv_dataset()
    q = np.quantile(cv["rel_error"].values, 0.95, axis=1)
    n = cv["n_runs"].values
    expected = next((int(n[k]) for k in range(len(n)) if np.all(q[k:] <= 0.1)), None)
    texts = [t.get_text() for t in ax.texts]
    if expected is not None:
        assert texts == [f"{expected} runs needed"]
    else:
        assert len(texts) == 1 and "extrapolated" in texts[0]
    assert "95% quantile (decides)" in labels
    # at tolerance 0.2 the 95% quantiles (0.37, 0.28, 0.22, 0.15, 0.10) first stay within from n = 8
    (ax,) = plots.plot_runs_needed(cv, tolerance=0.2).axes
    assert [t.get_text() for t in ax.texts] == ["8 runs needed"]
    with pytest.raises(QDriftError, match="rel_error"):
        plots.plot_runs_needed(xr.Dataset({"other": ("x", [1.0])}))


def test_runs_needed_beyond_the_curve_is_said_in_words():
    cv = cv_dataset().assign_attrs(tolerance=0.01, runs_needed=40)
    (ax,) = plots.plot_runs_needed(cv).axes
    assert [t.get_text() for t in ax.texts] == ["about 40 runs needed (beyond the curve, extrapolated)"]


def diagnostics_dataset(names, scalars=True):
    rng = np.random.default_rng(1)
    data = {name: (("step", "run"), rng.uniform(0.001, 1.0, size=(6, 4))) for name in names}
    if scalars:
        data.update({"lb_reject": ((), 0.3), "lag1_autocorr": ((), 0.1)})
    attrs = {
        "regime": "noise-like",
        "estimator": "empirical",
        "correction": "shrink",
        "reasons": '["light tails"]',
        "caveats": "[]",
    }
    return xr.Dataset(data, coords={"step": np.arange(6), "b_next": ("step", np.linspace(2.0, 0.0, 6))}, attrs=attrs)


def test_diagnostics_figure_has_one_panel_per_diagnostic():
    fig = plots.plot_diagnostics(diagnostics_dataset(["kurtosis", "jb_pvalue", "r2", "lattice"]))
    *grid, twin = fig.axes  # the 3 x 2 panels, then the Ljung-Box panel's right axis
    visible = [ax for ax in grid if ax.get_visible()]
    assert len(visible) == 6  # 4 per-step panels, the Ljung-Box bars, the reasons
    assert [ax.get_yscale() for ax in visible[:4]] == ["linear", "log", "linear", "linear"]
    assert all(ax.get_ylabel() for ax in visible[:4])  # every panel says what its y axis is
    assert "Jarque-Bera" in visible[1].get_title() and "Ljung-Box" in visible[4].get_title()
    # the two across-step quantities have different units: one bar on each axis, each axis labelled
    assert len(visible[4].patches) == 1 and len(twin.patches) == 1
    assert "fraction" in visible[4].get_ylabel() and "autocorrelation" in twin.get_ylabel()
    assert twin.get_ylim() == (-1.0, 1.0) and visible[4].get_ylim() == (0.0, 1.0)
    assert "light tails" in visible[5].texts[0].get_text()
    assert "noise-like" in fig._suptitle.get_text()
    two = plots.plot_diagnostics(diagnostics_dataset(["kurtosis", "ljung_box_pvalue"], scalars=False), x="b")
    assert len([ax for ax in two.axes if ax.get_visible()]) == 2 and two.axes[0].get_xscale() == "log"
    with pytest.raises(QDriftError, match="none of the variables"):
        plots.plot_diagnostics(diagnostics_dataset(["something_else"], scalars=False))


@pytest.mark.skipif(
    importlib.util.find_spec("qdrift_stats.validate.diagnostics") is None, reason="no diagnostics module"
)
def test_diagnostics_figure_draws_what_diagnose_returns(traj_store):
    from qdrift_stats.validate.diagnostics import diagnose

    fig = plots.plot_diagnostics(diagnose(traj_store[0]))
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert any("kurtosis" in t for t in titles) and any("Jarque-Bera" in t for t in titles)
    assert any("R^2" in t for t in titles) and any("Ljung-Box" in t for t in titles)


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, match):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qdrift: error:") and match in lines[0], err


def test_qdrift_plot_writes_png_figures(tmp_path, capsys, traj_store):
    store, est = traj_store
    for kind, extra in (
        ("accumulation", ["--estimator", est, "--pair", VP_PAIR]),
        ("variance", ["--fit", "empirical", "--fit", "per-channel"]),
    ):
        out = tmp_path / f"{kind}.png"
        code, text, err = run(capsys, "plot", kind, store, "--out", out, *extra)
        assert code == 0, err
        assert f"-> {out}" in text and out.read_bytes()[:8] == PNG_MAGIC
    cv = tmp_path / "cv.zarr"
    cv_dataset().to_zarr(cv, mode="w", consolidated=False)
    code, _, err = run(capsys, "plot", "runs-needed", cv, "--out", tmp_path / "runs.png")
    assert code == 0, err
    assert (tmp_path / "runs.png").read_bytes()[:8] == PNG_MAGIC
    for kind, module in (
        ("runs-needed", "qdrift_stats.validate.crossval"),
        ("diagnostics", "qdrift_stats.validate.diagnostics"),
    ):
        if importlib.util.find_spec(module) is not None:  # computed from the store by that module
            out = tmp_path / f"{kind}-of-store.png"
            code, _, err = run(capsys, "plot", kind, store, "--out", out)
            assert code == 0, err
            assert out.read_bytes()[:8] == PNG_MAGIC


def test_qdrift_plot_bad_input_is_one_line_and_exit_2(tmp_path, capsys, traj_store):
    store, est = traj_store
    one_line_error(
        *run(capsys, "plot", "histogram", store, "--out", tmp_path / "x.png")[::2], "'histogram' is not one of"
    )
    one_line_error(*run(capsys, "plot", "accumulation", store, "--out", tmp_path / "x.png")[::2], "needs --estimator")
    one_line_error(
        *run(capsys, "plot", "variance", tmp_path / "missing.zarr", "--out", tmp_path / "x.png")[::2], "does not exist"
    )
    (tmp_path / "taken.png").write_bytes(b"")
    one_line_error(*run(capsys, "plot", "variance", store, "--out", tmp_path / "taken.png")[::2], "--overwrite")
    one_line_error(
        *run(capsys, "plot", "variance", store, "--fit", "no-such-estimator", "--out", tmp_path / "x.png")[::2],
        "unknown estimator",
    )
    if importlib.util.find_spec("qdrift_stats.validate.crossval") is None:
        one_line_error(
            *run(capsys, "plot", "runs-needed", store, "--out", tmp_path / "x.png")[::2],
            "needs qdrift_stats.validate.crossval",
        )
