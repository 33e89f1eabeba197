"""Grouped-query attention with RoPE, optional qkv bias, sliding window, KV cache and packed segments."""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lmx.models.backend import write_slots
from lmx.models.config import ModelConfig
from lmx.models.layers import apply_rope, dense_init, rope_inv_freq
from lmx.models.quantize import matmul, weight
from lmx.pallas._compat import model_interpret
from lmx.pallas.decode_attention import decode_attention
from lmx.pallas.flash_attention import flash_attention
from lmx.sharding import per_shard

NEG_INF = -1e30
# Logical axes of the kernels' operands (lmx.sharding.per_shard): q [B, T, N, H], k / v [B, S, K, H], and the KV
# cache's layouts k [B, K, H, S], v [B, K, S, H].
_Q, _KV = ("batch", "seq", "heads", "head_dim"), ("batch", "seq", "kv_heads", "head_dim")
_K_BKHS, _V_BKSH = ("batch", "kv_heads", "head_dim", None), ("batch", "kv_heads", None, "head_dim")


def attention_mask(q_pos_BT, k_pos_BS, *, window: int | None, q_seg_BT=None, k_seg_BS=None, k_valid_BS=None):
    """Boolean [B, T, S] mask over slot indices: causal, within the window, same segment, valid key."""
    diff_BTS = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
    mask = diff_BTS >= 0
    if window is not None:
        mask &= diff_BTS < window
    if q_seg_BT is not None:
        mask &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    if k_valid_BS is not None:
        mask &= k_valid_BS[:, None, :]
    return mask


def dot_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, sm_scale: float):
    """Reference attention: softmax in f32, GQA by grouping query heads over each KV head."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    s_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * sm_scale
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, NEG_INF)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKH.dtype)
    o_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", p_BKGTS, v_BSKH)
    return o_BTKGH.reshape(B, T, N, H)


def cached_attention(q_BTNH, k_BKHS, v_BKSH, mask_BTS, sm_scale: float):
    """Attention over one layer's KV buffers (KVState's layouts)."""
    B, T, N, H = q_BTNH.shape
    K = k_BKHS.shape[1]
    q_BKGTH = jnp.transpose(q_BTNH.reshape(B, T, K, N // K, H), (0, 2, 3, 1, 4))
    s_BKGTS = jnp.einsum("BKGTH,BKHS->BKGTS", q_BKGTH, k_BKHS, preferred_element_type=jnp.float32) * sm_scale
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, NEG_INF)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BKSH.dtype)
    o_BKGTH = jnp.einsum("BKGTS,BKSH->BKGTH", p_BKGTS, v_BKSH)
    return jnp.transpose(o_BKGTH, (0, 3, 1, 2, 4)).reshape(B, T, N, H)


def own_keys_segment_mask(segment_ids_BT, lengths_B, S: int):
    """[B, T, S] mask of a cached call with packed segments: this call's own keys (slots lengths_B + t) are seen
    only by queries of the same segment; keys already cached before the call (a shared prefix) by every query."""
    slot_BS = jnp.arange(S, dtype=jnp.int32)[None, :] - lengths_B[:, None]  # index into this call's T, or < 0
    T = segment_ids_BT.shape[1]
    k_seg_BS = jnp.take_along_axis(segment_ids_BT, jnp.clip(slot_BS, 0, T - 1), axis=1)
    return (slot_BS < 0)[:, None, :] | (segment_ids_BT[:, :, None] == k_seg_BS[:, None, :])


@flax.struct.dataclass
class KVState:
    """One attention layer's decode state: its KV buffers. Slot s of row b holds the token at position s of that
    row (no left padding), so a call writes at slots lengths_B + t; slots past a row's length are stale, masked by
    attention and overwritten by the next write, so commit and rollback leave the buffers as they are. Keys are
    stored [B, K, H, S] (slots last) and values [B, K, S, H]: both cached products are then plain batched matmuls
    over (B, K) with the cache as the untransposed right operand, which XLA reads where it lies (a [B, S, K, H]
    cache was transposed and copied every decode step on XLA:CPU; see benchmarks/RESULTS.md)."""

    k_BKHS: jax.Array
    v_BKSH: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype, rollback_window: int | None = None) -> KVState:
        a = cfg.attention
        K, H = a.num_kv_heads, a.head_dim
        return cls(jnp.zeros((batch, K, H, max_len), dtype), jnp.zeros((batch, K, max_len, H), dtype))

    def write(self, k_BTKH, v_BTKH, lengths_B) -> KVState:
        """This call's keys and values written at slots lengths_B + t."""
        return KVState(write_slots(self.k_BKHS, k_BTKH, lengths_B, slot_axis=3),
                       write_slots(self.v_BKSH, v_BTKH, lengths_B, slot_axis=2))

    def commit(self, lengths_B) -> KVState:
        return self

    def rollback(self, lengths_B) -> KVState:
        return self


def project_kv(cfg: ModelConfig, x_BTD, positions_BT, wk_DKH, wv_DKH, k_bias_KH=None, v_bias_KH=None):
    """A layer's keys (RoPE-rotated) and values for its normed input x_BTD: what a call writes into the cache.
    Early-exit decoding calls it alone to fill the KV of layers a token skipped."""
    a, dt = cfg.attention, jnp.dtype(cfg.dtype)
    x = x_BTD.astype(dt)
    k_BTKH = matmul(x, wk_DKH, dt, "BTD,DKH->BTKH")
    v_BTKH = matmul(x, wv_DKH, dt, "BTD,DKH->BTKH")
    if k_bias_KH is not None:
        k_BTKH += k_bias_KH.astype(dt)
        v_BTKH += v_bias_KH.astype(dt)
    return apply_rope(k_BTKH, positions_BT, rope_inv_freq(a.head_dim, a.rope_theta, a.rope_scaling)), v_BTKH


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, slots_BT, state: KVState | None = None, lengths_B=None,
                 segment_ids_BT=None):
        """state: None (teacher-forced) or this layer's KVState at lengths_B. Returns y_BTD and the state with this
        call's entries written at slots lengths_B + t (or None)."""
        cfg, a = self.cfg, self.cfg.attention
        D, N, K, H = cfg.d_model, a.num_heads, a.num_kv_heads, a.head_dim
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        wq = weight(self, "q", dense_init(D, ("embed", "heads", "head_dim")), (D, N, H), pd)
        wk = weight(self, "k", dense_init(D, ("embed", "kv_heads", "head_dim")), (D, K, H), pd)
        wv = weight(self, "v", dense_init(D, ("embed", "kv_heads", "head_dim")), (D, K, H), pd)
        wo = weight(self, "o", dense_init(N * H, ("heads", "head_dim", "embed")), (N, H, D), pd)
        x = x_BTD.astype(dt)
        q_BTNH = matmul(x, wq, dt, "BTD,DNH->BTNH")
        if a.qkv_bias:
            zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim"))
            zeros_kv = nn.with_logical_partitioning(nn.initializers.zeros, ("kv_heads", "head_dim"))
            q_BTNH += self.param("q_bias", zeros, (N, H), pd).astype(dt)
            k_bias, v_bias = (self.param(f"{n}_bias", zeros_kv, (K, H), pd) for n in "kv")
        else:
            k_bias = v_bias = None
        k_BTKH, v_BTKH = project_kv(cfg, x, positions_BT, wk, wv, k_bias, v_bias)
        q_BTNH = apply_rope(q_BTNH, positions_BT, rope_inv_freq(H, a.rope_theta, a.rope_scaling))
        q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "seq", "heads", "head_dim"))

        # The kernels run per device shard (rows, heads) under a mesh: XLA cannot partition a pallas_call.
        flash = per_shard(lambda q, k, v, seg: flash_attention(
            q, k, v, causal=True, segment_ids=seg, sliding_window=a.sliding_window, sm_scale=1.0 / math.sqrt(H),
            impl=a.impl, interpret=model_interpret(a.impl)), (_Q, _KV, _KV, ("batch", "seq")), _Q)
        if state is None:
            if a.impl == "xla":
                mask = attention_mask(slots_BT, slots_BT, window=a.sliding_window,
                                      q_seg_BT=segment_ids_BT, k_seg_BS=segment_ids_BT)
                o_BTNH = dot_attention(q_BTNH, k_BTKH, v_BTKH, mask, 1.0 / math.sqrt(H))
            else:  # lmx.pallas's flash attention over positions 0..T-1, the slots of a teacher-forced call ("auto"
                # falls back to its own reference off a GPU)
                o_BTNH = flash(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
            new_state = None
        else:  # write this call's entries in place, then attend over the layer's cache (slot <= query slot)
            new_state = state.write(k_BTKH, v_BTKH, lengths_B)
            B, T, S = *x.shape[:2], new_state.v_BKSH.shape[2]
            mask = attention_mask(slots_BT, jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)),
                                  window=a.sliding_window)
            if segment_ids_BT is not None:
                mask &= own_keys_segment_mask(segment_ids_BT, lengths_B, S)
            cached = lambda: cached_attention(q_BTNH, new_state.k_BKHS.astype(dt), new_state.v_BKSH.astype(dt),
                                              mask, 1.0 / math.sqrt(H))
            # lmx.pallas's decode attention: this call's T queries per row over the cache (slots < lengths + T)
            decode = per_shard(lambda q, k, v, n: decode_attention(
                q, k, v, n, sliding_window=a.sliding_window, sm_scale=1.0 / math.sqrt(H), impl=a.impl,
                interpret=model_interpret(a.impl)), (_Q, _K_BKHS, _V_BKSH, ("batch",)), _Q)
            kernel = lambda: decode(q_BTNH, new_state.k_BKHS.astype(dt), new_state.v_BKSH.astype(dt), lengths_B + T)
            if a.impl == "xla" or segment_ids_BT is not None:
                o_BTNH = cached()
            elif T == 1:  # a decode step
                o_BTNH = kernel()
            else:  # a prefill of empty rows attends only to its own keys: flash attention; a call onto a non-empty
                # cache (speculative verification, a continued prefill) decode attention
                o_BTNH = jax.lax.cond(jnp.all(lengths_B == 0), lambda: flash(
                    q_BTNH, k_BTKH.astype(dt), v_BTKH.astype(dt), None), kernel)
        # As a 2-D matmul (same maths as the einsum, for which XLA:CPU transposed wo at every step).
        return matmul(o_BTNH.reshape(*o_BTNH.shape[:2], N * H), wo.reshape(N * H, D), dt), new_state
