"""Heun (two model calls per step) and PNDM / PLMS (multistep, a two-call first step) on the analytic
mixture testbed: the correction against ground truth.

For Heun and PLMS at 10, 25 and 50 steps on ``mixture_vp_noise`` (Euler and DDIM, their one-step
counterparts, at the same step counts as references): 5 paired calibration runs of 64 samples,
recorded one step per landing (a two-call step is the quantized sampler's whole step from the FP
state, its second call at its own prediction), the first-order empirical statistic on the steps'
effective outputs exported and reloaded, then FP, Q and Q corrected (shrink, once per landing) from
the same seeds.

Metric: the fraction of the FP-to-Q gap in within-mode variance closed, with a 95% paired bootstrap
interval (200 resamples), and the NLL gap closed. 3000 samples per set.

    python studies/heun_table.py           # about 3-4 minutes on 2 cores
    python studies/heun_table.py --quick   # a smoke run, not for the docs
"""

from __future__ import annotations

import argparse
import csv
import time
import warnings

from _report import ROOT, command_line, pct, write_section
from mixture_table import bootstrap_closed

from qdrift_stats import testbed
from qdrift_stats.testbed.evaluate import DIVERGED, evaluate_correction

warnings.filterwarnings("ignore")

CASES = [(name, steps) for name in ("heun", "euler", "pndm", "ddim") for steps in (10, 25, 50)]
CALLS = {"heun": lambda n: 2 * n - 1, "pndm": lambda n: n + 1}
PAIR = "mixture_vp_noise"


def cell(scheduler, steps, args):
    pair = getattr(testbed, PAIR)()
    result = evaluate_correction(
        pair,
        scheduler,
        steps,
        pair_name=f"qdrift_stats.testbed:{PAIR}",
        runs=5,
        batch=64,
        num_samples=args.samples,
        forms=("shrink",),
        keep_samples=True,
    )
    row = {"scheduler": scheduler, "steps": steps, "model_calls": CALLS.get(scheduler, lambda n: n)(steps)}
    for model in ("fp", "q", "shrink"):
        for metric in ("within_var", "nll"):
            row[f"{metric}_{model}"] = result.metrics[model][metric]
    row["closed"] = result.closed("shrink")
    row["closed_lo"], row["closed_hi"] = bootstrap_closed(result, pair, "shrink", args.bootstrap)
    row["closed_nll"] = result.closed("shrink", "nll")
    row["status"] = result.status.get("shrink", "ok")
    row["max_coefficient"] = result.max_coefficient["shrink"]
    return row


def fmt_closed(row):
    if row["status"] == DIVERGED:
        return "**diverged**"
    return f"{pct(row['closed'])} [{pct(row['closed_lo'])}, {pct(row['closed_hi'])}]"


def table(rows):
    lines = [
        "| scheduler | steps | model calls | within-var FP | Q | corrected | gap closed [95% CI] | NLL gap closed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scheduler']} | {r['steps']} | {r['model_calls']} | {r['within_var_fp']:.4f} "
            f"| {r['within_var_q']:.4f} | {r['within_var_shrink']:.4f} | {fmt_closed(r)} | {pct(r['closed_nll'])} |"
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
        print(f"{scheduler:>6} {steps:>3}: closed {fmt_closed(rows[-1])} ({time.time() - start:.0f}s)", flush=True)
    if args.quick:
        return
    out = ROOT / "docs" / "results" / "heun_table.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_section(
        "heun",
        f"Heun and PLMS on `{PAIR}` (5 x 64 calibration runs, first-order statistic on the steps' effective outputs, "
        "shrink "
        f"correction once per landing, {args.samples} samples per set, {args.bootstrap} bootstrap resamples; "
        f"`{command_line()}`, {time.time() - start:.0f} s):\n\n" + table(rows),
    )


if __name__ == "__main__":
    main()
