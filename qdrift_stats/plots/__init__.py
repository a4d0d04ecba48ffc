"""Show: noise accumulation, variance statistics, runs-needed curves and diagnostics."""

from qdrift_stats.plots.figures import *  # noqa: F401,F403
