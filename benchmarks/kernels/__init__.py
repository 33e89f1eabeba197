"""Kernel benchmarks (issue 13): one module per lmx.pallas op, each with run(emit, quick). `python -m
benchmarks.kernels` runs them all (see __main__.py). Shared here: the device's copy bandwidth, the roofline that
memory-bound kernels (decode attention, quant_matmul) are measured against; the kernel-vs-baseline error; the
GPU check every op's timed run starts with."""

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


def max_abs_err(a, b) -> float:
    """Largest |a - b| over the leaves of two pytrees of arrays (outputs, or outputs and gradients), in f32."""
    import jax
    import jax.numpy as jnp

    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def gpu_ready(emit, op: str) -> bool:
    """True on a GPU, after emitting `<op>/env` (jax version, device); elsewhere emits `<op>/skipped` and returns
    False: timings off a GPU would say nothing about the kernels."""
    import jax

    if jax.default_backend() != "gpu":
        emit(f"{op}/skipped", "info", None, reason=f"needs a GPU, backend is {jax.default_backend()!r}")
        return False
    emit(f"{op}/env", "info", None, jax=jax.__version__, device=jax.devices()[0].device_kind)
    return True
