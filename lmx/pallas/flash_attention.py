"""Flash attention (forward and backward) as Pallas Triton kernels, next to its pure-jnp reference.

`flash_attention(q_BTNH, k_BSKH, v_BSKH, ...)` computes softmax(q·kᵀ·sm_scale + mask)·v per query head, query head
n reading kv head n // G (N = K·G; K/V are never repeated in memory). The mask is the conjunction of
  causal          key j <= query i (T == S, both indexed from 0),
  sliding_window  i - j < w (causal only), as lmx.models.attention.attention_mask,
  segment_ids     q_segment_ids[i] == kv_segment_ids[j] (packed sequences; any int ids),
and a query row with no visible key returns 0 (both implementations; its gradients are 0 too).

Kernels (grid, one program per block):
  forward  (T/bq, B, N): one q block against the kv blocks in its live range, online softmax in f32 (base 2);
           writes o and the log-sum-exp (base 2, +inf for a row with no key) that the backward reuses.
  dq       (T/bq, B, N): the same loop, recomputing p from the saved log-sum-exp.
  dk, dv   (S/bk, B, K): one kv block against the q blocks that can see it, for each of the G query heads of
           its kv head, so the GQA sum happens in registers. delta = rowsum(dO·O) is computed in jnp.
Live ranges: a kv block is skipped unless the block-level causal / window / segment tests say some (q, k) pair in
the two blocks may be unmasked; per-block [min, max] segment ids give the segment test, computed in jnp outside
the kernels and passed as small int tables ([first, last + 1) block per row of blocks). Inside the range every
score is masked exactly, so any segment ids are right; nondecreasing ids (lmx's packing) just make ranges short.
Partial blocks (lengths that are not a multiple of the block): every load is a masked load with a zero fill (on a
GPU an unmasked load would read past the array; interpret mode pads with NaN), every store is masked.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lmx.pallas._compat import kernel_compiles, pl, pltriton, resolve_impl, triton_params

__all__ = ["flash_attention", "flash_attention_reference"]

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_LOG2E = math.log2(math.e)
_MIN_BLOCK, _DEFAULT_BLOCK, _MAX_BLOCK, _MAX_HEAD_DIM = 16, 64, 256, 256


# ----------------------------------------------------------------------------------------------- reference


def flash_attention_reference(q_BTNH, k_BSKH, v_BSKH, *, causal=True, q_segment_ids_BT=None,
                              kv_segment_ids_BS=None, sliding_window=None, sm_scale=None):
    """Pure-jnp attention with flash_attention's semantics (softmax in f32, GQA by grouping query heads);
    rows with no visible key give 0."""
    from lmx.models.attention import attention_mask, dot_attention  # lazy: attention.py imports this module

    B, T, _, H = q_BTNH.shape
    S = k_BSKH.shape[1]
    sm_scale = 1.0 / math.sqrt(H) if sm_scale is None else sm_scale
    if causal:
        q_pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        k_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        mask_BTS = attention_mask(q_pos_BT, k_pos_BS, window=sliding_window, q_seg_BT=q_segment_ids_BT,
                                  k_seg_BS=kv_segment_ids_BS)
    elif q_segment_ids_BT is not None:
        mask_BTS = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
    else:
        mask_BTS = jnp.ones((B, T, S), bool)
    o_BTNH = dot_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, sm_scale)
    # dot_attention gives a fully masked row the mean of v; flash_attention's contract is 0 there.
    return jnp.where(mask_BTS.any(-1)[:, :, None, None], o_BTNH, 0).astype(q_BTNH.dtype)


# ----------------------------------------------------------------------------------------------- public entry


def flash_attention(q_BTNH, k_BSKH, v_BSKH, *, causal=True, segment_ids=None, sliding_window=None, sm_scale=None,
                    impl="auto", interpret=False, block_q=None, block_k=None):
    """Multi-head / grouped-query attention, o_BTNH in q's dtype.

    q_BTNH [B, T, N, H]; k_BSKH, v_BSKH [B, S, K, H] with N a multiple of K (query head n uses kv head n // G).
    causal: key j visible to query i iff j <= i (needs T == S). sliding_window w (causal only): also i - j < w.
    segment_ids: None, one [B, T] array (T == S) or a pair (q_segment_ids_BT, kv_segment_ids_BS): a query sees
    only keys with its segment id (any int ids; 0 for padding is just another segment). A query with no visible
    key gets 0 output and 0 gradient. sm_scale defaults to 1/sqrt(H).
    impl: "xla" (the reference), "pallas" (the kernel; raises ValueError on inputs it cannot take: dtype other
    than float32/bfloat16, head dim or block sizes not powers of two in [16, 256]) or
    "auto" (the kernel on a GPU or with interpret=True when supported, else the reference, logging why).
    block_q / block_k: kernel block sizes (default 64, clipped to the sequence length, at least 16)."""
    q_seg_BT, kv_seg_BS = _check_inputs(q_BTNH, k_BSKH, v_BSKH, causal, segment_ids, sliding_window)
    T, S, H = q_BTNH.shape[1], k_BSKH.shape[1], q_BTNH.shape[3]
    block_q = _default_block(T) if block_q is None else block_q
    block_k = _default_block(S) if block_k is None else block_k
    unsupported = _unsupported(q_BTNH, k_BSKH, v_BSKH, block_q, block_k)
    sm_scale = 1.0 / math.sqrt(H) if sm_scale is None else float(sm_scale)
    cfg = _Config(causal=causal, window=sliding_window, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
                  interpret=interpret)
    grads = jax.grad(lambda q, k, v, *seg: _flash(q, k, v, *seg, cfg).astype(jnp.float32).sum(), (0, 1, 2))
    probe = lambda: kernel_compiles("flash_attention", cfg, grads, q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS)
    if resolve_impl("flash_attention", impl, unsupported, interpret, probe) == "xla":
        return flash_attention_reference(q_BTNH, k_BSKH, v_BSKH, causal=causal, q_segment_ids_BT=q_seg_BT,
                                         kv_segment_ids_BS=kv_seg_BS, sliding_window=sliding_window,
                                         sm_scale=sm_scale)
    return _flash(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, cfg)


def _check_inputs(q_BTNH, k_BSKH, v_BSKH, causal, segment_ids, sliding_window):
    """Shape errors (both implementations). Returns (q_segment_ids_BT, kv_segment_ids_BS), int32 or None."""
    if q_BTNH.ndim != 4 or k_BSKH.ndim != 4 or k_BSKH.shape != v_BSKH.shape:
        raise ValueError(f"flash_attention: want q [B,T,N,H] and k, v [B,S,K,H] of one shape, got q "
                         f"{q_BTNH.shape}, k {k_BSKH.shape}, v {v_BSKH.shape}")
    (B, T, N, H), (Bk, S, K, Hk) = q_BTNH.shape, k_BSKH.shape
    if B != Bk or H != Hk or N % K:
        raise ValueError(f"flash_attention: q {q_BTNH.shape} and k/v {k_BSKH.shape} need the same batch and head "
                         f"dim and a number of query heads N={N} that is a multiple of kv heads K={K}")
    if causal and T != S:
        raise ValueError(f"flash_attention: causal attention needs T == S, got T={T}, S={S}")
    if sliding_window is not None and (not causal or sliding_window < 1):
        raise ValueError(f"flash_attention: sliding_window={sliding_window} needs causal=True and a window >= 1")
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        q_seg_BT, kv_seg_BS = segment_ids
    elif T == S:
        q_seg_BT = kv_seg_BS = segment_ids
    else:
        raise ValueError(f"flash_attention: one segment_ids array needs T == S (got T={T}, S={S}); pass a pair "
                         f"(q_segment_ids_BT, kv_segment_ids_BS)")
    if q_seg_BT.shape != (B, T) or kv_seg_BS.shape != (B, S):
        raise ValueError(f"flash_attention: segment ids of shapes {q_seg_BT.shape}, {kv_seg_BS.shape}, want "
                         f"{(B, T)} and {(B, S)}")
    return q_seg_BT.astype(jnp.int32), kv_seg_BS.astype(jnp.int32)


def _default_block(n: int) -> int:
    """64, clipped to the largest power of two <= n, at least 16."""
    return max(_MIN_BLOCK, min(_DEFAULT_BLOCK, 1 << (max(n, 1).bit_length() - 1)))


def _pow2(n) -> bool:
    return isinstance(n, (int, np.integer)) and n > 0 and n & (n - 1) == 0


def _unsupported(q_BTNH, k_BSKH, v_BSKH, block_q, block_k) -> str | None:
    """Why the kernel cannot take these inputs, or None (Triton: power-of-two tiles, dots >= 16 per dim)."""
    dtypes = {jnp.dtype(x.dtype) for x in (q_BTNH, k_BSKH, v_BSKH)}
    if len(dtypes) != 1 or not dtypes <= set(_DTYPES):
        return f"dtypes {sorted(str(d) for d in dtypes)} (the kernel takes one of float32, bfloat16 for q, k, v)"
    H = q_BTNH.shape[3]
    if not (_pow2(H) and _MIN_BLOCK <= H <= _MAX_HEAD_DIM):
        return f"head dim {H} (the kernel takes a power of two in [{_MIN_BLOCK}, {_MAX_HEAD_DIM}])"
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not (_pow2(b) and _MIN_BLOCK <= b <= _MAX_BLOCK):
            return f"{name}={b} (must be a power of two in [{_MIN_BLOCK}, {_MAX_BLOCK}])"
    return None


# ----------------------------------------------------------------------------------------------- custom vjp


@dataclasses.dataclass(frozen=True)
class _Config:
    causal: bool
    window: int | None
    sm_scale: float
    block_q: int
    block_k: int
    interpret: bool

    def num_warps(self, H: int) -> int:
        return 4 if H <= 64 else 8


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, cfg):
    return _flash_fwd(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, cfg)[0]


def _flash_fwd(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, cfg):
    ranges = _block_ranges(q_BTNH.shape[0], q_BTNH.shape[1], k_BSKH.shape[1], cfg, q_seg_BT, kv_seg_BS)
    o_BTNH, lse_BNT = _forward_call(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, ranges, cfg)
    return o_BTNH, (q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, ranges, o_BTNH, lse_BNT)


def _flash_bwd(cfg, res, do_BTNH):
    q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, ranges, o_BTNH, lse_BNT = res
    delta_BNT = jnp.einsum("BTNH,BTNH->BNT", o_BTNH.astype(jnp.float32), do_BTNH.astype(jnp.float32))
    args = (q_BTNH, k_BSKH, v_BSKH, do_BTNH, lse_BNT, delta_BNT, q_seg_BT, kv_seg_BS, ranges, cfg)
    dq_BTNH = _dq_call(*args)
    dk_BSKH, dv_BSKH = _dkdv_call(*args)
    return dq_BTNH, dk_BSKH, dv_BSKH, None, None  # segment ids get no gradient


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------- block ranges


def _block_ranges(B, T, S, cfg, q_seg_BT, kv_seg_BS):
    """Live kv-block range per q block (kv_lo_BI, kv_hi_BI) and live q-block range per kv block (q_lo_BJ, q_hi_BJ):
    [first, last + 1) of the blocks that pass the block-level causal / window / segment-interval tests."""
    bq, bk = cfg.block_q, cfg.block_k
    nI, nJ = pl.cdiv(T, bq), pl.cdiv(S, bk)
    q_first_I = np.arange(nI) * bq
    q_last_I = np.minimum(q_first_I + bq, T) - 1
    k_first_J = np.arange(nJ) * bk
    k_last_J = np.minimum(k_first_J + bk, S) - 1
    live_IJ = np.ones((nI, nJ), bool)
    if cfg.causal:
        live_IJ &= q_last_I[:, None] >= k_first_J[None, :]
    if cfg.window is not None:
        live_IJ &= q_first_I[:, None] - k_last_J[None, :] < cfg.window
    live_BIJ = jnp.broadcast_to(jnp.asarray(live_IJ), (B, nI, nJ))
    if q_seg_BT is not None:  # the two blocks' [min, max] segment-id intervals must overlap
        q_min_BI, q_max_BI = _block_min_max(q_seg_BT, bq, nI)
        k_min_BJ, k_max_BJ = _block_min_max(kv_seg_BS, bk, nJ)
        live_BIJ = live_BIJ & ((q_min_BI[:, :, None] <= k_max_BJ[:, None, :])
                               & (k_min_BJ[:, None, :] <= q_max_BI[:, :, None]))
    return (*_first_last(live_BIJ, 2), *_first_last(live_BIJ, 1))


def _block_min_max(seg_BT, block, n):
    pad = n * block - seg_BT.shape[1]
    info = jnp.iinfo(jnp.int32)
    lo = jnp.pad(seg_BT, ((0, 0), (0, pad)), constant_values=info.max).reshape(-1, n, block).min(-1)
    hi = jnp.pad(seg_BT, ((0, 0), (0, pad)), constant_values=info.min).reshape(-1, n, block).max(-1)
    return lo, hi


def _first_last(live, axis):
    """[first, last + 1) index of True along axis, (0, 0) where there is none."""
    n = live.shape[axis]
    first = jnp.argmax(live, axis)
    last = n - 1 - jnp.argmax(jnp.flip(live, axis), axis)
    any_ = live.any(axis)
    return jnp.where(any_, first, 0).astype(jnp.int32), jnp.where(any_, last + 1, 0).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------- kernel pieces


def _load(ref, mask, other=0):
    """Masked load: off-mask entries (rows past the array) read as `other`, never as memory or NaN padding."""
    return pltriton.load(ref, mask=mask, other=other)


def _dot(a, b, contract=(1, 0)):
    """2-D matmul with f32 accumulation; contract=(1, 1) is a·bᵀ, (0, 0) is aᵀ·b."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def _score_mask(cfg, q_rows, k_rows, q_valid, k_valid, q_seg, k_seg):
    """[bq, bk] bool: which (query, key) pairs of the two blocks attend."""
    mask = q_valid[:, None] & k_valid[None, :]
    if cfg.causal:
        mask &= q_rows[:, None] >= k_rows[None, :]
    if cfg.window is not None:
        mask &= q_rows[:, None] - k_rows[None, :] < cfg.window
    if q_seg is not None:
        mask &= q_seg[:, None] == k_seg[None, :]
    return mask


def _scores(cfg, q, k, mask):
    """Masked scores in base 2 (exp2 is what the GPU computes; the log2(e) factor folds into sm_scale)."""
    return jnp.where(mask, _dot(q, k, (1, 1)) * (cfg.sm_scale * _LOG2E), -jnp.inf)


def _split_refs(refs, has_seg, n_in):
    """(inputs, (q_seg_ref, kv_seg_ref) or (None, None), (lo_ref, hi_ref), outputs)."""
    refs = list(refs)
    ins, refs = refs[:n_in], refs[n_in:]
    segs, refs = (refs[:2], refs[2:]) if has_seg else ((None, None), refs)
    return ins, segs, refs[:2], refs[2:]


def _maybe_load_seg(ref, valid):
    return None if ref is None else _load(ref, valid)


# ----------------------------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, cfg, T, S, has_seg):
    (q_ref, k_ref, v_ref), (qs_ref, ks_ref), (lo_ref, hi_ref), (o_ref, lse_ref) = _split_refs(refs, has_seg, 3)
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(0)
    q_rows = i * bq + jnp.arange(bq)
    q_valid = q_rows < T
    q = _load(q_ref, q_valid[:, None])
    q_seg = _maybe_load_seg(qs_ref, q_valid)

    def body(j, carry):
        acc, m, l = carry
        k_rows = j * bk + jnp.arange(bk)
        k_valid = k_rows < S
        kv_blk = pl.ds(j * bk, bk)
        k = _load(k_ref.at[kv_blk, :], k_valid[:, None])
        v = _load(v_ref.at[kv_blk, :], k_valid[:, None])
        k_seg = None if ks_ref is None else _load(ks_ref.at[kv_blk], k_valid)
        s = _scores(cfg, q, k, _score_mask(cfg, q_rows, k_rows, q_valid, k_valid, q_seg, k_seg))
        m_new = jnp.maximum(m, s.max(-1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key yet: keep exp2 away from (-inf) - (-inf)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l * alpha + p.sum(-1)

    H = q.shape[-1]
    init = (jnp.zeros((bq, H), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(lo_ref[i], hi_ref[i], body, init)
    empty = l == 0.0  # no visible key: output 0, lse +inf so the backward's p = exp2(s - lse) is 0
    o = acc / jnp.where(empty, 1.0, l)[:, None]
    pltriton.store(o_ref, o.astype(o_ref.dtype), mask=q_valid[:, None])
    pltriton.store(lse_ref, jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l))), mask=q_valid)


def _row_specs(cfg, G, T, S, H, has_seg, *, with_grad):
    """in_specs for the grid (T/bq, B, N) kernels: q [, do, lse, delta], k, v [, segment ids], ranges."""
    bq = cfg.block_q
    nI = pl.cdiv(T, bq)
    q_spec = pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, S, None, H), lambda i, b, n: (b, 0, n // G, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
    specs = [q_spec, kv_spec, kv_spec] + ([q_spec, row_spec, row_spec] if with_grad else [])
    if has_seg:
        specs += [pl.BlockSpec((None, bq), lambda i, b, n: (b, i)), pl.BlockSpec((None, S), lambda i, b, n: (b, 0))]
    range_spec = pl.BlockSpec((None, nI), lambda i, b, n: (b, 0))
    return specs + [range_spec, range_spec], q_spec, row_spec


def _forward_call(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, ranges, cfg):
    (B, T, N, H), S, K = q_BTNH.shape, k_BSKH.shape[1], k_BSKH.shape[2]
    has_seg = q_seg_BT is not None
    in_specs, q_spec, row_spec = _row_specs(cfg, N // K, T, S, H, has_seg, with_grad=False)
    segs = (q_seg_BT, kv_seg_BS) if has_seg else ()
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, T=T, S=S, has_seg=has_seg),
        grid=(pl.cdiv(T, cfg.block_q), B, N),
        in_specs=in_specs,
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32)],
        compiler_params=triton_params(num_warps=cfg.num_warps(H), num_stages=2),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(q_BTNH, k_BSKH, v_BSKH, *segs, ranges[0], ranges[1])


# ----------------------------------------------------------------------------------------------- backward: dq


def _dq_kernel(*refs, cfg, T, S, has_seg):
    ins, (qs_ref, ks_ref), (lo_ref, hi_ref), (dq_ref,) = _split_refs(refs, has_seg, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(0)
    q_rows = i * bq + jnp.arange(bq)
    q_valid = q_rows < T
    q = _load(q_ref, q_valid[:, None])
    do = _load(do_ref, q_valid[:, None])
    lse = _load(lse_ref, q_valid, jnp.inf)
    delta = _load(delta_ref, q_valid)
    q_seg = _maybe_load_seg(qs_ref, q_valid)

    def body(j, dq):
        k_rows = j * bk + jnp.arange(bk)
        k_valid = k_rows < S
        kv_blk = pl.ds(j * bk, bk)
        k = _load(k_ref.at[kv_blk, :], k_valid[:, None])
        v = _load(v_ref.at[kv_blk, :], k_valid[:, None])
        k_seg = None if ks_ref is None else _load(ks_ref.at[kv_blk], k_valid)
        p = jnp.exp2(_scores(cfg, q, k, _score_mask(cfg, q_rows, k_rows, q_valid, k_valid, q_seg, k_seg))
                     - lse[:, None])
        ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo_ref[i], hi_ref[i], body, jnp.zeros(q.shape, jnp.float32))
    pltriton.store(dq_ref, (dq * cfg.sm_scale).astype(dq_ref.dtype), mask=q_valid[:, None])


def _dq_call(q_BTNH, k_BSKH, v_BSKH, do_BTNH, lse_BNT, delta_BNT, q_seg_BT, kv_seg_BS, ranges, cfg):
    (B, T, N, H), S, K = q_BTNH.shape, k_BSKH.shape[1], k_BSKH.shape[2]
    has_seg = q_seg_BT is not None
    in_specs, q_spec, _ = _row_specs(cfg, N // K, T, S, H, has_seg, with_grad=True)
    segs = (q_seg_BT, kv_seg_BS) if has_seg else ()
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, T=T, S=S, has_seg=has_seg),
        grid=(pl.cdiv(T, cfg.block_q), B, N),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype),
        compiler_params=triton_params(num_warps=cfg.num_warps(H), num_stages=2),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(q_BTNH, k_BSKH, v_BSKH, do_BTNH, lse_BNT, delta_BNT, *segs, ranges[0], ranges[1])


# ----------------------------------------------------------------------------------------------- backward: dk, dv


def _dkdv_kernel(*refs, cfg, T, S, G, has_seg):
    ins, (qs_ref, ks_ref), (lo_ref, hi_ref), (dk_ref, dv_ref) = _split_refs(refs, has_seg, 6)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins  # q, do: [T, G, H]; lse, delta: [G, T]; k, v: [bk, H]
    bq, bk = cfg.block_q, cfg.block_k
    j = pl.program_id(0)
    k_rows = j * bk + jnp.arange(bk)
    k_valid = k_rows < S
    k = _load(k_ref, k_valid[:, None])
    v = _load(v_ref, k_valid[:, None])
    k_seg = _maybe_load_seg(ks_ref, k_valid)

    def q_block(g, i, carry):
        dk, dv = carry
        q_rows = i * bq + jnp.arange(bq)
        q_valid = q_rows < T
        q_blk = pl.ds(i * bq, bq)
        q = _load(q_ref.at[q_blk, g, :], q_valid[:, None])
        do = _load(do_ref.at[q_blk, g, :], q_valid[:, None])
        lse = _load(lse_ref.at[g, q_blk], q_valid, jnp.inf)
        delta = _load(delta_ref.at[g, q_blk], q_valid)
        q_seg = None if qs_ref is None else _load(qs_ref.at[q_blk], q_valid)
        p = jnp.exp2(_scores(cfg, q, k, _score_mask(cfg, q_rows, k_rows, q_valid, k_valid, q_seg, k_seg))
                     - lse[:, None])  # [bq, bk]
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
        ds = p * (_dot(do, v, (1, 1)) - delta[:, None])
        return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

    def head(g, carry):  # the G query heads that read this kv head: their dk, dv sum here
        return lax.fori_loop(lo_ref[j], hi_ref[j], functools.partial(q_block, g), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, G, head, (zeros, zeros))
    pltriton.store(dk_ref, (dk * cfg.sm_scale).astype(dk_ref.dtype), mask=k_valid[:, None])
    pltriton.store(dv_ref, dv.astype(dv_ref.dtype), mask=k_valid[:, None])


def _dkdv_call(q_BTNH, k_BSKH, v_BSKH, do_BTNH, lse_BNT, delta_BNT, q_seg_BT, kv_seg_BS, ranges, cfg):
    (B, T, N, H), S, K = q_BTNH.shape, k_BSKH.shape[1], k_BSKH.shape[2]
    G, bk = N // K, cfg.block_k
    has_seg = q_seg_BT is not None
    qg_spec = pl.BlockSpec((None, T, G, H), lambda j, b, h: (b, 0, h, 0))  # the G query heads of kv head h
    kv_spec = pl.BlockSpec((None, bk, None, H), lambda j, b, h: (b, j, h, 0))
    row_spec = pl.BlockSpec((None, G, T), lambda j, b, h: (b, h, 0))
    in_specs = [qg_spec, kv_spec, kv_spec, qg_spec, row_spec, row_spec]
    if has_seg:
        in_specs += [pl.BlockSpec((None, T), lambda j, b, h: (b, 0)), pl.BlockSpec((None, bk), lambda j, b, h: (b, j))]
    range_spec = pl.BlockSpec((None, pl.cdiv(S, bk)), lambda j, b, h: (b, 0))
    segs = (q_seg_BT, kv_seg_BS) if has_seg else ()
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, T=T, S=S, G=G, has_seg=has_seg),
        grid=(pl.cdiv(S, bk), B, K),
        in_specs=in_specs + [range_spec, range_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k_BSKH.shape, k_BSKH.dtype), jax.ShapeDtypeStruct(v_BSKH.shape, v_BSKH.dtype)],
        compiler_params=triton_params(num_warps=cfg.num_warps(H), num_stages=2),
        interpret=cfg.interpret,
        name="flash_attention_dkdv",
    )(q_BTNH, k_BSKH, v_BSKH, do_BTNH, lse_BNT, delta_BNT, *segs, ranges[2], ranges[3])
