"""Why a state-aware output map needs a bound on its gain: the per-step gains of the maps on one zoo store, and what
the unbounded map does to the samples.

On one calibration store (the zoo cell ``--cell``, 5 runs x 64 samples, seeds 0.., 25 steps: the store of
``studies/replication_v2.py``) the output map is fitted three ways (``PersistentEstimator(path="fp")``, so only the map
matters): the default's (regressed on the FP output), the state-aware one (``map_state=True``, a step whose gain
exceeds ``MAX_STATE_MAP_GAIN`` keeps its mean error only) and the same without that bound. Per step: the gain
``|(I + K_i)^{-1}|`` (dense) or ``1 / (1 - |K_i|)`` (local), the state part's norm, and the step's weight in the
predicted final deviation (``P_i gain_i``). Then the quantized sampler with each map alone (strength 0: no pull) and
with the whole correction (strength 1), from the same seeds as FP: the mean squared distance of each sample to FP's
sample of the same seed (state units squared; Q's for reference).

    python studies/state_map_gain.py                          # the DiT flow-Euler w4a4 cell (a few minutes)
    python studies/state_map_gain.py --cell dit/flow-euler/w3a4
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import xarray as xr
from _report import command_line, write_section

from qdrift_stats.correct.estimator_file import EstimatorFile
from qdrift_stats.correct.sample import sample
from qdrift_stats.estimators import output_map as output_map_module
from qdrift_stats.estimators.base import grid_of
from qdrift_stats.estimators.persistent import PersistentEstimator, trajectory_weights
from qdrift_stats.record.lockstep import record
from qdrift_stats.zoo import named_pair
from qdrift_stats.zoo.named import pair_name

warnings.filterwarnings("ignore")

EVAL_SEED = 100_000


def gains(out_map) -> tuple[np.ndarray, np.ndarray]:
    """``(steps,)`` the inverse's gain and the state part's norm (0 without a state part) per step."""
    steps, shape = len(out_map.center), tuple(out_map.center.shape[1:])
    inverse, state = np.zeros(steps), np.zeros(steps)
    for i in range(steps):
        if out_map.structure == "full":
            inverse[i] = np.linalg.norm(np.eye(out_map.weight.shape[1]) - out_map.weight[i], 2)
            if out_map.uses_state:
                state[i] = np.linalg.norm(out_map.state_weight[i], 2)
        else:
            k = output_map_module.local_norm(out_map.weight[i], shape[1:])
            inverse[i] = 1.0 / (1.0 - k) if k < 1 else np.inf
            if out_map.uses_state:
                state[i] = output_map_module.local_norm(out_map.state_weight[i], shape[1:])
    return inverse, state


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="dit/flow-euler/w4a4", metavar="MODEL/SCHEDULER/RECIPE")
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, scheduler, recipe = args.cell.split("/")
    name = pair_name(model, recipe)
    pair = named_pair(name)
    start = time.time()
    fits, files = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "c.zarr"
        record(pair, store, pair_name=f"qdrift_stats.zoo:{name}", scheduler_name=scheduler, steps=25, runs=5,
               batch_size=64, seed=0)  # fmt: skip
        ds = xr.open_zarr(store).load()
        weights = trajectory_weights(np.asarray(ds["gain"].values, float), grid_of(ds), ds.attrs.get("prediction_type"))
        fits["default (output only)"] = PersistentEstimator(pair=pair, path="fp").fit(store)
        fits["state-aware"] = PersistentEstimator(pair=pair, path="fp", map_state=True).fit(store)
        with mock.patch.object(output_map_module, "MAX_STATE_MAP_GAIN", float("inf")):
            fits["state-aware, no bound"] = PersistentEstimator(pair=pair, path="fp", map_state=True).fit(store)
        for key, fitted in fits.items():
            fitted.export(Path(tmp) / f"{len(files)}.safetensors")
            files[key] = EstimatorFile.load(Path(tmp) / f"{len(files)}.safetensors")
        n = args.samples
        fp = sample(pair, scheduler, 25, n, 64, EVAL_SEED, model="fp")
        q = sample(pair, scheduler, 25, n, 64, EVAL_SEED, model="q")
        distance = {"Q": float(np.mean((q - fp) ** 2))}
        for key, est in files.items():
            for strength in (0.0, 1.0):
                x = sample(pair, scheduler, 25, n, 64, EVAL_SEED, model="q", estimator=est, strength=strength)
                distance[(key, strength)] = float(np.mean((x - fp) ** 2)) if np.isfinite(x).all() else float("inf")
    elapsed = time.time() - start
    per_step = {key: gains(f.output_map) for key, f in fits.items()}
    lines = [
        "| step | weight P_i gain_i | "
        + " | ".join(f"{key}: inverse gain / state norm" for key in fits)
        + " |\n|"
        + "---|" * (2 + len(fits)),
    ]
    for i in range(len(weights)):
        lines.append(
            f"| {i} | {weights[i]:.4f} | "
            + " | ".join(f"{per_step[key][0][i]:.2f} / {per_step[key][1][i]:.2f}" for key in fits)
            + " |"
        )
    rows = [
        "| map | chosen (held-out share) | steps kept at their mean | paired squared distance to FP: map alone / "
        "whole correction |",
        "|---|---|---|---|",
    ]
    for key, fitted in fits.items():
        m = fitted.output_map
        rows.append(
            f"| {key} | {m.name} ({m.share:.1%}) | {list(m.mean_only_steps) or 'none'} | "
            f"{distance[(key, 0.0)]:.4f} / {distance[(key, 1.0)]:.4f} |"
        )
    md = [
        f"Generated by `{command_line()}` ({elapsed / 60:.1f} min on 2 shared CPU cores). Cell {args.cell}; one "
        f"calibration store (5 runs x 64, seeds 0.., 25 steps); {args.samples} samples per set from the same seeds "
        f"(batch k: seed {EVAL_SEED} + k). Uncorrected Q: paired squared distance to FP {distance['Q']:.4f}.",
        "",
        "\n".join(rows),
        "",
        "Per step, the inverse's gain (`|(I + K_i)^{-1}|`, dense; local: `1 / (1 - |K_i|)`) and the state part's norm "
        "(`|M_i|` dense, `|L_i|` local), and the step's weight in the predicted final deviation:",
        "",
        "\n".join(lines),
    ]
    write_section("state_map_gain", "\n".join(md))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
