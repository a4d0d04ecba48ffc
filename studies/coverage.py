"""Coverage of each estimator's confidence interval, on the mixture testbed where the truth is known.

For Euler (VP, epsilon) and flow-matching Euler with a noise-like error ``m_q = m_fp + e`` the
lock-step perturbation is ``Delta_i = c_i e`` with the gain ``c_i = b_{i+1} - b_i``, so the true
statistic is ``v_i = (b_{i+1} - b_i)^2 A^2 / 2`` for both error families of the testbed:

- ``mixture_*_noise``: ``e = A sin(G z + phi)``, bounded, arcsine marginal (``E sin^2 = 1/2`` for the
  high-frequency, uniform phase);
- ``mixture_*_gauss``: the same phase mapped to an exactly Gaussian ``e ~ N(0, A^2 / 2)``.

For each of many calibration seeds, record ``--runs`` runs of ``--batch`` samples, fit every
estimator, and count how often its nominal 95% interval covers its target at the correctable
steps (``b_{i+1} > 0``). Also reported: the mean relative bias of the estimate and the mean
interval width relative to the target.

Each estimator's target is its own estimand:

- empirical, first-order, decomposed, smooth, robust winsor: the mean square ``v_i``: every case;
- robust Huber and MAD: ``mu^2 + sigma^2`` of a Gaussian core, equal to ``v_i`` on the Gaussian
  pairs only; on the sinusoidal pairs their rows measure the gap to ``v_i`` (a finding, not a
  coverage test);
- moment matching: the ``v*_i`` that keeps the free-running corrected trajectory's second moment on
  the FP one (see its module), computed per case as the same sequential match on
  ``--reference-batch`` samples (four seeds, averaged): the "vs v*" row; its rows against ``v_i``
  measure the gap between the two estimands.

    python studies/coverage.py                 # about 14 minutes on 2 cores
    python studies/coverage.py --seeds 20      # a smoke run, not for the docs (use --out)
    python studies/coverage.py --hetero        # only the heterogeneous-testbed rows (sizes in the output)

Heterogeneous testbed (``--hetero``, issue 14): ``mixture_*_hetero``, whose error variance changes with
the noise level and whose runs differ by a per-run scale (``qdrift_stats.testbed.heterogeneous``),
where an interval that treats every (run, step) value as independent, or a smoother that assumes a
flat variance, can fail. Truth: the per-step mean of the first-order per-run values over a pool of
``--truth-runs`` runs recorded apart from every calibration (never fitted). Rows: the pointwise 95%
interval and the simultaneous 95% max-t band over the correctable steps, for the empirical
first-order estimator and the smooth GLM with run-clustered (default) and with plain GLM covariance.
Pointwise coverage pools steps and seeds; simultaneous coverage is one yes/no per seed (every
correctable step inside the band).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _report import ROOT, command_line, write_section
from scipy import stats

from qdrift_stats import testbed
from qdrift_stats.estimators import (
    DecomposedEstimator,
    EmpiricalEstimator,
    MomentEstimator,
    RobustEstimator,
    SmoothGLMEstimator,
    SmoothLowessEstimator,
)
from qdrift_stats.estimators.base import per_run_second_moment
from qdrift_stats.estimators.moment import matched_run
from qdrift_stats.loop import prepared_scheduler
from qdrift_stats.record.lockstep import record
from qdrift_stats.record.store import open_store
from qdrift_stats.schedulers.base import step_grid

warnings.filterwarnings("ignore")

ESTIMATORS = {
    "empirical (t over runs)": lambda: EmpiricalEstimator(),
    "first-order": lambda: EmpiricalEstimator(statistic="first-order"),
    "decomposed": lambda: DecomposedEstimator(),
    "smooth-glm": lambda: SmoothGLMEstimator(),
    "smooth-glm (cluster by run)": lambda: SmoothGLMEstimator(cov_type="cluster"),
    "smooth-lowess (bootstrap)": lambda: SmoothLowessEstimator(),
    "robust winsor (t)": lambda: RobustEstimator(),
    "robust winsor (bootstrap)": lambda: RobustEstimator(ci="bootstrap"),
    "robust huber": lambda: RobustEstimator(method="huber"),
    "robust mad": lambda: RobustEstimator(method="mad"),
    "moment (shrink)": lambda: MomentEstimator(),
}
MOMENT = "moment (shrink)"
# (pair, scheduler, kind, fraction of --seeds): the Gaussian cases get fewer seeds to bound the run time
CASES = (
    ("mixture_vp_noise", "euler", "vp", 1.0),
    ("mixture_flow_noise", "flow-euler", "flow", 0.5),
    ("mixture_vp_gauss", "euler", "vp", 0.5),
    ("mixture_flow_gauss", "flow-euler", "flow", 0.25),
)
ESTIMAND = {
    "gauss": "Gaussian error: `v_i` is also the Huber and MAD estimand",
    "noise": "bounded sinusoidal error: `v_i` is not the Huber or MAD estimand, their rows measure the gap",
}


def true_variance(ds) -> np.ndarray:
    amplitude = testbed.NOISE_AMPLITUDE[ds.attrs["_kind"]]
    return (ds["b_next"].values - ds["b"].values) ** 2 * amplitude**2 / 2


def wilson(hits: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return float("nan"), float("nan")
    z = stats.norm.ppf(0.5 + level / 2)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def moment_estimand(pair, scheduler: str, steps: int, batch: int) -> np.ndarray:
    """The moment-matching estimand ``v*_i``: the sequential match on ``batch`` samples, four seeds
    averaged, floored at 0 as the estimate is."""
    est = MomentEstimator()
    runs = [matched_run(pair, scheduler, steps, batch, seed, est.form, est.min_factor)[0] for seed in (1, 2, 3, 4)]
    return np.maximum(np.mean(runs, axis=0), 0.0)


def run_case(
    pair_name: str,
    scheduler: str,
    kind: str,
    seeds: int,
    runs: int,
    batch: int,
    steps: int,
    workdir: Path,
    v_star: np.ndarray,
) -> dict[str, dict[str, list]]:
    pair = getattr(testbed, pair_name)()
    rows = list(ESTIMATORS) + [f"{MOMENT} vs v*"]
    out: dict[str, dict[str, list]] = {name: {"cover": [], "rel_bias": [], "rel_width": []} for name in rows}

    def add(name, fitted, target):
        lo, hi, v, t = fitted.ci_low[keep], fitted.ci_high[keep], fitted.variance[keep], target[keep]
        out[name]["cover"].append((lo <= t) & (t <= hi))
        with np.errstate(
            divide="ignore", invalid="ignore"
        ):  # a zero target (v* at a capped step) has no relative error
            out[name]["rel_bias"].append(np.where(t > 0, v / t - 1, np.nan))
            out[name]["rel_width"].append(np.where(t > 0, (hi - lo) / t, np.nan))

    for s in range(seeds):
        store = workdir / f"{pair_name}_{s}.zarr"
        record(
            pair,
            store,
            pair_name=f"qdrift_stats.testbed:{pair_name}",
            scheduler_name=scheduler,
            steps=steps,
            runs=runs,
            batch_size=batch,
            seed=10_000 + s * runs,
            overwrite=True,
        )
        ds = open_store(store).load()
        ds.attrs["_kind"] = kind
        truth = true_variance(ds)
        keep = ds["b_next"].values > 0
        for name, make in ESTIMATORS.items():
            fitted = make().fit(ds)
            add(name, fitted, truth)
            if name == MOMENT:
                add(f"{MOMENT} vs v*", fitted, v_star)
        for path in workdir.glob("*.zarr"):
            shutil.rmtree(path)
    return out


HETERO_ESTIMATORS = {
    "first-order (t over runs)": lambda: EmpiricalEstimator(statistic="first-order"),
    "smooth-glm (cluster by run, default)": lambda: SmoothGLMEstimator(),
    "smooth-glm (plain GLM covariance)": lambda: SmoothGLMEstimator(cov_type="nonrobust"),
}


def hetero_runs(pair, scheduler: str, steps: int, runs: int, batch: int, seed: int):
    """An in-memory store of ``runs`` runs of ``batch`` samples (one recording, each run its own scale)."""
    import xarray as xr

    from qdrift_stats.record.lockstep import record_run
    from qdrift_stats.record.store import step_coordinates

    arrays, sched = record_run(pair, scheduler, steps, runs * batch, seed)
    coords = step_coordinates(sched)
    data = {}
    for name in ("delta_x", "delta_out", "out_fp"):
        a = arrays[name].astype(np.float64)
        data[name] = (("run", "step", "sample", "channel"), np.moveaxis(a.reshape(a.shape[0], runs, batch, -1), 0, 1))
    c = {k: ("step", np.asarray(v, dtype=np.float64)) for k, v in coords.items()}
    c.update({"run": np.arange(runs), "seed": ("run", seed * 1000 + np.arange(runs)), "step": np.arange(steps)})
    attrs = {"scheduler": scheduler, "prediction_type": "flow_prediction" if "flow" in scheduler else "epsilon"}
    return xr.Dataset(data, coords=c, attrs={**attrs, "pair": "hetero", "batch_size": batch})


def hetero_case(kind: str, scheduler: str, seeds: int, runs: int, batch: int, steps: int, truth_runs: int) -> dict:
    pair = getattr(testbed, f"mixture_{kind}_hetero")(group=batch)
    # the truth: runs recorded apart (seeds far from the calibration ones), never fitted
    pool = [hetero_runs(pair, scheduler, steps, 200, batch, 900_000 + k) for k in range(truth_runs // 200)]
    # the first-order per-run values (gain^2 times the per-run mean square of the output error), as the
    # estimator computes them, without its interval and band (not needed for the truth)
    per_run = np.concatenate(
        [per_run_second_moment(ds, "delta_out", False).values * ds["gain"].values ** 2 for ds in pool]
    )
    truth = per_run.mean(axis=0)
    truth_se = per_run.std(axis=0, ddof=1) / np.sqrt(len(per_run))
    grid_b = pool[0]["b"].values
    gain = pool[0]["gain"].values
    a_in, b_in = (pool[0]["a"].values, grid_b) if kind == "flow" else (None, grid_b / np.sqrt(1 + grid_b**2))
    analytic = gain**2 * pair.true_output_variance(b_in)
    keep = pool[0]["b_next"].values > 0
    out = {name: {"point": [], "band": [], "bias": [], "width": [], "band_width": []} for name in HETERO_ESTIMATORS}
    for seed in range(seeds):
        ds = hetero_runs(pair, scheduler, steps, runs, batch, seed)
        for name, make in HETERO_ESTIMATORS.items():
            fit = make().fit(ds)
            hit = (fit.ci_low <= truth) & (truth <= fit.ci_high)
            band = (fit.band_low <= truth) & (truth <= fit.band_high)
            out[name]["point"].append(hit[keep])
            out[name]["band"].append(bool(band[keep].all()))
            out[name]["bias"].append(fit.variance[keep] / truth[keep] - 1)
            out[name]["width"].append((fit.ci_high - fit.ci_low)[keep] / truth[keep])
            out[name]["band_width"].append((fit.band_high - fit.band_low)[keep] / truth[keep])
    return {
        "kind": kind,
        "scheduler": scheduler,
        "seeds": seeds,
        "truth_se": float(np.max(truth_se[keep] / truth[keep])),
        "analytic_gap": float(np.max(np.abs(analytic[keep] / truth[keep] - 1))),
        "run_cv": float(np.median(per_run.std(axis=0)[keep] / truth[keep])),
        "rows": out,
        "steps_scored": int(keep.sum()),
    }


def hetero_main(args) -> None:
    start = time.time()
    cases = [("vp", "euler", args.seeds), ("flow", "flow-euler", max(args.seeds // 2, 1))]
    results = []
    for kind, scheduler, seeds in cases:
        results.append(hetero_case(kind, scheduler, seeds, args.runs, args.batch, args.steps, args.truth_runs))
        print(kind, scheduler, f"{time.time() - start:.0f}s", flush=True)
    md = [
        "## Coverage on the heterogeneous testbed (level-dependent error, runs that differ)",
        "",
        f"`mixture_vp_hetero` (Euler) and `mixture_flow_hetero` (flow Euler): error `s_r f(b) A sin(G z + phi)`, "
        "`f(b) = (0.2 + b) / 1.2` (the error variance changes 20-36x over the trajectory), per-run scale `s_r` with "
        f"log-sd 0.15 (`E s_r^2 = 1`). {args.runs} runs x {args.batch} samples per calibration, {args.steps} steps; "
        f"truth: mean first-order per-run value over {args.truth_runs} runs recorded apart (never fitted). "
        "Nominal level 95% everywhere. *Pointwise*: each correctable step's interval (`ci_low`, `ci_high`), "
        "coverage pooled over steps and seeds; *simultaneous*: the max-t band (`band_low`, `band_high`) covers every "
        "correctable step of a seed at once. Wilson 95% intervals of the coverage in brackets.",
        "",
        "| testbed | scheduler | estimator | seeds | pointwise coverage | simultaneous coverage | mean rel. bias | "
        "median rel. width (pointwise / simultaneous) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, o in r["rows"].items():
            point = np.concatenate(o["point"])
            band = np.array(o["band"])
            plo, phi = wilson(int(point.sum()), point.size)
            blo, bhi = wilson(int(band.sum()), band.size)
            md.append(
                f"| `mixture_{r['kind']}_hetero` | {r['scheduler']} | {name} | {r['seeds']} | "
                f"{point.mean():.1%} [{plo:.1%}, {phi:.1%}] | {band.mean():.1%} [{blo:.1%}, {bhi:.1%}] | "
                f"{np.mean(np.concatenate(o['bias'])):+.1%} | {np.median(np.concatenate(o['width'])):.2f} / "
                f"{np.median(np.concatenate(o['band_width'])):.2f} |"
            )
    md += [""]
    for r in results:
        md.append(
            f"- `mixture_{r['kind']}_hetero`: {r['steps_scored']} correctable steps; per-run coefficient of variation "
            f"(median over steps) {r['run_cv']:.2f}; the truth's own standard error at most {r['truth_se']:.1%} of it; "
            f"the analytic `c_i^2 f(b_i)^2 A^2 / 2` differs from it by at most {r['analytic_gap']:.1%}."
        )
    md += ["", f"Generated by `{command_line()}` ({(time.time() - start) / 60:.1f} min on 2 shared CPU cores)."]
    write_section("coverage_hetero", "\n".join(md), page=args.out)
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seeds",
        type=int,
        default=200,
        help="calibration seeds for the VP sine case (flow sine and VP Gaussian: half; flow Gaussian: a quarter)",
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--reference-batch", type=int, default=131072, help="samples per seed of the moment estimand's reference match"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "coverage.md")
    parser.add_argument("--hetero", action="store_true", help="only the heterogeneous-testbed rows")
    parser.add_argument("--truth-runs", type=int, default=4000, help="--hetero: runs of the truth pool")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.hetero:
        hetero_main(args)
        return
    start = time.time()
    md = [
        "## Coverage of the estimators' 95% intervals (mixture testbed, known truth)",
        "",
        f"Truth: `v_i = (b_next - b)^2 A^2 / 2` (Euler and flow Euler, noise-like error: sinusoidal `A sin(G z + phi)` "
        "in the `_noise` pairs, exactly Gaussian `N(0, A^2/2)` with the same phase construction in "
        "the `_gauss` pairs). "
        f"Each seed: {args.runs} calibration runs x {args.batch} samples, {args.steps} steps; "
        "coverage counted over the "
        f"{args.steps - 1} correctable steps of every seed (Wilson 95% interval of the proportion "
        "in brackets). Nominal: 95%.",
        "",
        "What each estimator targets, and so which rows test its coverage: empirical, first-order, "
        "decomposed, smooth and "
        "robust winsor estimate the mean square `v_i` (every case tests them). Robust Huber and "
        "MAD estimate `mu^2 + sigma^2` "
        "of a Gaussian core, which equals `v_i` for the `_gauss` pairs only; on the sinusoidal `_noise` pairs (arcsine "
        "marginal) their rows measure how far that estimand is from `v_i`. The moment estimator targets `v*_i`, the "
        "correction that keeps the free-running trajectory's second moment on the FP one; `v*_i` "
        "is computed per case by "
        f"the same sequential match on {args.reference_batch} samples (four seeds, averaged, "
        "floored at 0 as the estimate is), and the row "
        f"`{MOMENT} vs v*` tests its interval; its row against `v_i` measures the gap between the two estimands.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for pair_name, scheduler, kind, fraction in CASES:
            seeds = max(1, int(round(args.seeds * fraction)))
            pair = getattr(testbed, pair_name)()
            v_star = moment_estimand(pair, scheduler, args.steps, args.reference_batch)
            res = run_case(pair_name, scheduler, kind, seeds, args.runs, args.batch, args.steps, Path(tmp), v_star)
            family = "gauss" if pair_name.endswith("_gauss") else "noise"
            md += [
                f"### `{pair_name}`, `{scheduler}`, {seeds} seeds ({ESTIMAND[family]})",
                "",
                "| estimator | coverage | per-step coverage (min-max) | mean rel. bias | mean CI width / target |",
                "|---|---|---|---|---|",
            ]
            for name, r in res.items():
                cover = np.array(r["cover"])  # (seeds, steps)
                hits, n = int(cover.sum()), cover.size
                lo, hi = wilson(hits, n)
                per_step = cover.mean(axis=0)
                bias = float(np.nanmean(r["rel_bias"]))
                width = float(np.nanmean(r["rel_width"]))
                md.append(
                    f"| {name} | {hits / n:.1%} [{lo:.1%}, {hi:.1%}] | "
                    f"{per_step.min():.0%}-{per_step.max():.0%} | {bias:+.1%} | {width:.3f} |"
                )
            store_grid = prepared_grid(pair, scheduler, args.steps)
            keep = store_grid["b_next"] > 0
            truth = (store_grid["b_next"] - store_grid["b"]) ** 2 * testbed.NOISE_AMPLITUDE[kind] ** 2 / 2
            md += [
                "",
                "Moment estimand per correctable step, `v*_i / v_i`: "
                + ", ".join(f"{x:.2f}" for x in v_star[keep] / truth[keep])
                + "; coverage of `v*_i` per step: "
                + ", ".join(f"{x:.0%}" for x in np.array(res[f"{MOMENT} vs v*"]["cover"]).mean(axis=0))
                + ".",
                "",
            ]
    elapsed = time.time() - start
    md += [
        f"Generated by `{command_line()}` ({elapsed / 60:.1f} min on 2 CPU cores, shared with other jobs).",
        "(The mean relative bias averages `estimate / target - 1` over steps and seeds, so steps where the target is "
        "tiny weigh heavily; steps where the target is 0, `v*_i` at a step the match cannot reach, "
        "count in the coverage "
        "only.)",
    ]
    write_section("coverage", "\n".join(md), page=args.out)
    print("\n".join(md))


def prepared_grid(pair, scheduler: str, steps: int) -> dict[str, np.ndarray]:
    grid = step_grid(prepared_scheduler(pair, scheduler, steps))
    return {"b": np.asarray(grid.b, dtype=float), "b_next": np.asarray(grid.b_next, dtype=float)}


if __name__ == "__main__":
    main()
