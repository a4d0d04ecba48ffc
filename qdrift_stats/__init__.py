"""qdrift-stats: quantization-aware sampling of diffusion models (Q-Drift), recorded, fitted,
validated, exported and applied.

Data flow: :mod:`~qdrift_stats.record.lockstep` -> :mod:`~qdrift_stats.estimators` (fit) ->
:mod:`~qdrift_stats.correct.estimator_file` (estimator files) -> :mod:`~qdrift_stats.loop` (correct).
"""

__version__ = "0.1.0"
