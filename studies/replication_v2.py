"""Replication table v2 on the digits zoo: the library's estimators against the published Q-Drift correction and PTQD.

Per cell (model, scheduler, PTQ recipe): one calibration store (5 paired runs of 64 samples, seeds
0..4, 25 steps), shared by every row; its error budget (``qdrift_stats.validate.budget``); then FP,
Q and Q corrected by each row from the same seeds (batch k uses seed 100000 + k), and an
independent FP reference set (seeds 200000+). Metric: Fréchet distance in the digits classifier's
feature space to the FP reference; every difference against Q is paired (same seeds, same
bootstrap indices). 'Gap closed' = (FD Q - FD row) / (FD Q - FD FP).

Rows: ``published`` (the published Q-Drift code's conditional variance and step rescaling, bias
off), ``ptqd`` (PTQD's output map), ``first-order`` (the library's default before issue 12),
``persistent`` (the persistence-aware statistic, the default of ``qdrift fit``, with the pull sized by the local
spread), ``persistent-noise-pull`` (the same with the pull of a state that is all noise: the default before the
local spread), ``persistent-ptqd``, ``persistent-landing`` (the default's statistic with the pull solved at the landing
level, an option), ``persistent-mapped`` (persistence measured along the path the corrected sampler follows before
its pull: the default since the path was flipped; this row was run before the flip, when it was an option),
``persistent-state-map`` (the default with output maps that may also regress on the sampler state, an option),
``decomposed``, ``auto`` (``qdrift fit --estimator auto``: it samples the pair tens of times per
held-out run, 20 to 30 minutes per cell on one shared CPU core, so it is run on chosen cells with ``--only``, beside
``persistent``, and rendered against it with ``--render-auto``). Library rows use the shrink form at strength 1
(``auto`` the form and profile it chose).

    python studies/replication_v2.py                       # the reduced table in docs/results.md
    python studies/replication_v2.py --samples 1000 --cells all   # the full version (hours on 2 cores)
    python studies/replication_v2.py --samples 1000 --cells degraded --rows published ptqd persistent \
        --csv replication_v2_degraded.csv                  # every cell the v1 table measured as degraded
    python studies/replication_v2.py --samples 1000 --cells degraded --rows persistent auto \
        --only unet/ddim/w3a4 --csv replication_v2_auto.csv  # the automatic choice on chosen cells
    python studies/replication_v2.py --render-auto replication_v2_auto.csv   # its section
    python studies/replication_v2.py --samples 1000 --cells all --rows published ptqd persistent \
        --only unet/ddim/w8a8 ... --csv replication_v2_undegraded.csv   # the v1 cells not measured as degraded
    python studies/replication_v2.py --samples 1000 --render-undegraded replication_v2_undegraded.csv   # its section

``--cells degraded`` takes the cells whose paired ``Q - FP`` in FD to the FP distribution the v1
replication table (``docs/results/replication_table.csv``, 1000 samples) measured above 0; each is then
re-tested here on this run's own samples. Besides each row against Q, that run reports the default
(``persistent``) against each peer per cell, and the median gap closed over the cells degraded in this run
with a bootstrap interval (each cell's sets resampled with one index draw shared by every row, cells drawn
independently), so the median difference default - peer is paired.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _report import ROOT, command_line, pct, write_section
from replication_table import BATCH, FrechetToReference, features_of, paired_difference

from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.correct.sample import sample
from qdrift_stats.estimators import get_estimator
from qdrift_stats.estimators.persistent import PersistentEstimator
from qdrift_stats.record.lockstep import record
from qdrift_stats.validate.budget import error_budget
from qdrift_stats.zoo import ZOO_RECIPES, digits_pair, named_pair
from qdrift_stats.zoo.named import pair_name

warnings.filterwarnings("ignore")

ROWS = (
    "published",
    "ptqd",
    "first-order",
    "persistent",
    "persistent-noise-pull",
    "persistent-nobias",
    "persistent-ptqd",
    "persistent-accumulated",
    "persistent-landing",
    "persistent-mapped",
    "persistent-state-map",
    "decomposed",
    "auto",
)
REDUCED_CELLS = [("unet", "ddim", "w3a4"), ("dit", "flow-euler", "w3a4")]
V1_TABLE = ROOT / "docs" / "results" / "replication_table.csv"
DEFAULT_ROW = "persistent"
PEERS = ("published", "ptqd")
#: Options compared with the default in the degraded table's summary (median difference and per-cell paired verdicts).
OPTIONS_AGAINST_DEFAULT = ("persistent-plain-map",)
#: How a rendered table names the default row of an earlier run, when a later run recomputed the default.
PREVIOUS_DEFAULTS = ("persistent-r2-gate", "persistent-ptqd-terms", "persistent-quantized-path", "persistent-plain-map")
#: What each earlier default was, for the rendered table's header.
PREVIOUS_MEANING = {
    "persistent-r2-gate": "the default before the output map was split (PTQD's whole map only at steps with "
    "R^2 >= 0.2)",
    "persistent-ptqd-terms": "the default before the affine output map (PTQD's slope, else each step's mean, "
    "decided on the trajectory)",
    "persistent-quantized-path": "the default before the output-mapped path (persistence measured along the "
    "uncorrected quantized path)",
    "persistent-plain-map": "the default before the state-aware output map (the map regresses on the FP output only)",
}
SHOWN_ROWS = ROWS + PREVIOUS_DEFAULTS
#: auto runs after the default's map began to see the state write CSVs named with this prefix; earlier ones were
#: anchored on the plain map (the column "anchor" of the auto section says which).
STATE_ANCHOR_PREFIX = "replication_v2_auto_state_"
AUTO_RUNS_NOTE = (
    "The column 'anchor' says which default a run had: runs before the default's output map saw the sampler state "
    "(`plain map`) have the plain map, today's `persistent-plain-map`, as their default column and as auto's "
    "candidate `persistent`; runs after it (`state-aware map`) have today's default."
)
SCHEDULERS = {"unet": ("ddim", "euler", "dpmpp-2m"), "dit": ("flow-euler", "flow-dpmpp-2m")}


ACTIVE = list(ROWS)


def draw(pair, scheduler, steps, n, seed, model="q", estimator=None):
    images = sample(pair, scheduler, steps, n, min(BATCH, n), seed, model=model, estimator=estimator)
    return features_of(images) if np.isfinite(images).all() else None


def estimator_of(row):
    """The estimator of a row: a registry name, or ``persistent-accumulated`` (the default's affine output map
    with the accumulated cross term everywhere; the default takes the carried one)."""
    if row == "persistent-accumulated":
        return PersistentEstimator(cross="accumulated")
    return get_estimator(row)


def degraded_cells(path=V1_TABLE):
    """``(model, scheduler, recipe)`` of every cell whose v1 paired ``Q - FP`` (FD to FP) interval lies above 0."""
    cells = []
    for r in csv.DictReader(path.open()):
        low = r.get("q_minus_fp_fp_lo", "")
        key = (r["model"], r["scheduler"], r["recipe"])
        if low not in ("", "nan") and float(low) > 0 and key not in cells:
            cells.append(key)
    return cells


def fp_sets(job):
    """FP features from the sample seeds and the independent FP reference: shared by every recipe of a scheduler."""
    model, scheduler, args = job
    torch.set_num_threads(1)
    fp_pair = digits_pair(model, name=f"digits_{model}_fp")
    return (model, scheduler), {
        "fp": draw(fp_pair, scheduler, args.steps, args.samples, 100_000, "fp"),
        "reference": draw(fp_pair, scheduler, args.steps, args.samples, 200_000, "fp"),
    }


def bootstrap_fd(fd, feats, keys, n_boot, seed):
    """``{key: (n_boot,)}`` FD of every set under one shared row resampling per replicate (paired across keys)."""
    rng = np.random.default_rng(seed)
    n = len(feats[keys[0]])
    out = {k: np.empty(n_boot) for k in keys}
    for b in range(n_boot):
        idx = torch.as_tensor(rng.integers(0, n, n))
        for k in keys:
            out[k][b] = fd(feats[k][idx])
    return out


def cell(job):
    model, scheduler, recipe, args, fp_feats = job
    torch.set_num_threads(1)
    start = time.time()
    name = pair_name(model, recipe)
    pair = named_pair(name)
    steps, n = args.steps, args.samples
    out = {"model": model, "scheduler": scheduler, "recipe": recipe}
    if fp_feats is None:
        fp_feats = fp_sets((model, scheduler, args))[1]
    feats = {**fp_feats, "q": draw(pair, scheduler, steps, n, 100_000, "q")}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "c.zarr"
        record(
            pair,
            store,
            pair_name=f"qdrift_stats.zoo:{name}",
            scheduler_name=scheduler,
            steps=steps,
            runs=args.runs,
            batch_size=64,
            seed=0,
        )
        budget = error_budget(store)
        for key in (
            "persistence_ratio",
            "fraction_bias",
            "fraction_explained_ptqd",
            "fraction_explained_conditional",
            "fraction_independent",
            "fraction_persistence",
        ):
            out[f"budget_{key}"] = float(budget[key].values)
        for row in args.rows:
            fit_start = time.time()
            est = estimator_of(row)
            fitted = (est.with_params(pair=pair) if "pair" in est.param_names() else est).fit(store)
            out[f"ratio_{row}"] = float(getattr(fitted, "persistence_ratio", float("nan")))
            if row == "auto":
                c = fitted.choice
                out["auto_chose"] = "none" if c["estimator"] is None else f"{c['estimator']}/{c['form']}/{c['profile']}"
                out["auto_reason"] = c["reason"]
                out["auto_fit_minutes"] = (time.time() - fit_start) / 60
            path = Path(tmp) / f"{row}.safetensors"
            fitted.export(path)
            feats[row] = draw(pair, scheduler, steps, n, 100_000, "q", EstimatorFile.load(path))
    fd = FrechetToReference(feats["reference"])
    out["fd_fp"], out["fd_q"] = fd(feats["fp"]), fd(feats["q"])
    out["q_minus_fp"], out["q_minus_fp_lo"], out["q_minus_fp_hi"] = paired_difference(
        fd, feats["fp"], feats["q"], args.bootstrap
    )
    gap = out["fd_q"] - out["fd_fp"]
    for row in args.rows:
        if feats[row] is None:
            out[f"fd_{row}"] = out[f"closed_{row}"] = float("nan")
            out[f"{row}_minus_q"] = out[f"{row}_minus_q_lo"] = out[f"{row}_minus_q_hi"] = float("nan")
            continue
        out[f"fd_{row}"] = fd(feats[row])
        est, lo, hi = paired_difference(fd, feats["q"], feats[row], args.bootstrap)
        out[f"{row}_minus_q"], out[f"{row}_minus_q_lo"], out[f"{row}_minus_q_hi"] = est, lo, hi
        out[f"closed_{row}"] = (out["fd_q"] - out[f"fd_{row}"]) / gap if gap != 0 else float("nan")
    keys = ["fp", "q"] + [row for row in args.rows if feats[row] is not None]
    boot = bootstrap_fd(fd, feats, keys, args.bootstrap, seed=2)
    if DEFAULT_ROW in boot:
        for peer in PEERS:
            if peer in boot:
                diffs = boot[DEFAULT_ROW] - boot[peer]
                out[f"{DEFAULT_ROW}_minus_{peer}"] = out[f"fd_{DEFAULT_ROW}"] - out[f"fd_{peer}"]
                out[f"{DEFAULT_ROW}_minus_{peer}_lo"], out[f"{DEFAULT_ROW}_minus_{peer}_hi"] = np.percentile(
                    diffs, [2.5, 97.5]
                )
        if "auto" in boot:
            diffs = boot["auto"] - boot[DEFAULT_ROW]
            out[f"auto_minus_{DEFAULT_ROW}"] = out["fd_auto"] - out[f"fd_{DEFAULT_ROW}"]
            out[f"auto_minus_{DEFAULT_ROW}_lo"], out[f"auto_minus_{DEFAULT_ROW}_hi"] = np.percentile(diffs, [2.5, 97.5])
    out["_boot"] = boot
    out["seconds"] = time.time() - start
    print(
        f"{model}/{scheduler}/{recipe}: Q-FP {out['q_minus_fp']:+.3f}; "
        + ", ".join(f"{row} {pct(out[f'closed_{row}'])}" for row in args.rows)
        + f" ({out['seconds'] / 60:.1f} min)",
        flush=True,
    )
    return out


def verdict(lo, hi):
    return "helps" if hi < 0 else "hurts" if lo > 0 else "neutral"


def table(rows, shown=ROWS):
    shown = [r for r in shown if f"closed_{r}" in rows[0]]
    head = (
        "| cell | FD→FP: FP | Q | Q − FP [paired CI] | "
        + " | ".join(f"{r}: gap closed (row − Q [paired CI])" for r in shown)
        + " | budget: accumulated / independent | persistence | bias | explained (PTQD) | independent |\n|"
        + "---|" * (4 + len(shown) + 5)
    )
    lines = [head]
    for r in rows:
        cells = []
        for row in shown:
            cells.append(
                f"{pct(r[f'closed_{row}'])} ({r[f'{row}_minus_q']:+.3f} [{r[f'{row}_minus_q_lo']:+.3f}, "
                f"{r[f'{row}_minus_q_hi']:+.3f}] {verdict(r[f'{row}_minus_q_lo'], r[f'{row}_minus_q_hi'])})"
            )
        lines.append(
            f"| {r['model']}/{r['scheduler']}/{r['recipe']} | {r['fd_fp']:.3f} | {r['fd_q']:.3f} | "
            f"{r['q_minus_fp']:+.3f} [{r['q_minus_fp_lo']:+.3f}, {r['q_minus_fp_hi']:+.3f}] | "
            + " | ".join(cells)
            + f" | {r['budget_persistence_ratio']:.2f} | {pct(r['budget_fraction_persistence'])} | "
            f"{pct(r['budget_fraction_bias'])} | {pct(r['budget_fraction_explained_ptqd'])} | "
            f"{pct(r['budget_fraction_independent'])} |"
        )
    return "\n".join(lines)


def medians(rows):
    degraded = [r for r in rows if r["q_minus_fp_lo"] > 0]
    parts = []
    for row in [x for x in ROWS if f"closed_{x}" in rows[0]]:
        vals = [r[f"closed_{row}"] for r in degraded if np.isfinite(r[f"closed_{row}"])]
        if vals:
            parts.append(f"{row} {pct(float(np.median(vals)))}")
    return f"Median gap closed over the {len(degraded)} measurably degraded cells: " + ", ".join(parts) + "."


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cells", default="reduced", choices=("reduced", "all", "degraded"))
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="MODEL/SCHEDULER/RECIPE",
        help="only these of the chosen cells (to split a run over several invocations; writes the CSV, not the docs: "
        "merge with --render)",
    )
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="rows to compute")
    parser.add_argument("--csv", default="replication_v2.csv", help="CSV name under docs/results/")
    parser.add_argument(
        "--render",
        nargs="+",
        help="only render the docs section from these CSVs under docs/results/ (columns of later files are "
        "added to the rows of the first, matched by cell; same seeds, so the FP and Q sets are the same)",
    )
    parser.add_argument(
        "--render-auto",
        nargs="+",
        metavar="CSV",
        help="only render the auto row against the default from runs with --rows persistent auto (section "
        "replication_v2_auto, or --auto-section)",
    )
    parser.add_argument(
        "--auto-section",
        default="replication_v2_auto",
        help="the docs section --render-auto writes (to keep runs against an earlier default apart)",
    )
    parser.add_argument(
        "--render-undegraded",
        nargs="+",
        metavar="CSV",
        help="only render the cells outside the degraded set from runs with --cells all --only ... (section "
        "replication_v2_undegraded: does a row do harm where there is little or nothing to repair?)",
    )
    args = parser.parse_args()
    if args.render_undegraded:
        render_undegraded(args)
        return
    if args.render_auto:
        render_auto(args)
        return
    if args.render and args.cells == "degraded":
        render_degraded(args)
        return
    if args.render:
        render(args)
        return
    if args.cells == "all":
        cells = [(m, s, r) for m in ("unet", "dit") for s in SCHEDULERS[m] for r in ZOO_RECIPES]
    elif args.cells == "degraded":
        cells = degraded_cells()
    else:
        cells = REDUCED_CELLS
    if args.only:
        unknown = sorted(set(args.only) - {"/".join(c) for c in cells})
        if unknown:
            parser.error(f"--only: not among the chosen cells: {', '.join(unknown)}")
        cells = [c for c in cells if "/".join(c) in args.only]
    start = time.time()
    with ProcessPoolExecutor(args.processes) as pool:
        pairs = sorted({(m, s) for m, s, _ in cells})
        fps = dict(pool.map(fp_sets, [(m, s, args) for m, s in pairs]))
        rows = list(pool.map(cell, [(m, s, r, args, fps[(m, s)]) for m, s, r in cells]))
    elapsed = time.time() - start
    out = ROOT / "docs" / "results" / args.csv
    boots = {}
    for r in rows:
        r["minutes"] = elapsed / 60
        for key, values in r.pop("_boot").items():
            boots[f"{r['model']}/{r['scheduler']}/{r['recipe']}/{key}"] = values
    np.savez(out.with_name(out.stem + "_bootstrap.npz"), **boots)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if args.only:
        return
    if args.cells == "degraded":
        write_degraded_docs(rows, boots, args, elapsed, command_line())
        return
    if args.csv != "replication_v2.csv":
        return
    write_docs(rows, args, elapsed, command_line())


def render(args):
    files = [ROOT / "docs" / "results" / name for name in args.render]
    tables = [list(csv.DictReader(f.open())) for f in files]
    rows = []
    for base in tables[0]:
        row = {k: _num(v) for k, v in base.items()}
        for other in tables[1:]:
            for extra in other:
                if all(extra[k] == base[k] for k in ("model", "scheduler", "recipe")):
                    row.update(
                        {
                            k: _num(v)
                            for k, v in extra.items()
                            if k.startswith(tuple(f"{x}" for x in ("closed_", "fd_", "ratio_"))) or "_minus_q" in k
                        }
                    )
        rows.append(row)
    minutes = sum(float(t[0].get("minutes", "nan")) for t in tables)
    write_docs(
        rows,
        args,
        minutes * 60,
        " and ".join(f"`python studies/replication_v2.py{_flags(n)}`" for n in args.render),
        rendered=True,
    )


def _flags(name):
    if name == "replication_v2.csv":
        return ""
    if name == "replication_v2_default.csv":
        return f" --rows persistent persistent-noise-pull --csv {name}"
    return f" --rows persistent --csv {name}"


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def write_docs(rows, args, elapsed, command, rendered=False):
    cells = rows
    args.rows = [r for r in ROWS if f"closed_{r}" in rows[0]]
    md = [
        f"Generated by {command if rendered else '`' + command + '`'} ({elapsed / 60:.1f} min on 2 shared CPU cores)"
        + (f", rendered by `python studies/replication_v2.py --render {' '.join(args.render)}`" if rendered else "")
        + ". All numbers in `docs/results/replication_v2*.csv`. **Reduced**: "
        f"{len(cells)} cells, {args.samples} samples per set (the v1 table used 20 cells x 1000); the full command is "
        "`python studies/replication_v2.py --samples 1000 --cells all`.",
        "",
        f"{args.steps} steps, guidance 2.0, calibration: {args.runs} paired runs x 64 samples (seeds 0..), shared by "
        "every row; FD in the digits classifier's feature space to an independent FP set (seeds 200000+); paired "
        f"percentile bootstrap ({args.bootstrap} resamples) of each row − Q; library rows: shrink form, strength 1. "
        "The last five columns are the cell's error budget (shares of the predicted final mean square deviation).",
        "",
        table(rows),
        "",
        medians(rows),
    ]
    write_section("replication_v2", "\n".join(md))
    return cells


def median_closure(rows, boots, row):
    """Median gap closed by ``row`` over ``rows`` and its bootstrap replicates ``(n_boot,)``."""
    reps = []
    for r in rows:
        key = f"{r['model']}/{r['scheduler']}/{r['recipe']}"
        q, fp, x = boots[f"{key}/q"], boots[f"{key}/fp"], boots[f"{key}/{row}"]
        reps.append((q - x) / (q - fp))
    return float(np.median([r[f"closed_{row}"] for r in rows])), np.median(np.stack(reps), axis=0)


def render_degraded(args):
    """Merge degraded-cell runs by cell (later files add or replace rows; an earlier ``persistent`` row becomes
    the first unused name of :data:`PREVIOUS_DEFAULTS` when a later run has one) and write the docs section from the
    merged table."""
    files = [ROOT / "docs" / "results" / name for name in args.render]
    rows, boots = None, {}
    for path in files:
        table_k = [{key: _num(v) for key, v in r.items()} for r in csv.DictReader(path.open())]
        boot_k = dict(np.load(path.with_name(path.stem + "_bootstrap.npz")))
        if rows is None:
            rows, boots = table_k, boot_k
            continue
        later_default = f"closed_{DEFAULT_ROW}" in table_k[0]
        for base in rows:
            cell_key = f"{base['model']}/{base['scheduler']}/{base['recipe']}"
            extra = next((r for r in table_k if all(r[c] == base[c] for c in ("model", "scheduler", "recipe"))), None)
            if extra is None:
                continue
            if later_default and f"closed_{DEFAULT_ROW}" in base:
                previous = next(name for name in PREVIOUS_DEFAULTS if f"closed_{name}" not in base)
                for key in [key for key in base if _row_of(key) == DEFAULT_ROW]:
                    base[key.replace(DEFAULT_ROW, previous, 1)] = base.pop(key)
                boots[f"{cell_key}/{previous}"] = boots.pop(f"{cell_key}/{DEFAULT_ROW}")
            base.update({key: v for key, v in extra.items() if _row_of(key) is not None})
            for name in ("fp", "q"):  # same seeds: the same sets; keep the first run's replicates
                boot_k.pop(f"{cell_key}/{name}", None)
            boots.update({key: v for key, v in boot_k.items() if key.startswith(cell_key + "/")})
        for base in rows:  # the default against each peer, from the merged replicates
            cell_key = f"{base['model']}/{base['scheduler']}/{base['recipe']}"
            for peer in PEERS:
                if f"{cell_key}/{DEFAULT_ROW}" in boots and f"{cell_key}/{peer}" in boots:
                    diffs = boots[f"{cell_key}/{DEFAULT_ROW}"] - boots[f"{cell_key}/{peer}"]
                    base[f"{DEFAULT_ROW}_minus_{peer}"] = base[f"fd_{DEFAULT_ROW}"] - base[f"fd_{peer}"]
                    lo, hi = np.percentile(diffs, [2.5, 97.5])
                    base[f"{DEFAULT_ROW}_minus_{peer}_lo"], base[f"{DEFAULT_ROW}_minus_{peer}_hi"] = lo, hi
    minutes = sum(float(next(csv.DictReader(f.open()))["minutes"]) for f in files)
    missing = [f"{r['model']}/{r['scheduler']}/{r['recipe']}" for r in rows if f"closed_{DEFAULT_ROW}" not in r]
    if missing:
        raise SystemExit(f"no {DEFAULT_ROW} row for {', '.join(missing)} in {', '.join(args.render)}")
    commands = " and ".join(
        f"`python studies/replication_v2.py --samples {args.samples} --cells degraded --rows {_rows_in(f)} "
        + (f"--only {' '.join(_cells_in(f))} " if len(_cells_in(f)) < len(rows) else "")
        + f"--csv {f.name}`"
        for f in files
    )
    args.csv = files[0].name
    write_degraded_docs(
        rows, boots, args, minutes * 60, commands, rendered=f"python studies/replication_v2.py {_argv_tail()}"
    )


def _row_of(key):
    """The row a CSV column belongs to (``closed_persistent`` -> ``persistent``), or None."""
    for row in sorted(SHOWN_ROWS, key=len, reverse=True):
        if key in (f"closed_{row}", f"fd_{row}", f"ratio_{row}") or key.startswith(f"{row}_minus_"):
            return row
    return None


def _rows_in(path):
    first = next(csv.DictReader(path.open()))
    return " ".join(r for r in ROWS if f"closed_{r}" in first)


def _cells_in(path):
    return [f"{r['model']}/{r['scheduler']}/{r['recipe']}" for r in csv.DictReader(path.open())]


def _argv_tail():
    import sys

    return " ".join(sys.argv[1:])


def _sources(files, samples, cells, rows_of) -> str:
    """The docs line naming the ``--only`` runs a section was rendered from, their wall time and CSVs; ``cells`` is
    the ``--cells`` value of every run, or a function of the CSV's path giving it."""
    cells_of = cells if callable(cells) else (lambda f: cells)
    commands = " and ".join(
        f"`python studies/replication_v2.py --samples {samples} --cells {cells_of(f)} --rows {rows_of(f)} "
        f"--only {' '.join(_cells_in(f))} --csv {f.name}`"
        for f in files
    )
    minutes = sum(float(next(csv.DictReader(f.open()))["minutes"]) for f in files)
    return (
        f"Generated by {commands} ({minutes:.1f} min of wall time on 2 shared CPU cores), rendered by "
        f"`python studies/replication_v2.py {_argv_tail()}`. Numbers in "
        + ", ".join(f"`docs/results/{f.name}`" for f in files)
        + "."
    )


def render_undegraded(args):
    """The cells the v1 table did not measure as degraded (runs with ``--cells all --only ...``): per cell ``Q - FP``
    and each row's ``row - Q`` in FD to FP with paired intervals; the section ``replication_v2_undegraded``. Gap
    closed is not shown: it divides by a gap whose interval contains 0."""
    files = [ROOT / "docs" / "results" / name for name in args.render_undegraded]
    rows = []
    for f in files:  # merged by cell: a later run's default renames an earlier one (PREVIOUS_DEFAULTS), as above
        for r in csv.DictReader(f.open()):
            r = {k: _num(v) for k, v in r.items()}
            base = next((b for b in rows if all(b[c] == r[c] for c in ("model", "scheduler", "recipe"))), None)
            if base is None:
                rows.append(r)
                continue
            if f"{DEFAULT_ROW}_minus_q" in r and f"{DEFAULT_ROW}_minus_q" in base:
                # these runs began after the plain map's time: the newest earlier default not yet named
                previous = next(name for name in reversed(PREVIOUS_DEFAULTS) if f"{name}_minus_q" not in base)
                for key in [key for key in base if _row_of(key) == DEFAULT_ROW]:
                    base[key.replace(DEFAULT_ROW, previous, 1)] = base.pop(key)
            base.update({key: v for key, v in r.items() if _row_of(key) is not None})
    shown = [r for r in SHOWN_ROWS if f"{r}_minus_q" in rows[0]]
    lines = [
        "| cell | FD→FP: FP | Q | Q − FP [paired CI] | "
        + " | ".join(f"{r}: row − Q [paired CI]" for r in shown)
        + " |\n|"
        + "---|" * (4 + len(shown))
    ]
    for r in rows:
        cells = [
            f"{r[f'{row}_minus_q']:+.3f} [{r[f'{row}_minus_q_lo']:+.3f}, {r[f'{row}_minus_q_hi']:+.3f}] "
            f"{verdict(r[f'{row}_minus_q_lo'], r[f'{row}_minus_q_hi'])}"
            for row in shown
        ]
        lines.append(
            f"| {r['model']}/{r['scheduler']}/{r['recipe']} | {r['fd_fp']:.3f} | {r['fd_q']:.3f} | "
            f"{r['q_minus_fp']:+.3f} [{r['q_minus_fp_lo']:+.3f}, {r['q_minus_fp_hi']:+.3f}] "
            f"{'degraded here' if r['q_minus_fp_lo'] > 0 else 'better than FP here' if r['q_minus_fp_hi'] < 0 else ''}"
            " | " + " | ".join(cells) + " |"
        )
    summary = []
    for row in shown:
        hurts = [f"{r['model']}/{r['scheduler']}/{r['recipe']}" for r in rows if r[f"{row}_minus_q_lo"] > 0]
        helps = [f"{r['model']}/{r['scheduler']}/{r['recipe']}" for r in rows if r[f"{row}_minus_q_hi"] < 0]
        summary.append(
            f"- `{row}`: significantly worse than Q on {len(hurts)} of {len(rows)} cells"
            + (f" ({', '.join(hurts)})" if hurts else "")
            + f", significantly better on {len(helps)}"
            + (f" ({', '.join(helps)})" if helps else "")
            + "."
        )
    md = [
        _sources(files, args.samples, "all", lambda f: _rows_in(f)),
        "",
        f"The {len(rows)} cells of the v1 table that it did not measure as degraded in FD to FP; {args.samples} "
        "samples per set, the same seeds, calibration protocol, FD and paired bootstrap as the degraded table; "
        "library rows: shrink form, strength 1. A negative `row − Q` moves the samples' distribution towards FP's.",
        "",
        "\n".join(lines),
        "",
        "\n".join(summary),
    ]
    write_section("replication_v2_undegraded", "\n".join(md))


def render_auto(args):
    """The ``auto`` row against the default on the cells it was run on (runs with ``--rows persistent auto``): the
    section ``replication_v2_auto``."""
    files = [ROOT / "docs" / "results" / name for name in args.render_auto]
    v1_degraded = {"/".join(c) for c in degraded_cells()}
    rows = [
        {**{k: _num(v) for k, v in r.items()}, "anchor": _anchor_of(f)} for f in files for r in csv.DictReader(f.open())
    ]
    # the v1 table's degraded cells come first (the order of the runs), then the others
    rows.sort(key=lambda r: f"{r['model']}/{r['scheduler']}/{r['recipe']}" not in v1_degraded)
    n_degraded = sum(f"{r['model']}/{r['scheduler']}/{r['recipe']}" in v1_degraded for r in rows)
    lines = [
        "| cell | v1 degraded | anchor | Q − FP [paired CI] | default (`persistent`): gap closed (row − Q) | "
        "`auto`: gap closed (row − Q) | auto − default [paired CI] | auto chose (estimator/form/profile) | why | "
        "auto fit (min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"{r['model']}/{r['scheduler']}/{r['recipe']}"
        pieces = []
        for row in (DEFAULT_ROW, "auto"):
            lo, hi = r[f"{row}_minus_q_lo"], r[f"{row}_minus_q_hi"]
            pieces.append(
                f"{pct(r[f'closed_{row}'])} ({r[f'{row}_minus_q']:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict(lo, hi)})"
            )
        k = f"auto_minus_{DEFAULT_ROW}"
        who = {"helps": "auto better", "hurts": "default better", "neutral": "tie"}[verdict(r[k + "_lo"], r[k + "_hi"])]
        lines.append(
            f"| {name} | {'yes' if name in v1_degraded else 'no'} | {r['anchor']} | {r['q_minus_fp']:+.3f} "
            f"[{r['q_minus_fp_lo']:+.3f}, "
            f"{r['q_minus_fp_hi']:+.3f}] | {pieces[0]} | {pieces[1]} | {r[k]:+.3f} [{r[k + '_lo']:+.3f}, "
            f"{r[k + '_hi']:+.3f}] {who} | {r['auto_chose']} | {r['auto_reason']} | {r['auto_fit_minutes']:.1f} |"
        )
    md = [
        _sources(
            files,
            args.samples,
            lambda f: "degraded" if set(_cells_in(f)) <= v1_degraded else "all",
            lambda f: "persistent auto",
        ),
        "",
        f"{len(rows)} runs: {n_degraded} on the cells the v1 table measured as degraded (the 'v1 degraded' column; "
        f"the others are the undegraded cells, run with `--cells all`), {args.samples} samples per set, the same "
        "seeds, calibration store and FD as the tables above; `auto` is `qdrift fit --estimator auto` with its "
        "defaults (candidates first-order, persistent, persistent-ptqd, decomposed; strengths 0 to 32; 2 segments "
        "of log b; shrink then drift; "
        "the default kept unless beaten beyond the held-out noise).",
        "",
        AUTO_RUNS_NOTE,
        "",
        "\n".join(lines),
    ]
    write_section(args.auto_section, "\n".join(md))


def _anchor_of(path) -> str:
    """Which default an auto run's CSV was anchored on (see :data:`STATE_ANCHOR_PREFIX`)."""
    return "state-aware map" if path.name.startswith(STATE_ANCHOR_PREFIX) else "plain map"


def write_degraded_docs(rows, boots, args, elapsed, command, rendered=None):
    shown = [r for r in SHOWN_ROWS if f"closed_{r}" in rows[0]]
    degraded = [r for r in rows if r["q_minus_fp_lo"] > 0]
    head = (
        "| cell | FD→FP: FP | Q | Q − FP [paired CI] | "
        + " | ".join(f"{r}: gap closed (row − Q [paired CI])" for r in shown)
        + "".join(f" | {DEFAULT_ROW} − {p} [paired CI]" for p in PEERS if f"{DEFAULT_ROW}_minus_{p}" in rows[0])
        + " | budget: persistence / bias / explained (PTQD) / independent |\n|"
        + "---|" * (4 + len(shown) + sum(f"{DEFAULT_ROW}_minus_{p}" in rows[0] for p in PEERS) + 1)
    )
    lines = [head]
    for r in rows:
        cells = [
            f"{pct(r[f'closed_{row}'])} ({r[f'{row}_minus_q']:+.3f} [{r[f'{row}_minus_q_lo']:+.3f}, "
            f"{r[f'{row}_minus_q_hi']:+.3f}] {verdict(r[f'{row}_minus_q_lo'], r[f'{row}_minus_q_hi'])})"
            for row in shown
        ]
        for p in PEERS:
            k = f"{DEFAULT_ROW}_minus_{p}"
            if k in r:
                who = {"helps": "default better", "hurts": f"{p} better", "neutral": "tie"}
                cells.append(
                    f"{r[k]:+.3f} [{r[k + '_lo']:+.3f}, {r[k + '_hi']:+.3f}] {who[verdict(r[k + '_lo'], r[k + '_hi'])]}"
                )
        flag = "" if r["q_minus_fp_lo"] > 0 else " (not degraded here)"
        lines.append(
            f"| {r['model']}/{r['scheduler']}/{r['recipe']}{flag} | {r['fd_fp']:.3f} | {r['fd_q']:.3f} | "
            f"{r['q_minus_fp']:+.3f} [{r['q_minus_fp_lo']:+.3f}, {r['q_minus_fp_hi']:+.3f}] | "
            + " | ".join(cells)
            + f" | {pct(r['budget_fraction_persistence'])} / {pct(r['budget_fraction_bias'])} / "
            f"{pct(r['budget_fraction_explained_ptqd'])} / {pct(r['budget_fraction_independent'])} |"
        )
    summary = [f"Over the {len(degraded)} cells degraded in this run (Q − FP interval above 0), median gap closed:"]
    medians_by_row = {}
    for row in shown if degraded else []:
        est, reps = median_closure(degraded, boots, row)
        medians_by_row[row] = reps
        lo, hi = np.percentile(reps, [2.5, 97.5])
        summary.append(f"- `{row}`: {pct(est)} [{pct(lo)}, {pct(hi)}]")
    if DEFAULT_ROW in medians_by_row:
        for p in PEERS:
            if p in medians_by_row:
                est = median_closure(degraded, boots, DEFAULT_ROW)[0] - median_closure(degraded, boots, p)[0]
                lo, hi = np.percentile(medians_by_row[DEFAULT_ROW] - medians_by_row[p], [2.5, 97.5])
                points = f"{100 * est:+.0f} points [{100 * lo:+.0f}, {100 * hi:+.0f}]"
                summary.append(f"- median `{DEFAULT_ROW}` − median `{p}`: {points}")
    for option in OPTIONS_AGAINST_DEFAULT:
        if option in medians_by_row and DEFAULT_ROW in medians_by_row:
            est = median_closure(degraded, boots, option)[0] - median_closure(degraded, boots, DEFAULT_ROW)[0]
            lo, hi = np.percentile(medians_by_row[option] - medians_by_row[DEFAULT_ROW], [2.5, 97.5])
            worse_than_q = [
                f"{r['model']}/{r['scheduler']}/{r['recipe']}" for r in rows if r[f"{option}_minus_q_lo"] > 0
            ]
            verdicts = {"helps": [], "hurts": []}
            for r in rows:
                key = f"{r['model']}/{r['scheduler']}/{r['recipe']}"
                diffs = boots[f"{key}/{option}"] - boots[f"{key}/{DEFAULT_ROW}"]  # FD: below 0 favours the option
                verdict_k = verdict(*np.percentile(diffs, [2.5, 97.5]))
                if verdict_k in verdicts:
                    verdicts[verdict_k].append(key)
            for peer in PEERS:
                if peer in medians_by_row:
                    diff = median_closure(degraded, boots, option)[0] - median_closure(degraded, boots, peer)[0]
                    p_lo, p_hi = np.percentile(medians_by_row[option] - medians_by_row[peer], [2.5, 97.5])
                    summary.append(
                        f"- median `{option}` − median `{peer}`: {100 * diff:+.0f} points "
                        f"[{100 * p_lo:+.0f}, {100 * p_hi:+.0f}]"
                    )
            summary.append(
                f"- median `{option}` − median `{DEFAULT_ROW}`: {100 * est:+.0f} points "
                f"[{100 * lo:+.0f}, {100 * hi:+.0f}]; "
                f"per cell (paired FD interval) `{option}` better on {len(verdicts['helps'])} "
                f"({', '.join(verdicts['helps']) or 'none'}), worse on {len(verdicts['hurts'])} "
                f"({', '.join(verdicts['hurts']) or 'none'}); significantly worse than Q on "
                + (", ".join(worse_than_q) or "none")
            )
    worse = (
        [f"{r['model']}/{r['scheduler']}/{r['recipe']}" for r in rows if r[f"{DEFAULT_ROW}_minus_q_lo"] > 0]
        if f"{DEFAULT_ROW}_minus_q_lo" in rows[0]
        else []
    )
    summary.append(
        f"- cells where `{DEFAULT_ROW}` is significantly worse than Q: " + (", ".join(worse) if worse else "none")
    )
    source = (
        f"Generated by {command} ({elapsed / 60:.1f} min of wall time summed over the runs, on 2 shared CPU cores), "
        f"rendered by `{rendered}`. Numbers "
        "in `docs/results/replication_v2_degraded*.csv`, bootstrap replicates in the `*_bootstrap.npz` beside them."
        + "".join(
            f" `{name}` is {PREVIOUS_MEANING[name]}, from an earlier run."
            for name in PREVIOUS_DEFAULTS
            if f"closed_{name}" in rows[0]
        )
        if rendered
        else f"Generated by `{command}` ({elapsed / 60:.1f} min on 2 shared CPU cores). Numbers in "
        f"`docs/results/{args.csv}`, bootstrap replicates in `docs/results/{Path(args.csv).stem}_bootstrap.npz`."
    )
    md = [
        source,
        "",
        f"{len(rows)} cells (every cell the v1 table measured as degraded in FD to FP), {args.samples} samples per "
        f"set, {args.steps} steps, guidance 2.0; calibration: {args.runs} paired runs x 64 samples (seeds 0..), shared "
        "by every row; FD in the digits classifier's feature space to an independent FP set (seeds 200000+); paired "
        f"percentile bootstrap ({args.bootstrap} resamples); library rows: shrink form, strength 1. Gap closed = "
        "(FD Q − FD row) / (FD Q − FD FP); a negative `row − Q` or `default − peer` favours the first.",
        "",
        "\n".join(lines),
        "",
        "\n".join(summary),
    ]
    write_section("replication_v2_degraded", "\n".join(md))


if __name__ == "__main__":
    main()
