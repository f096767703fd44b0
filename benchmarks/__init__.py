"""Benchmarks of the limiter against its floors and its alternatives: ``python -m benchmarks.run``.

See :mod:`benchmarks.run` for what is measured, how, and the ``--quick`` smoke mode.
"""
