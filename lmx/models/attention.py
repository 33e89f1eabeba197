"""Grouped-query attention with RoPE, optional qkv bias, sliding window, KV cache and packed segments."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmx.models.config import ModelConfig
from lmx.models.layers import apply_rope, dense_init, rope_inv_freq

NEG_INF = -1e30


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


def write_cache(cache_BSKH, new_BTKH, start_B):
    """Write each row's T new entries at its own slot offset."""
    return jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (i, 0, 0)))(
        cache_BSKH, new_BTKH, start_B
    )


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, slots_BT, cache=None, segment_ids_BT=None):
        """cache: None (teacher-forced) or (k_BSKH, v_BSKH, lengths_B). Returns (y_BTD, new (k, v) or None)."""
        cfg, a = self.cfg, self.cfg.attention
        D, N, K, H = cfg.d_model, a.num_heads, a.num_kv_heads, a.head_dim
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        wq = self.param("q", dense_init(D, ("embed", "heads", "head_dim")), (D, N, H), pd)
        wk = self.param("k", dense_init(D, ("embed", "kv_heads", "head_dim")), (D, K, H), pd)
        wv = self.param("v", dense_init(D, ("embed", "kv_heads", "head_dim")), (D, K, H), pd)
        wo = self.param("o", dense_init(N * H, ("heads", "head_dim", "embed")), (N, H, D), pd)
        x = x_BTD.astype(dt)
        q_BTNH = jnp.einsum("BTD,DNH->BTNH", x, wq.astype(dt))
        k_BTKH = jnp.einsum("BTD,DKH->BTKH", x, wk.astype(dt))
        v_BTKH = jnp.einsum("BTD,DKH->BTKH", x, wv.astype(dt))
        if a.qkv_bias:
            zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim"))
            zeros_kv = nn.with_logical_partitioning(nn.initializers.zeros, ("kv_heads", "head_dim"))
            q_BTNH += self.param("q_bias", zeros, (N, H), pd).astype(dt)
            k_BTKH += self.param("k_bias", zeros_kv, (K, H), pd).astype(dt)
            v_BTKH += self.param("v_bias", zeros_kv, (K, H), pd).astype(dt)
        inv_freq = rope_inv_freq(H, a.rope_theta, a.rope_scaling)
        q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
        k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)
        q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "seq", "heads", "head_dim"))

        if cache is None:
            mask = attention_mask(slots_BT, slots_BT, window=a.sliding_window,
                                  q_seg_BT=segment_ids_BT, k_seg_BS=segment_ids_BT)
            keys, values, new_cache = k_BTKH, v_BTKH, None
        else:
            k_BSKH, v_BSKH, lengths_B = cache
            keys = write_cache(k_BSKH, k_BTKH, lengths_B)
            values = write_cache(v_BSKH, v_BTKH, lengths_B)
            S = keys.shape[1]
            k_slots_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (x.shape[0], S))
            mask = attention_mask(slots_BT, k_slots_BS, window=a.sliding_window)
            new_cache = (keys, values)
        o_BTNH = dot_attention(q_BTNH, keys.astype(dt), values.astype(dt), mask, 1.0 / math.sqrt(H))
        return jnp.einsum("BTNH,NHD->BTD", o_BTNH, wo.astype(dt)), new_cache
