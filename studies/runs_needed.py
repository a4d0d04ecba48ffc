"""How many calibration runs does each pair need? Cross-validation over runs, checked against the truth.

For each pair: record ``M`` paired calibration runs, run ``qdrift_stats.validate.crossval.cross_validate``
(first-order statistic, the default of ``qdrift fit``; up to 200 random subsets per count) and ask
``runs_needed(tolerance, 0.95)`` for tolerances 10% and 5%: the number of runs whose fit has an
RMS relative error over the correctable steps within the tolerance with probability 0.95. "5 runs
enough?" compares the 95% quantile of that error at N = 5 with 10% (the paper's claim: "as few as
5 paired runs").

Truth check (mixture, Euler and flow Euler with the noise-like error, where
``v_i = (b_next - b)^2 A^2 / 2`` is known): the same quantile computed against the analytic
truth instead of the all-runs fit, from ``truth_repeats`` independent N-run fits; it tests the
cross-validation's finite-population correction.

Digits zoo (``qdrift_stats.zoo``, real networks under 4-bit weights / 8-bit activations): fewer
runs (CPU time), so the answer may be an extrapolation along ``1/sqrt(N)``, flagged as such.

Monte Carlo check of the answer's interval (``--monte-carlo``; issue 14). A pool of runs of the
heterogeneous testbed (``mixture_vp_hetero``: the error grows with the noise level and each run has its
own scale, as prompts make real runs differ) is recorded once and split in two disjoint halves. The
*truth* comes from the truth half only (runs never used in any cross-validation): the rule applied to
the 95% quantile of the error of fits on N truth-half runs against the truth-half mean. Each Monte
Carlo replicate draws M runs (10 or 40) from the other half, runs ``cross_validate`` on them (what
``qdrift cv`` runs) and asks ``runs_needed``; it counts how often the interval covers the truth, how
often the answer is "not enough runs to tell", and how often either holds (the done-when criterion).

    python studies/runs_needed.py                  # about 15 minutes on 2 cores
    python studies/runs_needed.py --quick          # a smoke run, not for the docs
    python studies/runs_needed.py --monte-carlo    # the Monte Carlo check only (sizes in the output)
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _report import ROOT, command_line, write_section

from qdrift_stats import testbed
from qdrift_stats.estimators import EmpiricalEstimator
from qdrift_stats.record.lockstep import record
from qdrift_stats.record.store import open_store
from qdrift_stats.validate.crossval import cross_validate

warnings.filterwarnings("ignore")

MIXTURE = [
    # (pair, scheduler, steps, batch, truth known)
    ("mixture_vp_noise", "euler", 25, 64, True),
    ("mixture_vp_noise", "euler", 25, 16, True),
    ("mixture_vp_noise", "ddim", 25, 64, False),
    ("mixture_vp_noise", "dpmpp-2m", 25, 64, False),
    ("mixture_flow_noise", "flow-euler", 25, 64, True),
    ("mixture_flow_noise", "flow-dpmpp-2m", 25, 64, False),
    ("mixture_vp_rounding", "euler", 25, 64, False),
]
ZOO = [
    ("digits_unet_w4a8", "ddim", 20, 16),
    ("digits_dit_w4a8", "flow-euler", 20, 16),
]
TOLERANCES = (0.1, 0.05)
CONFIDENCE = 0.95


def truth_quantiles(
    per_run: np.ndarray, truth: np.ndarray, keep: np.ndarray, counts: list[int], repeats: int, seed: int = 0
) -> dict[int, float]:
    """95% quantile of the RMS relative error against the truth of fits on N independent runs.

    ``per_run`` rows are independent runs; each repeat draws N distinct rows (without replacement
    within a repeat), so with many recorded runs the fits are close to independent across repeats.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for n in counts:
        errs = []
        for _ in range(repeats):
            pick = rng.choice(len(per_run), size=n, replace=False)
            v = per_run[pick].mean(axis=0)
            errs.append(np.sqrt(np.mean(((v[keep] - truth[keep]) / truth[keep]) ** 2)))
        out[n] = float(np.quantile(errs, CONFIDENCE))
    return out


def pool_per_run(pair, scheduler: str, steps: int, batch: int, runs: int, seed: int, chunk: int = 200):
    """Raw arrays of ``runs`` runs of ``batch`` samples (one recording of ``chunk`` runs at a time, each run's
    samples sharing the run's scale) and the step grid; ``(steps, runs, batch, ...)`` per variable."""
    from qdrift_stats.loop import prepared_scheduler
    from qdrift_stats.record.lockstep import record_run
    from qdrift_stats.record.store import step_coordinates

    coords = step_coordinates(prepared_scheduler(pair, scheduler, steps))
    parts: dict[str, list[np.ndarray]] = {"delta_x": [], "delta_out": [], "out_fp": []}
    for k, start in enumerate(range(0, runs, chunk)):
        n = min(chunk, runs - start)
        arrays, _ = record_run(pair, scheduler, steps, n * batch, seed + k)
        for name in parts:
            a = arrays[name]
            parts[name].append(a.reshape(a.shape[0], n, batch, *a.shape[2:]))
    return {name: np.concatenate(v, axis=1) for name, v in parts.items()}, coords


def replicate_dataset(pool: dict[str, np.ndarray], coords: dict[str, np.ndarray], pick: np.ndarray, attrs: dict):
    """An in-memory calibration store of the pool's runs ``pick`` (dims run, step, sample, channel)."""
    import xarray as xr

    data = {
        name: (("run", "step", "sample", "channel"), np.moveaxis(v[:, pick], 0, 1).astype(np.float64))
        for name, v in pool.items()
    }
    c = {name: ("step", value) for name, value in coords.items()}
    c.update({"run": np.arange(len(pick)), "seed": ("run", pick.astype(np.int64)), "step": np.arange(len(coords["b"]))})
    return xr.Dataset(data, coords=c, attrs=attrs)


def first_order_per_run(pool: dict[str, np.ndarray], coords: dict[str, np.ndarray]) -> np.ndarray:
    """``(runs, steps)`` the first-order statistic of each run: ``gain^2`` times the mean square of ``delta_out``."""
    d = pool["delta_out"].astype(np.float64)
    return ((d**2).reshape(d.shape[0], d.shape[1], -1).mean(axis=2) * coords["gain"][:, None] ** 2).T


def truth_curve(per_run: np.ndarray, counts: range, repeats: int, seed: int) -> np.ndarray:
    """95% quantile of the RMS relative error of N-run fits against the mean of all ``per_run`` (the truth pool)."""
    rng = np.random.default_rng(seed)
    truth = per_run.mean(axis=0)
    keep = truth > 0
    out = []
    for n in counts:
        idx = np.argsort(rng.random((repeats, len(per_run))), axis=1)[:, :n]
        v = per_run[idx].mean(axis=1)
        err = np.sqrt(np.mean(((v[:, keep] - truth[keep]) / truth[keep]) ** 2, axis=1))
        out.append(np.quantile(err, CONFIDENCE))
    return np.array(out)


def monte_carlo(args) -> None:
    from qdrift_stats.validate.runs_needed import needed_from_quantiles, runs_needed_from_runs

    start = time.time()
    steps, batch, scheduler = args.mc_steps, args.mc_batch, "euler"
    pair = testbed.mixture_vp_hetero(group=batch)
    pair.run_sigma = args.mc_run_sigma
    cache = Path(tempfile.gettempdir()) / (
        f"qdrift_rn_pool_{steps}_{batch}_{args.mc_run_sigma}_{args.mc_cv_pool}_{args.mc_truth_pool}.npz"
    )
    if cache.exists():  # the same recording (same seeds), kept from an earlier run of this study
        loaded = np.load(cache)
        pool = {k: loaded[k] for k in ("delta_x", "delta_out", "out_fp")}
        coords = {k[2:]: loaded[k] for k in loaded.files if k.startswith("c_")}
    else:
        pool, coords = pool_per_run(pair, scheduler, steps, batch, args.mc_cv_pool + args.mc_truth_pool, seed=10_000)
        np.savez(cache, **pool, **{f"c_{k}": v for k, v in coords.items()})
    coords = {k: np.asarray(v, dtype=np.float64) for k, v in coords.items()}
    per_run = first_order_per_run(pool, coords)
    cv_runs = np.arange(args.mc_cv_pool)
    truth_runs = np.arange(args.mc_cv_pool, args.mc_cv_pool + args.mc_truth_pool)
    counts = range(1, 81)
    q_true = truth_curve(per_run[truth_runs, :][:, coords["b_next"] > 0], counts, 2000, seed=1)
    # the tolerance that makes the true answer 7 runs (between the truth's q(7) and q(6))
    tolerance = float(np.round((q_true[5] + q_true[6]) / 2, 4))
    truth = needed_from_quantiles(np.array(list(counts)), q_true, tolerance)[0]
    print(f"pool recorded ({time.time() - start:.0f}s); tolerance {tolerance}, true answer {truth}", flush=True)
    keep = coords["b_next"] > 0
    attrs = {"scheduler": scheduler, "prediction_type": "epsilon", "pair": "mixture_vp_hetero", "batch_size": batch}
    rng = np.random.default_rng(2)
    rows = []
    for m, reps in ((10, args.mc_reps), (40, args.mc_reps)):
        answers = []
        t0 = time.time()
        for r in range(reps):
            pick = np.sort(rng.choice(cv_runs, size=m, replace=False))
            if r < args.mc_store_reps:  # the full path of 'qdrift cv' on an in-memory store
                ds = replicate_dataset(pool, coords, pick, attrs)
                result = cross_validate("first-order", ds, n_splits=args.mc_splits, strength=False, seed=r)
                answers.append(result.runs_needed(tolerance, CONFIDENCE, bootstrap=args.mc_bootstrap, seed=r))
                same = runs_needed_from_runs(
                    per_run[pick], keep, tolerance, CONFIDENCE, args.mc_splits, r, args.mc_bootstrap, r
                )
                assert (same.runs, same.low, same.high) == (answers[-1].runs, answers[-1].low, answers[-1].high)
            else:  # the same rule and bootstrap from the runs' per-run values (equal, asserted above)
                answers.append(
                    runs_needed_from_runs(
                        per_run[pick], keep, tolerance, CONFIDENCE, args.mc_splits, r, args.mc_bootstrap, r
                    )
                )
        covered = np.array([a.low <= truth <= a.high for a in answers])
        undecided = np.array([not a.decided for a in answers])
        points = np.array([a.runs for a in answers])
        rows.append(
            {
                "m": m,
                "reps": reps,
                "covered": covered.mean(),
                "undecided": undecided.mean(),
                "either": (covered | undecided).mean(),
                "decided_covered": covered[~undecided].mean() if (~undecided).any() else float("nan"),
                "points": np.percentile(points, [5, 50, 95]),
                "five_enough": np.mean([a.decided and a.runs <= 5 for a in answers]),
                "width": np.median([a.high - a.low for a in answers]),
                "seconds": time.time() - t0,
            }
        )
        print(rows[-1], flush=True)
    md = [
        "## Monte Carlo check of the runs-needed interval (truth from runs never cross-validated)",
        "",
        f"Pair `mixture_vp_hetero` (per-run scale log-sd {args.mc_run_sigma}, error variance "
        "growing with the noise level), "
        f"{scheduler} {steps} steps, {batch} samples per run, first-order statistic. Pool of "
        f"{args.mc_cv_pool + args.mc_truth_pool} recorded runs split in two: the truth uses only the "
        f"{args.mc_truth_pool}-run truth half (95% quantile of the RMS relative error of 2000 N-run fits against the "
        f"truth-half mean, N = 1..80); tolerance {tolerance} chosen so that the true answer is "
        f"**{truth} runs**. Each of "
        f"{args.mc_reps} replicates per row draws M runs from the other {args.mc_cv_pool}, runs `cross_validate` "
        f"({args.mc_splits} splits per count) and `runs_needed` ({args.mc_bootstrap} bootstrap "
        "resamples of the recorded runs, "
        f"expanded 95% percentile interval); the first {args.mc_store_reps} replicates per row go "
        "through `cross_validate` on an "
        "in-memory store, the rest through `validate.runs_needed.runs_needed_from_runs` on the "
        "same per-run values (the "
        "same rule and numbers; equality asserted on those replicates). Binomial standard error of a 90% coverage over "
        f"{args.mc_reps} replicates: {100 * np.sqrt(0.09 / args.mc_reps):.1f} points.",
        "",
        '| runs recorded M | interval covers the truth | says "not enough runs to tell" | covers '
        "or says so (done when >= 90%) | "
        'covers, among decided answers | point answer 5% / 50% / 95% | "5 runs are enough" '
        "(decided) | median interval width |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p5, p50, p95 = r["points"]
        md.append(
            f"| {r['m']} | {r['covered']:.0%} | {r['undecided']:.0%} | **{r['either']:.0%}** | "
            f"{r['decided_covered']:.0%} | "
            f"{p5:.0f} / {p50:.0f} / {p95:.0f} | {r['five_enough']:.0%} | {r['width']:.0f} |"
        )
    md += ["", f"Generated by `{command_line()}` ({(time.time() - start) / 60:.1f} min on 2 shared CPU cores)."]
    write_section("runs_needed_mc", "\n".join(md), page=args.out)
    print("\n".join(md))


def needed_from(quantiles: dict[int, float], tolerance: float) -> str:
    ok = [n for n in sorted(quantiles) if all(quantiles[m] <= tolerance for m in quantiles if m >= n)]
    return str(ok[0]) if ok else f"> {max(quantiles)}"


def study_pair(
    pair,
    pair_name: str,
    scheduler: str,
    steps: int,
    batch: int,
    runs: int,
    workdir: Path,
    splits: int,
    truth_known: bool,
):
    store = workdir / f"{pair_name}_{scheduler}_{batch}.zarr"
    t0 = time.time()
    record(
        pair,
        store,
        pair_name=pair_name,
        scheduler_name=scheduler,
        steps=steps,
        runs=runs,
        batch_size=batch,
        seed=0,
        overwrite=True,
    )
    ds = open_store(store).load()
    result = cross_validate(
        "first-order",
        ds,
        workdir / f"{pair_name}_{scheduler}_{batch}_cv.zarr",
        n_splits=splits,
        strength=False,
        overwrite=True,
    )
    row = {"pair": pair_name, "scheduler": scheduler, "steps": steps, "batch": batch, "runs": runs}
    for tol in TOLERANCES:
        row[f"need_{tol}"] = result.runs_needed(tol, CONFIDENCE, bootstrap=300)
    row["need_max"] = result.runs_needed(TOLERANCES[0], CONFIDENCE, bootstrap=300, aggregate="max")
    quantiles = row[f"need_{TOLERANCES[0]}"].quantiles
    row["q5"] = quantiles.get(5, float("nan"))
    row["q1"] = quantiles.get(1, float("nan"))
    if truth_known:
        kind = "vp" if "vp" in pair_name else "flow"
        truth = (ds["b_next"].values - ds["b"].values) ** 2 * testbed.NOISE_AMPLITUDE[kind] ** 2 / 2
        keep = ds["b_next"].values > 0
        per_run = EmpiricalEstimator(statistic="first-order").fit(ds).per_run
        counts = [n for n in (1, 2, 3, 5, 8, 10) if n <= runs // 2]
        row["truth"] = truth_quantiles(per_run, truth, keep, counts, repeats=300)
        row["cv_at"] = {n: quantiles[n] for n in counts}
    row["seconds"] = time.time() - t0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40, help="calibration runs per mixture pair")
    parser.add_argument("--zoo-runs", type=int, default=10, help="calibration runs per digits-zoo pair")
    parser.add_argument("--splits", type=int, default=200, help="random subsets per calibration count")
    parser.add_argument("--no-zoo", action="store_true", help="skip the digits zoo")
    parser.add_argument("--quick", action="store_true", help="two mixture cases with 12 runs, no zoo")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "runs_needed.md")
    parser.add_argument("--monte-carlo", action="store_true", help="only the Monte Carlo check of the interval")
    parser.add_argument("--mc-reps", type=int, default=150, help="Monte Carlo replicates per recorded count")
    parser.add_argument("--mc-steps", type=int, default=10)
    parser.add_argument("--mc-batch", type=int, default=4)
    parser.add_argument("--mc-run-sigma", type=float, default=0.1)
    parser.add_argument("--mc-cv-pool", type=int, default=1200)
    parser.add_argument("--mc-truth-pool", type=int, default=2400)
    parser.add_argument("--mc-splits", type=int, default=50)
    parser.add_argument("--mc-bootstrap", type=int, default=200)
    parser.add_argument("--mc-store-reps", type=int, default=5, help="replicates run through cross_validate on a store")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.monte_carlo:
        monte_carlo(args)
        return
    start = time.time()
    rows = []
    cases = MIXTURE[:2] if args.quick else MIXTURE
    runs = 12 if args.quick else args.runs
    with tempfile.TemporaryDirectory() as tmp:
        for pair_name, scheduler, steps, batch, truth_known in cases:
            pair = getattr(testbed, pair_name)()
            rows.append(
                study_pair(
                    pair,
                    f"qdrift_stats.testbed:{pair_name}",
                    scheduler,
                    steps,
                    batch,
                    runs,
                    Path(tmp),
                    args.splits,
                    truth_known,
                )
            )
            print(rows[-1]["pair"], scheduler, batch, rows[-1]["need_0.1"], f"{rows[-1]['seconds']:.0f}s", flush=True)
        if not (args.no_zoo or args.quick):
            from qdrift_stats import zoo

            for name, scheduler, steps, batch in ZOO:
                pair = getattr(zoo, name)()
                rows.append(
                    study_pair(
                        pair,
                        f"qdrift_stats.zoo:{name}",
                        scheduler,
                        steps,
                        batch,
                        args.zoo_runs,
                        Path(tmp),
                        args.splits,
                        False,
                    )
                )
                print(
                    rows[-1]["pair"], scheduler, batch, rows[-1]["need_0.1"], f"{rows[-1]['seconds']:.0f}s", flush=True
                )
    md = [
        "## Runs needed (cross-validation over calibration runs)",
        "",
        "First-order statistic (`qdrift fit`'s default). Error of an N-run fit: RMS over the "
        "correctable steps of the relative error, "
        f"estimated by `qdrift cv` against the all-runs fit with the finite-population correction `sqrt(M/(M-N))`; "
        f"runs needed: smallest N from which the {CONFIDENCE:.0%} quantile of that error stays within the tolerance "
        "(bootstrap interval over splits in brackets; `extrapolated` = beyond the recorded runs, along `1/sqrt(N)`). "
        "The last column asks the stricter question of the worst step instead of the RMS over steps.",
        "",
        "| pair | scheduler | steps | samples/run | runs recorded | 95% quantile at N=1 | at N=5 | "
        "5 runs enough for 10%? | runs for 10% | runs for 5% | runs for 10% at every step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for key in [f"need_{tol}" for tol in TOLERANCES] + ["need_max"]:
            need = r[key]
            cells.append(f"{need.runs} [{need.low}-{need.high}]" + (" extrapolated" if need.extrapolated else ""))
        q5 = r["q5"]
        enough = "n/a" if not np.isfinite(q5) else ("yes" if q5 <= 0.1 else "no")
        md.append(
            f"| `{r['pair'].split(':')[1]}` | {r['scheduler']} | {r['steps']} | {r['batch']} | "
            f"{r['runs']} | {r['q1']:.3f} | "
            f"{q5:.3f} | {enough} | {cells[0]} | {cells[1]} | {cells[2]} |"
        )
    truth_rows = [r for r in rows if "truth" in r]
    if truth_rows:
        md += [
            "",
            "### Check against the analytic truth (noise-like error, one-step solvers)",
            "",
            f"{CONFIDENCE:.0%} quantile of the RMS relative error of an N-run fit: estimated by "
            "cross-validation (`qdrift cv`, "
            "from the recorded runs only) vs computed against the known `v_i` (300 fits on N distinct runs).",
            "",
            "| pair | scheduler | samples/run | N | CV estimate | against the truth | runs for 10% (CV / truth) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in truth_rows:
            for n in r["truth"]:
                md.append(
                    f"| `{r['pair'].split(':')[1]}` | {r['scheduler']} | {r['batch']} | {n} | "
                    f"{r['cv_at'][n]:.4f} | {r['truth'][n]:.4f} | "
                    f"{r['need_0.1'].runs} / {needed_from(r['truth'], 0.1)} |"
                )
    elapsed = time.time() - start
    md += ["", f"Generated by `{command_line()}` ({elapsed / 60:.1f} min on 2 CPU cores)."]
    write_section("runs_needed", "\n".join(md), page=args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
