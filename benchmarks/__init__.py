"""Benchmarks: scripts that print JSON lines {"name", "metric", "value", "baseline", "ratio", ...}.

Every speed figure is a ratio measured side by side in one run (lmx vs a reference implementation, or vs
the hardware roofline), with the two sides interleaved so that machine load hits both alike.
"""
