"""lmx.pallas.ssd: the SSD kernels (Pallas interpret mode on the CPU) against lmx.models.ssm.ssd_chunked, forward
and gradients; cross-lowering of the kernels for CUDA; input checks and the "auto" fallback."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.models.ssm import ssd_chunked
from lmx.pallas._compat import TRITON_CUSTOM_CALL, cuda_export
from lmx.pallas.ssd import ssd, ssd_pallas
from tests.pallas.hw import INTERPRET, f32_tol

F32, BF16 = jnp.float32, jnp.bfloat16
Bn, T, N, H, Z, CHUNK = 2, 40, 4, 16, 16, 16  # T = 2.5 chunks: the last chunk is a partial block
# Resets (segment starts) at 16 (a chunk boundary), 23 and 37 (inside chunks, 37 in the partial one); row 1 at 30.
SEGMENTS = np.array([[0] * 16 + [1] * 7 + [2] * 14 + [3] * 3, [5] * 30 + [6] * 10], np.int32)


def _inputs(U, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(ks[0], (Bn, T, N, H)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (Bn, T, N)) - 1.0).astype(dtype)
    A = -jnp.exp(0.5 * jax.random.normal(ks[2], (N,)))
    B = jax.random.normal(ks[3], (Bn, T, U, Z)).astype(dtype)
    C = jax.random.normal(ks[4], (Bn, T, U, Z)).astype(dtype)
    h0 = jax.random.normal(ks[5], (Bn, N, H, Z))
    return (x, dt, A, B, C, h0), jax.random.split(ks[6])


def _value_and_vjp(scan, args, cot_keys, with_state: bool):
    """(y, final, gradients of <y, dy> + <final, dfinal> w.r.t. x, dt, A, B, C [, h0])."""
    diff = args if with_state else args[:5]
    (y, final), pull = jax.vjp(lambda *a: scan(*a[:5], a[5] if with_state else None), *diff)
    dy = jax.random.normal(cot_keys[0], y.shape)
    dfinal = jax.random.normal(cot_keys[1], final.shape)
    return y, final, pull((dy, dfinal))


# Axes combined per case: dtype, groups U (1: all heads share B/C), initial state, segment resets, and heads per
# kernel program (2 of a group of 4: the in-kernel head loop and the sum of dB, dC over head blocks).
CASES = {
    "f32-U2-state-resets": dict(U=2, dtype=F32, with_state=True, resets=True, heads=None),
    "bf16-U1-heads2": dict(U=1, dtype=BF16, with_state=False, resets=False, heads=2),
}


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case):
    U, dtype, with_state, resets, heads = (CASES[case][k] for k in ("U", "dtype", "with_state", "resets", "heads"))
    args, cot_keys = _inputs(U, dtype)
    seg = jnp.asarray(SEGMENTS) if resets else None

    def kernel(x, dt, A, B, C, h0):
        return ssd_pallas(x, dt, A, B, C, chunk=CHUNK, initial_state=h0, segment_ids=seg, heads=heads,
                          interpret=INTERPRET)

    def reference(x, dt, A, B, C, h0):
        return ssd_chunked(x, dt, A, B, C, chunk_size=CHUNK, initial_state_BNHZ=h0, segment_ids_BT=seg)

    run_kernel = jax.jit(lambda a: _value_and_vjp(kernel, a, cot_keys, with_state))
    got = run_kernel(args)
    want = jax.jit(lambda a: _value_and_vjp(reference, a, cot_keys, with_state))(args)
    if resets:  # the resets take effect: changing x before the one at 23 (30 in row 1) and h0 changes nothing after
        x, dt, A, B, C, h0 = args
        y2, final2, _ = run_kernel((x.at[:, :23].set(0.0), dt, A, B, C, 2 * h0))
        np.testing.assert_array_equal(np.asarray(y2[0, 23:]), np.asarray(got[0][0, 23:]))
        np.testing.assert_array_equal(np.asarray(final2[0]), np.asarray(got[1][0]))
        assert not np.allclose(y2[0, 16:23], got[0][0, 16:23]) and not np.allclose(y2[1, 23:30], got[0][1, 23:30])
    names = ["y", "final_state"] + [f"d{n}" for n in ("x", "dt", "A", "B", "C", "h0")]
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want) == (8 if with_state else 7)
    for name, g, w, a in zip(names[:len(got)], got, want, [None, None, *args][:len(got)], strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, g.dtype, w.shape, w.dtype)
        if a is not None:
            assert g.dtype == a.dtype, name  # cotangents in the input's dtype
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all(), f"{name}: non-finite values (NaN padding of a partial block leaked?)"
        # Forward values see identical (bf16-rounded) inputs and compute in f32; bf16 gradients are rounded once.
        tol = 1e-2 if dtype == BF16 and name.startswith("d") else f32_tol(2e-5)
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max(), err_msg=f"{case}: {name}")


def _shapes(chunk, H_, Z_, dtype, T_=200, U=1):
    S = jax.ShapeDtypeStruct
    return (S((Bn, T_, N, H_), dtype), S((Bn, T_, N), dtype), S((N,), F32), S((Bn, T_, U, Z_), dtype),
            S((Bn, T_, U, Z_), dtype), S((Bn, N, H_, Z_), F32), S((Bn, T_), jnp.int32))


def _fwd(chunk, heads=None):
    """ssd(impl="pallas"), or the kernels with `heads` heads per program (the default picks 1 at these shapes)."""
    if heads is None:
        return lambda x, dt, A, B, C, h0, seg: ssd(x, dt, A, B, C, chunk=chunk, initial_state=h0, segment_ids=seg,
                                                   impl="pallas")
    return lambda x, dt, A, B, C, h0, seg: ssd_pallas(x, dt, A, B, C, chunk=chunk, initial_state=h0,
                                                      segment_ids=seg, heads=heads)


def _fwd_bwd(fwd):
    """Outputs and the vjp of x, dt, A, B, C, h0 (every forward and backward kernel)."""
    def run(*a):
        out, pull = jax.vjp(lambda *d: fwd(*d, a[6]), *a[:6])
        return out, pull(out)
    return run


# The model configurations: chunk 16/64, H 16/64, Z 16/64 (and the benchmark's Z 128), f32/bf16. T = 200 gives a
# partial chunk and a chunk count J that is not a power of two.
@pytest.mark.parametrize("chunk,H_,Z_,dtype,heads", [(16, 16, 16, F32, None), (64, 64, 64, BF16, 2),
                                                      (64, 16, 64, F32, None), (16, 64, 16, BF16, None),
                                                      (64, 64, 128, BF16, None)])
def test_cross_lowers_for_cuda(chunk, H_, Z_, dtype, heads):
    shapes = _shapes(chunk, H_, Z_, dtype)
    module = cuda_export(_fwd_bwd(_fwd(chunk, heads)), *shapes).mlir_module()
    assert module.count(TRITON_CUSTOM_CALL) >= 6  # chunk state, state pass, chunk scan and 3 backward kernels


def test_cross_lowering_rejects_illegal_blocks():
    unchecked = lambda chunk, **kw: (lambda x, dt, A, B, C, h0, seg: ssd_pallas(
        x, dt, A, B, C, chunk=chunk, initial_state=h0, segment_ids=seg, **kw))
    with pytest.raises(ValueError, match="power of 2"):  # a [24, ...] block: Triton's power-of-two rule
        cuda_export(unchecked(24), *_shapes(24, 16, 16, F32))
    with pytest.raises(ValueError, match="dot dim must be >= 16"):  # tl.dot needs every dim >= 16
        cuda_export(unchecked(16), *_shapes(16, 8, 16, F32))


@pytest.mark.parametrize("kw,shape_args,match", [
    (dict(chunk=24), (16, 16, 16, F32), "chunk=24"),
    (dict(chunk=8), (16, 16, 16, F32), "chunk=8"),
    (dict(chunk=16), (16, 8, 16, F32), "H=8"),
    (dict(chunk=16), (16, 16, 256, F32), "Z=256"),
    (dict(chunk=16), (16, 16, 16, jnp.float16), "float16"),
])
def test_bad_input(kw, shape_args, match, caplog):
    shapes = _shapes(*shape_args, T_=T)
    # "auto" (even with interpret=True) falls back to the reference and logs why.
    auto = lambda *a: ssd(*a[:5], initial_state=a[5], segment_ids=a[6], impl="auto", interpret=True, **kw)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda *a: ssd(*a[:5], impl="pallas", **kw), *shapes)
    with caplog.at_level(logging.INFO, logger="lmx.pallas"):
        jaxpr = str(jax.make_jaxpr(auto)(*shapes))
    assert "pallas_call" not in jaxpr and match in caplog.text


def test_auto_dispatch(caplog):
    shapes = _shapes(16, 16, 16, F32, T_=T)
    run = lambda **kw: str(jax.make_jaxpr(lambda *a: ssd(*a[:5], chunk=16, impl="auto", **kw))(*shapes))
    assert "pallas_call" in run(interpret=True)
    big_chunk = jax.make_jaxpr(lambda *a: ssd(*a[:5], chunk=256, impl="pallas", interpret=True))(*shapes)
    assert "pallas_call" in str(big_chunk)  # chunks above MAX_CHUNK run as MAX_CHUNK-step kernel chunks
    with caplog.at_level(logging.INFO, logger="lmx.pallas"):
        assert "pallas_call" not in run()  # no GPU here: the reference, logged
    assert "kernels need a GPU" in caplog.text
    assert "pallas_call" not in str(jax.make_jaxpr(lambda *a: ssd(*a[:5], chunk=16, impl="xla"))(*shapes))
