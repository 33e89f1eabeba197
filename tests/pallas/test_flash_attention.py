"""Flash attention kernel (Pallas interpret mode on CPU) vs its pure-jnp reference, forward and gradients;
cross-lowering of the model configurations for CUDA; bad input."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.pallas._compat import TRITON_CUSTOM_CALL, cuda_export, kernel_dot_shapes
from lmx.pallas.flash_attention import _block_ranges, _Config, _flash, flash_attention, flash_attention_reference
from tests.pallas.hw import INTERPRET, f32_tol

B, T, H = 2, 40, 16  # T = 40 with blocks of 16 or 32: every case has a partial last block
PAD = [0] * 4
SEGMENT_LAYOUTS = {  # one row each; packed rows end in padding (id 0), as lmx.data.batching builds them
    "one": [1] * T,
    "several+pad": [1] * 13 + [2] * 17 + [3] * 6 + PAD,
    "short+pad": [1] * 5 + [2] * 3 + [3] * 9 + [4] * 11 + [5] * 8 + PAD,
    "arbitrary": list(np.random.default_rng(7).integers(1, 4, T)),  # not nondecreasing: masking alone is right
}


def _segments(*layouts):
    return jnp.asarray([SEGMENT_LAYOUTS[name] for name in layouts], jnp.int32)


def _inputs(N, K, S, dtype, seed=0):
    r = np.random.default_rng(seed)
    q, k, v, do = (jnp.asarray(r.normal(size=shape), jnp.float32).astype(dtype)
                   for shape in [(B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H)])
    return q, k, v, do


def _fwd_vjp(fn, q, k, v, do):
    o, vjp = jax.vjp(fn, q, k, v)
    return (o, *vjp(do))


def _assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    err, scale = np.abs(got - want).max(), max(1.0, np.abs(want).max())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} * {scale:.3g}"


# (name, N, K, S, dtype, causal, window, segments, blocks): GQA ratio, dtype, masking and layout combined per case.
CASES = [
    ("gqa1-causal-f32-default-blocks", 2, 2, T, jnp.float32, True, None, None, (None, None)),  # blocks of 32
    ("gqa2-causal-segments-f32", 4, 2, T, jnp.float32, True, None, ("one", "several+pad"), (16, 32)),
    ("gqa4-window-segments-bf16", 4, 1, T, jnp.bfloat16, True, 12, ("short+pad", "arbitrary"), (16, 16)),
    ("gqa2-noncausal-cross-segments-bf16", 4, 2, 24, jnp.bfloat16, False, None, "cross", (16, 16)),
]


@pytest.mark.parametrize("name,N,K,S,dtype,causal,window,segments,blocks", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(name, N, K, S, dtype, causal, window, segments, blocks):
    q, k, v, do = _inputs(N, K, S, dtype)
    if segments == "cross":  # query segment 3 has no key: those rows must give exactly 0, with 0 gradient
        q_seg = jnp.asarray([[1] * 20 + [2] * 20, [1] * 10 + [3] * 10 + [2] * 20], jnp.int32)
        kv_seg = jnp.asarray([[1] * 12 + [2] * 12, [2] * 12 + [1] * 8 + [0] * 4], jnp.int32)
        seg = (q_seg, kv_seg)
    else:
        seg = None if segments is None else _segments(*segments)
    kw = dict(causal=causal, segment_ids=seg, sliding_window=window)
    kernel = lambda q, k, v: flash_attention(q, k, v, impl="pallas", interpret=INTERPRET, block_q=blocks[0],
                                             block_k=blocks[1], **kw)
    reference = lambda q, k, v: flash_attention(q, k, v, impl="xla", **kw)
    got = jax.jit(lambda *a: _fwd_vjp(kernel, *a))(q, k, v, do)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]  # bf16 inputs: compare with the f32 reference
    want = jax.jit(lambda *a: _fwd_vjp(reference, *a))(*f32)
    tol = f32_tol(1e-5) if dtype == jnp.float32 else 1e-2
    for what, g, w in zip(["o", "dq", "dk", "dv"], got, want, strict=True):
        assert g.dtype == dtype
        _assert_close(g, w, tol, f"{name} {what}")
    if segments == "cross":
        empty = np.asarray(q_seg == 3)
        assert empty.any() and not np.asarray(got[0])[empty].any() and not np.asarray(got[1])[empty].any()


def test_block_ranges_skip_masked_blocks():
    """Loop bounds: kv blocks [lo, hi) per q block (and q blocks per kv block) exclude fully masked blocks."""
    cfg = _Config(causal=True, window=20, sm_scale=1.0, block_q=16, block_k=16, interpret=True)
    seg = jnp.asarray([[1] * 32 + [2] * 32, [1] * 64], jnp.int32)
    kv_lo, kv_hi, q_lo, q_hi = (np.asarray(x) for x in jax.jit(lambda s: _block_ranges(2, 64, 64, cfg, s, s))(seg))
    # window 20: q block i sees kv blocks i-2 .. i (i-2 only through its first rows); segment 2 starts at block 2
    np.testing.assert_array_equal(kv_lo, [[0, 0, 2, 2], [0, 0, 0, 1]])
    np.testing.assert_array_equal(kv_hi, [[1, 2, 3, 4], [1, 2, 3, 4]])
    np.testing.assert_array_equal(q_lo, [[0, 1, 2, 3], [0, 1, 2, 3]])
    np.testing.assert_array_equal(q_hi, [[2, 2, 4, 4], [3, 4, 4, 4]])


# ------------------------------------------------------------------------------------------------ lowering


# The models' configurations: GQA 2, causal, packed segments (llama-tiny: head dim 16, window 8), default blocks.
EXPORTS = [(16, jnp.float32, 40, 8), (64, jnp.bfloat16, 128, None)]


@pytest.mark.parametrize("H_,dtype,T_,window", EXPORTS, ids=["h16-f32-window", "h64-bf16"])
def test_cross_lowers_for_cuda(H_, dtype, T_, window):
    q = jax.ShapeDtypeStruct((B, T_, 4, H_), dtype)
    kv = jax.ShapeDtypeStruct((B, T_, 2, H_), dtype)
    seg = jax.ShapeDtypeStruct((B, T_), jnp.int32)
    fwd = lambda q, k, v, s: flash_attention(q, k, v, causal=True, segment_ids=s, sliding_window=window,
                                             impl="pallas")
    grads = jax.grad(lambda q, k, v, s: fwd(q, k, v, s).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    for fn, kernels in [(fwd, 1), (grads, 3)]:  # forward; forward + dq + dkdv
        exported = cuda_export(fn, q, kv, kv, seg)
        assert exported.mlir_module().count(TRITON_CUSTOM_CALL) == kernels
        assert list(kernel_dot_shapes(jax.make_jaxpr(fn)(q, kv, kv, seg).jaxpr))  # cuda_export checked their sizes


def test_illegal_block_is_rejected():
    q = jnp.zeros((1, 48, 2, 16))
    with pytest.raises(ValueError, match="block_q=24"):
        flash_attention(q, q, q, impl="pallas", interpret=True, block_q=24)
    with pytest.raises(ValueError, match="block_k=8"):
        flash_attention(q, q, q, impl="pallas", interpret=True, block_k=8)
    # Past the validation, the Triton lowering itself refuses the non-power-of-two tile (what CI would catch).
    cfg = _Config(causal=True, window=None, sm_scale=0.25, block_q=24, block_k=16, interpret=False)
    with pytest.raises(ValueError, match="power of 2"):
        cuda_export(lambda q, k, v: _flash(q, k, v, None, None, cfg), q, q, q)


# ------------------------------------------------------------------------------------------------ bad input


def test_unsupported_head_dim_raises_under_pallas_and_falls_back_under_auto(caplog):
    q = jnp.asarray(np.random.default_rng(0).normal(size=(1, 20, 2, 24)), jnp.float32)
    with pytest.raises(ValueError, match="head dim 24"):
        flash_attention(q, q, q, impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="float16"):
        flash_attention(*(jnp.zeros((1, 20, 2, 16), jnp.float16),) * 3, impl="pallas", interpret=True)
    with caplog.at_level(logging.INFO, logger="lmx.pallas"):
        o = jax.jit(lambda q: flash_attention(q, q, q, impl="auto", interpret=True))(q)
    assert "falls back" in caplog.text and "head dim 24" in caplog.text
    np.testing.assert_array_equal(o, jax.jit(lambda q: flash_attention_reference(q, q, q))(q))


def test_shape_errors():
    q = jnp.zeros((1, 20, 3, 16))
    with pytest.raises(ValueError, match="N=3"):
        flash_attention(q, jnp.zeros((1, 20, 2, 16)), jnp.zeros((1, 20, 2, 16)), impl="xla")
    with pytest.raises(ValueError, match="T=20, S=16"):
        flash_attention(q, jnp.zeros((1, 16, 3, 16)), jnp.zeros((1, 16, 3, 16)), impl="xla")
    with pytest.raises(ValueError, match="sliding_window=4"):
        flash_attention(q, q, q, causal=False, sliding_window=4, impl="xla")
