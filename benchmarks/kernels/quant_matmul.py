"""Low-bit weight-only matmul (lmx.pallas.quant_matmul) vs the bf16 XLA dot `x @ w`, on a GPU.

bf16 activations, M in {1, 4, 16} rows, weights of 256 MiB and 1 GiB in bf16 terms (I x O = 8192 x 16384 and
16384 x 32768), quantized to int8 / int4 / 2-bit (groups of 64 rows) and the mixed 2/4-bit scheme (frac4 = 0.1,
tiles of 128 columns). Each line: the kernel's achieved bandwidth on the packed bytes it reads (codes, scales,
offsets, slots) / time, beside the bf16 dot's (its weight bytes / time) measured in the same run, the speedup
(ratio = t_dot / t_kernel), the kernel's max abs error vs the XLA reference (dequantize + dot) at that shape, and
the device's copy bandwidth measured in the same run.

Timing: one jitted fori_loop runs the op `reps` times, each step's output fed back into the next step's input (a
true dependence, so nothing is hoisted and one dispatch covers all steps); median of several such runs after a
warmup. quick=True (the CPU smoke test) runs one tiny shape through both implementations (kernel in interpret
mode) and emits their max abs difference only: no timings off a GPU.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import copy_bandwidth, gpu_ready, max_abs_err
from lmx.pallas.quant_matmul import quant_matmul, quantize

ROWS = (1, 4, 16)
WEIGHTS = ((8192, 16384), (16384, 32768))  # 256 MiB and 1 GiB of bf16
FORMATS = ((8, 64), (4, 64), (2, 64), ("mixed", 64))
DTYPE = jnp.bfloat16


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _weight(I: int, O: int, seed: int):
    w = jax.random.normal(jax.random.key(seed), (I, O), jnp.float32) / np.sqrt(I)
    return w.at[: I // 16].multiply(4.0).astype(DTYPE)  # some wide-range groups, what the mixed scheme targets


def _seconds_per_call(fn, x, w, reps: int, runs: int) -> float:
    """Median over `runs` of (one jitted loop of `reps` dependent calls fn(x, w)) / reps."""
    I = x.shape[1]

    @jax.jit
    def loop(x, w):
        # the next x depends on this y (O >= I here), a negligible update next to the weight read
        return jax.lax.fori_loop(0, reps, lambda _, x: x + (1e-3 * fn(x, w)[:, :I]).astype(x.dtype), x)

    jax.block_until_ready(loop(x, w))  # compile + warm up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(x, w))
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def _quick(emit):
    rng = np.random.default_rng(0)  # numpy: eager jax.random costs more CPU than the check itself
    w = jnp.asarray(rng.standard_normal((192, 48)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 192)), jnp.bfloat16)
    for bits in (4, "mixed"):  # the uniform and the mixed kernel
        qw = quantize(w, bits, 64, frac4=0.34, tile=32)
        kernel = jax.jit(functools.partial(quant_matmul, impl="pallas", interpret=True, block_o=32))(x, qw)
        ref = jax.jit(functools.partial(quant_matmul, impl="xla"))(x, qw)
        emit(f"quant_matmul/quick/{bits}", "max_abs_err", max_abs_err(kernel, ref), shape="B3 I192 O48 bf16",
             interpret=True)


def run(emit, quick: bool):
    """Emit JSON lines through `emit` (benchmarks._common.emit); see the module docstring."""
    if quick:
        return _quick(emit)
    if not gpu_ready(emit, "quant_matmul"):
        return
    peak = copy_bandwidth()
    emit("quant_matmul/copy_peak", "bytes_per_s", peak)
    kernel = functools.partial(quant_matmul, impl="pallas")
    ref = jax.jit(functools.partial(quant_matmul, impl="xla"))
    dot = lambda x, w: x @ w  # noqa: E731
    rng = np.random.default_rng(0)
    for I, O in WEIGHTS:
        w = _weight(I, O, I + O)
        w_bytes = w.size * w.dtype.itemsize
        xs = {M: jnp.asarray(rng.standard_normal((M, I)), DTYPE) for M in ROWS}
        reps = int(np.clip(np.ceil(8e9 / w_bytes), 5, 200))
        t_dot = {M: _seconds_per_call(dot, xs[M], w, reps, runs=7) for M in ROWS}
        for bits, group in FORMATS:
            fmt = bits if bits == "mixed" else f"int{bits}"
            qw = jax.block_until_ready(quantize(w, bits, group))
            err = max_abs_err(jax.jit(kernel)(xs[16], qw), ref(xs[16], qw))
            for M in ROWS:
                t = _seconds_per_call(kernel, xs[M], qw, reps, runs=7)
                emit(f"quant_matmul/{fmt}/g{group}/m{M}/i{I}/o{O}", "packed_bytes_per_s", qw.nbytes / t,
                     baseline=w_bytes / t_dot[M], ratio=t_dot[M] / t, kernel_s=t, bf16_dot_s=t_dot[M],
                     packed_bytes=qw.nbytes, bf16_bytes=w_bytes, frac_of_copy_peak=qw.nbytes / t / peak,
                     dot_frac_of_copy_peak=w_bytes / t_dot[M] / peak,
                     tflops=2 * M * I * O / t / 1e12, max_abs_err_m16=err, reps=reps)
            del qw
        del w, xs


if __name__ == "__main__":
    import sys

    from benchmarks._common import emit

    run(emit, quick="--quick" in sys.argv[1:])
