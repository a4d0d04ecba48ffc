"""Estimators of the per-step variance statistic: ``Estimator().fit(store) -> FittedEstimator``.

Registered by name for the command line (``qdrift fit --estimator NAME``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.base import FittedEstimator
from qdrift_stats.estimators.decomposed import DecomposedEstimator
from qdrift_stats.estimators.empirical import EmpiricalEstimator
from qdrift_stats.estimators.moment import MomentEstimator
from qdrift_stats.estimators.robust import RobustEstimator
from qdrift_stats.estimators.smooth import SmoothGLMEstimator, SmoothLowessEstimator

ESTIMATORS: dict[str, Callable[[], Any]] = {
    "empirical": EmpiricalEstimator,
    "per-channel": lambda: EmpiricalEstimator(per_channel=True),
    "first-order": lambda: EmpiricalEstimator(statistic="first-order"),
    "first-order-per-channel": lambda: EmpiricalEstimator(per_channel=True, statistic="first-order"),
    "decomposed": DecomposedEstimator,
    "smooth-glm": SmoothGLMEstimator,
    "smooth-lowess": SmoothLowessEstimator,
    "robust": RobustEstimator,
    "robust-huber": lambda: RobustEstimator(method="huber"),
    "robust-mad": lambda: RobustEstimator(method="mad"),
    "moment": MomentEstimator,  # re-samples the pair named in the store
}


def get_estimator(name: str) -> Any:
    """A fresh estimator instance by its command-line name."""
    try:
        return ESTIMATORS[name]()
    except KeyError:
        raise QDriftError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}") from None


__all__ = [
    "ESTIMATORS",
    "DecomposedEstimator",
    "EmpiricalEstimator",
    "FittedEstimator",
    "MomentEstimator",
    "RobustEstimator",
    "SmoothGLMEstimator",
    "SmoothLowessEstimator",
    "get_estimator",
]
