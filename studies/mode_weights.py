"""What the testbed's two metrics do not see: which mode each sample lands in.

``studies/mixture_persistent.py`` and ``studies/calibration_draws.py`` score a correction by the within-mode
variance and by the NLL under the true mixture. Neither sees the *mode proportions*: a sample that lands near the
wrong mode has the right within-mode spread and a high likelihood. A persistent error can move samples between
modes (a weight error ``dW z`` tilts the flow), and a correction can repair the spread but not the proportions.

For every cell of those tables (50 steps; one calibration store, seed 0, 5 runs x 64 samples; the default
``qdrift fit`` with the pair, exported and reloaded), FP, Q and Q corrected are sampled from the same seeds and
each sample is assigned to its most likely mode. Reported:

- the total variation between each set's mode proportions and FP's, ``TV = 0.5 sum_k |p_k - p_k^FP|``, and the
  share of it the correction removes, ``(TV_Q - TV_corrected) / TV_Q`` [95% paired bootstrap interval]; FP's own
  proportions on other seeds give the noise floor;
- the share of seeds that land in the same mode as FP's sample of the same seed (FP on other seeds: chance level);
- the within-mode variance gap closed (as the other tables), beside it;
- the two held-out scores of ``qdrift fit --estimator auto`` on these samples against FP's: the MMD² at the local
  bandwidth (its default) and the energy distance, for Q and for the corrected set.

    python studies/mode_weights.py            # the section in docs/results.md (a few minutes on 2 cores)
    python studies/mode_weights.py --quick    # a smoke run, not for the docs
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
from _report import ROOT, command_line, pct, processes, write_section
from mixture_persistent import FAMILIES, STEPS, within_var_batch

from qdrift_stats import testbed
from qdrift_stats.correct.auto import distribution_score, local_bandwidth
from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.correct.sample import sample
from qdrift_stats.estimators.persistent import PersistentEstimator
from qdrift_stats.record.lockstep import record

warnings.filterwarnings("ignore")

EVAL_SEED, OTHER_SEED = 100_000, 300_000


def proportions(modes: np.ndarray, k: int) -> np.ndarray:
    """Share of samples per mode, ``(k,)``."""
    return np.bincount(modes, minlength=k) / len(modes)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


def cell(job):
    family, scheduler, regime, samples, reps = job
    torch.set_num_threads(1)
    pair = getattr(testbed, family)()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "c.zarr"
        record(pair, store, pair_name=f"qdrift_stats.testbed:{family}", scheduler_name=scheduler, steps=STEPS,
               runs=5, batch_size=64, seed=0)  # fmt: skip
        fitted = PersistentEstimator(pair=pair).fit(store)
        fitted.export(Path(tmp) / "e.safetensors")
        est = EstimatorFile.load(Path(tmp) / "e.safetensors")
        # the pull alone: the same estimator without the output map (its statistic fitted for no map)
        PersistentEstimator(pair=pair, bias="none").fit(store).export(Path(tmp) / "pull.safetensors")
        pull = EstimatorFile.load(Path(tmp) / "pull.safetensors")
        # the default before: the output map on the FP output only (persistent-plain-map)
        PersistentEstimator(pair=pair, map_state=False).fit(store).export(Path(tmp) / "plain.safetensors")
        plain_map = EstimatorFile.load(Path(tmp) / "plain.safetensors")
        sets = {
            "fp": sample(pair, scheduler, STEPS, samples, 2000, EVAL_SEED, model="fp"),
            "fp_other": sample(pair, scheduler, STEPS, samples, 2000, OTHER_SEED, model="fp"),
            "q": sample(pair, scheduler, STEPS, samples, 2000, EVAL_SEED, model="q"),
            "corrected": sample(pair, scheduler, STEPS, samples, 2000, EVAL_SEED, model="q", estimator=est),
            # the default's file at strength 0: its output map alone, no pull
            "map_only": sample(
                pair, scheduler, STEPS, samples, 2000, EVAL_SEED, model="q", estimator=est, strength=0.0
            ),
            "pull_only": sample(pair, scheduler, STEPS, samples, 2000, EVAL_SEED, model="q", estimator=pull),
            "plain_map": sample(pair, scheduler, STEPS, samples, 2000, EVAL_SEED, model="q", estimator=plain_map),
        }
    flat = {k: torch.as_tensor(v, dtype=torch.float64).reshape(len(v), -1) for k, v in sets.items()}
    modes = {k: pair.mixture.assign(v).numpy() for k, v in flat.items()}
    k = int(max(m.max() for m in modes.values())) + 1
    props = {name: proportions(m, k) for name, m in modes.items()}
    parts = ("corrected", "map_only", "pull_only", "plain_map")
    tv = {name: total_variation(props[name], props["fp"]) for name in ("fp_other", "q") + parts}
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(reps):
        idx = rng.integers(0, samples, samples)
        p = {name: proportions(modes[name][idx], k) for name in ("fp", "q", "corrected")}
        tv_q, tv_c = total_variation(p["q"], p["fp"]), total_variation(p["corrected"], p["fp"])
        boot.append((tv_q - tv_c) / tv_q if tv_q > 0 else np.nan)
    within = {n: within_var_batch(flat[n], torch.as_tensor(modes[n]), torch.arange(samples)[None])[0] for n in flat}
    reference = flat["fp"].numpy()
    bandwidth = local_bandwidth(reference)
    out = {
        "family": family,
        "scheduler": scheduler,
        "regime": regime,
        "samples": samples,
        "modes": k,
        "map_applied": fitted.output_map is not None,
        "tv_fp_other": tv["fp_other"],
        "tv_q": tv["q"],
        "tv_corrected": tv["corrected"],
        "tv_closed": (tv["q"] - tv["corrected"]) / tv["q"] if tv["q"] > 0 else float("nan"),
        "tv_closed_lo": float(np.nanpercentile(boot, 2.5)),
        "tv_closed_hi": float(np.nanpercentile(boot, 97.5)),
        "same_mode_fp_other": float(np.mean(modes["fp_other"] == modes["fp"])),
        "same_mode_q": float(np.mean(modes["q"] == modes["fp"])),
        "same_mode_corrected": float(np.mean(modes["corrected"] == modes["fp"])),
        **{f"tv_{n}": tv[n] for n in parts[1:]},
        **{f"tv_closed_{n}": (tv["q"] - tv[n]) / tv["q"] if tv["q"] > 0 else float("nan") for n in parts[1:]},
        **{f"same_mode_{n}": float(np.mean(modes[n] == modes["fp"])) for n in parts[1:]},
        "within_var_closed": (within["q"] - within["corrected"]) / (within["q"] - within["fp"]),
        "within_var_corrected_over_fp": within["corrected"] / within["fp"],
        **{f"within_var_closed_{n}": (within["q"] - within[n]) / (within["q"] - within["fp"]) for n in parts[1:]},
        "bandwidth": bandwidth,
    }
    for name in ("q",) + parts:
        for score in ("mmd", "energy"):
            out[f"{score}_{name}"] = distribution_score(flat[name].numpy(), reference, score, bandwidth)
    out["seconds"] = time.time() - start
    print(
        f"{family:>28} {scheduler:>14}: TV Q {tv['q']:.3f} corrected {tv['corrected']:.3f} "
        f"(FP other seeds {tv['fp_other']:.3f}); within-var closed {pct(out['within_var_closed'])} "
        f"({out['seconds']:.0f}s)",
        flush=True,
    )
    return out


def table(rows):
    lines = [
        "| family | regime | scheduler | map | mode TV to FP: FP other seeds / Q / corrected | TV removed [95%] | "
        "same mode as FP's seed: FP other seeds / Q / corrected | within-var gap closed (corrected / FP) | "
        "held-out MMD² (local bandwidth): Q / corrected | energy distance: Q / corrected |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['family'].replace('mixture_', '')} | {r['regime']} | {r['scheduler']} | "
            f"{'yes' if r['map_applied'] else 'no'} | {r['tv_fp_other']:.3f} / {r['tv_q']:.3f} / "
            f"{r['tv_corrected']:.3f} | {pct(r['tv_closed'])} [{pct(r['tv_closed_lo'])}, {pct(r['tv_closed_hi'])}] | "
            f"{pct(r['same_mode_fp_other'])} / {pct(r['same_mode_q'])} / {pct(r['same_mode_corrected'])} | "
            f"{pct(r['within_var_closed'])} ({pct(r['within_var_corrected_over_fp'])}) | "
            f"{r['mmd_q']:.4f} / {r['mmd_corrected']:.4f} | {r['energy_q']:.3f} / {r['energy_corrected']:.3f} |"
        )
    return "\n".join(lines)


def parts_table(rows):
    """Where the repair of the mode proportions comes from, on the cells where Q moves them beyond the noise floor:
    the default's output map alone (its file at strength 0), its pull alone (fitted without the map), both; and the
    default before, whose map sees the FP output only (``persistent-plain-map``)."""
    lines = [
        "| family | scheduler | map | TV removed: map alone / pull alone / both (the default) / plain map | "
        "same mode as FP's seed: Q / map alone / pull alone / both / plain map | "
        "within-var gap closed: map alone / pull alone / both / plain map |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["tv_q"] > 2 * r["tv_fp_other"]:
            continue
        lines.append(
            f"| {r['family'].replace('mixture_', '')} | {r['scheduler']} | {'yes' if r['map_applied'] else 'no'} | "
            f"{pct(r['tv_closed_map_only'])} / {pct(r['tv_closed_pull_only'])} / {pct(r['tv_closed'])} / "
            f"{pct(r['tv_closed_plain_map'])} | "
            f"{pct(r['same_mode_q'])} / {pct(r['same_mode_map_only'])} / {pct(r['same_mode_pull_only'])} / "
            f"{pct(r['same_mode_corrected'])} / {pct(r['same_mode_plain_map'])} | "
            f"{pct(r['within_var_closed_map_only'])} / {pct(r['within_var_closed_pull_only'])} / "
            f"{pct(r['within_var_closed'])} / {pct(r['within_var_closed_plain_map'])} |"
        )
    return "\n".join(lines)


def summary(rows):
    lines = []
    for regime in ("noise-like", "persistent", "strong persistent"):
        sel = [r for r in rows if r["regime"] == regime]
        if not sel:
            continue
        above = [r for r in sel if r["tv_q"] > 2 * r["tv_fp_other"]]
        removed = [r["tv_closed"] for r in above]
        mmd_wrong = [
            f"{r['family'].replace('mixture_', '')}/{r['scheduler']}"
            for r in sel
            if r["mmd_corrected"] > r["mmd_q"] and r["energy_corrected"] < r["energy_q"]
        ]
        lines.append(
            f"- **{regime}** ({len(sel)} cells): Q's mode proportions differ from FP's by more than twice FP's own "
            f"seed-to-seed TV on {len(above)} cells"
            + (
                f"; there the correction removes {pct(min(removed))} to {pct(max(removed))} of Q's TV "
                f"(median {pct(float(np.median(removed)))})"
                if removed
                else ""
            )
            + ". Cells where the MMD² at the local bandwidth ranks the corrected set below Q while the energy "
            "distance ranks it above: " + (", ".join(mmd_wrong) if mmd_wrong else "none") + "."
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="two cells, tiny sizes; writes nothing")
    args = parser.parse_args()
    jobs = [(f, s, regime, args.samples, args.bootstrap) for f, scheds, regime in FAMILIES for s in scheds]
    if args.quick:
        jobs = [(f, s, r, 300, 20) for f, s, r, *_ in jobs[:2]]
    start = time.time()
    with ProcessPoolExecutor(args.processes) as pool:
        rows = list(pool.map(cell, jobs))
    elapsed = time.time() - start
    if args.quick:
        return
    out = ROOT / "docs" / "results" / "mode_weights.csv"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md = [
        f"Generated by `{command_line()}` ({elapsed / 60:.1f} min on 2 shared CPU cores, {processes(args.processes)}). "
        "All numbers in `docs/results/mode_weights.csv`.",
        "",
        f"50 steps; one calibration store per cell (seed 0, 5 runs x 64 samples); the default `qdrift fit` with the "
        f"pair, exported and reloaded; {args.samples} samples per set from the same seeds (FP on other seeds for the "
        "noise floor); each sample assigned to its most likely mode of the true mixture. TV: total variation between "
        "a set's mode proportions and FP's; 'TV removed' = (TV Q - TV corrected) / TV Q, 95% paired bootstrap "
        f"({args.bootstrap} resamples); the scores are those of `qdrift fit --estimator auto`, against FP's set.",
        "",
        table(rows),
        "",
        summary(rows),
        "",
        "Where the repair of the mode proportions comes from, on the cells where Q's TV is above twice the noise "
        "floor: the default's output map alone (the exported file at strength 0: no pull), the pull alone "
        '(`PersistentEstimator(bias="none")`: the statistic fitted with no map), both (the default, whose map also '
        "sees the sampler state), and the default before, whose map sees the FP output only (`persistent-plain-map`: "
        "its map and pull).",
        "",
        parts_table(rows),
    ]
    write_section("mode_weights", "\n".join(md))


if __name__ == "__main__":
    main()
