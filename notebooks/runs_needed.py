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
# # How many calibration runs are needed?
#
# Q-Drift's correction needs one number per sampling step: the variance `v_i` of the
# quantization perturbation. It is estimated from *paired calibration runs* (the FP and the
# quantized model sampled in lock-step from the same seed). This notebook answers the question a
# deployer asks first: **how many runs are enough?**
#
# Cross-validation over runs (`qdrift_stats.validate.crossval.cross_validate`, or `qdrift cv` on the
# command line) fits the statistic on random subsets of `N` runs and scores each against the
# all-runs fit; `runs_needed(tolerance, confidence)` reads the learning curve.
#
# Set `QDRIFT_NOTEBOOK_SMALL=1` to run everything at a reduced size (a smoke run, as in CI).

# %%
import io
import os
import tempfile
import warnings
from pathlib import Path

from IPython.display import Image, display

from qdrift_stats import testbed
from qdrift_stats.plots.figures import plot_runs_needed
from qdrift_stats.record.lockstep import record
from qdrift_stats.validate.crossval import cross_validate

warnings.filterwarnings("ignore")
SMALL = os.environ.get("QDRIFT_NOTEBOOK_SMALL") == "1"
WORK = Path(tempfile.mkdtemp(prefix="qdrift-runs-needed-"))


def show(fig):
    """Show a matplotlib Figure in the notebook, as a PNG (works without any matplotlib magic)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    display(Image(buffer.getvalue()))

TOLERANCE = 0.1
print("reduced size" if SMALL else "full size", "- files in", WORK)

# %% [markdown]
# ## The analytic testbed
#
# `mixture_vp_noise` is a Gaussian mixture with an exact denoiser and a noise-like
# "quantization" error, so the recording is cheap and the answer can be checked.

# %%
steps, runs, batch = (6, 4, 16) if SMALL else (25, 12, 64)
store = record(testbed.mixture_vp_noise(), WORK / "mixture.zarr", pair_name="qdrift_stats.testbed:mixture_vp_noise",
               scheduler_name="euler", steps=steps, runs=runs, batch_size=batch, seed=0)
cv = cross_validate("first-order", store, WORK / "mixture-cv.zarr", n_splits=20 if SMALL else 200, strength=False)
print(cv.summary(tolerance=TOLERANCE))

# %% [markdown]
# The learning curve: each dot is one random subset of `N` runs; the answer is the smallest `N`
# whose 95% quantile of the relative error stays within the tolerance.

# %%
curve = cv.dataset.assign_attrs(tolerance=TOLERANCE, runs_needed=cv.runs_needed(TOLERANCE).runs)
fig = plot_runs_needed(curve)
show(fig)
print(cv.runs_needed(TOLERANCE))

# %% [markdown]
# ## A real network: the digits zoo
#
# The same question for a small class-conditional UNet trained on scikit-learn's digits and
# quantized with 4-bit weights (`qdrift_stats.zoo`). Fewer runs (CPU time), so the answer may be
# an extrapolation along the `1/sqrt(N)` law of a mean, which `runs_needed` says.

# %%
from qdrift_stats import zoo

zoo_name = "digits_unet_w4a4" if SMALL else "digits_unet_w4a8"
zoo_pair = getattr(zoo, zoo_name)()
z_steps, z_runs, z_batch = (3, 3, 2) if SMALL else (20, 8, 16)
zoo_store = record(zoo_pair, WORK / "zoo.zarr", pair_name=f"qdrift_stats.zoo:{zoo_name}", scheduler_name="ddim",
                   steps=z_steps, runs=z_runs, batch_size=z_batch, seed=0)
zoo_cv = cross_validate("first-order", zoo_store, WORK / "zoo-cv.zarr", n_splits=10 if SMALL else 100, strength=False)
print(zoo_cv.summary(tolerance=TOLERANCE))

# %%
fig = plot_runs_needed(zoo_cv.dataset.assign_attrs(tolerance=TOLERANCE, runs_needed=zoo_cv.runs_needed(TOLERANCE).runs))
show(fig)

# %% [markdown]
# ## Reading the answer
#
# - `runs_needed` is the calibration count for a relative error within the tolerance with 95%
#   probability; "extrapolated" means the store had too few runs to see it directly: record more
#   (`qdrift record ... --runs R` extends an existing store) and run `qdrift cv` again.
# - The same study for every pair in the docs is `studies/runs_needed.py`.
