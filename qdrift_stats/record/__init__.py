"""Record: instrumented paired FP/Q sampling written to the calibration store.

- :mod:`~qdrift_stats.record.store`: the store's schema, identity and commit point;
- :mod:`~qdrift_stats.record.lockstep`: ``record`` for any model pair;
- :mod:`~qdrift_stats.record.pipelines`: ``calibrate_pipeline`` for diffusers pipelines;
- :mod:`~qdrift_stats.record.distributed`: the same recording on dask.distributed.
"""
