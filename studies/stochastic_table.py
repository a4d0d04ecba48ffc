"""Stochastic samplers on the analytic mixture testbed: the marginal-preserving correction against ground truth.

For Euler-ancestral and DDPM at 25 and 50 steps on ``mixture_vp_noise``: 5 paired calibration runs of
64 samples (the step noise shared between FP and Q, so the lock-step perturbation is the model's),
the first-order empirical statistic exported and reloaded, then FP, Q, and Q corrected in two ways,
all from the same seeds (same initial and step noise):

- ``noise-lowering`` (the library's correction for stochastic samplers): the injected noise is lowered
  by the quantization variance, the pull (shrink) takes only what the noise cannot absorb;
- ``pull only``: the deterministic samplers' shrink pull with the injected noise left as it is (what
  the published Q-Drift code does for Euler-ancestral).

Metric: the fraction of the FP-to-Q gap in within-mode variance closed, with a 95% paired bootstrap
interval (200 resamples), and the NLL gap closed. 3000 samples per set (half the deterministic
table's, to stay under ~8 minutes on 2 cores).

    python studies/stochastic_table.py           # about 5 minutes on 2 cores
    python studies/stochastic_table.py --quick   # a smoke run, not for the docs
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _report import ROOT, command_line, pct, write_section
from mixture_table import bootstrap_closed

from qdrift_stats import testbed
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.correct.sample import sample
from qdrift_stats.schedulers.base import get_adapter
from qdrift_stats.testbed.evaluate import DIVERGED, _measure, evaluate_correction

warnings.filterwarnings("ignore")

CASES = [("euler-ancestral", 25), ("euler-ancestral", 50), ("ddpm", 25), ("ddpm", 50)]
PAIR = "mixture_vp_noise"
SAMPLE_SEED = 100_000


def pull_only(pair, scheduler, steps, estimator, num_samples):
    """Q corrected by the shrink pull alone: the adapter's injected noise is hidden from the correction."""
    adapter = get_adapter(scheduler)
    original = adapter.noise_std
    adapter.noise_std = lambda grid: np.zeros(grid.num_steps)
    try:
        return sample(
            pair,
            scheduler,
            steps,
            num_samples,
            min(num_samples, 2000),
            SAMPLE_SEED,
            model="q",
            estimator=estimator,
            correction="shrink",
        )
    finally:
        adapter.noise_std = original


def cell(scheduler, steps, args):
    pair = getattr(testbed, PAIR)()
    with tempfile.TemporaryDirectory() as tmp:
        result = evaluate_correction(
            pair,
            scheduler,
            steps,
            pair_name=f"qdrift_stats.testbed:{PAIR}",
            runs=5,
            batch=64,
            num_samples=args.samples,
            sample_seed=SAMPLE_SEED,
            forms=("shrink",),
            keep_samples=True,
            workdir=tmp,
        )
        estimator = EstimatorFile.load(Path(tmp) / f"{scheduler}_{steps}.safetensors")
        draws = pull_only(pair, scheduler, steps, estimator, args.samples)
    reference = pair.mixture.sample(args.samples, seed=SAMPLE_SEED + 1).numpy()
    result.extra["draws"]["pull"] = draws
    result.metrics["pull"], result.status["pull"] = _measure(draws, pair, reference, result.metrics["q"])
    row = {"scheduler": scheduler, "steps": steps}
    for model in ("fp", "q", "shrink", "pull"):
        for metric in ("within_var", "nll"):
            row[f"{metric}_{model}"] = result.metrics[model][metric]
    for form in ("shrink", "pull"):
        row[f"closed_{form}"] = result.closed(form)
        row[f"closed_{form}_lo"], row[f"closed_{form}_hi"] = bootstrap_closed(result, pair, form, args.bootstrap)
        row[f"closed_nll_{form}"] = result.closed(form, "nll")
        row[f"status_{form}"] = result.status.get(form, "ok")
    return row


def fmt_closed(row, form):
    if row[f"status_{form}"] == DIVERGED:
        return "**diverged**"
    return f"{pct(row[f'closed_{form}'])} [{pct(row[f'closed_{form}_lo'])}, {pct(row[f'closed_{form}_hi'])}]"


def table(rows):
    lines = [
        "| scheduler | steps | within-var FP | Q | noise-lowering | pull only | gap closed: noise-lowering [95% CI] "
        "| pull only [95% CI] | NLL gap closed: noise-lowering | pull only |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scheduler']} | {r['steps']} | {r['within_var_fp']:.4f} | {r['within_var_q']:.4f} "
            f"| {r['within_var_shrink']:.4f} | {r['within_var_pull']:.4f} | {fmt_closed(r, 'shrink')} "
            f"| {fmt_closed(r, 'pull')} | {pct(r['closed_nll_shrink'])} | {pct(r['closed_nll_pull'])} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.bootstrap = 500, 20
    rows = []
    start = time.time()
    for scheduler, steps in CASES:
        rows.append(cell(scheduler, steps, args))
        print(
            f"{scheduler:>16} {steps:>3}: noise-lowering {fmt_closed(rows[-1], 'shrink')}, pull only "
            f"{fmt_closed(rows[-1], 'pull')} ({time.time() - start:.0f}s)",
            flush=True,
        )
    if args.quick:
        return
    out = ROOT / "docs" / "results" / "stochastic_table.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_section(
        "stochastic",
        f"Stochastic samplers on `{PAIR}` (5 x 64 calibration runs, first-order statistic, {args.samples} samples "
        f"per set, {args.bootstrap} bootstrap resamples; `{command_line()}`, {time.time() - start:.0f} s):\n\n"
        + table(rows),
    )


if __name__ == "__main__":
    main()
