"""Estimators of the per-step variance statistic: ``Estimator().fit(store) -> FittedEstimator``.

Every estimator subclasses :class:`~qdrift_stats.estimators.base.Estimator` and lives in its own
module. :data:`ESTIMATORS` names them for the command line (``qdrift fit --estimator NAME``,
``qdrift cv --estimator NAME``): adding an estimator is one module plus one line there.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from qdrift_stats.errors import QDriftError
from qdrift_stats.estimators.base import Estimator, FittedEstimator
from qdrift_stats.estimators.baselines import PTQDEstimator, PublishedEstimator
from qdrift_stats.estimators.decomposed import DecomposedEstimator, DecomposedFit
from qdrift_stats.estimators.empirical import EmpiricalEstimator
from qdrift_stats.estimators.moment import MomentEstimator, MomentFit
from qdrift_stats.estimators.persistent import PersistentEstimator
from qdrift_stats.estimators.robust import RobustEstimator
from qdrift_stats.estimators.smooth import SmoothFit, SmoothGLMEstimator, SmoothLowessEstimator

#: Command-line name -> a factory of a configured, unfitted estimator.
ESTIMATORS: dict[str, Callable[[], Estimator]] = {
    "empirical": EmpiricalEstimator,
    "per-channel": partial(EmpiricalEstimator, per_channel=True),
    "first-order": partial(EmpiricalEstimator, statistic="first-order"),
    "first-order-per-channel": partial(EmpiricalEstimator, per_channel=True, statistic="first-order"),
    "decomposed": DecomposedEstimator,
    "smooth-glm": SmoothGLMEstimator,
    "smooth-lowess": SmoothLowessEstimator,
    "robust": RobustEstimator,
    "robust-huber": partial(RobustEstimator, method="huber"),
    "robust-mad": partial(RobustEstimator, method="mad"),
    "robust-first-order": partial(RobustEstimator, statistic="first-order"),
    "moment": MomentEstimator,  # re-samples the pair named in the store
    "persistent": PersistentEstimator,
    "persistent-nobias": partial(PersistentEstimator, bias="none"),
    # the two pull options keep the plain map they were measured with (docs/results.md)
    "persistent-noise-pull": partial(PersistentEstimator, spread="noise", map_state=False),
    "persistent-landing": partial(PersistentEstimator, spread="landing", map_state=False),
    "persistent-state-map": partial(PersistentEstimator, map_state=True),  # the default: the map also sees the state
    "persistent-plain-map": partial(PersistentEstimator, map_state=False),  # the default before: the FP output only
    "persistent-mapped": partial(PersistentEstimator, path="mapped", map_state=False),  # plain map, mapped path
    "persistent-quantized-path": partial(PersistentEstimator, path="quantized", map_state=False),  # before that
    "persistent-ptqd": partial(PersistentEstimator, bias="ptqd", min_explained=0.0),
    "persistent-conditional": partial(PersistentEstimator, bias="conditional"),
    "published": PublishedEstimator,  # the published Q-Drift code's statistic and correction (baseline)
    "published-bias": partial(PublishedEstimator, bias=True),
    "ptqd": PTQDEstimator,
    "auto": lambda: _auto(),  # chooses estimator, form and strength profile by CV (re-samples the pair)
}


def _auto() -> Estimator:
    """:class:`qdrift_stats.correct.auto.AutoEstimator`, imported on demand (it samples: it lives in ``correct``)."""
    from qdrift_stats.correct.auto import AutoEstimator

    return AutoEstimator()


def get_estimator(name: str) -> Estimator:
    """A fresh estimator instance by its command-line name (a key of :data:`ESTIMATORS`)."""
    try:
        factory = ESTIMATORS[name]
    except KeyError:
        raise QDriftError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}") from None
    return factory()


def registered_name(estimator: Estimator) -> str | None:
    """The :data:`ESTIMATORS` name that builds an estimator with the same class and parameters, if any."""
    for name, factory in ESTIMATORS.items():
        candidate = factory()
        if type(candidate) is type(estimator) and candidate.get_params() == estimator.get_params():
            return name
    return None


__all__ = [
    "ESTIMATORS",
    "DecomposedEstimator",
    "DecomposedFit",
    "EmpiricalEstimator",
    "Estimator",
    "FittedEstimator",
    "MomentEstimator",
    "MomentFit",
    "PersistentEstimator",
    "PTQDEstimator",
    "PublishedEstimator",
    "RobustEstimator",
    "SmoothFit",
    "SmoothGLMEstimator",
    "SmoothLowessEstimator",
    "get_estimator",
    "registered_name",
]
