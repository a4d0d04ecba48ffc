"""Record: instrumented paired FP/Q sampling written to the calibration store.

- :mod:`~qdrift_stats.record.store`: the store's schema, identity and commit point;
- :mod:`~qdrift_stats.record.lockstep`: ``record`` for any model pair;
- :mod:`~qdrift_stats.record.pipelines`: ``calibrate_pipeline`` for diffusers pipelines;
- :mod:`~qdrift_stats.record.distributed`: the same recording on dask.distributed.

This package is also the public ``qdrift_stats.record`` function: calling the module,
``qdrift_stats.record(pair, out, ...)``, calls :func:`qdrift_stats.record.lockstep.record` (same
arguments; imported on the first call). See :mod:`qdrift_stats` for why.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class CallableModule(types.ModuleType):
    """A module whose call is :func:`qdrift_stats.record.lockstep.record`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from qdrift_stats.record.lockstep import record

        return record(*args, **kwargs)


sys.modules[__name__].__class__ = CallableModule
