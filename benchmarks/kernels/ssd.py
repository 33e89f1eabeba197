"""Mamba-2 SSD scan: the Pallas kernels (`lmx.pallas.ssd`, impl="pallas") vs the XLA reference (jitted
`lmx.models.ssm.ssd_chunked`), forward and forward+backward, at Mamba-2 training shapes (x, B, C in bfloat16, Δ
and A in float32, U = 1, chunk 64). GPU only: each case is timed interleaved (median over rounds after a warmup,
`jax.block_until_ready`), with the ratio xla_s / pallas_s (> 1: the kernels are faster) and the kernels' dot
TFLOP/s; the max abs difference of the outputs (y, and dx for forward+backward) is reported beside each time.
quick=True (the CPU smoke run) pushes one tiny shape through both implementations (interpret mode) and emits only
the max abs differences, no timings."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from benchmarks._common import interleaved, median
from benchmarks.kernels import gpu_ready, max_abs_err

F32, BF16 = jnp.float32, jnp.bfloat16
CASES = [  # (batch, T, heads N, head dim H, state Z, groups U, chunk)
    (4, 4096, 32, 64, 128, 1, 64),
    (1, 16384, 32, 64, 128, 1, 64),
]
QUICK_CASE = (1, 40, 4, 16, 16, 1, 16)


def _inputs(Bn, T, N, H, Z, U, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (Bn, T, N, H), BF16)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (Bn, T, N), F32) - 3.0)  # Δ around softplus(dt_bias) ~ 0.05
    A = -jnp.exp(jnp.log(jnp.arange(1, N + 1, dtype=F32)))  # the mixer's A_log init
    B = jax.random.normal(ks[2], (Bn, T, U, Z), BF16)
    C = jax.random.normal(ks[3], (Bn, T, U, Z), BF16)
    dy = jax.random.normal(ks[4], (Bn, T, N, H), F32)
    return (x, dt, A, B, C), dy


def _functions(impl: str, chunk: int, interpret: bool):
    from lmx.pallas.ssd import ssd

    def fwd(args):
        return ssd(*args, chunk=chunk, impl=impl, interpret=interpret)

    def fwd_bwd(args, dy):
        (y, final), pull = jax.vjp(fwd, args)
        return pull((dy, jnp.zeros_like(final)))[0]

    return jax.jit(fwd), jax.jit(fwd_bwd)


def _dot_flops(Bn, T, N, H, Z, chunk) -> tuple[float, float]:
    """Dot FLOPs of the kernels (forward, backward), counted per head (a program looping over several heads of a
    group computes C Bᵀ once): per position and head, forward 2C(Z+H) (C Bᵀ, then times X) + 4HZ (chunk state,
    entering state's output); backward 2C(3Z+2H) + 12HZ, its recomputation of the chunk states included."""
    per = Bn * T * N
    fwd = per * (2 * chunk * (Z + H) + 4 * H * Z)
    bwd = per * (2 * chunk * (3 * Z + 2 * H) + 12 * H * Z)
    return float(fwd), float(bwd)


def run(emit, quick: bool):
    """Emit one line per (case, pass): see the module docstring."""
    if quick:
        Bn, T, N, H, Z, U, chunk = QUICK_CASE
        args, dy = _inputs(Bn, T, N, H, Z, U)
        (kf, kb), (rf, rb) = _functions("pallas", chunk, True), _functions("xla", chunk, False)
        (yk, hk), (yr, hr) = kf(args), rf(args)
        gk, gr = kb(args, dy), rb(args, dy)
        shape = dict(B=Bn, T=T, N=N, H=H, Z=Z, U=U, chunk=chunk, interpret=True)
        emit("ssd/quick/fwd", "max_abs_err", max(max_abs_err(yk, yr), max_abs_err(hk, hr)), **shape)
        grad_err = max_abs_err(gk, gr)
        emit("ssd/quick/fwd_bwd", "max_abs_err", grad_err, **shape)
        return
    if not gpu_ready(emit, "ssd"):
        return
    device = jax.devices()[0].device_kind
    for Bn, T, N, H, Z, U, chunk in CASES:
        args, dy = _inputs(Bn, T, N, H, Z, U)
        (kf, kb), (rf, rb) = _functions("pallas", chunk, False), _functions("xla", chunk, False)
        name = f"ssd/B{Bn}_T{T}_N{N}_H{H}_Z{Z}_U{U}_C{chunk}"
        flops_f, flops_b = _dot_flops(Bn, T, N, H, Z, chunk)
        for label, kernel, reference, flops in [
            ("fwd", partial(kf, args), partial(rf, args), flops_f),
            ("fwd_bwd", partial(kb, args, dy), partial(rb, args, dy), flops_f + flops_b),
        ]:
            _time_pair(emit, f"{name}/{label}", kernel, reference, flops, device,
                       compared="y" if label == "fwd" else "dx")


def _time_pair(emit, name, kernel, reference, flops, device, compared):
    """Compile and warm up both sides, compare their first outputs, time them interleaved and emit."""
    out_k, out_r = jax.block_until_ready((kernel(), reference()))
    err = max_abs_err(out_k[0], out_r[0])
    times = interleaved({"pallas": lambda: jax.block_until_ready(kernel()),
                         "xla": lambda: jax.block_until_ready(reference())}, rounds=7, pause=0.0)
    t_k, t_r = median(times["pallas"]), median(times["xla"])
    emit(name, "seconds", t_k, baseline=t_r, ratio=t_r / t_k, ratio_is="xla_s / pallas_s", tflops=flops / t_k / 1e12,
         max_abs_err=err, compared=compared, device=device)
