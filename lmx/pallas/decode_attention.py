"""Decode attention: one query per row over that row's KV cache (split-K flash decoding).

Layout is the decode state's (lmx.models.attention.KVState): keys k_BKHS [B, K, H, S], values v_BKSH [B, K, S, H];
slot s of row b holds position s, and a row's valid keys are the slots < lengths_B (the current token included), or
with a sliding window w only the last w of them (slots >= lengths_B - w). Slots past a row's length are stale and are
ignored whatever they hold (NaN included).

Kernel (Pallas Triton lowering): grid (B, K, splits). A program takes the G query heads of one kv head, padded to a
power of two >= 16 rows (a tl.dot needs every dimension >= 16; the pad rows load as zeros and are never stored),
and one split of the cache slots. It loops, with a dynamic trip count, over only those blocks of `block_s` slots of
its split that hold valid keys of its row (online softmax in f32). The one or two partial blocks (the row's last, the
window's first) load with a mask on their operands (masked lanes read 0 and touch no memory, so stale or padded
slots, NaN in interpret mode, never reach a dot or sum); the blocks between load unmasked. It writes an
unnormalised partial output with its running max and sum; a small jnp combine merges the splits (log-sum-exp).
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


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _valid_slots(lengths_B, S: int, sliding_window: int | None):
    """Boolean [B, S]: slot s holds a key row b attends to."""
    slot_S = jnp.arange(S, dtype=jnp.int32)
    valid_BS = slot_S[None, :] < lengths_B[:, None]
    if sliding_window is not None:
        valid_BS &= slot_S[None, :] >= lengths_B[:, None] - sliding_window
    return valid_BS


def decode_attention_reference(q_BNH, k_BKHS, v_BKSH, lengths_B, *, sliding_window=None, sm_scale=None):
    """Pure-jnp reference: softmax in f32, GQA (query head n reads kv head n // G); a row of length 0 gives 0."""
    B, N, H = q_BNH.shape
    K, S = k_BKHS.shape[1], k_BKHS.shape[3]
    sm_scale = 1.0 / math.sqrt(H) if sm_scale is None else sm_scale
    valid_BS = _valid_slots(lengths_B.astype(jnp.int32), S, sliding_window)
    q_BKGH = q_BNH.reshape(B, K, N // K, H)
    s_BKGS = jnp.einsum("BKGH,BKHS->BKGS", q_BKGH, k_BKHS, preferred_element_type=jnp.float32) * sm_scale
    s_BKGS = jnp.where(valid_BS[:, None, None], s_BKGS, -jnp.inf)
    m_BKG = jnp.max(s_BKGS, axis=-1, keepdims=True)
    p_BKGS = jnp.exp(s_BKGS - jnp.where(jnp.isfinite(m_BKG), m_BKG, 0.0))  # empty row: all 0, not NaN
    l_BKG = jnp.sum(p_BKGS, axis=-1, keepdims=True)
    p_BKGS = p_BKGS / jnp.where(l_BKG > 0, l_BKG, 1.0)
    # Stale values may be NaN: zero them, as 0 * NaN would poison the product.
    v_BKSH = jnp.where(valid_BS[:, None, :, None], v_BKSH, jnp.zeros((), v_BKSH.dtype))
    o_BKGH = jnp.einsum("BKGS,BKSH->BKGH", p_BKGS.astype(v_BKSH.dtype), v_BKSH, preferred_element_type=jnp.float32)
    return o_BKGH.reshape(B, N, H).astype(q_BNH.dtype)


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


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, cfg: _Config, G: int, Gp: int):
    """One (row b, kv head, split j) program. Refs: q [Gp, H] (rows >= G out of bounds), k [H, split_len],
    v [split_len, H], o [Gp, H], m and l [Gp]."""
    H, split_len = k_ref.shape
    bs = cfg.block_s
    length = len_ref[()]
    lo = 0 if cfg.sliding_window is None else jnp.maximum(length - cfg.sliding_window, 0)
    start = pl.program_id(2) * split_len
    # This split's blocks that hold valid slots [lo, length): none if the split lies outside them.
    lo_in = jnp.clip(lo - start, 0, split_len)
    hi_in = jnp.clip(length - start, 0, split_len)
    first, end = lo_in // bs, pl.cdiv(hi_in, bs)
    # Blocks wholly inside [lo, length) load unmasked (a mask along the slots, k's contiguous axis, would keep
    # Triton from vectorising the loads); only the window's first and the row's last block can be partial.
    full_lo = jnp.clip(pl.cdiv(lo_in, bs), first, end)
    full_hi = jnp.clip(hi_in // bs, full_lo, end)

    row_G = lax.broadcasted_iota(jnp.int32, (Gp,), 0) < G
    q = pltriton.load(q_ref, mask=row_G[:, None], other=0)

    def step(masked: bool, i, carry):
        o_GH, m_G, l_G = carry
        k_ref_i, v_ref_i = k_ref.at[:, pl.ds(i * bs, bs)], v_ref.at[pl.ds(i * bs, bs), :]
        if masked:  # the stale / padded slots (NaN in interpret mode) load as 0 and score -inf
            slot = start + i * bs + lax.broadcasted_iota(jnp.int32, (bs,), 0)
            valid = (slot >= lo) & (slot < length)
            k_HS = pltriton.load(k_ref_i, mask=valid[None, :], other=0)
            v_SH = pltriton.load(v_ref_i, mask=valid[:, None], other=0)
            s_GS = jnp.where(valid[None, :], _dot_f32(q, k_HS) * cfg.sm_scale, -jnp.inf)
        else:
            k_HS, v_SH = k_ref_i[...], v_ref_i[...]
            s_GS = _dot_f32(q, k_HS) * cfg.sm_scale
        m_new = jnp.maximum(m_G, jnp.max(s_GS, axis=1))  # finite: every visited block has a valid slot
        p_GS = jnp.exp(s_GS - m_new[:, None])
        alpha = jnp.exp(m_G - m_new)
        o_GH = alpha[:, None] * o_GH + _dot_f32(p_GS.astype(v_SH.dtype), v_SH)
        return o_GH, m_new, alpha * l_G + jnp.sum(p_GS, axis=1)

    carry = (jnp.zeros((Gp, H), jnp.float32), jnp.full((Gp,), -jnp.inf, jnp.float32), jnp.zeros((Gp,), jnp.float32))
    carry = lax.fori_loop(first, full_lo, functools.partial(step, True), carry)  # partial window start, if any
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, False), carry)
    o_GH, m_G, l_G = lax.fori_loop(full_hi, end, functools.partial(step, True), carry)  # partial last block
    pltriton.store(o_ref, o_GH, mask=row_G[:, None])
    pltriton.store(m_ref, m_G, mask=row_G)
    pltriton.store(l_ref, l_G, mask=row_G)


def _split_len(S: int, block_s: int, num_splits: int) -> int:
    blocks = pl.cdiv(S, block_s)
    return block_s * pl.cdiv(blocks, min(num_splits, blocks))


def _partials(q_BNH, k_BKHS, v_BKSH, lengths_B, cfg: _Config):
    """The pallas_call: per-split unnormalised outputs o [B, K, J, G, H] and their max / sum [B, K, J, G]."""
    B, N, H = q_BNH.shape
    K, S = k_BKHS.shape[1], k_BKHS.shape[3]
    G = N // K
    Gp = max(MIN_DOT, _next_pow2(G))
    split_len = _split_len(S, cfg.block_s, cfg.num_splits)
    J = pl.cdiv(S, split_len)
    part = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, G=G, Gp=Gp),
        grid=(B, K, J),
        in_specs=[
            pl.BlockSpec((None,), lambda b, k, j: (b,)),
            pl.BlockSpec((None, None, Gp, H), lambda b, k, j: (b, k, 0, 0)),
            pl.BlockSpec((None, None, H, split_len), lambda b, k, j: (b, k, 0, j)),
            pl.BlockSpec((None, None, split_len, H), lambda b, k, j: (b, k, j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, Gp, H), lambda b, k, j: (b, k, j, 0, 0)),
            pl.BlockSpec((None, None, None, Gp), lambda b, k, j: (b, k, j, 0)),
            pl.BlockSpec((None, None, None, Gp), lambda b, k, j: (b, k, j, 0)),
        ],
        out_shape=[part(B, K, J, G, H), part(B, K, J, G), part(B, K, J, G)],
        compiler_params=triton_params(num_warps=4, num_stages=2),
        interpret=cfg.interpret,
        name="decode_attention",
    )(jnp.clip(lengths_B.astype(jnp.int32), 0, S), q_BNH.reshape(B, K, G, H), k_BKHS, v_BKSH)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _decode_kernel(q_BNH, k_BKHS, v_BKSH, lengths_B, cfg: _Config):
    o_BKJGH, m_BKJG, l_BKJG = _partials(q_BNH, k_BKHS, v_BKSH, lengths_B, cfg)
    # Log-sum-exp merge of the splits; a split with no valid slot has m = -inf and weighs 0, an empty row gives 0.
    # The barrier is jax's own decode kernel's workaround for NaNs XLA:GPU fusions produced here (b/389925439).
    m_BKG = lax.optimization_barrier(jnp.max(m_BKJG, axis=2))
    w_BKJG = jnp.exp(m_BKJG - jnp.where(jnp.isfinite(m_BKG), m_BKG, 0.0)[:, :, None])
    l_BKG = jnp.sum(w_BKJG * l_BKJG, axis=2)
    o_BKGH = jnp.sum(w_BKJG[..., None] * o_BKJGH, axis=2) / jnp.where(l_BKG > 0, l_BKG, 1.0)[..., None]
    return o_BKGH.reshape(q_BNH.shape).astype(q_BNH.dtype)


def _no_vjp_fwd(q_BNH, k_BKHS, v_BKSH, lengths_B, cfg):
    return _decode_kernel(q_BNH, k_BKHS, v_BKSH, lengths_B, cfg), None


def _no_vjp_bwd(cfg, res, g):
    raise NotImplementedError(f"{OP}: the Pallas kernel is inference only and has no backward; differentiate "
                              "impl='xla' (the reference) instead")


_decode_kernel.defvjp(_no_vjp_fwd, _no_vjp_bwd)


def _check_shapes(q_BNH, k_BKHS, v_BKSH, lengths_B):
    """Bad input for any impl: raise naming the shapes."""
    if q_BNH.ndim != 3 or k_BKHS.ndim != 4 or v_BKSH.ndim != 4:
        raise ValueError(f"{OP}: want q [B, N, H], k [B, K, H, S], v [B, K, S, H]; got q {q_BNH.shape}, "
                         f"k {k_BKHS.shape}, v {v_BKSH.shape}")
    B, N, H = q_BNH.shape
    _, K, _, S = k_BKHS.shape
    if k_BKHS.shape != (B, K, H, S) or v_BKSH.shape != (B, K, S, H) or K == 0 or N % K:
        raise ValueError(f"{OP}: shapes disagree: q {q_BNH.shape} [B, N, H], k {k_BKHS.shape} [B, K, H, S], "
                         f"v {v_BKSH.shape} [B, K, S, H] (N must be a multiple of K)")
    if lengths_B.shape != (B,):
        raise ValueError(f"{OP}: lengths shape {lengths_B.shape} != (B,) = ({B},)")


def _unsupported(q_BNH, k_BKHS, v_BKSH, block_s: int, num_splits: int) -> str | None:
    """Why the kernel cannot take these inputs, or None."""
    H = q_BNH.shape[2]
    dtypes = {jnp.dtype(x.dtype) for x in (q_BNH, k_BKHS, v_BKSH)}
    if len(dtypes) != 1 or dtypes.pop() not in DTYPES:
        return f"dtypes q {q_BNH.dtype}, k {k_BKHS.dtype}, v {v_BKSH.dtype} (want all float32 or all bfloat16)"
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


def default_num_splits(B: int, K: int, S: int, block_s: int) -> int:
    """Enough splits that the (B, K, splits) grid has ~TARGET_PROGRAMS programs, at most one per block."""
    return max(1, min(pl.cdiv(S, block_s), pl.cdiv(TARGET_PROGRAMS, B * K)))


def decode_attention(q_BNH, k_BKHS, v_BKSH, lengths_B, *, sliding_window: int | None = None,
                     sm_scale: float | None = None, impl: str = "auto", interpret: bool = False,
                     block_s: int | None = None, num_splits: int | None = None):
    """Attention of one query per row over that row's KV cache: o_BNH.

    q_BNH [B, N, H]; k_BKHS [B, K, H, S] and v_BKSH [B, K, S, H] (KVState's layouts, N = K * G, query head n reads
    kv head n // G); lengths_B [B] int: row b attends to slots < lengths_B[b] (its current token already written),
    only the last `sliding_window` of them if set. Slots >= the length are ignored whatever they hold; a row of
    length 0 gives 0 (not NaN). sm_scale defaults to 1 / sqrt(H).

    impl: "xla" (the pure-jnp reference), "pallas" (the split-K kernel; raises ValueError on inputs it does not
    support: dtype other than float32 / bfloat16, head dim or block_s not a power of two >= 16), or "auto" (the
    kernel on a GPU, or under interpret=True, for supported inputs; else the reference, logging why).
    block_s: cache slots per kernel loop step; num_splits: splits of the cache over the grid (defaults fill the GPU).

    Inference only: the kernel has no backward, and differentiating through it raises NotImplementedError (the
    "xla" reference is differentiable)."""
    _check_shapes(q_BNH, k_BKHS, v_BKSH, lengths_B)
    B, N, H = q_BNH.shape
    K, S = k_BKHS.shape[1], k_BKHS.shape[3]
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{OP}: sliding_window={sliding_window} must be >= 1 (or None)")
    block_s = default_block_s(H, S) if block_s is None else block_s
    num_splits = default_num_splits(B, K, S, block_s) if num_splits is None else num_splits
    unsupported = _unsupported(q_BNH, k_BKHS, v_BKSH, block_s, num_splits)
    sm_scale = 1.0 / math.sqrt(H) if sm_scale is None else float(sm_scale)
    cfg = _Config(sm_scale, sliding_window, block_s, num_splits, interpret)
    probe = lambda: kernel_compiles(OP, cfg, lambda *a: _decode_kernel(*a, cfg), q_BNH, k_BKHS, v_BKSH, lengths_B)
    if resolve_impl(OP, impl, unsupported, interpret, probe) == "xla":
        return decode_attention_reference(q_BNH, k_BKHS, v_BKSH, lengths_B, sliding_window=sliding_window,
                                          sm_scale=sm_scale)
    return _decode_kernel(q_BNH, k_BKHS, v_BKSH, lengths_B, cfg)
