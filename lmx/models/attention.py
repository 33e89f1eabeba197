"""Grouped-query attention with RoPE, optional qkv bias, sliding window, KV cache and packed segments."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmx.models.config import ModelConfig
from lmx.models.layers import apply_rope, dense_init, rope_inv_freq

NEG_INF = -1e30
SMALL_QUERY = 16  # cached calls with at most this many query rows per KV head (T·G) use decode_attention


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


def decode_attention(q_BTNH, k_BKSH, v_BKSH, mask_BTS, sm_scale: float):
    """Attention of a few query rows over a cache laid out [B, K, S, H]. As multiply-and-reduce (not dots)
    XLA:CPU reads the cache where it lies; the dot form copied a transposed cache every step."""
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    f32 = jnp.float32
    q_BKGTH = jnp.transpose(q_BTNH.reshape(B, T, K, N // K, H), (0, 2, 3, 1, 4)).astype(f32)
    s_BKGTS = jnp.sum(q_BKGTH[:, :, :, :, None] * k_BKSH[:, :, None, None].astype(f32), -1) * sm_scale
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, NEG_INF)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    o_BKGTH = jnp.sum(p_BKGTS[..., None] * v_BKSH[:, :, None, None].astype(f32), -2)
    return jnp.transpose(o_BKGTH, (0, 3, 1, 2, 4)).reshape(B, T, N, H).astype(q_BTNH.dtype)


def write_cache(cache_LBKSH, new_BTKH, layer, start_B):
    """Write each row's T new entries of one layer at slots start_B + t: a scatter that XLA performs in place
    when the cache is loop-carried or donated. Writes past the last slot are dropped (callers check room)."""
    B, T = new_BTKH.shape[:2]
    rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    slots_BT = start_B[:, None] + jnp.arange(T)[None, :]
    return cache_LBKSH.at[layer, rows_BT, :, slots_BT].set(new_BTKH.astype(cache_LBKSH.dtype), mode="drop",
                                                          unique_indices=True)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, slots_BT, cache=None, segment_ids_BT=None):
        """cache: None (teacher-forced) or (k_LBKSH, v_LBKSH, layer, lengths_B), the stacked KV cache of all
        attention layers and this layer's index. Returns y_BTD and the updated (k_LBKSH, v_LBKSH) or None."""
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
            o_BTNH = dot_attention(q_BTNH, k_BTKH, v_BTKH, mask, 1.0 / math.sqrt(H))
            new_cache = None
        else:  # write this call's entries in place, then attend over the layer's cache (slot <= query slot)
            k_LBKSH, v_LBKSH, layer, lengths_B = cache
            k_LBKSH = write_cache(k_LBKSH, k_BTKH, layer, lengths_B)
            v_LBKSH = write_cache(v_LBKSH, v_BTKH, layer, lengths_B)
            keys_BKSH, values_BKSH = k_LBKSH[layer].astype(dt), v_LBKSH[layer].astype(dt)
            B, T, S = x.shape[0], x.shape[1], keys_BKSH.shape[2]
            mask = attention_mask(slots_BT, jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)),
                                  window=a.sliding_window)
            if T * (N // K) <= SMALL_QUERY:
                o_BTNH = decode_attention(q_BTNH, keys_BKSH, values_BKSH, mask, 1.0 / math.sqrt(H))
            else:
                o_BTNH = dot_attention(q_BTNH, jnp.swapaxes(keys_BKSH, 1, 2), jnp.swapaxes(values_BKSH, 1, 2), mask,
                                       1.0 / math.sqrt(H))
            new_cache = (k_LBKSH, v_LBKSH)
        return jnp.einsum("BTNH,NHD->BTD", o_BTNH, wo.astype(dt)), new_cache
