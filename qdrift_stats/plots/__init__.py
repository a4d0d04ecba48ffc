"""Show: noise accumulation, variance statistics, runs-needed curves and diagnostics.

- :mod:`~qdrift_stats.plots.datasets`: the data, computed (fits, re-sampling) apart from drawing;
- :mod:`~qdrift_stats.plots.figures`: the ``plot_*`` figures drawn from those Datasets.
"""

from qdrift_stats.plots.datasets import *  # noqa: F401,F403
from qdrift_stats.plots.figures import *  # noqa: F401,F403
