"""qdrift-stats: quantization-aware sampling of diffusion models (Q-Drift), recorded, fitted,
validated, exported and applied.

The public API, by step of the data flow (each name is imported on first use, so ``import
qdrift_stats`` stays fast and loads neither torch nor diffusers):

- record: :func:`record` (a model pair, ``qdrift record``), :func:`calibrate_pipeline` (a
  diffusers pipeline pair), :func:`load_pair`;
- fit: :func:`get_estimator` and the estimator classes (:class:`Estimator`,
  :class:`EmpiricalEstimator`, ...), each ``fit(store) -> FittedEstimator``;
- validate: :func:`cross_validate`, :func:`learning_curve`, :func:`strength_curve`, :func:`diagnose`;
- export: :class:`EstimatorFile` (``EstimatorFile.from_fitted(fitted).save(path)``);
- correct: :func:`sample` (a model pair), :class:`QDriftScheduler` (any diffusers pipeline);
- errors: :class:`QDriftError` (bad input; the command line exits with code 2).

``qdrift_stats.record`` is both the record subpackage and the record function: the subpackage
module is callable, ``qdrift_stats.record(pair, out, ...)`` calls
:func:`qdrift_stats.record.lockstep.record`, and ``qdrift_stats.record.store`` etc. stay the
subpackage's modules. (A plain function attribute would be replaced by the subpackage as soon as any
``qdrift_stats.record.*`` module is imported; the callable module is the same object either way.)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None: the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "record": ("qdrift_stats.record", None),
    "calibrate_pipeline": ("qdrift_stats.record.pipelines", "calibrate_pipeline"),
    "open_store": ("qdrift_stats.record.store", "open_store"),
    "load_pair": ("qdrift_stats.pair", "load_pair"),
    "get_estimator": ("qdrift_stats.estimators", "get_estimator"),
    "ESTIMATORS": ("qdrift_stats.estimators", "ESTIMATORS"),
    "Estimator": ("qdrift_stats.estimators", "Estimator"),
    "FittedEstimator": ("qdrift_stats.estimators", "FittedEstimator"),
    "EmpiricalEstimator": ("qdrift_stats.estimators", "EmpiricalEstimator"),
    "DecomposedEstimator": ("qdrift_stats.estimators", "DecomposedEstimator"),
    "SmoothGLMEstimator": ("qdrift_stats.estimators", "SmoothGLMEstimator"),
    "SmoothLowessEstimator": ("qdrift_stats.estimators", "SmoothLowessEstimator"),
    "RobustEstimator": ("qdrift_stats.estimators", "RobustEstimator"),
    "MomentEstimator": ("qdrift_stats.estimators", "MomentEstimator"),
    "cross_validate": ("qdrift_stats.validate.crossval", "cross_validate"),
    "open_cv": ("qdrift_stats.validate.crossval", "open_cv"),
    "learning_curve": ("qdrift_stats.validate.learning_curve", "learning_curve"),
    "strength_curve": ("qdrift_stats.validate.strength", "strength_curve"),
    "diagnose": ("qdrift_stats.validate.diagnostics", "diagnose"),
    "EstimatorFile": ("qdrift_stats.correct.estimator_file", "EstimatorFile"),
    "sample": ("qdrift_stats.correct.sample", "sample"),
    "QDriftScheduler": ("qdrift_stats.correct.diffusers", "QDriftScheduler"),
    "QDriftError": ("qdrift_stats.errors", "QDriftError"),
}

__all__ = [
    "__version__",
    "record",
    "calibrate_pipeline",
    "open_store",
    "load_pair",
    "get_estimator",
    "ESTIMATORS",
    "Estimator",
    "FittedEstimator",
    "EmpiricalEstimator",
    "DecomposedEstimator",
    "SmoothGLMEstimator",
    "SmoothLowessEstimator",
    "RobustEstimator",
    "MomentEstimator",
    "cross_validate",
    "open_cv",
    "learning_curve",
    "strength_curve",
    "diagnose",
    "EstimatorFile",
    "sample",
    "QDriftScheduler",
    "QDriftError",
]

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names load on first use
    from qdrift_stats import record
    from qdrift_stats.correct.diffusers import QDriftScheduler
    from qdrift_stats.correct.estimator_file import EstimatorFile
    from qdrift_stats.correct.sample import sample
    from qdrift_stats.errors import QDriftError
    from qdrift_stats.estimators import (
        ESTIMATORS,
        DecomposedEstimator,
        EmpiricalEstimator,
        Estimator,
        FittedEstimator,
        MomentEstimator,
        RobustEstimator,
        SmoothGLMEstimator,
        SmoothLowessEstimator,
        get_estimator,
    )
    from qdrift_stats.pair import load_pair
    from qdrift_stats.record.pipelines import calibrate_pipeline
    from qdrift_stats.record.store import open_store
    from qdrift_stats.validate.crossval import cross_validate, open_cv
    from qdrift_stats.validate.diagnostics import diagnose
    from qdrift_stats.validate.learning_curve import learning_curve
    from qdrift_stats.validate.strength import strength_curve


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'qdrift_stats' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    if attribute is not None:
        globals()[name] = value  # cache (the record subpackage sets itself when imported)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
