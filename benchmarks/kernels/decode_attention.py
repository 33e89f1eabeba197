"""Decode attention kernel (lmx.pallas.decode_attention) vs its XLA reference, on a GPU; last, a speculative
verification's T = 5 queries per row (B = 1, 8; S = 16k).

bf16, N=32 query heads over K=8 kv heads, H=128, B in {1, 8, 32}, cache S in {4k, 16k, 32k}, row lengths drawn
uniformly from [0.9 S, S]. The figure of merit is achieved HBM bandwidth on the K/V bytes a row must read
(sum over rows of length * K * H * 2 arrays * 2 bytes) / time, beside the XLA reference's time in the same run and
the device's copy bandwidth (a large device-to-device copy, bytes read + written / time) measured in the same run.

Timing: one jitted fori_loop runs the op `reps` times, each step's output fed back as the next query (a true
dependence, so nothing is hoisted and one dispatch covers all steps); median of several such runs after a warmup.
quick=True (the CPU smoke test) runs one tiny shape through both implementations (kernel in interpret mode) and
emits their max abs difference only: no timings off a GPU.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import copy_bandwidth, gpu_ready, max_abs_err
from lmx.pallas.decode_attention import decode_attention, default_block_s, default_num_splits

N, K, H = 32, 8, 128
BATCHES = (1, 8, 32)
CACHES = (4096, 16384, 32768)
DTYPE = jnp.bfloat16


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))  # one compiled program, not one per random op
def _inputs(B: int, N: int, K: int, H: int, S: int, dtype, seed: int = 0):
    kq, kk, kv, kl = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, N, H), dtype)
    k = jax.random.normal(kk, (B, K, H, S), dtype)
    v = jax.random.normal(kv, (B, K, S, H), dtype)
    lengths = jax.random.randint(kl, (B,), int(0.9 * S), S + 1, jnp.int32)
    return q, k, v, lengths


def _seconds_per_call(fn, args, reps: int, runs: int) -> float:
    """Median over `runs` of (one jitted loop of `reps` dependent calls) / reps."""

    @jax.jit
    def loop(q, k, v, lengths):
        return jax.lax.fori_loop(0, reps, lambda _, q: fn(q, k, v, lengths), q)

    jax.block_until_ready(loop(*args))  # compile + warm up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(*args))
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def _quick(emit):
    rng = np.random.default_rng(0)  # numpy: eager jax.random costs more CPU than the check itself
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(2, 4, 16), (2, 2, 16, 40), (2, 2, 40, 16)])
    lengths = jnp.asarray([40, 23], jnp.int32)
    kernel = jax.jit(functools.partial(decode_attention, impl="pallas", interpret=True, block_s=16, num_splits=2))
    ref = jax.jit(functools.partial(decode_attention, impl="xla"))
    kernel, ref = kernel(q, k, v, lengths), ref(q, k, v, lengths)
    emit("decode_attention/quick", "max_abs_err", max_abs_err(kernel, ref), shape="B2 N4 K2 H16 S40 f32",
         interpret=True)


def run(emit, quick: bool):
    """Emit JSON lines through `emit` (benchmarks._common.emit); see the module docstring."""
    if quick:
        return _quick(emit)
    if not gpu_ready(emit, "decode_attention"):
        return
    peak = copy_bandwidth()
    emit("decode_attention/copy_peak", "bytes_per_s", peak)
    kernel = functools.partial(decode_attention, impl="pallas")
    ref = functools.partial(decode_attention, impl="xla")
    for S in CACHES:
        for B in BATCHES:
            args = _inputs(B, N, K, H, S, DTYPE, seed=B * S)
            kv_bytes = int(np.sum(np.asarray(args[3], np.int64))) * K * H * 2 * 2
            err = max_abs_err(jax.jit(kernel)(*args), jax.jit(ref)(*args))
            reps = int(np.clip(np.ceil(4e9 / kv_bytes), 5, 500))  # a few GB per timed loop
            t_kernel = _seconds_per_call(kernel, args, reps, runs=7)
            t_ref = _seconds_per_call(ref, args, reps, runs=7)
            block_s = default_block_s(H, S)
            emit(f"decode_attention/b{B}/s{S}", "kv_bytes_per_s", kv_bytes / t_kernel, baseline=kv_bytes / t_ref,
                 ratio=t_ref / t_kernel, kernel_s=t_kernel, xla_s=t_ref, kv_bytes=kv_bytes,
                 frac_of_copy_peak=kv_bytes / t_kernel / peak, xla_frac_of_copy_peak=kv_bytes / t_ref / peak,
                 max_abs_err=err, block_s=block_s, num_splits=default_num_splits(B, K, S, block_s), reps=reps)
            del args
    # A speculative verification (γ = 4): T = 5 queries per row read the row's cache once, vs the XLA reference.
    for B in (1, 8):
        S, T = 16384, 5
        q, k, v, lengths = _inputs(B, N, K, H, S, DTYPE, seed=7 + B)
        args = (q[:, None] + jnp.arange(T, dtype=DTYPE)[None, :, None, None] / T, k, v, lengths)
        kv_bytes = int(np.sum(np.asarray(lengths, np.int64))) * K * H * 2 * 2
        err = max_abs_err(jax.jit(kernel)(*args), jax.jit(ref)(*args))
        reps = int(np.clip(np.ceil(4e9 / kv_bytes), 5, 500))
        t_kernel, t_ref = _seconds_per_call(kernel, args, reps, runs=7), _seconds_per_call(ref, args, reps, runs=7)
        emit(f"decode_attention/verify_t{T}/b{B}/s{S}", "kv_bytes_per_s", kv_bytes / t_kernel,
             baseline=kv_bytes / t_ref, ratio=t_ref / t_kernel, kernel_s=t_kernel, xla_s=t_ref,
             frac_of_copy_peak=kv_bytes / t_kernel / peak, max_abs_err=err, reps=reps)


if __name__ == "__main__":
    import sys

    from benchmarks._common import emit

    run(emit, quick="--quick" in sys.argv[1:])
