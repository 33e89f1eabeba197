"""The decoder LM: embed -> scanned stack of pre-norm blocks -> final norm -> LM head.

Blocks: "attn" is attention + SwiGLU MLP; "ssm" is a Mamba-2 or Mamba-3 mixer alone (like HF Mamba2). The stack scans
over repetitions of the layer pattern's shortest repeating unit, so params of a pattern ("ssm", "ssm", "ssm",
"attn") * k live under layers/ssm_0, layers/ssm_1, layers/ssm_2, layers/attn_3 with a leading k axis. A
one-kind unit scans its block directly (params under layers/ with a leading L axis).
"""

from __future__ import annotations

import operator
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lmx.models.attention import Attention
from lmx.models.config import ModelConfig, repeating_unit
from lmx.models.layers import MLP, Embed, RMSNorm, dense_init
from lmx.models.mamba3 import Mamba3Mixer
from lmx.models.ssm import Mamba2Mixer
from lmx.models.state import DecodeState, KVCache, Mamba3Cache, SSMCache, commit_pending


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


def _norm(cfg: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name=name)


class AttnBlock(nn.Module):
    """Pre-norm attention + SwiGLU block. Blocks map (x_BTD, cache, ctx) -> (x_BTD, cache out)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, kv, ctx):
        positions_BT, slots_BT, segment_ids_BT, lengths_B = ctx
        cfg = self.cfg
        cache = None if kv is None else (kv[0], kv[1], lengths_B)
        y_BTD, new_kv = Attention(cfg, name="attn")(_norm(cfg, "attn_norm")(x_BTD), positions_BT, slots_BT, cache,
                                                     segment_ids_BT)
        x_BTD = x_BTD + y_BTD
        x_BTD = x_BTD + MLP(cfg, name="mlp")(_norm(cfg, "mlp_norm")(x_BTD))
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "seq", "embed"))
        return x_BTD, new_kv


class SSMBlock(nn.Module):
    """Pre-norm residual SSM mixer (no MLP), Mamba-2 or Mamba-3 by cfg.ssm.variant. cache: None or this layer's
    rings (SSMCache.rings / Mamba3Cache.rings)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, cache, ctx):
        _, _, segment_ids_BT, lengths_B = ctx
        h_BTD = _norm(self.cfg, "norm")(x_BTD)
        if self.cfg.ssm.variant == "mamba3":
            y_BTD, out = Mamba3Mixer.from_config(self.cfg, name="mixer").with_rings(h_BTD, cache, lengths_B,
                                                                                   segment_ids_BT)
        else:
            y_BTD, out = Mamba2Mixer(self.cfg, name="mixer")(h_BTD, cache, lengths_B, segment_ids_BT)
        x_BTD = nn.with_logical_constraint(x_BTD + y_BTD, ("batch", "seq", "embed"))
        return x_BTD, out


BLOCKS = {"attn": AttnBlock, "ssm": SSMBlock}


class Unit(nn.Module):
    """One repetition of a multi-block pattern unit. caches: kind -> that kind's caches for this unit, stacked
    on a leading axis (or None); returns the blocks' outputs stacked the same way."""

    cfg: ModelConfig
    kinds: tuple[str, ...]

    @nn.compact
    def __call__(self, x_BTD, caches, ctx):
        outs = {kind: [] for kind in caches}
        for i, kind in enumerate(self.kinds):
            cache = jax.tree.map(operator.itemgetter(len(outs[kind])), caches[kind])  # j-th block of its kind
            x_BTD, out = BLOCKS[kind](self.cfg, name=f"{kind}_{i}")(x_BTD, cache, ctx)
            outs[kind].append(out)
        return x_BTD, {kind: jax.tree.map(lambda *a: jnp.stack(a), *o) if o else None for kind, o in outs.items()}


def _ssm_state(state: DecodeState, out, T: int) -> SSMCache | Mamba3Cache:
    """After one token the rings hold the new step; after more, the call is recorded as pending (state.py)."""
    ssm = state.ssm
    if T > 1:
        return ssm.replace(pending=ssm.pending_class(state.lengths_B, *out))
    return type(ssm)(*out, floor_B=jnp.maximum(ssm.floor_B, state.lengths_B + 1 - ssm.rollback_window))


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
        if state is not None and state.ssm is not None:
            state = state.replace(ssm=commit_pending(state.ssm, state.lengths_B))  # fold the previous call
        caches = {"attn": None if state is None or state.kv is None else (state.kv.k_LBSKH, state.kv.v_LBSKH),
                  "ssm": None if state is None or state.ssm is None else state.ssm.rings}
        x_BTD, outs = self._stack(x_BTD, caches, (positions_BT, slots_BT, segment_ids_BT, offset_B))
        h_BTD = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name="final_norm")(x_BTD)

        if cfg.tie_embeddings:
            logits_BTV = embed.attend(h_BTD)
        else:
            w_DV = self.param("lm_head", dense_init(cfg.d_model, ("embed", "vocab")), (cfg.d_model, cfg.vocab_size),
                              jnp.dtype(cfg.param_dtype))
            logits_BTV = h_BTD @ w_DV.astype(jnp.dtype(cfg.dtype))
        new_state = None
        if state is not None:
            kv = None if state.kv is None else KVCache(*outs["attn"])
            ssm = None if state.ssm is None else _ssm_state(state, outs["ssm"], T)
            new_state = DecodeState(lengths_B=state.lengths_B + T, kv=kv, ssm=ssm)
        return LMOutput(logits_BTV.astype(jnp.float32), new_state, {"hidden_BTD": h_BTD})

    def _stack(self, x_BTD, caches, ctx):
        """Scan over repetitions of the pattern unit; caches and outputs are kind -> per-layer stacks."""
        cfg = self.cfg
        unit = repeating_unit(cfg.layer_pattern)
        reps = cfg.num_layers // len(unit)
        if len(unit) == 1:
            block = BLOCKS[unit[0]]
            xs, args = caches[unit[0]], (cfg,)
        else:
            block, args = Unit, (cfg, unit)
            xs = {k: jax.tree.map(lambda a: a.reshape(reps, -1, *a.shape[1:]), c) for k, c in caches.items()}
        stack = nn.scan(
            nn.remat(block, prevent_cse=False) if cfg.remat else block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=reps,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(*args, name="layers")
        x_BTD, ys = stack(x_BTD, xs, ctx)
        if len(unit) == 1:
            return x_BTD, {**dict.fromkeys(caches), unit[0]: ys}
        return x_BTD, {k: jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), y) for k, y in ys.items()}


def build(cfg: ModelConfig) -> nn.Module:
    """The one model factory; variants (early exit, ParScale, recursion) plug in here."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build expects a ModelConfig, got {type(cfg).__name__}")
    for name in ("exits", "parscale", "recursion"):
        if getattr(cfg, name) is not None:
            raise NotImplementedError(f"ModelConfig.{name} is not implemented yet")
    return LM(cfg)


def init_params(model: nn.Module, rng, seq_len: int = 8):
    """Unboxed parameter pytree (the logical-axis metadata is read separately by lmx.sharding)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    # One compiled program: far faster than running the initialisers op by op.
    return jax.jit(lambda r: nn.meta.unbox(model.init(r, tokens)["params"]))(rng)
