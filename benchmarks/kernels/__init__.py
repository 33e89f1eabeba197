"""Kernel benchmarks (issue 13): one module per lmx.pallas op, each with run(emit, quick). `python -m
benchmarks.kernels` runs them all (see __main__.py). Shared here: the device's copy bandwidth, the roofline that
memory-bound kernels (decode attention, quant_matmul) are measured against."""

from __future__ import annotations

import statistics
import time


def copy_bandwidth(nbytes: int = 4 << 30, runs: int = 10) -> float:
    """Device-to-device copy bandwidth: bytes read + written per second, median of `runs`."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    copy = jax.jit(lambda x: x.copy())
    jax.block_until_ready(copy(x))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(copy(x))
        times.append(time.perf_counter() - t0)
    del x
    return 2 * nbytes / statistics.median(times)
