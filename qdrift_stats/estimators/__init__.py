"""Estimators of the per-step variance statistic: ``Estimator().fit(store) -> FittedEstimator``.

Registered by name for the command line (``qdrift fit --estimator NAME``).
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import QDriftError
from .base import FittedEstimator
from .empirical import EmpiricalEstimator

ESTIMATORS: dict[str, Callable[[], Any]] = {
    "empirical": EmpiricalEstimator,
    "per-channel": lambda: EmpiricalEstimator(per_channel=True),
    "first-order": lambda: EmpiricalEstimator(statistic="first-order"),
    "first-order-per-channel": lambda: EmpiricalEstimator(per_channel=True, statistic="first-order"),
}


def get_estimator(name: str) -> Any:
    """A fresh estimator instance by its command-line name."""
    try:
        return ESTIMATORS[name]()
    except KeyError:
        raise QDriftError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}") from None


__all__ = ["ESTIMATORS", "EmpiricalEstimator", "FittedEstimator", "get_estimator"]
