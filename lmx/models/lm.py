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
from lmx.models.state import (
    DecodeState,
    KVCache,
    Mamba3Cache,
    SSMCache,
    commit_pending,
    pending_from_layers,
    ssm_cache_from_layers,
)


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
    """Pre-norm attention + SwiGLU block. Blocks map (x_BTD, cache, ctx) -> (x_BTD, new cache): None without a
    decode state; else this layer's (k_BKHS, v_BKSH) KV cache, or (conv, ssm) rings for an SSM block."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, kv, ctx):
        positions_BT, slots_BT, segment_ids_BT, lengths_B = ctx
        cfg = self.cfg
        cache = None if kv is None else (*kv, lengths_B)
        y_BTD, kv = Attention(cfg, name="attn")(_norm(cfg, "attn_norm")(x_BTD), positions_BT, slots_BT, cache,
                                                 segment_ids_BT)
        x_BTD = x_BTD + y_BTD
        x_BTD = x_BTD + MLP(cfg, name="mlp")(_norm(cfg, "mlp_norm")(x_BTD))
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "seq", "embed"))
        return x_BTD, kv


class SSMBlock(nn.Module):
    """Pre-norm residual SSM mixer (no MLP), Mamba-2 or Mamba-3 by cfg.ssm.variant. cache: None or this layer's
    rings (one entry of SSMCache.rings / Mamba3Cache.rings)."""

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
    """One repetition of a multi-block pattern unit (blocks named {kind}_{i}), without decode state."""

    cfg: ModelConfig
    kinds: tuple[str, ...]

    @nn.compact
    def __call__(self, x_BTD, _, ctx):
        for i, kind in enumerate(self.kinds):
            x_BTD, _ = BLOCKS[kind](self.cfg, name=f"{kind}_{i}")(x_BTD, None, ctx)
        return x_BTD, None


def _ssm_state(state: DecodeState, outs, T: int) -> SSMCache | Mamba3Cache:
    """After one token the rings hold the new step; after more, the call is recorded as pending (state.py).
    outs: each SSM layer's output (its rings, or its pending record)."""
    ssm = state.ssm
    if T > 1:
        return ssm.replace(pending=pending_from_layers(ssm.pending_class, state.lengths_B, outs))
    return ssm_cache_from_layers(type(ssm), outs, jnp.maximum(ssm.floor_B, state.lengths_B + 1 - ssm.rollback_window))


class LM(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, state: DecodeState | None = None, segment_ids_BT=None,
                 logits_at_B=None):
        """logits_at_B: optional int [B], one index into T per row; only those positions' logits are computed
        (logits_BTV has T = 1). A prefill needs only each prompt's last position; the LM head over every
        position is a large share of its FLOPs (23% on benchmarks.ssm_decode's model: vocab 4096, d_model 256)."""
        cfg = self.cfg
        check_tokens(tokens_BT, cfg.vocab_size)
        B, T = tokens_BT.shape
        if logits_at_B is not None and not isinstance(logits_at_B, jax.core.Tracer):
            at = np.asarray(logits_at_B)
            if at.shape != (B,) or at.min() < 0 or at.max() >= T:
                raise ValueError(f"logits_at_B={at.tolist()} must hold one index in [0, {T}) per row ({B} rows)")
        offset_B = jnp.zeros((B,), jnp.int32) if state is None else state.lengths_B
        slots_BT = offset_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        if positions_BT is None:
            positions_BT = slots_BT
        if state is not None and segment_ids_BT is not None:
            raise ValueError("segment_ids_BT (packed sequences) is for teacher-forced calls, not with a decode state")
        if state is not None and state.kv is not None and not isinstance(state.lengths_B, jax.core.Tracer):
            longest = int(np.max(np.asarray(state.lengths_B)))  # KV writes past the cache would be undefined
            if longest + T > state.max_len:
                raise ValueError(f"a call of {T} tokens on a row of length {longest} needs {longest + T} cache "
                                 f"positions, but the decode state holds max_len={state.max_len}")

        embed = Embed(cfg, name="embed")
        x_BTD = embed(tokens_BT)
        if state is not None and state.ssm is not None:
            state = state.replace(ssm=commit_pending(state.ssm, state.lengths_B))  # fold the previous call
        ctx = (positions_BT, slots_BT, segment_ids_BT, offset_B)
        layers = None if self.is_initializing() else self.variables["params"].get("layers")
        if state is None and not isinstance(layers, tuple):
            x_BTD = self._stack(x_BTD, ctx)
        else:  # with a decode state (or params in decode layout): the layers unrolled, see unstack_layers
            if layers is None:  # initialising with a state: let the scan create the params first
                self._stack(x_BTD, ctx)
                layers = self.variables["params"]["layers"]
            x_BTD, kv, ssm_out = self._unrolled(unstack_layers({"layers": layers})["layers"], x_BTD, state, ctx)
        h_BTD = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name="final_norm")(x_BTD)
        head_BTD = h_BTD
        if logits_at_B is not None:
            at_B1 = jnp.asarray(logits_at_B, jnp.int32).reshape(B, 1)
            head_BTD = jnp.take_along_axis(h_BTD, at_B1[..., None], axis=1)

        if cfg.tie_embeddings:
            logits_BTV = embed.attend(head_BTD)
        else:
            w_DV = self.param("lm_head", dense_init(cfg.d_model, ("embed", "vocab")), (cfg.d_model, cfg.vocab_size),
                              jnp.dtype(cfg.param_dtype))
            logits_BTV = head_BTD @ w_DV.astype(jnp.dtype(cfg.dtype))
        new_state = None
        if state is not None:
            ssm = None if state.ssm is None else _ssm_state(state, ssm_out, T)
            new_state = DecodeState(lengths_B=state.lengths_B + T, kv=kv, ssm=ssm)
        return LMOutput(logits_BTV.astype(jnp.float32), new_state, {"hidden_BTD": h_BTD})

    def _stack(self, x_BTD, ctx):
        """Scan over repetitions of the pattern unit (no decode state: training, teacher-forced scoring)."""
        cfg = self.cfg
        unit = repeating_unit(cfg.layer_pattern)
        block, args = (BLOCKS[unit[0]], (cfg,)) if len(unit) == 1 else (Unit, (cfg, unit))
        stack = nn.scan(
            nn.remat(block, prevent_cse=False) if cfg.remat else block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=cfg.num_layers // len(unit),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(*args, name="layers")
        return stack(x_BTD, None, ctx)[0]

    def _unrolled(self, layers, x_BTD, state, ctx):
        """The same blocks in a Python loop over per-repetition param trees, with static layer indices: each
        layer's decode state (KV cache, SSM rings) is its own buffer, written in place and then read (no slicing
        of a stack, no restacking)."""
        unit = repeating_unit(self.cfg.layer_pattern)
        kv = None if state is None else state.kv
        ssm = None if state is None or state.ssm is None else state.ssm.rings
        ks, vs, ssm_outs = [], [], []
        for p in layers:
            for i, kind in enumerate(unit):
                block = BLOCKS[kind](self.cfg)
                params = {"params": p if len(unit) == 1 else p[f"{kind}_{i}"]}
                if kind == "attn":
                    cache = None if kv is None else (kv.k_BKHS[len(ks)], kv.v_BKSH[len(ks)])
                    x_BTD, out = block.apply(params, x_BTD, cache, ctx)
                    ks.append(None if out is None else out[0])
                    vs.append(None if out is None else out[1])
                else:
                    cache = None if ssm is None else ssm[len(ssm_outs)]
                    x_BTD, out = block.apply(params, x_BTD, cache, ctx)
                    ssm_outs.append(out)
        new_kv = None if kv is None else KVCache(tuple(ks), tuple(vs))
        return x_BTD, new_kv, None if ssm is None else tuple(ssm_outs)


def unstack_layers(params):
    """The decode layout of `params`: the stacked `params["layers"]` (leading axis = repetitions of the layer
    pattern's unit, for nn.scan) split into a tuple of per-repetition trees. `model.apply` accepts either
    layout with the same result. Inside a decode loop, XLA:CPU copies every layer's weights out of the stack
    at every step (profiled: 100 MB per step on the 58M decode benchmark); `generate` therefore splits once per
    call, before its prefill and loop. Costs one copy of the layer weights while the split params are alive; a
    caller that generates repeatedly can split once (`params = unstack_layers(params)`) and pass that, which
    generate uses as it is."""
    layers = params["layers"]
    if isinstance(layers, tuple):
        return params
    reps = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(operator.itemgetter(i), layers) for i in range(reps))}


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
