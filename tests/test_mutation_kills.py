"""Tests written to kill mutants that survived ``mutmut`` on the correction path (docs/results/mutation.md).

Each pins a behaviour the earlier tests left open: an exact message, a boundary, a fallback.
"""
