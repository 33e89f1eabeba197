"""Decode state: the per-layer caches that `model.apply` reads and returns, and pure helpers on them.

Layout. Cache slot s of row b holds the token at position s of that row (no left padding), so a row's
next write goes to slot `lengths_B[b]`. Right-padded prompts are prefilled whole and then `truncate`d to
their true lengths: the padding slots are simply overwritten by the next tokens.

Every decoding algorithm touches state only through `init_state`, `select`, `repeat` and `truncate`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from lmx.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    k_LBSKH: jax.Array
    v_LBSKH: jax.Array


@flax.struct.dataclass
class DecodeState:
    lengths_B: jax.Array  # int32: number of valid positions per row
    kv: KVCache | None = None  # attention layers, stacked in layer_pattern order

    @property
    def batch_size(self) -> int:
        return self.lengths_B.shape[0]

    @property
    def max_len(self) -> int:
        return self.kv.k_LBSKH.shape[2] if self.kv is not None else 0


def init_state(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> DecodeState:
    """Empty state for `batch` rows and caches of `max_len` positions."""
    if max_len <= 0 or batch <= 0:
        raise ValueError(f"init_state needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
    dtype = jnp.dtype(dtype or cfg.dtype)
    a = cfg.attention
    kv = None
    if cfg.num_attn_layers:
        shape = (cfg.num_attn_layers, batch, max_len, a.num_kv_heads, a.head_dim)
        kv = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return DecodeState(lengths_B=jnp.zeros((batch,), jnp.int32), kv=kv)


def _map_rows(state: DecodeState, fn_kv, fn_len) -> DecodeState:
    kv = state.kv
    if kv is not None:
        kv = KVCache(fn_kv(kv.k_LBSKH), fn_kv(kv.v_LBSKH))
    return DecodeState(lengths_B=fn_len(state.lengths_B), kv=kv)


def select(state: DecodeState, idx_B) -> DecodeState:
    """Gather rows: new row i is old row idx_B[i] (resampling, beam reordering)."""
    idx_B = jnp.asarray(idx_B, jnp.int32)
    return _map_rows(state, lambda x: jnp.take(x, idx_B, axis=1), lambda l: jnp.take(l, idx_B, axis=0))


def repeat(state: DecodeState, num_samples: int) -> DecodeState:
    """Each row repeated `num_samples` times consecutively: row b -> rows b*R .. b*R+R-1."""
    return _map_rows(
        state, lambda x: jnp.repeat(x, num_samples, axis=1), lambda l: jnp.repeat(l, num_samples, axis=0)
    )


def truncate(state: DecodeState, lengths_B) -> DecodeState:
    """Roll each row back to `lengths_B` positions (never forward). Stale KV slots past the length are
    masked by attention and overwritten by the next write, so only the lengths change."""
    lengths_B = jnp.minimum(jnp.asarray(lengths_B, jnp.int32), state.lengths_B)
    return state.replace(lengths_B=lengths_B)
