"""Which output terms the default estimator applies, per zoo cell and testbed family.

The default (``qdrift fit``, estimator ``persistent``, ``bias="map"``) applies the affine output map whose
structure and ridge explain the most of the predicted final deviation on held-out calibration runs, if that is
at least 10% (``qdrift_stats.estimators.output_map``). Beside it, the shares of PTQD's two terms on the same
store (``bias="ptqd"``: the slope ``k_i m_fp`` with its intercept, else each step's mean error, in-sample;
``qdrift_stats.estimators.persistent.output_map_shares``), the rule of the default before. And what a map could
explain that also sees the sampler state, ``offset_i + K_i (m_fp - c_i) + L_i (x_i - xbar_i)``
(``qdrift_stats.estimators.output_map.STATE_CANDIDATES``, the same held-out share; measured, not applied by any
estimator yet): the stores are recorded with their FP trajectories, so ``x_i`` is the FP state at step ``i``'s
input. The shares do not depend on where persistence is measured, so this fits with ``path="fp"`` (no extra model
calls) on the same calibration stores as ``studies/replication_v2.py`` (5 runs x 64 samples, seeds 0.., 25 steps)
and ``studies/mixture_persistent.py`` (50 steps).

    python studies/output_map_terms.py
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
import xarray as xr
from _report import ROOT, command_line, write_section
from mixture_persistent import FAMILIES
from replication_v2 import degraded_cells

from qdrift_stats import testbed
from qdrift_stats.estimators.base import grid_of
from qdrift_stats.estimators.output_map import STATE_CANDIDATES, heldout_shares
from qdrift_stats.estimators.persistent import PersistentEstimator, trajectory_weights
from qdrift_stats.loop import initial_noise, prepared_scheduler
from qdrift_stats.record.lockstep import record
from qdrift_stats.zoo import named_pair
from qdrift_stats.zoo.named import pair_name

warnings.filterwarnings("ignore")


def state_map_shares(pair, ds, scheduler, steps) -> dict[str, float]:
    """Held-out shares of the state-aware candidates on a store recorded with ``trajectories``: the state at step
    ``i``'s input is the initial noise (``i = 0``) or the FP state after step ``i - 1``."""
    runs, batch = ds.sizes["run"], ds.sizes["sample"]
    first = [
        initial_noise(pair, prepared_scheduler(pair, scheduler, steps), batch, int(seed))[0]
        for seed in ds["seed"].values
    ]
    x0 = torch.stack(first).double().numpy()
    traj = ds["traj_fp"].values.astype(np.float64)
    states = [x0] + [traj[:, i - 1] for i in range(1, steps)]
    m_fp = [ds["out_fp"].values[:, i].astype(np.float64) for i in range(steps)]
    errors = [ds["delta_out"].values[:, i].astype(np.float64) for i in range(steps)]
    weights = trajectory_weights(
        np.asarray(ds["gain"].values, dtype=np.float64), grid_of(ds), ds.attrs.get("prediction_type")
    )
    assert states[0].shape == m_fp[0].shape == (runs, batch, *m_fp[0].shape[2:])
    return heldout_shares(m_fp, errors, weights, STATE_CANDIDATES, states=states)


def terms(job):
    kind, model, scheduler, recipe = job
    torch.set_num_threads(1)
    if kind == "zoo":
        name = pair_name(model, recipe)
        pair, full_name, steps = named_pair(name), f"qdrift_stats.zoo:{name}", 25
        cell = f"{model}/{scheduler}/{recipe}"
    else:
        pair, full_name, steps = getattr(testbed, model)(), f"qdrift_stats.testbed:{model}", 50
        cell = f"{model}/{scheduler}"
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "c.zarr"
        record(pair, store, pair_name=full_name, scheduler_name=scheduler, steps=steps, runs=5, batch_size=64, seed=0,
               trajectories=True)  # fmt: skip
        fitted = PersistentEstimator(bias="ptqd", path="fp").fit(store)
        mapped = PersistentEstimator(path="fp").fit(store)
        state_shares = state_map_shares(pair, xr.open_zarr(store).load(), scheduler, steps)
    state_best = max(state_shares, key=state_shares.get) if state_shares else ""
    mean_share, slope_share = fitted.output_map_shares
    applied = {(): "none", ("mean",): "mean"}.get(fitted.output_terms, "slope + intercept")
    shares = mapped.map_shares or {}
    best = max(shares, key=shares.get) if shares else ""
    chosen = mapped.output_map.name if mapped.output_map is not None else "none"
    print(
        f"{cell}: PTQD mean {mean_share:.1%}, slope {slope_share:.1%} -> {applied}; "
        f"map: best {best} {shares.get(best, float('nan')):.1%} -> {chosen}; "
        f"with the state: {state_best} {state_shares.get(state_best, float('nan')):.1%}",
        flush=True,
    )
    return {
        "kind": kind,
        "cell": cell,
        "mean_share": mean_share,
        "slope_share": slope_share,
        "applied": applied,
        "map_best": best,
        "map_best_share": shares.get(best, float("nan")),
        "map_mean_share": shares.get("mean", float("nan")),
        "map_applied": chosen,
        "map_state_best": state_best,
        "map_state_best_share": state_shares.get(state_best, float("nan")),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    jobs = [("zoo", m, s, r) for m, s, r in degraded_cells()]
    jobs += [("testbed", f, s, "") for f, scheds, _ in FAMILIES for s in scheds]
    start = time.time()
    with ProcessPoolExecutor(args.processes) as pool:
        rows = list(pool.map(terms, jobs))
    elapsed = time.time() - start
    out = ROOT / "docs" / "results" / "output_map_terms.csv"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| where | cell | map: best candidate (held-out share) | map: each element's mean (held-out) | "
        "the default applies | PTQD: mean error's share | PTQD: slope's share | the previous default applied | "
        "a map on output and state: best (held-out share) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['cell']} | {r['map_best']} ({100 * r['map_best_share']:.1f}%) | "
            f"{100 * r['map_mean_share']:.1f}% | {r['map_applied']} | {100 * r['mean_share']:.1f}% | "
            f"{100 * r['slope_share']:.1f}% | {r['applied']} | {r['map_state_best']} "
            f"({100 * r['map_state_best_share']:.1f}%) |"
        )
    md = [
        f"Generated by `{command_line()}` ({elapsed / 60:.1f} min on 2 shared CPU cores). Numbers in "
        "`docs/results/output_map_terms.csv`. Shares of the predicted final mean square deviation (threshold 10%): "
        "the affine output map's on held-out runs (leave one run out), PTQD's terms in-sample; "
        "the same stores as the replication v2 table (zoo, 25 steps) and the persistent testbed table (50 steps).",
        "",
        "\n".join(lines),
    ]
    write_section("output_map_terms", "\n".join(md))


if __name__ == "__main__":
    main()
