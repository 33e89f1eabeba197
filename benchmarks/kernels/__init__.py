"""Kernel benchmarks (issue 13): one module per lmx.pallas op, each with run(emit, quick). `python -m
benchmarks.kernels` runs them all (see __main__.py)."""
