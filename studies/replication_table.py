"""Q-Drift on real networks under real PTQ: the digits zoo's UNet and DiT under every recipe.

For each (model, scheduler, recipe) cell: 5 paired calibration runs (``record``), the first-order
empirical statistic (``EmpiricalEstimator(statistic="first-order")``), exported to an estimator
file and reloaded (as in production); then samples of Q and of Q corrected by the drift and by the
shrink form, from the *same seeds* as the FP samples of that (model, scheduler). Metrics, all in the
digits classifier's feature space (``qdrift_stats.metrics``):

- Fréchet distance (FD) to the 360 held-out test digits, with a 95% percentile bootstrap interval;
- FD to an independent FP sample set (other seeds): the distance to the FP distribution, which is
  what the correction tries to restore (the FP row shows this distance's own noise floor);
- paired bootstrap intervals of the differences ``corrected - Q`` and ``Q - FP`` (the generated sets
  share their seeds, so they are resampled jointly: the same indices for every set);
- class consistency (fraction classified as their conditioning label) with a Wilson interval (a proportion:
  a bootstrap of 1000 hits in 1000 collapses to [1, 1]); "within Q's CI" compares the corrected value with it,
  and an exact McNemar test (statsmodels) compares corrected and Q paired, seed by seed.

The FP sampler's stability is measured by FP sample sets from other seeds (FD to the test digits of
each, and FD between them). The Fréchet distances use torchmetrics ``FrechetInceptionDistance``
on features extracted once per sample set (an identity feature module; the reference statistics
are kept with ``reset_real_features=False``), so a bootstrap resample costs no network call.

    python studies/replication_table.py                 # the table: 20 cells, 51 min on 2 cores shared with other jobs
    python studies/replication_table.py --full          # only the first scheduler of each model: 14 cells, ~38 min
    python studies/replication_table.py --quick         # a smoke run, not for the docs
    python studies/replication_table.py fp-reference    # data/zoo_fp_reference.json (for the test)
    python studies/replication_table.py control         # the corrections applied to FP (adds rows to the CSV)
    python studies/replication_table.py report          # re-render the docs sections from the CSV
    python studies/replication_table.py pair-errors     # the named pairs' output errors (docs/zoo.md)

The docs were made by ``table``, then ``control``, then ``report --reading --header '...'`` (the header
names the table run and its time; ``report`` re-renders from the CSV without sampling).

Writes ``docs/results/replication_table.csv``, ``docs/img/replication_grid_*.png`` and the sections
``replication_table`` and ``zoo_fp_reproduction`` of ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _report import ROOT, command_line, write_section
from torch import nn

from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.correct.sample import sample
from qdrift_stats.estimators import EmpiricalEstimator
from qdrift_stats.loop import initial_noise, prepared_scheduler
from qdrift_stats.metrics import bootstrap_ci, class_consistency_ci, class_hits, frechet_distance
from qdrift_stats.metrics.images import default_features
from qdrift_stats.record.lockstep import record
from qdrift_stats.schedulers.base import step_grid
from qdrift_stats.testbed.metrics import gap_closed
from qdrift_stats.zoo import (
    ZOO_RECIPES,
    digits_pair,
    load_digits_tensors,
    named_pair,
    quantized_digits_model,
    to_pixels,
)
from qdrift_stats.zoo.named import CALIBRATION_CALLS, CALIBRATION_SEED, pair_name

warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)

#: Schedulers per model: the first is the one every recipe runs on.
SCHEDULERS = {"unet": ("ddim", "euler", "dpmpp-2m"), "dit": ("flow-euler", "flow-dpmpp-2m")}
FORMS = ("drift", "shrink")
CALIBRATION_RUN_SEED = 0
SAMPLE_SEED = 100_000  # FP, Q and corrected samples (batch k uses SAMPLE_SEED + k)
FP_OTHER_SEEDS = (200_000, 300_000)  # independent FP sets: the FP reference and a stability check
BATCH = 250
_TOL = 1e-9  # a Wilson bound of 1 computes as 1 - 1e-16
DIVERGED = "diverged"
PARTIAL = Path(tempfile.gettempdir()) / "qdrift_replication_table"  # per-setting CSVs while it runs
REFERENCE_JSON = ROOT / "data" / "zoo_fp_reference.json"
#: The reduced, deterministic setting of the FP reproduction check (tests/test_zoo_pairs.py).
REDUCED = {"unet": {"scheduler": "ddim"}, "dit": {"scheduler": "flow-euler"}}
REDUCED_COMMON = {"steps": 10, "num_samples": 200, "batch_size": 200, "seed": 0, "guidance_scale": 2.0}


# --- features and metrics ---------------------------------------------------------------------


class _Precomputed(nn.Module):
    """Identity 'feature network' for torchmetrics: the inputs already are classifier features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@torch.no_grad()
def features_of(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Classifier features ``(N, 64)`` of ``[-1, 1]`` images (clamped), float64."""
    net = default_features()
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    return torch.cat([net(x[i : i + 500]) for i in range(0, len(x), 500)]).double()


class FrechetToReference:
    """``fd(features)``: torchmetrics' Fréchet distance of generated features to a fixed reference set."""

    def __init__(self, reference_features: torch.Tensor):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = FrechetInceptionDistance(
            feature=_Precomputed(reference_features.shape[1]), reset_real_features=False
        )
        self.metric.update(reference_features, real=True)

    def __call__(self, features: torch.Tensor) -> float:
        self.metric.reset()  # keeps the reference statistics
        self.metric.update(torch.as_tensor(features).double(), real=False)
        return float(self.metric.compute())


def paired_difference(
    fd: FrechetToReference, a: torch.Tensor, b: torch.Tensor, n_boot: int
) -> tuple[float, float, float]:
    """``fd(b) - fd(a)`` with a paired percentile bootstrap interval (rows resampled jointly)."""
    stacked = torch.stack([a, b], dim=1)
    return bootstrap_ci(lambda s: fd(s[:, 1]) - fd(s[:, 0]), stacked, n_boot=n_boot, seed=1)


def verdict(low: float, high: float) -> str:
    """'helps' (interval below 0), 'hurts' (above 0) or 'neutral' for a corrected - Q difference."""
    if math.isnan(low):
        return DIVERGED
    return "helps" if high < 0 else "hurts" if low > 0 else "neutral"


# --- sampling ---------------------------------------------------------------------------------


def sample_labels(pair, scheduler: str, steps: int, num_samples: int, seed: int) -> np.ndarray:
    """The conditioning labels ``sample`` draws for these seeds (same generator, same order)."""
    labels = []
    for k, start in enumerate(range(0, num_samples, BATCH)):
        size = min(BATCH, num_samples - start)
        _, cond = initial_noise(pair, prepared_scheduler(pair, scheduler, steps), size, seed + k)
        labels.append(cond["class_labels"].cpu().numpy())
    return np.concatenate(labels)


def calibrate(pair, name: str, scheduler: str, steps: int, runs: int, batch: int, workdir: Path) -> EstimatorFile:
    """record -> fit (first-order empirical) -> export -> reload, as ``testbed.evaluate`` does."""
    store = workdir / f"{name}_{scheduler}.zarr"
    record(
        pair,
        store,
        pair_name=f"qdrift_stats.zoo:{name}",
        scheduler_name=scheduler,
        steps=steps,
        runs=runs,
        batch_size=batch,
        seed=CALIBRATION_RUN_SEED,
        overwrite=True,
    )
    fitted = EmpiricalEstimator(statistic="first-order").fit(store)
    path = workdir / f"{name}_{scheduler}.safetensors"
    fitted.export(path, overwrite=True)
    return EstimatorFile.load(path)


@dataclass
class SampleSet:
    images: np.ndarray
    seconds: float
    status: str = "ok"
    features: torch.Tensor | None = None


def draw(
    pair,
    scheduler: str,
    steps: int,
    num_samples: int,
    seed: int,
    model: str = "q",
    estimator: EstimatorFile | None = None,
    correction: str | None = None,
) -> SampleSet:
    start = time.time()
    images = sample(
        pair, scheduler, steps, num_samples, BATCH, seed, model=model, estimator=estimator, correction=correction
    )
    out = SampleSet(images, time.time() - start)
    if not np.isfinite(images).all():
        out.status = DIVERGED
    else:
        out.features = features_of(images)
    return out


# --- the table --------------------------------------------------------------------------------


@dataclass
class Setting:
    """FP sample sets of one (model, scheduler) and the metrics shared by its cells."""

    model: str
    scheduler: str
    fp: SampleSet
    fp_other: list[SampleSet]
    labels: np.ndarray
    fd_test: FrechetToReference
    fd_fp: FrechetToReference  # reference: the first independent FP set


def fp_setting(model: str, scheduler: str, args, test_features: torch.Tensor, extra_fp_sets: int) -> Setting:
    pair = digits_pair(model, name=f"digits_{model}_fp")
    fp = draw(pair, scheduler, args.steps, args.samples, SAMPLE_SEED, model="fp")
    others = [draw(pair, scheduler, args.steps, args.samples, s, model="fp") for s in FP_OTHER_SEEDS[:extra_fp_sets]]
    labels = sample_labels(pair, scheduler, args.steps, args.samples, SAMPLE_SEED)
    return Setting(
        model, scheduler, fp, others, labels, FrechetToReference(test_features), FrechetToReference(others[0].features)
    )


def consistency(images: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Class consistency with its Wilson interval (a binomial proportion)."""
    return class_consistency_ci(images, labels)


def paired_consistency(q_images: np.ndarray, images: np.ndarray, labels: np.ndarray) -> dict:
    """Corrected vs Q class consistency over the same seeds: exact McNemar test (statsmodels).

    Only the discordant seeds carry information: ``gained`` (Q missed, corrected hits) and ``lost``.
    """
    from statsmodels.stats.contingency_tables import mcnemar

    q, c = class_hits(q_images, labels), class_hits(images, labels)
    table = [[int(np.sum(q & c)), int(np.sum(q & ~c))], [int(np.sum(~q & c)), int(np.sum(~q & ~c))]]
    return {
        "consistency_diff": float(c.mean() - q.mean()),
        "consistency_gained": table[1][0],
        "consistency_lost": table[0][1],
        "consistency_mcnemar_p": float(mcnemar(table, exact=True).pvalue),
    }


def fp_row(setting: Setting, args) -> dict:
    fp = setting.fp
    est, lo, hi = bootstrap_ci(setting.fd_test, fp.features, n_boot=args.bootstrap, seed=3)
    cc, cc_lo, cc_hi = consistency(fp.images, setting.labels)
    other_fd_test = [setting.fd_test(s.features) for s in setting.fp_other]
    return {
        "model": setting.model,
        "scheduler": setting.scheduler,
        "steps": args.steps,
        "recipe": "fp",
        "form": "fp",
        "num_samples": args.samples,
        "fd_test": est,
        "fd_test_lo": lo,
        "fd_test_hi": hi,
        "fd_fp": setting.fd_fp(fp.features),
        "fd_test_other_seeds": ";".join(f"{v:.4f}" for v in other_fd_test),
        "fd_fp_other_pair": (
            FrechetToReference(setting.fp_other[1].features)(setting.fp_other[0].features)
            if len(setting.fp_other) > 1
            else float("nan")
        ),
        "consistency": cc,
        "consistency_lo": cc_lo,
        "consistency_hi": cc_hi,
        "status": "ok",
        "seconds": fp.seconds,
    }


def cell(setting: Setting, recipe: str, args, keep: dict) -> list[dict]:
    """Rows for Q, drift and shrink of one recipe (the FP row is shared, see :func:`fp_row`)."""
    model, scheduler = setting.model, setting.scheduler
    name = pair_name(model, recipe)
    start = time.time()
    quantized_digits_model(model, recipe)  # built once per process; timed separately
    quantize_seconds = time.time() - start
    pair = named_pair(name)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        estimator = calibrate(pair, name, scheduler, args.steps, args.runs, args.calib_batch, Path(tmp))
        calib_seconds = time.time() - start
    sets = {"q": draw(pair, scheduler, args.steps, args.samples, SAMPLE_SEED)}
    for form in FORMS:
        sets[form] = draw(pair, scheduler, args.steps, args.samples, SAMPLE_SEED, estimator=estimator, correction=form)
    if (model, scheduler, recipe) in keep:
        keep[(model, scheduler, recipe)] = {"fp": setting.fp.images, **{k: v.images for k, v in sets.items()}}
    step = step_grid(prepared_scheduler(pair, scheduler, args.steps))
    fp_feat, q = setting.fp.features, sets["q"]
    fp_fd_test, fp_fd_fp = setting.fd_test(fp_feat), setting.fd_fp(fp_feat)
    rows = []
    for form, s in sets.items():
        row = {
            "model": model,
            "scheduler": scheduler,
            "steps": args.steps,
            "recipe": recipe,
            "form": form,
            "num_samples": args.samples,
            "status": s.status,
            "seconds": s.seconds,
            "calibration_seconds": calib_seconds,
            "quantize_seconds": quantize_seconds,
        }
        if form != "q":
            row["max_coefficient"] = float(np.max(estimator.coefficients(step, form)))
        if form == "drift":  # what the derivation's drift would apply without the clip at 1
            row["max_coefficient_unclipped"] = float(np.max(estimator.coefficients(step, "drift-unclipped")))
        if s.status == DIVERGED:
            nan = float("nan")
            row.update({k: nan for k in ("fd_test", "fd_test_lo", "fd_test_hi", "fd_fp", "consistency")})
            row["verdict_test"] = row["verdict_fp"] = DIVERGED
            rows.append(row)
            continue
        est, lo, hi = bootstrap_ci(setting.fd_test, s.features, n_boot=args.bootstrap, seed=3)
        cc, cc_lo, cc_hi = consistency(s.images, setting.labels)
        row.update(
            {
                "fd_test": est,
                "fd_test_lo": lo,
                "fd_test_hi": hi,
                "fd_fp": setting.fd_fp(s.features),
                "consistency": cc,
                "consistency_lo": cc_lo,
                "consistency_hi": cc_hi,
            }
        )
        if form == "q":
            d, d_lo, d_hi = paired_difference(setting.fd_test, fp_feat, s.features, args.bootstrap)
            row.update({"q_minus_fp_test": d, "q_minus_fp_test_lo": d_lo, "q_minus_fp_test_hi": d_hi})
            d, d_lo, d_hi = paired_difference(setting.fd_fp, fp_feat, s.features, args.bootstrap)
            row.update({"q_minus_fp_fp": d, "q_minus_fp_fp_lo": d_lo, "q_minus_fp_fp_hi": d_hi})
        else:
            for metric, fd in (("test", setting.fd_test), ("fp", setting.fd_fp)):
                d, d_lo, d_hi = (
                    paired_difference(fd, q.features, s.features, args.bootstrap)
                    if q.features is not None
                    else (float("nan"),) * 3
                )
                row.update(
                    {
                        f"diff_{metric}": d,
                        f"diff_{metric}_lo": d_lo,
                        f"diff_{metric}_hi": d_hi,
                        f"verdict_{metric}": verdict(d_lo, d_hi),
                    }
                )
            row["gap_closed_test"] = gap_closed(fp_fd_test, rows[0]["fd_test"], est)
            row["gap_closed_fp"] = gap_closed(fp_fd_fp, rows[0]["fd_fp"], row["fd_fp"])
            row["consistency_within_q_ci"] = bool(
                rows[0]["consistency_lo"] - _TOL <= cc <= rows[0]["consistency_hi"] + _TOL
            )
            if q.status != DIVERGED:
                row.update(paired_consistency(q.images, s.images, setting.labels))
        rows.append(row)
    return rows


def plan(args) -> list[tuple[str, str, list[str]]]:
    """(model, scheduler, recipes): every recipe on each model's first scheduler, ``--full`` on the others."""
    out = []
    for model in args.models:
        for i, scheduler in enumerate(SCHEDULERS[model]):
            recipes = list(args.recipes) if i == 0 else [r for r in args.recipes if r in args.full]
            if recipes:
                out.append((model, scheduler, recipes))
    return out


# --- reporting --------------------------------------------------------------------------------


def f(value, spec=".3f") -> str:
    return (
        "n/a"
        if value is None or value == "" or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def ci(row, key, spec=".3f") -> str:
    return f"{f(row.get(key), spec)} [{f(row.get(key + '_lo'), spec)}, {f(row.get(key + '_hi'), spec)}]"


def signed_ci(row, key, spec="+.3f") -> str:
    return f"{f(row.get(key), spec)} [{f(row.get(key + '_lo'), spec)}, {f(row.get(key + '_hi'), spec)}]"


def _gap(q: dict, r: dict, metric: str) -> str:
    """Fraction of the FP-to-Q gap closed, shown only where the gap itself is measurable."""
    if not float(q.get(f"q_minus_fp_{metric}_lo", "nan")) > 0:
        return "—"
    return f"{100 * r[f'gap_closed_{metric}']:.0f}%" if f"gap_closed_{metric}" in r else "n/a"


def _outside(r: dict, q: dict) -> str:
    """'' when the corrected consistency lies in Q's interval, else whether it is above or below it."""
    value = float(r.get("consistency", "nan"))
    if math.isnan(value) or q.get("consistency_lo", 0) - _TOL <= value <= q.get("consistency_hi", 1) + _TOL:
        return ""
    return " (above Q's CI)" if value > q["consistency_hi"] else " (**below** Q's CI)"


def _mark(v: str) -> str:
    return {"helps": "**helps**", "hurts": "**hurts**", DIVERGED: "**diverged**"}.get(v, v)


def main_table(rows: list[dict]) -> str:
    lines = [
        "| model | scheduler | recipe | FD FP | FD Q [95% CI] | Q − FP [paired CI] | FD drift | "
        "drift − Q [paired CI] | drift "
        "| FD shrink | shrink − Q [paired CI] | shrink | consistency Q [CI] | drift | shrink |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, group in _groups(rows):
        fp, q, dr, sh = group["fp"], group["q"], group["drift"], group["shrink"]

        def kept(r, q=q):
            return f"{f(r.get('consistency'))}" + _outside(r, q)

        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {f(fp['fd_test'])} | {ci(q, 'fd_test')} | "
            f"{signed_ci(q, 'q_minus_fp_test')} "
            f"| {f(dr.get('fd_test'))} | {signed_ci(dr, 'diff_test')} | {_mark(dr.get('verdict_test', ''))} "
            f"| {f(sh.get('fd_test'))} | {signed_ci(sh, 'diff_test')} | {_mark(sh.get('verdict_test', ''))} "
            f"| {ci(q, 'consistency')} | {kept(dr)} | {kept(sh)} |"
        )
    return "\n".join(lines)


def fp_distance_table(rows: list[dict]) -> str:
    lines = [
        "| model | scheduler | recipe | FD→FP: FP (noise floor) | Q | Q − FP [paired CI] | drift | "
        "drift − Q [paired CI] | drift "
        "| shrink | shrink − Q [paired CI] | shrink | gap closed: drift | shrink | max pull "
        "coefficient: unclipped | drift | shrink |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, group in _groups(rows):
        fp, q, dr, sh = group["fp"], group["q"], group["drift"], group["shrink"]
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {f(fp['fd_fp'])} | {f(q['fd_fp'])} | {signed_ci(q, 'q_minus_fp_fp')} "
            f"| {f(dr.get('fd_fp'))} | {signed_ci(dr, 'diff_fp')} | {_mark(dr.get('verdict_fp', ''))} "
            f"| {f(sh.get('fd_fp'))} | {signed_ci(sh, 'diff_fp')} | {_mark(sh.get('verdict_fp', ''))} "
            f"| {_gap(q, dr, 'fp')} | {_gap(q, sh, 'fp')} "
            f"| {f(dr.get('max_coefficient_unclipped'), '.3g')} | {f(dr.get('max_coefficient'), '.3g')} "
            f"| {f(sh.get('max_coefficient'), '.3g')} |"
        )
    return "\n".join(lines)


def _groups(rows: list[dict]):
    fps = {(r["model"], r["scheduler"]): r for r in rows if r["form"] == "fp"}
    cells: dict[tuple, dict] = {}
    for r in rows:
        if r["form"] != "fp":
            cells.setdefault((r["model"], r["scheduler"], r["recipe"]), {"fp": fps[(r["model"], r["scheduler"])]})[
                r["form"]
            ] = r
    return cells.items()


def stability_table(rows: list[dict]) -> str:
    lines = [
        "| model | scheduler | FD to test: seeds 100000+ [95% bootstrap CI] | other seed sets | FD "
        "between two FP seed sets | class consistency |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["form"] == "fp":
            lines.append(
                f"| {r['model']} | {r['scheduler']} | {ci(r, 'fd_test')} | "
                f"{r['fd_test_other_seeds'].replace(';', ', ')} "
                f"| {f(r['fd_fp'])} (sets 100000+ vs 200000+)"
                + (
                    f", {f(r['fd_fp_other_pair'])} (200000+ vs 300000+)"
                    if not math.isnan(float(r["fd_fp_other_pair"]))
                    else ""
                )
                + f" | {ci(r, 'consistency')} |"
            )
    return "\n".join(lines)


def _degradation_mark(q: dict, metric: str) -> str:
    lo, hi = float(q.get(f"q_minus_fp_{metric}_lo", "nan")), float(q.get(f"q_minus_fp_{metric}_hi", "nan"))
    return "" if lo > 0 else " (Q *better* than FP)" if hi < 0 else " (n.s.)"


def stability_note(rows: list[dict]) -> str:
    spreads = []
    for r in rows:
        if r["form"] == "fp":
            values = [float(r["fd_test"])] + [float(v) for v in str(r["fd_test_other_seeds"]).split(";") if v]
            spreads.append((max(values) - min(values), r["model"], r["scheduler"]))
    worst = max(spreads)
    return (
        f"Unpaired, the FP distance to the test digits moves by up to {worst[0]:.2f} between FP sets of "
        f"{rows[0]['num_samples']} samples from different seeds ({worst[1]}, {worst[2]}): differences between rows "
        "smaller than that mean nothing unless paired. Every comparison below is paired (same seeds, same "
        "bootstrap indices), which removes most of that noise."
    )


def summary(rows: list[dict]) -> list[str]:
    """Plain statements: degradation per recipe, and where each form helps, hurts or is neutral."""
    out = []
    cells = list(_groups(rows))

    def measurable(q, metric):
        return float(q.get(f"q_minus_fp_{metric}_lo", "nan")) > 0

    for metric, label in (("test", "FD to the test digits"), ("fp", "FD to the FP distribution")):
        out.append(
            f"**Degradation of Q vs FP**, {label} (paired `Q − FP` over the same seeds): "
            + "; ".join(
                f"{k[0]}/{k[1]}/{k[2]} {f(g['q'].get(f'q_minus_fp_{metric}'), '+.3f')}"
                + _degradation_mark(g["q"], metric)
                for k, g in cells
            )
            + "."
        )
    neither = [k for k, g in cells if not measurable(g["q"], "test") and not measurable(g["q"], "fp")]
    if neither:
        out.append(
            "Cells whose degradation is **not measurable** on either distance (no paired CI of `Q − FP` above 0; "
            "a correction cannot show anything there, these rows test nothing): "
            + ", ".join(f"{k[0]}/{k[1]}/{k[2]}" for k in neither)
            + "."
        )
    else:
        out.append("Every cell degrades measurably on at least one of the two distances.")
    recipes: dict[str, list[str]] = {}
    for k, g in cells:
        recipes.setdefault(k[2], [])
        if measurable(g["q"], "test") or measurable(g["q"], "fp"):
            recipes[k[2]].append(f"{k[0]}/{k[1]}")
    out.append(
        "**Per recipe**, the cells where it degrades measurably (either distance): "
        + "; ".join(f"{r}: {', '.join(c) if c else '**none**'}" for r, c in recipes.items())
        + "."
    )
    for metric, label in (("test", "FD to the test digits"), ("fp", "FD to the FP distribution")):
        for form in FORMS:
            buckets: dict[str, list[str]] = {}
            for k, g in cells:
                buckets.setdefault(g[form].get(f"verdict_{metric}", DIVERGED), []).append(f"{k[0]}/{k[1]}/{k[2]}")
            parts = [
                f"{v} in {len(buckets[v])} ({', '.join(buckets[v])})"
                for v in ("helps", "hurts", "neutral", DIVERGED)
                if v in buckets
            ]
            out.append(f"**{form}**, {label}: " + "; ".join(parts) + ".")
    for side, label in (
        ("below", "**below** the CI of uncorrected Q (consistency lost)"),
        ("above", "above the CI of uncorrected Q (consistency gained)"),
    ):
        hits = [
            f"{k[0]}/{k[1]}/{k[2]} {form} {f(g[form].get('consistency'))} (Q {ci(g['q'], 'consistency')})"
            for k, g in cells
            for form in FORMS
            if side in _outside(g[form], g["q"])
        ]
        out.append(f"Class consistency {label}: " + ("; ".join(hits) or "none") + ".")
    paired = [
        (k, form, g[form]) for k, g in cells for form in FORMS if g[form].get("consistency_mcnemar_p") not in (None, "")
    ]
    if paired:
        for sign, label in ((-1, "a significant **loss**"), (1, "a significant gain")):
            hits = [
                f"{k[0]}/{k[1]}/{k[2]} {form} {float(r['consistency_diff']):+.3f} "
                f"(+{int(float(r['consistency_gained']))} / "
                f"−{int(float(r['consistency_lost']))} seeds, p = {float(r['consistency_mcnemar_p']):.2g})"
                for k, form, r in paired
                if float(r["consistency_mcnemar_p"]) < 0.05 and sign * float(r["consistency_diff"]) > 0
            ]
            out.append(
                f"Class consistency, paired over the same seeds (exact McNemar test, p < 0.05), {label}: "
                + ("; ".join(hits) or "none")
                + f" (of {len(paired)} corrected rows)."
            )
    return out


def save_grids(kept: dict, count: int = 20) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (model, scheduler, recipe), sets in kept.items():
        if not sets:
            continue
        names = ["fp", "q", "drift", "shrink"]
        fig, axes = plt.subplots(len(names), count, figsize=(count * 0.55, len(names) * 0.7))
        for r, name in enumerate(names):
            for c in range(count):
                ax = axes[r, c]
                img = sets[name][c, 0]
                if np.isfinite(img).all():
                    ax.imshow(to_pixels(torch.as_tensor(img)).numpy(), cmap="gray_r", vmin=0, vmax=16)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(
                        {"fp": "FP", "q": "Q"}.get(name, name), rotation=0, ha="right", va="center", fontsize=8
                    )
        fig.suptitle(f"{model}, {scheduler}, {recipe}: same seeds per column", fontsize=9)
        fig.tight_layout(pad=0.2)
        path = ROOT / "docs" / "img" / f"replication_grid_{model}_{scheduler}_{recipe}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path.relative_to(ROOT)))
    return written


def write_csv(rows: list[dict], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


# --- FP reproduction reference ----------------------------------------------------------------


def reduced_fd(model: str, seed: int) -> float:
    """FP Fréchet distance to the test digits in the reduced setting, for ``seed``."""
    setting = {**REDUCED_COMMON, **REDUCED[model], "seed": seed}
    pair = digits_pair(model, guidance_scale=setting["guidance_scale"])
    images = sample(
        pair,
        setting["scheduler"],
        setting["steps"],
        setting["num_samples"],
        setting["batch_size"],
        setting["seed"],
        model="fp",
    )
    return frechet_distance(load_digits_tensors("test")[0], images)


def fp_reference(args) -> None:
    """Write ``data/zoo_fp_reference.json``: the reduced-setting FP distance of each model and its 95% CI.

    The interval is ``fd +- 1.96 sd`` with ``sd`` the spread of the same distance over
    ``args.replicates`` other seeds (fresh sampling noise), so it holds the value a correct load of
    the shipped weights reproduces, whatever the platform's float summation order.
    """
    out = {
        "command": command_line(),
        "reference": "the 360 held-out test digits (load_digits_tensors('test'))",
        "metric": "qdrift_stats.metrics.frechet_distance (digits classifier features)",
        "ci": f"fd +- 1.96 * sd of the same distance over {args.replicates} other seeds (seed + 1000 * k)",
        "models": {},
    }
    for model in ("unet", "dit"):
        start = time.time()
        fd = reduced_fd(model, REDUCED_COMMON["seed"])
        others = [reduced_fd(model, REDUCED_COMMON["seed"] + 1000 * k) for k in range(1, args.replicates + 1)]
        sd = float(np.std(others, ddof=1))
        out["models"][model] = {
            "setting": {**REDUCED_COMMON, **REDUCED[model]},
            "fd": fd,
            "ci_low": fd - 1.96 * sd,
            "ci_high": fd + 1.96 * sd,
            "sd_over_seeds": sd,
            "other_seeds": others,
            "seconds": round(time.time() - start, 1),
        }
        print(model, json.dumps(out["models"][model]), flush=True)
    REFERENCE_JSON.write_text(json.dumps(out, indent=2) + "\n")


# --- control: the correction applied to the FP model ----------------------------------------------


def control(args) -> None:
    """Apply each cell's fitted correction to the *FP* sampler (``--controls model:scheduler:recipe``).

    If FP + correction moves the Fréchet distance as much as Q + correction does, the change is not a
    repair of quantization error but a generic effect of pulling states towards ``x0_hat``. Rows
    (``form`` ``fp+drift`` / ``fp+shrink``, paired against FP on the same seeds) are added to the CSV.
    """
    rows = read_csv(args.out)
    test_features = features_of(load_digits_tensors("test")[0])
    fd_test = FrechetToReference(test_features)
    new = []
    for spec in args.controls:
        model, scheduler, recipe = spec.split(":")
        name = pair_name(model, recipe)
        pair = named_pair(name)
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            estimator = calibrate(pair, name, scheduler, args.steps, args.runs, args.calib_batch, Path(tmp))
        fp = draw(pair, scheduler, args.steps, args.samples, SAMPLE_SEED, model="fp")
        fp_other = draw(pair, scheduler, args.steps, args.samples, FP_OTHER_SEEDS[0], model="fp")
        fd_fp = FrechetToReference(fp_other.features)
        for form in FORMS:
            s = draw(
                pair, scheduler, args.steps, args.samples, SAMPLE_SEED, model="fp", estimator=estimator, correction=form
            )
            row = {
                "model": model,
                "scheduler": scheduler,
                "steps": args.steps,
                "recipe": recipe,
                "form": f"fp+{form}",
                "num_samples": args.samples,
                "status": s.status,
                "seconds": s.seconds,
            }
            if s.status != DIVERGED:
                row.update({"fd_test": fd_test(s.features), "fd_fp": fd_fp(s.features)})
                for metric, fd in (("test", fd_test), ("fp", fd_fp)):
                    d, lo, hi = paired_difference(fd, fp.features, s.features, args.bootstrap)
                    row.update(
                        {
                            f"diff_{metric}": d,
                            f"diff_{metric}_lo": lo,
                            f"diff_{metric}_hi": hi,
                            f"verdict_{metric}": verdict(lo, hi),
                        }
                    )
            new.append(row)
            print(
                f"control {spec} FP+{form}: FD test {f(row.get('fd_test'))} (vs FP {signed_ci(row, 'diff_test')}), "
                f"FD to FP {f(row.get('fd_fp'))} (vs FP {signed_ci(row, 'diff_fp')}) ({time.time() - start:.0f} s)",
                flush=True,
            )
    done = {(r["model"], r["scheduler"], r["recipe"], r["form"]) for r in new}
    rows = [r for r in rows if (r["model"], r["scheduler"], r["recipe"], r["form"]) not in done] + new
    write_csv(rows, args.out)


def control_lines(rows: list[dict]) -> list[str]:
    controls = [r for r in rows if str(r["form"]).startswith("fp+")]
    if not controls:
        return []
    q_rows = {(r["model"], r["scheduler"], r["recipe"], r["form"]): r for r in rows}
    lines = [
        "Control: the same fitted correction applied to the **FP** sampler (same seeds; "
        "differences paired against FP). "
        "If FP + correction moves the distance like Q + correction does, the change is a generic effect of the pull "
        "towards `x0_hat`, not a repair of quantization error.",
        "",
        "| model | scheduler | estimator of | form | FP + form − FP, FD to test [paired CI] | Q + "
        "form − Q, FD to test | "
        "FP + form − FP, FD to FP [paired CI] | Q + form − Q, FD to FP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in controls:
        form = r["form"][3:]
        q = q_rows.get((r["model"], r["scheduler"], r["recipe"], form), {})
        lines.append(
            f"| {r['model']} | {r['scheduler']} | {r['recipe']} | {form} | {signed_ci(r, 'diff_test')} "
            f"| {signed_ci(q, 'diff_test')} | {signed_ci(r, 'diff_fp')} | {signed_ci(q, 'diff_fp')} |"
        )
    return lines + [""]


def read_csv(path: Path) -> list[dict]:
    """The study's CSV with numbers as floats (the inverse of :func:`write_csv`)."""
    rows = []
    with path.open() as fh:
        for raw in csv.DictReader(fh):
            row = {}
            for k, v in raw.items():
                if v == "" or v is None:
                    continue
                if k in ("fd_test_other_seeds",):  # a ';'-joined list
                    row[k] = v
                    continue
                try:
                    row[k] = float(v) if k not in ("steps", "num_samples") else int(v)
                except ValueError:
                    row[k] = v
            rows.append(row)
    return rows


def report(args) -> None:
    """Re-render both docs sections from the CSV (no sampling); grids are the PNGs already in docs/img."""
    rows = read_csv(args.out)
    first = next(r for r in rows if r["form"] == "q")
    args.steps, args.samples = first["steps"], first["num_samples"]
    grids = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "img").glob("replication_grid_*.png"))
    header = args.header or f"Rendered by `{command_line()}` from the CSV."
    write_report(rows, args, header, grids)


# --- named pairs: quantization time and output error --------------------------------------------


def pair_errors(args) -> None:
    """Print a markdown table: each named pair's quantization time and relative output error.

    Error: ``sqrt(sum ||y_q - y_fp||^2 / sum ||y_fp||^2)`` of the raw (unguided) model outputs over
    ``calibration_inputs(kind, n=8, seed=123)`` - held-out calls (the PTQ calibration uses seed 0).
    """
    from qdrift_stats.quantize import _call
    from qdrift_stats.zoo import build_quantized_digits_model, load_digits_model
    from qdrift_stats.zoo.pairs import calibration_inputs

    print(f"Generated by `{command_line()}`.\n")
    print("| pair | model | recipe | relative output error | quantize time (s) |")
    print("|---|---|---|---|---|")
    for kind in ("unet", "dit"):
        fp = load_digits_model(kind)
        held_out = calibration_inputs(kind, n=8, seed=123)
        refs = [_call(fp, a, kw) for a, kw in held_out]
        for recipe in ZOO_RECIPES:
            start = time.time()
            q = build_quantized_digits_model(kind, recipe)
            seconds = time.time() - start
            outs = [_call(q, a, kw) for a, kw in held_out]
            num = sum(float((o - r).pow(2).sum()) for o, r in zip(outs, refs))
            den = sum(float(r.pow(2).sum()) for r in refs)
            print(
                f"| `{pair_name(kind, recipe)}` | {kind} | `{recipe}` | {math.sqrt(num / den):.4f} | {seconds:.1f} |",
                flush=True,
            )


# --- the reading of the recorded run (hand-written; shown by `report --reading`) ----------------

READING = """**Reading** (written by hand for the run recorded in the CSV; re-read it if the table is regenerated).

- *Degradation.* The UNet degrades measurably under `w3a4` (FD to the test digits +2.46 on DDIM, +4.14 on Euler,
  +2.27 on DPM-Solver++ 2M), `w4a8` (+1.88), `svdquant-w4a4` (+0.19 to +0.21), `mixdq-w4a8` (+0.08) and, on the
  distance to FP only, `w4a4` (+0.49). The DiT is far more robust: on the distance to the test digits no recipe
  degrades it measurably (the `svdquant-w4a4` cells are even significantly *closer* to the test digits than FP); on
  the distance to FP, `w3a4` (+0.70 flow Euler, +0.76 flow DPM-Solver++), `w4a4` (+0.20), `mixdq-w4a8` (+0.16) and
  `mixdq-w5a8` (+0.11) do. Per recipe, every recipe but one degrades measurably in at least one cell at this sample
  size; **`w8a8` degrades neither model measurably here** (paired `Q − FP` to FP +0.003 [-0.046, +0.041] UNet,
  +0.010 [-0.023, +0.039] DiT). With 20x the samples it does, by about 0.01 on both models and on two seed sets
  (`studies/degradation_power.py`, next subsection): 8-bit is close to lossless, and at 1000 samples its rows
  cannot judge the correction. Six of the 20 cells show no measurable degradation on either distance.
- *Drift and shrink, UNet.* Where the UNet degrades clearly, both forms repair part of it, about equally: under
  `w3a4` the (clipped) drift closes 19% (DDIM), 21% (Euler) and 17% (DPM-Solver++ 2M) of the gap in FD to FP, shrink
  18%, 20% and 16%; in FD to the test digits 20% / 23% / 16% (drift) and 19% / 20% / 16% (shrink). Under `w4a4` both
  close 9%, under `svdquant-w4a4` 5-6% (DDIM), under `w4a8` 1%. The control shows this is a repair: the same
  corrections applied to the FP sampler move its distance to FP by -0.012 / -0.011 and its distance to the test
  digits by +0.014 to +0.017.
- *The clip costs the UNet part of its gain.* Before the drift was clipped at `c = 1`, the same script (commit
  `05d1c20`, its CSV kept as `docs/results/replication_table_unclipped_drift.csv`) closed 45% (DDIM) and 49% (Euler)
  of the `w3a4` gap with the derivation's drift. The difference comes from the last corrected step (target level
  `b = 0.01`, unclipped `c` = 13.6 and 14.3): it multiplies the residual by about -13 and the final model call
  denoises that again - a re-noising effect outside the derivation, and the very mechanism that destroyed the DiT
  (below). The library keeps the clip.
- *DiT.* Both forms are neutral on every DiT cell in FD to FP, including `w3a4` whose degradation (+0.70, +0.76)
  they leave in place. The clip is what makes the drift usable here: FlowMatchEuler's grid ends at `sigma = 0.001`,
  where the unclipped `v / (2 b^2)` reaches 21-1464 ('max pull coefficient: unclipped'); the earlier run's samples
  turned to noise for `w4a4`, `w3a4` and `svdquant-w4a4` (FD to FP 3.8-32 in the kept CSV), now they are within
  0.01 of Q. One "hurts" remains, drift on `mixdq-w4a8` in FD to the test digits: +0.003 [+0.0003, +0.006].
- *Class consistency.* No corrected row falls below Q's Wilson interval; under `w3a4` on Euler both forms rise
  above it (0.904 drift, 0.899 shrink, Q 0.873 [0.851, 0.892]). Paired over the same seeds (exact McNemar test on
  the seeds where Q and the corrected sampler disagree), none of the 40 corrected rows loses consistency
  significantly, and five `w3a4` rows on the UNet gain it (p < 0.05): Euler +0.031 (drift) / +0.026 (shrink),
  DPM-Solver++ 2M +0.011 / +0.012, DDIM shrink +0.009. The correction never costs semantic agreement here; where
  it repairs FD it also repairs a little consistency.
- *So:* on these real networks the correction repairs a fifth of the U-Net's `w3a4` degradation (either form,
  every scheduler), a tenth of `w4a4`'s, and does nothing measurable for the DiT. It never moves FD the
  wrong way by more than 0.01 (to FP) or 0.03 (to the test digits), only once measurably (+0.003), and never costs
  class consistency. Neither form is a large effect next to the degradation: the best case leaves about 80% of
  the gap.
"""


# --- main -------------------------------------------------------------------------------------


def run_setting(
    model: str,
    scheduler: str,
    recipes: list[str],
    args: argparse.Namespace,
    grid_cells: list[tuple[str, str, str]],
    extra_fp_sets: int,
    t_start: float,
) -> tuple[list[dict], dict]:
    """FP sets and every recipe's cell of one (model, scheduler); run in a worker process."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    test_features = features_of(load_digits_tensors("test")[0])
    keep = {k: None for k in grid_cells if k[:2] == (model, scheduler)}
    t0 = time.time()
    setting = fp_setting(model, scheduler, args, test_features, extra_fp_sets)
    rows = [fp_row(setting, args)]
    print(
        f"[{(time.time() - t_start) / 60:5.1f} min] {model} {scheduler} FP: FD {rows[-1]['fd_test']:.3f} "
        f"other seeds {rows[-1]['fd_test_other_seeds']} ({time.time() - t0:.0f} s)",
        flush=True,
    )
    for recipe in recipes:
        t0 = time.time()
        new = cell(setting, recipe, args, keep)
        rows += new
        write_csv(rows, PARTIAL / f"{model}_{scheduler}.csv")  # survives an interruption
        q, dr, sh = new
        print(
            f"[{(time.time() - t_start) / 60:5.1f} min] {model} {scheduler} {recipe}: FD Q {f(q['fd_test'])} "
            f"(Q-FP {signed_ci(q, 'q_minus_fp_test')}), drift {f(dr['fd_test'])} {dr['verdict_test']}, "
            f"shrink {f(sh['fd_test'])} {sh['verdict_test']}; to FP: Q {f(q['fd_fp'])} (Q-FP "
            f"{signed_ci(q, 'q_minus_fp_fp')}) "
            f"drift {f(dr['fd_fp'])} {dr['verdict_fp']}, shrink {f(sh['fd_fp'])} "
            f"{sh['verdict_fp']} ({time.time() - t0:.0f} s; "
            f"quantize {q['quantize_seconds']:.0f} s, calibrate {q['calibration_seconds']:.0f} s)",
            flush=True,
        )
    return rows, {k: v for k, v in keep.items() if v}


def run_table(args: argparse.Namespace) -> tuple[list[dict], dict, float]:
    """Every (model, scheduler) of :func:`plan`, ``args.jobs`` at a time (one process each)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    start = time.time()
    grid_cells = [tuple(g.split(":")) for g in args.grids]
    tasks = [(m, s, r, args, grid_cells, 2 if s == SCHEDULERS[m][0] else 1, start) for m, s, r in plan(args)]
    tasks.sort(key=lambda t: -len(t[2]))  # longest first, so the workers finish together
    order = {(t[0], t[1]): i for i, t in enumerate(tasks)}
    results = []
    if args.jobs <= 1:
        results = [run_setting(*t) for t in tasks]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_setting, *t) for t in tasks]
            results = [fut.result() for fut in futures]
    rows, kept = [], {}
    for part_rows, part_kept in sorted(results, key=lambda res: order[(res[0][0]["model"], res[0][0]["scheduler"])]):
        rows += part_rows
        kept.update(part_kept)
    return rows, kept, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "what", nargs="?", default="table", choices=("table", "fp-reference", "pair-errors", "control", "report")
    )
    parser.add_argument("--models", nargs="+", default=["unet", "dit"], choices=("unet", "dit"))
    parser.add_argument("--recipes", nargs="+", default=list(ZOO_RECIPES), choices=ZOO_RECIPES)
    parser.add_argument(
        "--full",
        nargs="*",
        default=["svdquant-w4a4", "w3a4"],
        help="recipes that also run on every other scheduler of their model",
    )
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calib-batch", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument(
        "--grids",
        nargs="*",
        default=["unet:ddim:w3a4", "dit:flow-euler:w3a4"],
        help="model:scheduler:recipe cells whose sample grids go to docs/img",
    )
    parser.add_argument(
        "--controls",
        nargs="*",
        default=[
            "unet:ddim:w3a4",
            "unet:euler:w3a4",
            "dit:flow-euler:w8a8",
            "dit:flow-euler:w4a8",
            "dit:flow-euler:w3a4",
        ],
        help="control: cells whose correction is also applied to the FP sampler",
    )
    parser.add_argument(
        "--reading", action="store_true", help="report: include the hand-written reading of the recorded run"
    )
    parser.add_argument(
        "--header", default=None, help="report: the first line of the section (what generated the table)"
    )
    parser.add_argument("--replicates", type=int, default=8, help="fp-reference: other seeds for the CI")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--jobs", type=int, default=2, help="(model, scheduler) settings run in parallel processes")
    parser.add_argument("--quick", action="store_true", help="tiny sizes; writes nothing to docs")
    parser.add_argument("--no-docs", action="store_true", help="write only --out (for timing a subset)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "replication_table.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "fp-reference":
        fp_reference(args)
        return
    if args.what in ("pair-errors", "control", "report"):
        {"pair-errors": pair_errors, "control": control, "report": report}[args.what](args)
        return
    if args.quick:
        args.samples, args.bootstrap, args.steps, args.runs, args.calib_batch = 200, 20, 10, 2, 16
    rows, kept, elapsed = run_table(args)
    if args.quick:
        print("\n".join(summary(rows)))
        return
    write_csv(rows, args.out)
    if args.no_docs:
        print(f"done in {elapsed / 60:.1f} min", flush=True)
        return
    grids = save_grids(kept)
    header = (
        f"Generated by `{command_line()}` ({elapsed / 60:.1f} min wall time on 2 shared CPU cores: {args.jobs} "
        f"processes of {args.threads} torch thread)."
    )
    write_report(rows, args, header, grids)


def ran_cells(rows: list[dict]) -> str:
    cells: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["form"] == "q":
            cells.setdefault((r["model"], r["scheduler"]), []).append(r["recipe"])
    return "; ".join(f"{m} × {s}: {', '.join(rs)}" for (m, s), rs in cells.items())


def write_report(rows: list[dict], args, header: str, grids: list[str]) -> None:
    ran = ran_cells(rows)
    md = [
        header + " All numbers in `docs/results/replication_table.csv`.",
        "",
        "What was run: the shipped digits models (`data/digits_unet`, `data/digits_dit`, guidance "
        "2.0) under the named "
        "PTQ pairs `qdrift_stats.zoo:digits_<model>_<recipe>` (calibration: "
        f"`calibration_inputs(kind, n={CALIBRATION_CALLS}, "
        f"seed={CALIBRATION_SEED})`); {args.steps} steps; cells: {ran}. Per cell: {args.runs} "
        "paired calibration runs of "
        f"{args.calib_batch} samples (seeds {CALIBRATION_RUN_SEED}..{CALIBRATION_RUN_SEED + args.runs - 1}), "
        '`EmpiricalEstimator(statistic="first-order")`, exported and reloaded, strength 1; then '
        f"{args.samples} samples each of FP, Q, Q + drift and Q + shrink from the same seeds "
        f"({SAMPLE_SEED}+, batches of {BATCH}; the FP set is shared by the recipes of a scheduler). "
        f"Fréchet distance (FD) in the digits classifier's 64-d feature space to the 360 test digits; "
        f"95% percentile bootstrap intervals, {args.bootstrap} resamples of the generated samples "
        "(FD is biased upwards "
        "under resampling, so its own interval sits above the estimate; the *paired* difference intervals resample all "
        "sets of a cell with the same indices and are not biased that way). A difference "
        "`corrected − Q` whose interval "
        "lies below 0 is **helps**, above 0 **hurts**, otherwise neutral; **diverged** = a non-finite sample.",
        "",
        "FP stability (the FD's own noise at this sample size: FP sets from other seeds):",
        "",
        stability_table(rows),
        "",
        stability_note(rows),
        "",
        "FD to the test digits:",
        "",
        main_table(rows),
        "",
        "FD to the FP distribution (reference: an independent FP set, seeds 200000+; what the "
        "correction aims to restore). "
        "The last three columns give the largest per-step pull coefficient `c_i` on this grid: the derivation's "
        "first-order drift `v_i / (2 b_{i+1}^2)` (unclipped), and what the drift and shrink forms apply (drift clipped "
        "at 1, shrink `1 - b_{i+1} / sqrt(b_{i+1}^2 + v_i)`): an unclipped coefficient above 1 "
        "would move the state past "
        "`a x0_hat`, so the drift form is clipped there (`qdrift_stats.correct.coefficients`). "
        "'Gap closed' = (Q − corrected) / (Q − FP), shown "
        "only where `Q − FP` is measurable (100% = back to the FP distance, negative = worse than no correction).",
        "",
        fp_distance_table(rows),
        "",
        *[line + "\n" for line in summary(rows)],
        *control_lines(rows),
        *([READING, ""] if args.reading else []),
        *[f"![{Path(g).stem}]({Path(g).relative_to('docs')})" for g in grids],
    ]
    if grids:
        md.append("")
        md.append("*Sample grids: rows FP, Q, drift, shrink; each column one seed and label (first 20 samples).*")
    write_section("replication_table", "\n".join(md))
    write_fp_section(rows, args)


def write_fp_section(rows: list[dict], args) -> None:
    ref = json.loads(REFERENCE_JSON.read_text()) if REFERENCE_JSON.is_file() else None
    lines = [
        f"FP Fréchet distance of each shipped model (guidance 2.0) to the 360 test digits, {args.samples} samples, "
        f"{args.steps} steps, seeds {SAMPLE_SEED}+, 95% bootstrap CI ({args.bootstrap} resamples); from "
        "`studies/replication_table.py` (same run as the replication table).",
        "",
        "| model | scheduler | FD [95% CI] | FD, other seed sets | class consistency [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["form"] == "fp":
            lines.append(
                f"| {r['model']} | {r['scheduler']} | {ci(r, 'fd_test')} | "
                f"{r['fd_test_other_seeds'].replace(';', ', ')} "
                f"| {ci(r, 'consistency')} |"
            )
    if ref:
        lines += [
            "",
            "Reproduction check "
            "(`tests/test_zoo_pairs.py::test_shipped_models_reproduce_their_fp_distance`): a reduced, "
            "deterministic setting, recorded in `data/zoo_fp_reference.json` by "
            f"`{ref['command']}`; the test loads each model afresh and recomputes the distance, which must fall in the "
            f"interval ({ref['ci']}).",
            "",
            "| model | scheduler | steps | samples | seed | FD | 95% interval |",
            "|---|---|---|---|---|---|---|",
        ]
        for model, m in ref["models"].items():
            s = m["setting"]
            lines.append(
                f"| {model} | {s['scheduler']} | {s['steps']} | {s['num_samples']} | {s['seed']} | {m['fd']:.4f} "
                f"| [{m['ci_low']:.4f}, {m['ci_high']:.4f}] |"
            )
    write_section("zoo_fp_reproduction", "\n".join(lines))


if __name__ == "__main__":
    main()
