# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # How quantization noise accumulates along sampling, with and without Q-Drift
#
# Record paired runs **with trajectories** (the free-running FP and quantized states after each
# step), fit the per-step variance statistic, and compare three samplers started from the same
# noise: FP, quantized, and quantized with the Q-Drift correction.
#
# Set `QDRIFT_NOTEBOOK_SMALL=1` to run at a reduced size.

# %%
import io
import os
import tempfile
import warnings
from pathlib import Path

from IPython.display import Image, display
import numpy as np

from qdrift_stats import testbed
from qdrift_stats.estimators import get_estimator
from qdrift_stats.plots.datasets import accumulation_dataset
from qdrift_stats.plots.figures import plot_accumulation
from qdrift_stats.record.lockstep import record

warnings.filterwarnings("ignore")
SMALL = os.environ.get("QDRIFT_NOTEBOOK_SMALL") == "1"
WORK = Path(tempfile.mkdtemp(prefix="qdrift-accumulation-"))


def show(fig):
    """Show a matplotlib Figure in the notebook, as a PNG (works without any matplotlib magic)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    display(Image(buffer.getvalue()))

PAIR = "qdrift_stats.testbed:mixture_vp_noise"

# %% [markdown]
# ## Record with trajectories
# (`qdrift record ... --trajectories` on the command line.)

# %%
steps, runs, batch = (6, 2, 32) if SMALL else (30, 6, 256)
store = record(testbed.mixture_vp_noise(), WORK / "calib.zarr", pair_name=PAIR, scheduler_name="euler",
               steps=steps, runs=runs, batch_size=batch, seed=0, trajectories=True)

# %% [markdown]
# ## Fit and export the estimator
# The first-order statistic (the default of `qdrift fit`) with the shrink form of the correction.

# %%
fitted = get_estimator("first-order").fit(store)
print(fitted.summary())
estimator = fitted.export(WORK / "est.safetensors", correction="shrink")

# %% [markdown]
# ## Accumulation
# For each run the corrected quantized trajectory is re-sampled from the run's seed; the stored
# trajectories give the FP and uncorrected ones. `dist_*` is the pathwise distance to the FP
# state; `var_*` the spread of the states, which Q-Drift aims to bring back to the FP spread.

# %%
acc = accumulation_dataset(PAIR, store, WORK / "est.safetensors")
fig = plot_accumulation(acc)
show(fig)

# %%
final = acc.isel(step=-1)
for name in ("var_fp", "var_q", "var_corrected"):
    print(f"{name:>14}: {float(final[name].mean()):.4f}")
print("final-state spread: quantized off by", f"{float((final['var_q'] - final['var_fp']).mean()):+.4f};",
      "corrected off by", f"{float((final['var_corrected'] - final['var_fp']).mean()):+.4f}")
assert np.isfinite(acc["dist_corrected"].values).all()
