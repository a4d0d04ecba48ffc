"""Validate: cross-validation over calibration runs, runs needed, and diagnostics of the method's assumptions.

- :mod:`~qdrift_stats.validate.crossval`: ``cross_validate``, the runs-needed learning curve and strength search;
- :mod:`~qdrift_stats.validate.diagnostics`: ``diagnose``, tests of the assumptions behind the correction.
"""
