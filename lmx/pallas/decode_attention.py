"""Decode attention: the last T queries of each row over that row's KV cache (split-K flash decoding). T = 1 is a
decode step; T > 1 a speculative verification or a prefill onto a non-empty cache.

Layout is the decode state's (lmx.models.attention.KVState): keys k_BKHS [B, K, H, S], values v_BKSH [B, K, S, H];
slot s of row b holds position s. lengths_B counts the slots written, this call's T included: query t of row b
sits at slot lengths_B - T + t and sees the slots below lengths_B - (T - 1 - t) (itself included), or with a
sliding window w only the last w of them. Slots past that are stale and are ignored whatever they hold (NaN
included).

Kernel (Pallas Triton lowering): grid (B, K, row tiles, splits). The T·G query rows of one kv head (row r = t·G + g)
are cut into tiles of R rows, R a power of two in [16, 64] (a tl.dot needs every dimension >= 16; pad rows load
as zeros and are never stored). A program takes one tile and one split of the cache slots, and loops, with a
dynamic trip count, over only those blocks of `block_s` slots of its split that hold keys some row of the tile
sees (online softmax in f32). Blocks that every row of the tile sees whole load unmasked; the others (the rows'
last blocks, the window's first) mask their operands (masked lanes read 0 and touch no memory, so stale or padded
slots, NaN in interpret mode, never reach a dot or sum) and their scores per row. It writes an unnormalised
partial output with its running max and sum; a small jnp combine merges the splits (log-sum-exp).
Inference only: no backward (differentiating the kernel raises).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lmx.pallas._compat import kernel_compiles, pl, pltriton, resolve_impl, triton_params

OP = "decode_attention"
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
MIN_DOT = 16  # smallest dimension of a tl.dot operand
TARGET_PROGRAMS = 256  # default splits aim at ~2 programs per SM of an H100 (132 SMs) over the (B, K) grid
MAX_ROWS = 64  # query rows (t, g) per program: an [R, H] f32 accumulator and [R, block_s] scores stay in registers


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _valid_slots(lengths_B, S: int, T: int, sliding_window: int | None):
    """Boolean [B, T, S]: slot s holds a key that query t of row b attends to."""
    slot_S = jnp.arange(S, dtype=jnp.int32)
    hi_BT = lengths_B[:, None] - (T - 1 - jnp.arange(T, dtype=jnp.int32))  # past the query's own slot
    valid_BTS = slot_S < hi_BT[..., None]
    if sliding_window is not None:
        valid_BTS &= slot_S >= hi_BT[..., None] - sliding_window
    return valid_BTS


def decode_attention_reference(q, k_BKHS, v_BKSH, lengths_B, *, sliding_window=None, sm_scale=None):
    """Pure-jnp reference: softmax in f32, GQA (query head n reads kv head n // G); q [B, N, H] or [B, T, N, H]
    (see the module docstring); a query that sees no slot gives 0."""
    q_BTNH = q[:, None] if q.ndim == 3 else q
    B, T, N, H = q_BTNH.shape
    K, S = k_BKHS.shape[1], k_BKHS.shape[3]
    sm_scale = 1.0 / math.sqrt(H) if sm_scale is None else sm_scale
    valid_BTS = _valid_slots(lengths_B.astype(jnp.int32), S, T, sliding_window)
    # Products of the inputs' values, summed in f32 (bf16 -> f32 is exact; XLA:CPU has no bf16 x bf16 = f32 dot).
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H).astype(jnp.float32)
    s_BTKGS = jnp.einsum("BTKGH,BKHS->BTKGS", q_BTKGH, k_BKHS.astype(jnp.float32)) * sm_scale
    s_BTKGS = jnp.where(valid_BTS[:, :, None, None], s_BTKGS, -jnp.inf)
    m_BTKG = jnp.max(s_BTKGS, axis=-1, keepdims=True)
    p_BTKGS = jnp.exp(s_BTKGS - jnp.where(jnp.isfinite(m_BTKG), m_BTKG, 0.0))  # no key: all 0, not NaN
    l_BTKG = jnp.sum(p_BTKGS, axis=-1, keepdims=True)
    p_BTKGS = p_BTKGS / jnp.where(l_BTKG > 0, l_BTKG, 1.0)
    # Stale values may be NaN: zero them, as 0 * NaN would poison the product.
    v_BKSH = jnp.where(valid_BTS.any(1)[:, None, :, None], v_BKSH, jnp.zeros((), v_BKSH.dtype))
    o_BTKGH = jnp.einsum("BTKGS,BKSH->BTKGH", p_BTKGS.astype(v_BKSH.dtype).astype(jnp.float32),
                         v_BKSH.astype(jnp.float32))
    return o_BTKGH.reshape(q.shape).astype(q.dtype)


class _Config(NamedTuple):  # static, hashable: the kernel's configuration
    sm_scale: float
    sliding_window: int | None
    block_s: int
    num_splits: int
    interpret: bool


def _dot_f32(a, b):
    """a @ b accumulated in f32, refusing the dot sizes Triton cannot compile (caught when cross-lowering)."""
    if min(*a.shape, b.shape[1]) < MIN_DOT:
        raise ValueError(f"{OP}: a tl.dot needs every dimension >= {MIN_DOT}, got {a.shape} @ {b.shape}")
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, cfg: _Config, G: int, T: int, R: int):
    """One (row b, kv head, row tile i, split j) program. Refs: q [R, H] (rows r = t·G + g, those >= T·G out of
    bounds), k [H, split_len], v [split_len, H], o [R, H], m and l [R]."""
    H, split_len = k_ref.shape
    bs = cfg.block_s
    length = len_ref[()]
    r0 = pl.program_id(2) * R
    r_R = r0 + lax.broadcasted_iota(jnp.int32, (R,), 0)
    row_R = r_R < T * G
    # Query row r (query t = r // G) sees the slots [lo_R, hi_R); the tile's rows see [lo, hi) together, and every
    # one of them sees [lo_all, hi_all) (the tile's first and last query bound these: hi grows with t).
    t_first, t_last = r0 // G, jnp.minimum((r0 + R - 1) // G, T - 1)
    hi_R = length - (T - 1 - r_R // G)
    hi, hi_all = length - (T - 1 - t_last), length - (T - 1 - t_first)
    if cfg.sliding_window is None:
        lo_R = jnp.zeros_like(hi_R)
        lo = lo_all = 0
    else:
        lo_R = hi_R - cfg.sliding_window
        lo, lo_all = hi_all - cfg.sliding_window, hi - cfg.sliding_window
    start = pl.program_id(3) * split_len
    # This split's blocks that hold slots some row sees: none if the split lies outside them.
    lo_in, hi_in = jnp.clip(lo - start, 0, split_len), jnp.clip(hi - start, 0, split_len)
    first, end = lo_in // bs, pl.cdiv(hi_in, bs)
    # Blocks every row sees whole load unmasked (a mask along the slots, k's contiguous axis, would keep Triton from
    # vectorising the loads); only the blocks at the window's start and the rows' ends are partial.
    lo_all_in, hi_all_in = jnp.clip(lo_all - start, 0, split_len), jnp.clip(hi_all - start, 0, split_len)
    full_lo = jnp.clip(pl.cdiv(lo_all_in, bs), first, end)
    full_hi = jnp.clip(hi_all_in // bs, full_lo, end)

    q = pltriton.load(q_ref, mask=row_R[:, None], other=0)

    def step(masked: bool, i, carry):
        o_RH, m_R, l_R = carry
        k_ref_i, v_ref_i = k_ref.at[:, pl.ds(i * bs, bs)], v_ref.at[pl.ds(i * bs, bs), :]
        if masked:  # the stale / padded slots (NaN in interpret mode) load as 0 and score -inf
            slot = start + i * bs + lax.broadcasted_iota(jnp.int32, (bs,), 0)
            seen = (slot >= lo) & (slot < hi)
            k_HS = pltriton.load(k_ref_i, mask=seen[None, :], other=0)
            v_SH = pltriton.load(v_ref_i, mask=seen[:, None], other=0)
            valid_RS = (slot[None, :] >= lo_R[:, None]) & (slot[None, :] < hi_R[:, None])
            s_RS = jnp.where(valid_RS, _dot_f32(q, k_HS) * cfg.sm_scale, -jnp.inf)
        else:
            k_HS, v_SH = k_ref_i[...], v_ref_i[...]
            s_RS = _dot_f32(q, k_HS) * cfg.sm_scale
        m_new = jnp.maximum(m_R, jnp.max(s_RS, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with no key yet: keep exp away from -inf - -inf
        p_RS = jnp.exp(s_RS - m_use[:, None])
        alpha = jnp.exp(m_R - m_use)
        o_RH = alpha[:, None] * o_RH + _dot_f32(p_RS.astype(v_SH.dtype), v_SH)
        return o_RH, m_new, alpha * l_R + jnp.sum(p_RS, axis=1)

    carry = (jnp.zeros((R, H), jnp.float32), jnp.full((R,), -jnp.inf, jnp.float32), jnp.zeros((R,), jnp.float32))
    carry = lax.fori_loop(first, full_lo, functools.partial(step, True), carry)  # partial window start, if any
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, False), carry)
    o_RH, m_R, l_R = lax.fori_loop(full_hi, end, functools.partial(step, True), carry)  # the rows' last blocks
    pltriton.store(o_ref, o_RH, mask=row_R[:, None])
    pltriton.store(m_ref, m_R, mask=row_R)
    pltriton.store(l_ref, l_R, mask=row_R)


def _split_len(S: int, block_s: int, num_splits: int) -> int:
    blocks = pl.cdiv(S, block_s)
    return block_s * pl.cdiv(blocks, min(num_splits, blocks))


def rows_per_program(T: int, G: int) -> int:
    """R: a power of two in [MIN_DOT, MAX_ROWS] (or G's, if larger), no more than the T·G rows need."""
    return max(MIN_DOT, min(_next_pow2(T * G), max(MAX_ROWS, _next_pow2(G))))


def _partials(q_BTNH, k_BKHS, v_BKSH, lengths_B, cfg: _Config):
    """The pallas_call: per-split unnormalised outputs o [B, K, J, T·G, H] and their max / sum [B, K, J, T·G]."""
    B, T, N, H = q_BTNH.shape
    K, S = k_BKHS.shape[1], k_BKHS.shape[3]
    G = N // K
    R = rows_per_program(T, G)
    split_len = _split_len(S, cfg.block_s, cfg.num_splits)
    J = pl.cdiv(S, split_len)
    part = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    q_BKrH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)  # r = t·G + g
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, G=G, T=T, R=R),
        grid=(B, K, pl.cdiv(T * G, R), J),
        in_specs=[
            pl.BlockSpec((None,), lambda b, k, i, j: (b,)),
            pl.BlockSpec((None, None, R, H), lambda b, k, i, j: (b, k, i, 0)),
            pl.BlockSpec((None, None, H, split_len), lambda b, k, i, j: (b, k, 0, j)),
            pl.BlockSpec((None, None, split_len, H), lambda b, k, i, j: (b, k, j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, R, H), lambda b, k, i, j: (b, k, j, i, 0)),
            pl.BlockSpec((None, None, None, R), lambda b, k, i, j: (b, k, j, i)),
            pl.BlockSpec((None, None, None, R), lambda b, k, i, j: (b, k, j, i)),
        ],
        out_shape=[part(B, K, J, T * G, H), part(B, K, J, T * G), part(B, K, J, T * G)],
        compiler_params=triton_params(num_warps=4, num_stages=2),
        interpret=cfg.interpret,
        name="decode_attention",
    )(jnp.clip(lengths_B.astype(jnp.int32), 0, S), q_BKrH, k_BKHS, v_BKSH)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _decode_kernel(q_BTNH, k_BKHS, v_BKSH, lengths_B, cfg: _Config):
    o_BKJrH, m_BKJr, l_BKJr = _partials(q_BTNH, k_BKHS, v_BKSH, lengths_B, cfg)
    # Log-sum-exp merge of the splits; a split with no visible slot has m = -inf and weighs 0, a query that sees no
    # slot gives 0. The barrier is jax's own decode kernel's workaround for NaNs XLA:GPU fusions produced here
    # (b/389925439).
    m_BKr = lax.optimization_barrier(jnp.max(m_BKJr, axis=2))
    w_BKJr = jnp.exp(m_BKJr - jnp.where(jnp.isfinite(m_BKr), m_BKr, 0.0)[:, :, None])
    l_BKr = jnp.sum(w_BKJr * l_BKJr, axis=2)
    o_BKrH = jnp.sum(w_BKJr[..., None] * o_BKJrH, axis=2) / jnp.where(l_BKr > 0, l_BKr, 1.0)[..., None]
    B, T, N, H = q_BTNH.shape
    K = k_BKHS.shape[1]
    o_BTNH = o_BKrH.reshape(B, K, T, N // K, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)
    return o_BTNH.astype(q_BTNH.dtype)


def _no_vjp_fwd(q_BNH, k_BKHS, v_BKSH, lengths_B, cfg):
    return _decode_kernel(q_BNH, k_BKHS, v_BKSH, lengths_B, cfg), None


def _no_vjp_bwd(cfg, res, g):
    raise NotImplementedError(f"{OP}: the Pallas kernel is inference only and has no backward; differentiate "
                              "impl='xla' (the reference) instead")


_decode_kernel.defvjp(_no_vjp_fwd, _no_vjp_bwd)


def _check_shapes(q, k_BKHS, v_BKSH, lengths_B):
    """Bad input for any impl: raise naming the shapes."""
    if q.ndim not in (3, 4) or k_BKHS.ndim != 4 or v_BKSH.ndim != 4:
        raise ValueError(f"{OP}: want q [B, N, H] or [B, T, N, H], k [B, K, H, S], v [B, K, S, H]; got q {q.shape}, "
                         f"k {k_BKHS.shape}, v {v_BKSH.shape}")
    B, N, H = q.shape[0], *q.shape[-2:]
    _, K, _, S = k_BKHS.shape
    if k_BKHS.shape != (B, K, H, S) or v_BKSH.shape != (B, K, S, H) or K == 0 or N % K:
        raise ValueError(f"{OP}: shapes disagree: q {q.shape} [B, (T,) N, H], k {k_BKHS.shape} [B, K, H, S], "
                         f"v {v_BKSH.shape} [B, K, S, H] (N must be a multiple of K)")
    if lengths_B.shape != (B,):
        raise ValueError(f"{OP}: lengths shape {lengths_B.shape} != (B,) = ({B},)")


def _unsupported(q, k_BKHS, v_BKSH, block_s: int, num_splits: int) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    H = q.shape[-1]
    dtypes = {jnp.dtype(x.dtype) for x in (q, k_BKHS, v_BKSH)}
    if len(dtypes) != 1 or dtypes.pop() not in DTYPES:
        return f"dtypes q {q.dtype}, k {k_BKHS.dtype}, v {v_BKSH.dtype} (want all float32 or all bfloat16)"
    if not (_pow2(H) and H >= MIN_DOT):
        return f"head dim H={H} (want a power of two >= {MIN_DOT})"
    if not (_pow2(block_s) and block_s >= MIN_DOT):
        return f"block_s={block_s} (want a power of two >= {MIN_DOT})"
    if num_splits < 1:
        return f"num_splits={num_splits} (want >= 1)"
    if k_BKHS.shape[3] == 0:
        return "an empty cache (S=0)"
    return None


def default_block_s(H: int, S: int) -> int:
    """Slots per loop step: 128 (64 for head dims above 128, to bound the [H, block_s] tile), no more than the
    cache needs."""
    return max(MIN_DOT, min(128 if H <= 128 else 64, _next_pow2(S)))


def default_num_splits(B: int, K: int, S: int, block_s: int, tiles: int = 1) -> int:
    """Enough splits that the (B, K, row tiles, splits) grid has ~TARGET_PROGRAMS programs, at most one per
    block."""
    return max(1, min(pl.cdiv(S, block_s), pl.cdiv(TARGET_PROGRAMS, B * K * tiles)))


def decode_attention(q, k_BKHS, v_BKSH, lengths_B, *, sliding_window: int | None = None,
                     sm_scale: float | None = None, impl: str = "auto", interpret: bool = False,
                     block_s: int | None = None, num_splits: int | None = None):
    """Attention of each row's last T queries over that row's KV cache: o in q's shape.

    q: [B, N, H] (one query per row, a decode step) or [B, T, N, H] (the T queries at slots lengths_B - T ..
    lengths_B - 1: a speculative verification, a prefill onto a non-empty cache). k_BKHS [B, K, H, S] and v_BKSH
    [B, K, S, H] (KVState's layouts, N = K * G, query head n reads kv head n // G). lengths_B [B] int: slots
    written, this call's included; query t of row b attends to the slots below lengths_B[b] - (T - 1 - t) (its own
    included), only the last `sliding_window` of them if set. Other slots are ignored whatever they hold; a query
    that sees no slot gives 0 (not NaN). sm_scale defaults to 1 / sqrt(H).

    impl: "xla" (the pure-jnp reference), "pallas" (the split-K kernel; raises ValueError on inputs it does not
    support: dtype other than float32 / bfloat16, head dim or block_s not a power of two >= 16), or "auto" (the
    kernel on a GPU, or under interpret=True, for supported inputs; else the reference, logging why).
    block_s: cache slots per kernel loop step; num_splits: splits of the cache over the grid (defaults fill the GPU).

    Inference only: the kernel has no backward, and differentiating through it raises NotImplementedError (the
    "xla" reference is differentiable)."""
    _check_shapes(q, k_BKHS, v_BKSH, lengths_B)
    q_BTNH = q[:, None] if q.ndim == 3 else q
    B, T, N, H = q_BTNH.shape
    K, S = k_BKHS.shape[1], k_BKHS.shape[3]
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{OP}: sliding_window={sliding_window} must be >= 1 (or None)")
    block_s = default_block_s(H, S) if block_s is None else block_s
    if num_splits is None:
        num_splits = default_num_splits(B, K, S, block_s, pl.cdiv(T * (N // K), rows_per_program(T, N // K)))
    unsupported = _unsupported(q, k_BKHS, v_BKSH, block_s, num_splits)
    sm_scale = 1.0 / math.sqrt(H) if sm_scale is None else float(sm_scale)
    cfg = _Config(sm_scale, sliding_window, block_s, num_splits, interpret)
    probe = lambda: kernel_compiles(OP, cfg, lambda *a: _decode_kernel(*a, cfg), q_BTNH, k_BKHS, v_BKSH, lengths_B)
    if resolve_impl(OP, impl, unsupported, interpret, probe) == "xla":
        return decode_attention_reference(q, k_BKHS, v_BKSH, lengths_B, sliding_window=sliding_window,
                                          sm_scale=sm_scale)
    o_BTNH = _decode_kernel(q_BTNH, k_BKHS, v_BKSH, lengths_B, cfg)
    return o_BTNH[:, 0] if q.ndim == 3 else o_BTNH
