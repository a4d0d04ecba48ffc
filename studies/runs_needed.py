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

    python studies/runs_needed.py                  # about 15 minutes on 2 cores
    python studies/runs_needed.py --quick          # a smoke run, not for the docs
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
    args = parser.parse_args()
    torch.set_num_threads(2)
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
