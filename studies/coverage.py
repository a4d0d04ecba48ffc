"""Coverage of each estimator's confidence interval, on the mixture testbed where the truth is known.

For Euler (VP, epsilon) and flow-matching Euler with the noise-like error
``m_q = m_fp + A sin(G z + phi)`` the lock-step perturbation is ``Delta_i = c_i A sin(.)`` with the
gain ``c_i = b_{i+1} - b_i``, so the true statistic is ``v_i = (b_{i+1} - b_i)^2 A^2 / 2`` (the
high-frequency phase is uniform: ``E sin^2 = 1/2``). For each of many calibration seeds, record
``--runs`` runs of ``--batch`` samples, fit every estimator, and count how often its nominal 95%
interval covers ``v_i`` at the correctable steps (``b_{i+1} > 0``). Also reported: the mean
relative bias of the estimate and the mean interval width relative to the truth.

The moment-matching estimator targets a different quantity (the correction that keeps the free-
running second moment, see its module) and the MAD / Huber scales are Gaussian-consistent, not
consistent for the sinusoid's arcsine distribution: their "coverage" of ``v_i`` measures that gap.

    python studies/coverage.py                 # about 6 minutes on 2 cores
    python studies/coverage.py --seeds 20      # a smoke run, not for the docs
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
from qdrift_stats.record import record
from qdrift_stats.store import open_store

from _report import ROOT, command_line, write_section

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
CASES = (("mixture_vp_noise", "euler", "vp"), ("mixture_flow_noise", "flow-euler", "flow"))


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


def run_case(pair_name: str, scheduler: str, kind: str, seeds: int, runs: int, batch: int, steps: int, workdir: Path) -> dict[str, dict[str, list]]:
    pair = getattr(testbed, pair_name)()
    out: dict[str, dict[str, list]] = {name: {"cover": [], "rel_bias": [], "rel_width": []} for name in ESTIMATORS}
    for s in range(seeds):
        store = workdir / f"{pair_name}_{s}.zarr"
        record(pair, store, pair_name=f"qdrift_stats.testbed:{pair_name}", scheduler_name=scheduler, steps=steps, runs=runs,
               batch_size=batch, seed=10_000 + s * runs, overwrite=True)
        ds = open_store(store).load()
        ds.attrs["_kind"] = kind
        truth = true_variance(ds)
        keep = ds["b_next"].values > 0
        for name, make in ESTIMATORS.items():
            fitted = make().fit(ds)
            lo, hi, v = fitted.ci_low[keep], fitted.ci_high[keep], fitted.variance[keep]
            t = truth[keep]
            out[name]["cover"].append((lo <= t) & (t <= hi))
            out[name]["rel_bias"].append(v / t - 1)
            out[name]["rel_width"].append((hi - lo) / t)
        for path in workdir.glob("*.zarr"):
            shutil.rmtree(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200, help="calibration seeds for the VP case (the flow case gets half)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "coverage.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    md = [
        "## Coverage of the estimators' 95% intervals (mixture testbed, known truth)",
        "",
        f"Truth: `v_i = (b_next - b)^2 A^2 / 2` (Euler and flow Euler, noise-like error). Each seed: {args.runs} calibration runs x "
        f"{args.batch} samples, {args.steps} steps; coverage counted over the {args.steps - 1} correctable steps of every seed "
        "(Wilson 95% interval of the proportion in brackets). Nominal: 95%.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for pair_name, scheduler, kind in CASES:
            seeds = args.seeds if kind == "vp" else max(1, args.seeds // 2)
            res = run_case(pair_name, scheduler, kind, seeds, args.runs, args.batch, args.steps, Path(tmp))
            md += [f"### `{pair_name}`, `{scheduler}`, {seeds} seeds", "",
                   "| estimator | coverage | per-step coverage (min-max) | mean rel. bias | mean CI width / truth |", "|---|---|---|---|---|"]
            for name, r in res.items():
                cover = np.array(r["cover"])  # (seeds, steps)
                hits, n = int(cover.sum()), cover.size
                lo, hi = wilson(hits, n)
                per_step = cover.mean(axis=0)
                bias = float(np.mean(r["rel_bias"]))
                width = float(np.nanmean(r["rel_width"]))
                md.append(f"| {name} | {hits / n:.1%} [{lo:.1%}, {hi:.1%}] | {per_step.min():.0%}-{per_step.max():.0%} | {bias:+.1%} | {width:.3f} |")
            md.append("")
    elapsed = time.time() - start
    md += [f"Generated by `{command_line()}` ({elapsed / 60:.1f} min on 2 CPU cores)."]
    write_section("coverage", "\n".join(md), page=args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
