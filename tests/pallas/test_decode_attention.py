"""Decode attention: the split-K Pallas kernel (interpret mode) vs its pure-jnp reference, one query per row and T
queries per row (a speculative verification, a prefill onto a non-empty cache), the reference vs the model's
cached attention, cross-lowering for CUDA, and bad input."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.models.attention import attention_mask, cached_attention
from lmx.pallas._compat import TRITON_CUSTOM_CALL, cuda_export
from lmx.pallas.decode_attention import _Config, _partials, decode_attention, decode_attention_reference
from tests.pallas.hw import INTERPRET, f32_tol

B, K, S = 3, 2, 40  # S = 40: not a multiple of any block, so every config has a partial (NaN-padded) block
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def caches(G, H, dtype, lengths, window, T=None, seed=0):
    """(q, dirty k/v, clean k/v): the dirty cache holds NaN in the stale slots (>= length) and huge values in the
    live slots before every query's window; the clean one holds ordinary random values there. Seen slots agree.
    q: [B, N, H], or [B, T, N, H] for T queries per row."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, K * G, H) if T is None else (B, T, K * G, H))
    k = rng.standard_normal((B, K, H, S))
    v = rng.standard_normal((B, K, S, H))
    slot, L = np.arange(S)[None, :], np.asarray(lengths)[:, None]
    stale_BS = slot >= L
    before_BS = slot < L - (T or 1) + 1 - window if window is not None else np.zeros_like(stale_BS)
    k_dirty, v_dirty = k.copy(), v.copy()
    for mask, value in [(stale_BS, np.nan), (before_BS, 1e4)]:
        k_dirty = np.where(mask[:, None, None, :], value, k_dirty)
        v_dirty = np.where(mask[:, None, :, None], value, v_dirty)
    cast = lambda *xs: [jnp.asarray(x, dtype) for x in xs]
    return cast(q), cast(k_dirty, v_dirty), cast(k, v)


# (dtype, G, H, window, block_s, num_splits, lengths, T): GQA 1/2/4, splits 1-3 (or the defaults: one 64-slot block
# over the 40 slots), windows whose start falls inside a block, lengths 0 / 1 / full cache / ragged; T None is one
# query per row ([B, N, H]); T > 1 includes a row shorter than T (its first queries see nothing: 0) and T·G = 80
# query rows (two row tiles of 64).
CASES = [
    (jnp.float32, 1, 16, None, 16, 1, [1, 40, 23], None),
    (jnp.bfloat16, 2, 16, 7, 16, 2, [40, 9, 1], None),
    (jnp.float32, 4, 16, 20, 16, 3, [0, 33, 40], None),
    (jnp.bfloat16, 4, 32, None, None, None, [40, 1, 17], None),
    (jnp.float32, 2, 16, None, 16, 2, [5, 40, 23], 5),
    (jnp.bfloat16, 4, 16, 7, 16, 3, [3, 40, 17], 4),
    (jnp.float32, 4, 32, None, None, None, [40, 30, 20], 20),
]


@pytest.mark.parametrize("dtype,G,H,window,block_s,num_splits,lengths,T", CASES)
def test_kernel_matches_reference(dtype, G, H, window, block_s, num_splits, lengths, T):
    (q,), dirty, clean = caches(G, H, dtype, lengths, window, T)
    L = jnp.asarray(lengths, jnp.int32)
    kernel = jax.jit(functools.partial(decode_attention, impl="pallas", interpret=INTERPRET, sliding_window=window,
                                       block_s=block_s, num_splits=num_splits))
    ref = jax.jit(functools.partial(decode_attention, impl="xla", sliding_window=window))
    o = kernel(q, *dirty, L)
    tol = f32_tol(TOL[dtype]) if dtype == jnp.float32 else TOL[dtype]
    want = ref(q, *clean, L)
    assert o.dtype == dtype and o.shape == q.shape
    assert np.isfinite(np.asarray(o, np.float32)).all()
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(ref(q, *dirty, L), np.float32), np.asarray(want, np.float32))
    if 0 in lengths:  # documented: an empty row attends to nothing and gives 0
        assert not np.asarray(o[lengths.index(0)], np.float32).any()
    if T is not None and min(lengths) < T:  # the first queries of a row shorter than T see no slot: 0
        b = int(np.argmin(lengths))
        assert not np.asarray(o[b, :T - lengths[b]], np.float32).any() and np.asarray(o[b, -1]).any()


@pytest.mark.parametrize("window,T", [(None, None), (6, None), (None, 3), (6, 3)])
def test_reference_matches_model_cached_attention(window, T):
    """The reference is the model's cached attention: a decode step (query at slot length - 1), or T queries at
    slots length - T .. length - 1."""
    G, H, lengths = 2, 16, [3, 40, 23]
    (q,), _, (k, v) = caches(G, H, jnp.float32, lengths, window, T)
    L = jnp.asarray(lengths, jnp.int32)
    q_BTNH = q[:, None] if T is None else q
    slots_BT = L[:, None] - q_BTNH.shape[1] + jnp.arange(q_BTNH.shape[1])
    mask = attention_mask(slots_BT, jnp.broadcast_to(jnp.arange(S), (B, S)), window=window)
    want = cached_attention(q_BTNH, k, v, mask, 0.25).reshape(q.shape)
    got = decode_attention(q, k, v, L, sliding_window=window, sm_scale=0.25, impl="xla")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def shapes(G, H, dtype, S=S, T=None):
    q = (B, K * G, H) if T is None else (B, T, K * G, H)
    return [jax.ShapeDtypeStruct(s, dtype) for s in [q, (B, K, H, S), (B, K, S, H)]] + [
        jax.ShapeDtypeStruct((B,), jnp.int32)]


# The model configurations (head dim 16 and 64, G = 1, 2, 4, f32 / bf16) and the benchmark's (H=128, G=4, bf16), at
# the default blocks and a split cache.
@pytest.mark.parametrize("H,G,dtype,window,num_splits,T", [
    (16, 1, jnp.float32, None, None, None), (16, 2, jnp.bfloat16, 5, 3, None), (16, 4, jnp.float32, None, 2, None),
    (64, 1, jnp.bfloat16, None, None, None), (64, 2, jnp.float32, 5, None, None), (64, 4, jnp.bfloat16, None, 4, 5),
    (128, 4, jnp.bfloat16, None, None, None), (128, 7, jnp.bfloat16, 300, None, 50),
])
def test_cross_lowers_for_cuda(H, G, dtype, window, num_splits, T):
    fn = functools.partial(decode_attention, impl="pallas", sliding_window=window, num_splits=num_splits)
    exported = cuda_export(fn, *shapes(G, H, dtype, S=1000, T=T))
    assert TRITON_CUSTOM_CALL in exported.mlir_module()


@pytest.mark.parametrize("block_s,match", [(24, "power of 2"), (8, "dimension >= 16")])
def test_cross_lowering_rejects_illegal_blocks(block_s, match):
    """Interpret mode would run these; lowering for the GPU refuses them (the public function refuses earlier)."""
    fn = lambda q, k, v, L: _partials(q[:, None], k, v, L, _Config(0.25, None, block_s, 2, False))
    with pytest.raises(ValueError, match=match):
        cuda_export(fn, *shapes(2, 64, jnp.bfloat16))
    q, k, v, L = (jnp.zeros(s.shape, s.dtype) for s in shapes(2, 64, jnp.bfloat16))
    with pytest.raises(ValueError, match=f"block_s={block_s}"):
        decode_attention(q, k, v, L, impl="pallas", block_s=block_s)


def test_bad_input_raises_under_pallas_and_falls_back_under_auto(caplog):
    (q,), _, (k, v) = caches(1, 24, jnp.float32, [5, 40, 1], None)
    L = jnp.asarray([5, 40, 1], jnp.int32)
    with pytest.raises(ValueError, match="H=24"):
        decode_attention(q, k, v, L, impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="float16"):
        decode_attention(*(x.astype(jnp.float16) for x in (q, k, v)), L, impl="pallas", interpret=True)
    with caplog.at_level(logging.INFO, logger="lmx.pallas"):
        o = decode_attention(q, k, v, L, impl="auto", interpret=True)
    assert "falls back" in caplog.text and "H=24" in caplog.text
    np.testing.assert_array_equal(o, decode_attention_reference(q, k, v, L))
    with pytest.raises(ValueError, match="lengths shape"):
        decode_attention(q, k, v, L[:2], impl="xla")


def test_kernel_refuses_differentiation():
    (q,), _, (k, v) = caches(1, 16, jnp.float32, [5, 40, 1], None)
    L = jnp.asarray([5, 40, 1], jnp.int32)
    loss = lambda q: decode_attention(q, k, v, L, impl="pallas", interpret=True, block_s=16).sum()
    with pytest.raises(NotImplementedError, match="no backward"):
        jax.jit(jax.grad(loss))(q)
