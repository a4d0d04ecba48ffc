"""Example model pairs to copy and adapt (see docs/quickstart.md).

- :mod:`~qdrift_stats.examples.conditional_pair`: a class-conditional pair with exact denoisers,
  runnable offline in seconds (``--pair qdrift_stats.examples.conditional_pair:make_pair``).
"""
