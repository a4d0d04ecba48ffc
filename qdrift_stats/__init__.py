"""qdrift-stats: quantization-aware sampling of diffusion models (Q-Drift), recorded, fitted,
validated, exported and applied.

Data flow: :mod:`~qdrift_stats.record` -> :mod:`~qdrift_stats.estimators` (fit) ->
:mod:`~qdrift_stats.export` (estimator files) -> :mod:`~qdrift_stats.sampling` (correct).
"""

__version__ = "0.1.0"
