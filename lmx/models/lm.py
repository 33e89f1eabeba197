"""The decoder LM: embed -> scanned stack of pre-norm blocks -> final norm -> LM head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lmx.models.attention import Attention
from lmx.models.config import ModelConfig
from lmx.models.layers import MLP, Embed, RMSNorm, dense_init
from lmx.models.state import DecodeState, KVCache


@flax.struct.dataclass
class LMOutput:
    logits_BTV: jax.Array  # float32
    state: DecodeState | None
    aux: dict[str, Any]  # variants add entries (per-exit logits, ...); "hidden_BTD" is the final-normed stream


def check_tokens(tokens, vocab_size: int, what: str = "tokens"):
    """Raise a clear error for token ids outside [0, vocab_size) when the values are concrete."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)]
        raise ValueError(f"{what} contain ids {sorted(set(bad.tolist()))[:8]} outside the vocabulary [0, {vocab_size})")


class Layer(nn.Module):
    """One pre-norm attention + SwiGLU block; scanned over depth (the carry is the residual stream)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, kv, ctx):
        positions_BT, slots_BT, segment_ids_BT, lengths_B = ctx
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        norm = lambda name: RMSNorm(cfg.norm_eps, dt, jnp.dtype(cfg.param_dtype), name=name)
        cache = None if kv is None else (kv[0], kv[1], lengths_B)
        y_BTD, new_kv = Attention(cfg, name="attn")(norm("attn_norm")(x_BTD), positions_BT, slots_BT, cache,
                                                     segment_ids_BT)
        x_BTD = x_BTD + y_BTD
        x_BTD = x_BTD + MLP(cfg, name="mlp")(norm("mlp_norm")(x_BTD))
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "seq", "embed"))
        return x_BTD, new_kv


class LM(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, state: DecodeState | None = None, segment_ids_BT=None):
        cfg = self.cfg
        check_tokens(tokens_BT, cfg.vocab_size)
        B, T = tokens_BT.shape
        offset_B = jnp.zeros((B,), jnp.int32) if state is None else state.lengths_B
        slots_BT = offset_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        if positions_BT is None:
            positions_BT = slots_BT
        if state is not None and segment_ids_BT is not None:
            raise ValueError("segment_ids_BT (packed sequences) is for teacher-forced calls, not with a decode state")

        embed = Embed(cfg, name="embed")
        x_BTD = embed(tokens_BT)
        layer_cls = nn.remat(Layer, prevent_cse=False) if cfg.remat else Layer
        stack = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        kv_in = None if state is None else (state.kv.k_LBSKH, state.kv.v_LBSKH)
        x_BTD, kv_out = stack(x_BTD, kv_in, (positions_BT, slots_BT, segment_ids_BT, offset_B))
        h_BTD = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name="final_norm")(x_BTD)

        if cfg.tie_embeddings:
            logits_BTV = embed.attend(h_BTD)
        else:
            w_DV = self.param("lm_head", dense_init(cfg.d_model, ("embed", "vocab")), (cfg.d_model, cfg.vocab_size),
                              jnp.dtype(cfg.param_dtype))
            logits_BTV = h_BTD @ w_DV.astype(jnp.dtype(cfg.dtype))
        new_state = None
        if state is not None:
            new_state = DecodeState(lengths_B=state.lengths_B + T, kv=KVCache(*kv_out))
        return LMOutput(logits_BTV.astype(jnp.float32), new_state, {"hidden_BTD": h_BTD})


def build(cfg: ModelConfig) -> nn.Module:
    """The one model factory; variants (early exit, ParScale, recursion) plug in here."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build expects a ModelConfig, got {type(cfg).__name__}")
    for name in ("ssm", "exits", "parscale", "recursion"):
        if getattr(cfg, name) is not None:
            raise NotImplementedError(f"ModelConfig.{name} is not implemented yet")
    return LM(cfg)


def init_params(model: nn.Module, rng, seq_len: int = 8):
    """Unboxed parameter pytree (the logical-axis metadata is read separately by lmx.sharding)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    # One compiled program: far faster than running the initialisers op by op.
    return jax.jit(lambda r: nn.meta.unbox(model.init(r, tokens)["params"]))(rng)
