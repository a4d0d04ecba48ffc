"""Export and correct: estimator files and the Q-Drift correction in samplers and diffusers pipelines.

- :mod:`~qdrift_stats.correct.coefficients`: the per-step pull coefficients (pure functions);
- :mod:`~qdrift_stats.correct.corrector`: the per-step update on the sampler's device;
- :mod:`~qdrift_stats.correct.estimator_file`: estimator files (safetensors + JSON), export and load;
- :mod:`~qdrift_stats.correct.diffusers`: ``QDriftScheduler``, the wrapper for any diffusers pipeline;
- :mod:`~qdrift_stats.correct.sample`: corrected sampling with a model pair (``qdrift sample``).
"""
