"""Flash attention kernel (lmx.pallas.flash_attention) vs cuDNN and XLA attention, on a GPU.

bf16, causal, N=16 query heads, batch * S = 16k tokens. A subset of the (S, H, G) grid, to stay near a minute and
a half of GPU time: S in {1k, 2k, 4k, 8k} at H=128, G=1; then G in {4, 8} at H=128 and G=4 at H=64, all at S=2k.
Each is timed forward and forward + backward (jax.vjp with a fixed cotangent, grads of q, k, v) for the kernel
(impl="pallas"), cuDNN and XLA (`jax.nn.dot_product_attention(..., is_causal=True, implementation=...)`).
Packed rows (`flash_attention/segments`): 4 equal segments per row, S=4k, H=128, G=4, the kernel's segment_ids
against cuDNN given the same mask densely (`mask=` [B, 1, T, S]).
Figure of merit: TFLOP/s over the unmasked (query, key) pairs only: 4·H per pair and head forward, 2.5x that
backward (fwd + bwd = 3.5x); ratio = baseline time / kernel time (> 1: the kernel is faster).
Timing: median of `RUNS` calls after a compile + warmup call, each call waited with jax.block_until_ready.
quick=True (the CPU smoke test): one tiny shape through both implementations (the kernel in interpret mode),
forward and gradients; emits their max abs difference only, no timings off a GPU.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import gpu_ready, max_abs_err
from lmx.pallas.flash_attention import flash_attention

N, TOKENS, RUNS = 16, 16384, 10
DTYPE = jnp.bfloat16
GRID = [(1024, 128, 1), (2048, 128, 1), (4096, 128, 1), (8192, 128, 1),  # (S, H, G)
        (2048, 128, 4), (2048, 128, 8), (2048, 64, 4)]
SEGMENTS = (4096, 128, 4, 4)  # (S, H, G, segments per row)


def _inputs(B, S, N, K, H, dtype, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(kq, (B, S, N, H), dtype), jax.random.normal(kk, (B, S, K, H), dtype),
            jax.random.normal(kv, (B, S, K, H), dtype), jax.random.normal(kd, (B, S, N, H), dtype))


def _fwd_bwd(attn):
    def f(q, k, v, do):
        o, vjp = jax.vjp(attn, q, k, v)
        return o, vjp(do)
    return f


def _seconds(fn, args):
    """(median wall seconds of one call of jit(fn) after a compile + warmup call, the warmup call's output)."""
    fn = jax.jit(fn)
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _time_sides(emit, name, sides, args, flops, extra):
    """Time every side forward and forward + backward; emit the kernel's TFLOP/s against each baseline, and its
    max abs difference from that baseline (outputs, or outputs and grads)."""
    for mode, mult in (("fwd", 1.0), ("fwd_bwd", 3.5)):
        secs, outs = {}, {}
        for side, attn in sides.items():
            try:
                fn = (lambda q, k, v, do, attn=attn: attn(q, k, v)) if mode == "fwd" else _fwd_bwd(attn)
                secs[side], outs[side] = _seconds(fn, args)
            except Exception as e:  # noqa: BLE001 - a side that cannot run this shape (OOM, cuDNN limits) is reported
                emit(f"{name}/{mode}/{side}", "error", f"{type(e).__name__}: {str(e)[:300]}", **extra)
        if "pallas" not in secs:
            continue
        tflops = {side: mult * flops / s / 1e12 for side, s in secs.items()}
        for side in secs.keys() - {"pallas"}:
            emit(f"{name}/{mode}/vs_{side}", "tflops", tflops["pallas"], baseline=tflops[side],
                 ratio=secs[side] / secs["pallas"], kernel_s=secs["pallas"], baseline_s=secs[side],
                 max_abs_err=max_abs_err(outs["pallas"], outs[side]), **extra)
        del outs


def _quick(emit):
    rng = np.random.default_rng(0)  # numpy: eager jax.random costs more CPU than the check itself
    q, k, v, do = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(1, 40, 4, 16), (1, 40, 2, 16),
                                                                               (1, 40, 2, 16), (1, 40, 4, 16)])
    seg = jnp.asarray([[1] * 17 + [2] * 19 + [0] * 4], jnp.int32)
    kw = dict(causal=True, segment_ids=seg, block_q=16, block_k=16)
    kernel = functools.partial(flash_attention, impl="pallas", interpret=True, **kw)
    ref = functools.partial(flash_attention, impl="xla", **kw)
    (o1, g1), (o2, g2) = (jax.jit(_fwd_bwd(f))(q, k, v, do) for f in (kernel, ref))
    emit("flash_attention/quick", "max_abs_err", max_abs_err(o1, o2), grad_max_abs_err=max_abs_err(g1, g2),
         shape="B1 T40 N4 K2 H16 f32 causal segments", interpret=True)


def run(emit, quick: bool):
    """Emit JSON lines through `emit` (benchmarks._common.emit); see the module docstring."""
    if quick:
        return _quick(emit)
    if not gpu_ready(emit, "flash_attention"):
        return
    dpa = jax.nn.dot_product_attention
    for S, H, G in GRID:
        B, K = TOKENS // S, N // G
        args = _inputs(B, S, N, K, H, DTYPE, seed=S + H + G)
        sides = {"pallas": functools.partial(flash_attention, causal=True, impl="pallas"),
                 "cudnn": functools.partial(dpa, is_causal=True, implementation="cudnn"),
                 "xla": functools.partial(dpa, is_causal=True, implementation="xla")}
        flops = 4.0 * H * N * B * S * (S + 1) / 2  # causal: S(S+1)/2 pairs per row and head
        _time_sides(emit, f"flash_attention/s{S}/h{H}/g{G}", sides, args, flops, dict(B=B, S=S, N=N, K=K, H=H))
        del args

    S, H, G, n_seg = SEGMENTS
    B, K = TOKENS // S, N // G
    args = _inputs(B, S, N, K, H, DTYPE, seed=1)
    seg_BS = jnp.broadcast_to(jnp.repeat(jnp.arange(1, n_seg + 1, dtype=jnp.int32), S // n_seg), (B, S))
    mask_B1TS = (seg_BS[:, :, None] == seg_BS[:, None, :])[:, None]
    sides = {"pallas": functools.partial(flash_attention, causal=True, segment_ids=seg_BS, impl="pallas"),
             "cudnn_dense_mask": functools.partial(dpa, mask=mask_B1TS, is_causal=True, implementation="cudnn")}
    L = S // n_seg
    flops = 4.0 * H * N * B * n_seg * L * (L + 1) / 2
    _time_sides(emit, f"flash_attention/segments{n_seg}/s{S}/h{H}/g{G}", sides, args, flops,
                dict(B=B, S=S, N=N, K=K, H=H, segments=n_seg))


if __name__ == "__main__":
    import sys

    from benchmarks._common import emit

    run(emit, quick="--quick" in sys.argv[1:])
