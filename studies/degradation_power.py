"""Is a recipe's degradation real but small, or absent? The replication table's cells at 20x the samples.

The replication table (``studies/replication_table.py``, 1000 samples per set) cannot tell whether
``w8a8`` degrades the digits models: its paired ``Q - FP`` intervals straddle 0. This study redraws
the named cells with many more samples, from the same seeds as the table (FP and Q: seeds
100000+, the independent FP reference: seeds 200000+, batch ``k`` uses ``seed + k``), and measures
the degradation three ways, all paired over the shared seeds:

- FD to the 360 test digits and FD to the independent FP set: paired percentile bootstrap of
  ``FD(Q) - FD(FP)`` (rows resampled jointly, as in the table);
- KID to the FP set (``torchmetrics``' unbiased polynomial-kernel MMD², ``poly_mmd``): the samples
  are cut into ``--blocks`` disjoint blocks (Q, FP and reference rows of one block share indices);
  ``KID(Q_b, R_b) - KID(FP_b, R_b)`` is unbiased for the population difference in every block, and
  the blocks are independent, so the mean over blocks gets a Student-t interval (``scipy.stats``);
- per seed: the relative L2 change of the final sample, ``|x_Q - x_FP| / |x_FP|`` (median and the
  fraction above 0.2), which shows whether the recipe changes samples at all.

A recipe degrades *measurably* where a paired interval lies above 0. The resolution of the
bootstrap intervals is reported as their half-width.

    python studies/degradation_power.py                              # w8a8 on both models, 20000 samples per set
    python studies/degradation_power.py --sample-seed 500000 --reference-seed 600000   # a replication on other seeds
    python studies/degradation_power.py --cells unet:ddim:w8a8 --samples 5000   # one cell, smaller
    python studies/degradation_power.py report                       # re-render the docs section from the CSV

Rows are added to ``docs/results/degradation_power.csv`` (a row with the same cell, sample count and
seeds is replaced), and the section ``degradation_power`` of ``docs/results.md`` shows them all.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
import warnings

import numpy as np
import torch
from _report import ROOT, command_line, write_section
from replication_table import (
    FP_OTHER_SEEDS,
    SAMPLE_SEED,
    FrechetToReference,
    draw,
    features_of,
    paired_difference,
    write_csv,
)
from scipy import stats

from qdrift_stats.zoo import digits_pair, load_digits_tensors, named_pair
from qdrift_stats.zoo.named import pair_name

warnings.filterwarnings("ignore")

CSV = ROOT / "docs" / "results" / "degradation_power.csv"
DEFAULT_CELLS = ("unet:ddim:w8a8", "dit:flow-euler:w8a8")


def kid_block_difference(
    q: torch.Tensor, fp: torch.Tensor, ref: torch.Tensor, blocks: int
) -> tuple[float, float, float]:
    """Mean over disjoint blocks of ``KID(Q_b, R_b) - KID(FP_b, R_b)`` with a t interval (95%).

    ``q``, ``fp``, ``ref``: features ``(N, d)``; ``q`` and ``fp`` share their rows' seeds.
    KID is torchmetrics' unbiased MMD² with the polynomial kernel ``(x.y / d + 1)^3``.
    """
    from torchmetrics.image.kid import poly_mmd

    n = min(len(q), len(fp), len(ref)) // blocks * blocks
    diffs = []
    for b in np.array_split(np.arange(n), blocks):
        r = ref[b]
        diffs.append(float(poly_mmd(q[b], r) - poly_mmd(fp[b], r)))
    diffs = np.asarray(diffs)
    mean, se = float(diffs.mean()), float(diffs.std(ddof=1) / math.sqrt(blocks))
    half = float(stats.t.ppf(0.975, blocks - 1)) * se
    return mean, mean - half, mean + half


def per_seed_change(q_images: np.ndarray, fp_images: np.ndarray) -> tuple[float, float]:
    """Median relative L2 change of the final samples, and the fraction of seeds above 0.2."""
    q = torch.as_tensor(q_images).flatten(1).double()
    fp = torch.as_tensor(fp_images).flatten(1).double()
    rel = (q - fp).norm(dim=1) / fp.norm(dim=1).clamp_min(1e-12)
    return float(rel.median()), float((rel > 0.2).double().mean())


def run(args) -> list[dict]:
    test_features = features_of(load_digits_tensors("test")[0])
    fd_test = FrechetToReference(test_features)
    fp_sets: dict[tuple[str, str], tuple] = {}
    rows = []
    for spec in args.cells:
        model, scheduler, recipe = spec.split(":")
        key = (model, scheduler)
        if key not in fp_sets:
            pair = digits_pair(model, name=f"digits_{model}_fp")
            fp = draw(pair, scheduler, args.steps, args.samples, args.sample_seed, model="fp")
            ref = draw(pair, scheduler, args.steps, args.samples, args.reference_seed, model="fp")
            fp_sets[key] = (fp, ref, FrechetToReference(ref.features))
            print(f"{model}/{scheduler}: FP sets of {args.samples} in {fp.seconds + ref.seconds:.0f} s", flush=True)
        fp, ref, fd_fp = fp_sets[key]
        start = time.time()
        q = draw(named_pair(pair_name(model, recipe)), scheduler, args.steps, args.samples, args.sample_seed)
        row = {
            "model": model,
            "scheduler": scheduler,
            "recipe": recipe,
            "steps": args.steps,
            "num_samples": args.samples,
            "sample_seed": args.sample_seed,
            "reference_seed": args.reference_seed,
            "bootstrap": args.bootstrap,
            "blocks": args.blocks,
            "q_seconds": q.seconds,
        }
        for metric, fd in (("test", fd_test), ("fp", fd_fp)):
            row[f"fd_{metric}_fp"], row[f"fd_{metric}_q"] = fd(fp.features), fd(q.features)
            d, lo, hi = paired_difference(fd, fp.features, q.features, args.bootstrap)
            row.update({f"q_minus_fp_{metric}": d, f"q_minus_fp_{metric}_lo": lo, f"q_minus_fp_{metric}_hi": hi})
        d, lo, hi = kid_block_difference(q.features, fp.features, ref.features, args.blocks)
        row.update({"kid_q_minus_fp": d, "kid_q_minus_fp_lo": lo, "kid_q_minus_fp_hi": hi})
        row["median_rel_change"], row["frac_rel_change_above_0_2"] = per_seed_change(q.images, fp.images)
        row["seconds"] = time.time() - start
        rows.append(row)
        print(
            f"{spec}: Q - FP  FD test {row['q_minus_fp_test']:+.4f} [{row['q_minus_fp_test_lo']:+.4f}, "
            f"{row['q_minus_fp_test_hi']:+.4f}]  FD fp {row['q_minus_fp_fp']:+.4f} [{row['q_minus_fp_fp_lo']:+.4f}, "
            f"{row['q_minus_fp_fp_hi']:+.4f}]  KID {d:+.2e} [{lo:+.2e}, {hi:+.2e}]  ({row['seconds']:.0f} s)",
            flush=True,
        )
    return rows


def _interval(row: dict, key: str, spec: str) -> str:
    lo, hi = float(row[f"{key}_lo"]), float(row[f"{key}_hi"])
    mark = " **above 0**" if lo > 0 else " (below 0)" if hi < 0 else ""
    return f"{float(row[key]):{spec}} [{lo:{spec}}, {hi:{spec}}]{mark}"


def render(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| model | scheduler | recipe | samples per set | seeds: FP and Q / reference | FD→test: Q "
        "− FP [paired CI] | FD→FP: Q − FP [paired CI] "
        "| KID→FP: Q − FP [t CI over blocks] | per-seed change: median | seeds changed > 20% |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['scheduler']} | {r['recipe']} | {int(float(r['num_samples']))} "
            f"| {r['sample_seed']}+ / {r['reference_seed']}+ "
            f"| {_interval(r, 'q_minus_fp_test', '+.4f')} | {_interval(r, 'q_minus_fp_fp', '+.4f')} "
            f"| {_interval(r, 'kid_q_minus_fp', '+.1e')} | {100 * float(r['median_rel_change']):.1f}% "
            f"| {100 * float(r['frac_rel_change_above_0_2']):.1f}% |"
        )
    lines += [
        "",
        "Interval half-widths (the smallest effect these samples resolve): "
        + "; ".join(
            f"{r['model']}/{r['recipe']} (seeds {r['sample_seed']}+): FD→test "
            f"±{(float(r['q_minus_fp_test_hi']) - float(r['q_minus_fp_test_lo'])) / 2:.4f}, "
            f"FD→FP ±{(float(r['q_minus_fp_fp_hi']) - float(r['q_minus_fp_fp_lo'])) / 2:.4f}"
            for r in rows
        )
        + ".",
    ]
    return "\n".join(lines)


KEY = ("model", "scheduler", "recipe", "steps", "num_samples", "sample_seed", "reference_seed")


def read_csv() -> list[dict]:
    if not CSV.exists():
        return []
    with CSV.open() as fh:
        return list(csv.DictReader(fh))


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows with the same cell, sample count and seeds as a ``new`` row are replaced by it."""

    def key(r):
        return tuple(str(r[k]) for k in KEY)

    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", default="run", choices=("run", "report"))
    parser.add_argument("--cells", nargs="+", default=list(DEFAULT_CELLS), help="model:scheduler:recipe")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--sample-seed", type=int, default=SAMPLE_SEED, help="first seed of the FP and Q sets")
    parser.add_argument("--reference-seed", type=int, default=FP_OTHER_SEEDS[0], help="first seed of the FP reference")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--header", default=None, help="the section's first paragraph (report)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.command == "run":
        start = time.time()
        rows = merge(read_csv(), run(args))
        write_csv(rows, CSV)
        header = args.header or (
            f"`{command_line()}` ({(time.time() - start) / 60:.1f} min on 2 cores): "
            f"{args.samples} samples per set, {args.steps} steps, guidance 2.0, "
            f"{args.bootstrap} paired bootstrap resamples, KID over {args.blocks} blocks."
        )
    else:
        rows = read_csv()
        header = args.header or "Re-rendered from `docs/results/degradation_power.csv`."
    write_section("degradation_power", render(rows, header))


if __name__ == "__main__":
    main()
