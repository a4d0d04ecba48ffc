"""The example figures in docs/img/ (accumulation, variance, runs needed, diagnostics) from a testbed store.

    python studies/plot_examples.py [--work /tmp/qdrift_plot_examples] [--out docs/img]

Store: ``qdrift_stats.testbed:mixture_vp_noise``, Euler, 50 steps, 5 runs x 64 samples, seeds 0-4,
with trajectories; estimator file: empirical, drift form, strength 1. The same as

    qdrift record --pair qdrift_stats.testbed:mixture_vp_noise --scheduler euler --steps 50 \\
        --runs 5 --batch 64 --seed 0 --trajectories --out calib.zarr
    qdrift fit calib.zarr --estimator empirical --correction drift --out est.safetensors
    qdrift plot accumulation calib.zarr --estimator est.safetensors \\
        --pair qdrift_stats.testbed:mixture_vp_noise --out docs/img/accumulation.png
    qdrift plot variance calib.zarr --fit all --out docs/img/variance.png
    qdrift plot runs-needed calib.zarr --out docs/img/runs_needed.png
    qdrift plot diagnostics calib.zarr --out docs/img/diagnostics.png

(``runs-needed`` of a store runs :func:`qdrift_stats.validate.crossval.runs_needed_dataset`, the learning
curve without the strength search; ``diagnostics`` runs :func:`qdrift_stats.validate.diagnostics.diagnose`.)
About 40 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from qdrift_stats import testbed
from qdrift_stats.estimators import EmpiricalEstimator
from qdrift_stats.plots.figures import figure_for, save_figure
from qdrift_stats.record.lockstep import record

PAIR = "qdrift_stats.testbed:mixture_vp_noise"
FIGURES = {
    "accumulation": "accumulation.png",
    "variance": "variance.png",
    "runs-needed": "runs_needed.png",
    "diagnostics": "diagnostics.png",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qdrift_plot_examples"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "img")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    store, est = args.work / "calib.zarr", args.work / "est.safetensors"
    if store.exists():
        shutil.rmtree(store)
    record(
        testbed.mixture_vp_noise(),
        store,
        pair_name=PAIR,
        scheduler_name="euler",
        steps=50,
        runs=5,
        batch_size=64,
        seed=0,
        trajectories=True,
    )
    EmpiricalEstimator().fit(store).export(est, correction="drift", provenance={"store": str(store)}, overwrite=True)
    for kind, name in FIGURES.items():
        options = (
            {"estimator": est, "pair": PAIR}  # a pair is never loaded from the store: pass it
            if kind == "accumulation"
            else {"fits": ("all",)}
            if kind == "variance"
            else {}
        )
        path = save_figure(figure_for(kind, store, **options), args.out / name)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
