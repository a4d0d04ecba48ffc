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
# # A tour of the diagnostics: does the quantization error behave like noise?
#
# Q-Drift assumes each step's quantization error is independent, zero-mean noise unrelated to the
# signal. `qdrift_stats.validate.diagnostics.diagnose` (`qdrift diagnose STORE`) tests each part of that on
# a calibration store and recommends an estimator and a correction form. Here it meets three
# testbed pairs whose error is known by construction:
#
# | pair | error |
# |---|---|
# | `mixture_vp_noise` | noise-like |
# | `mixture_vp_correlated` | a scale error `k * m_fp` (signal-correlated) |
# | `mixture_vp_rounding` | the output rounded to a grid |
#
# Set `QDRIFT_NOTEBOOK_SMALL=1` to run at a reduced size.

# %%
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

from IPython.display import Image, display

from qdrift_stats import testbed
from qdrift_stats.validate.diagnostics import diagnose, report
from qdrift_stats.plots.figures import plot_diagnostics
from qdrift_stats.record.lockstep import record

warnings.filterwarnings("ignore")
SMALL = os.environ.get("QDRIFT_NOTEBOOK_SMALL") == "1"
WORK = Path(tempfile.mkdtemp(prefix="qdrift-diagnostics-"))


def show(fig):
    """Show a matplotlib Figure in the notebook, as a PNG (works without any matplotlib magic)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    display(Image(buffer.getvalue()))

PAIRS = ["mixture_vp_noise", "mixture_vp_correlated", "mixture_vp_rounding"]
steps, runs, batch = (8, 2, 32) if SMALL else (25, 4, 128)

# %%
results = {}
for name in PAIRS:
    store = record(getattr(testbed, name)(), WORK / f"{name}.zarr", pair_name=f"qdrift_stats.testbed:{name}",
                   scheduler_name="euler", steps=steps, runs=runs, batch_size=batch, seed=0)
    results[name] = diagnose(store)
    print(f"{name:>24}: regime {results[name].attrs['regime']}, use {results[name].attrs['estimator']} "
          f"with the {results[name].attrs['correction']} form")

# %% [markdown]
# ## The panels
# One panel per diagnostic, per step; dashed lines are the thresholds between regimes.

# %%
for name, diag in results.items():
    fig = plot_diagnostics(diag)
    fig.suptitle(name)
    show(fig)

# %% [markdown]
# ## Reading the report
# `report` says the same in words: the regime, what to use, and the evidence.

# %%
print(report(results["mixture_vp_rounding"]))

# %% [markdown]
# The reasons and caveats are also attributes of the Dataset (JSON), for scripts:

# %%
for name, diag in results.items():
    print(name, "->", json.loads(diag.attrs["reasons"])[0])
