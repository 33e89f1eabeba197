"""The decoder LM: embed -> scanned stack of pre-norm blocks -> final norm -> LM head, and the same layer loop
in pieces for decoding (embed, run layers [a, b) with their states, head).

Blocks: "attn" is attention + SwiGLU MLP; "ssm" is a Mamba-2 or Mamba-3 mixer alone (like HF Mamba2). The stack scans
over repetitions of the layer pattern's shortest repeating unit, so params of a pattern ("ssm", "ssm", "ssm",
"attn") * k live under layers/ssm_0, layers/ssm_1, layers/ssm_2, layers/attn_3 with a leading k axis. A
one-kind unit scans its block directly (params under layers/ with a leading L axis).
"""

from __future__ import annotations

import importlib
import operator
import weakref
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lmx.models.attention import Attention, KVState
from lmx.models.config import ModelConfig, repeating_unit
from lmx.models.layers import MLP, Embed, RMSNorm, dense_init
from lmx.models.mamba3 import Mamba3LayerState, Mamba3Mixer
from lmx.models.quantize import matmul, weight
from lmx.models.ssm import Mamba2LayerState, Mamba2Mixer
from lmx.models.state import DecodeState


@flax.struct.dataclass
class LMOutput:
    logits_BTV: jax.Array  # float32
    state: DecodeState | None
    aux: dict[str, Any]  # variants add entries (per-exit logits, ...); "hidden_BTD" is the final-normed stream


@flax.struct.dataclass
class Ctx:
    """What every block sees besides its input and state: each token's RoPE position and cache slot, packed
    segment ids (teacher-forced only) and each row's length before the call."""

    positions_BT: jax.Array
    slots_BT: jax.Array
    lengths_B: jax.Array
    segment_ids_BT: jax.Array | None = None


def make_ctx(lengths_B, T: int, positions_BT=None, segment_ids_BT=None) -> Ctx:
    """The context of a call of T tokens on rows of `lengths_B` positions (positions default to the slots)."""
    slots_BT = lengths_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    return Ctx(slots_BT if positions_BT is None else positions_BT, slots_BT, lengths_B, segment_ids_BT)


def check_tokens(tokens, vocab_size: int, what: str = "tokens"):
    """Raise a clear error for token ids outside [0, vocab_size) when the values are concrete."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)]
        raise ValueError(f"{what} contain ids {sorted(set(bad.tolist()))[:8]} outside the vocabulary [0, {vocab_size})")


def _norm(cfg: ModelConfig, name: str | None = None) -> RMSNorm:
    return RMSNorm(cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name=name)


# Every block: (x_BTD, layer_state | None, ctx) -> (x_BTD, layer_state | None), and `state_class(cfg)` names the
# class of its layer state. With emit=True (teacher-forced only) a block returns its output in place of the None
# state, so the scanned stack stacks every layer's output (early exits read them).


class AttnBlock(nn.Module):
    """Pre-norm attention + SwiGLU block; its layer state is a KVState."""

    cfg: ModelConfig
    emit: bool = False

    @staticmethod
    def state_class(cfg: ModelConfig):
        return KVState

    @nn.compact
    def __call__(self, x_BTD, state: KVState | None, ctx: Ctx):
        cfg = self.cfg
        y_BTD, state = Attention(cfg, name="attn")(_norm(cfg, "attn_norm")(x_BTD), ctx.positions_BT, ctx.slots_BT,
                                                   state, ctx.lengths_B, ctx.segment_ids_BT)
        x_BTD = x_BTD + y_BTD
        x_BTD = x_BTD + MLP(cfg, name="mlp")(_norm(cfg, "mlp_norm")(x_BTD))
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "seq", "embed"))
        return x_BTD, (x_BTD if self.emit and state is None else state)


class SSMBlock(nn.Module):
    """Pre-norm residual SSM mixer (no MLP), Mamba-2 or Mamba-3 by cfg.ssm.variant."""

    cfg: ModelConfig
    emit: bool = False

    @staticmethod
    def state_class(cfg: ModelConfig):
        return Mamba3LayerState if cfg.ssm.variant == "mamba3" else Mamba2LayerState

    @nn.compact
    def __call__(self, x_BTD, state, ctx: Ctx):
        h_BTD = _norm(self.cfg, "norm")(x_BTD)
        if self.cfg.ssm.variant == "mamba3":
            y_BTD, state = Mamba3Mixer.from_config(self.cfg, name="mixer").with_rings(h_BTD, state, ctx.lengths_B,
                                                                                     ctx.segment_ids_BT)
        else:
            y_BTD, state = Mamba2Mixer(self.cfg, name="mixer")(h_BTD, state, ctx.lengths_B, ctx.segment_ids_BT)
        x_BTD = nn.with_logical_constraint(x_BTD + y_BTD, ("batch", "seq", "embed"))
        return x_BTD, (x_BTD if self.emit and state is None else state)


BLOCKS = {"attn": AttnBlock, "ssm": SSMBlock}


def layer_state_classes(cfg: ModelConfig) -> tuple[type, ...]:
    """The class of each layer's decode state, in layer_pattern order (a variant module may define its own)."""
    variant = variant_module(cfg)
    if variant is not None and hasattr(variant, "layer_state_classes"):
        return variant.layer_state_classes(cfg)
    return tuple(BLOCKS[kind].state_class(cfg) for kind in cfg.layer_pattern)


# The variants (ModelConfig fields) and the module that builds each. A variant module defines build(cfg) -> a
# module whose apply has LM's signature and returns an LMOutput; the decoding loops reach it through the pieces'
# hooks below: `model.decode_forward(params, tokens_BT, state, **forward's keywords)` for `forward`,
# `model.split_params(params)` for `decode_params`, and the module's `layer_state_classes(cfg)` for `init_state`.
# Each hook is optional: without it the base LM's piece runs. Every decode-state leaf keeps the batch (one row per
# sample) on axis 0, so `select` / `repeat` / `truncate` stay generic. Early-exit decoding asks the module's
# `decode_exits(cfg) -> ExitConfig | None` (`decode_exits` below) where a token may stop: after which layers, with
# which norm before the shared head (the exits variant: its own exits; the recursive model: its loop boundaries).
VARIANTS = {"exits": "lmx.models.early_exit", "parscale": "lmx.models.parscale", "recursion": "lmx.models.recursive"}


def variant_module(cfg: ModelConfig):
    """The module of the one variant cfg turns on (None: the base LM)."""
    on = [name for name in VARIANTS if getattr(cfg, name) is not None]
    if len(on) > 1:
        raise NotImplementedError(f"ModelConfig turns on {on}; combining variants is not supported")
    if not on:
        return None
    try:
        return importlib.import_module(VARIANTS[on[0]])
    except ModuleNotFoundError as e:
        if e.name != VARIANTS[on[0]]:
            raise
        raise NotImplementedError(f"ModelConfig.{on[0]} is not implemented yet") from None


def _kept(keep_B, y_BTD, x_BTD):
    """Layer dropout: the block's output on the rows that keep it, its input (no residual update) on the others."""
    return y_BTD if keep_B is None else jnp.where(keep_B[:, None, None], y_BTD, x_BTD)


def decode_exits(cfg: ModelConfig):
    """The exits early-exit decoding may stop at (an lmx.models.early_exit.ExitConfig), from cfg's variant module's
    `decode_exits(cfg)` hook; None: the model has none."""
    variant = variant_module(cfg)
    hook = None if variant is None else getattr(variant, "decode_exits", None)
    return None if hook is None else hook(cfg)


class Unit(nn.Module):
    """One repetition of a multi-block pattern unit (blocks named {kind}_{i}), without decode state. Its scanned
    input is None or each row's keep flag per block, bool [B, K] (layer dropout)."""

    cfg: ModelConfig
    kinds: tuple[str, ...]
    emit: bool = False

    @nn.compact
    def __call__(self, x_BTD, keep_BK, ctx):
        for i, kind in enumerate(self.kinds):
            y_BTD, _ = BLOCKS[kind](self.cfg, name=f"{kind}_{i}")(x_BTD, None, ctx)
            x_BTD = _kept(None if keep_BK is None else keep_BK[:, i], y_BTD, x_BTD)
        return x_BTD, (x_BTD if self.emit else None)


class LayerDropped(nn.Module):
    """A one-block unit whose scanned input is None or each row's keep flag, bool [B, 1] (layer dropout). It
    shares its scope with the block, so the params are the block's own (layers/... as without dropout)."""

    cfg: ModelConfig
    kind: str
    emit: bool = False

    def setup(self):
        self.block = BLOCKS[self.kind](self.cfg)
        nn.share_scope(self, self.block)

    def __call__(self, x_BTD, keep_B1, ctx):
        x_BTD = _kept(None if keep_B1 is None else keep_B1[:, 0], self.block(x_BTD, None, ctx)[0], x_BTD)
        return x_BTD, (x_BTD if self.emit else None)


class LM(nn.Module):
    """model.apply({"params": params}, tokens_BT, positions_BT=None, state=None, segment_ids_BT=None,
    logits_at_B=None, embeds_BTD=None, use_embeds_BT=None) -> LMOutput. Without a state the layers run as one
    nn.scan over the stacked params (training, teacher-forced scoring); with one, through the layer-loop pieces
    below (`forward`)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, state: DecodeState | None = None, segment_ids_BT=None,
                 logits_at_B=None, embeds_BTD=None, use_embeds_BT=None):
        """logits_at_B: optional int [B], one index into T per row; only those positions' logits are computed
        (logits_BTV has T = 1): a prefill needs only each prompt's last position. An int [B, K] computes K
        positions per row (logits_BTV has T = K): RL scores only the completion positions.
        embeds_BTD / use_embeds_BT: input embeddings that replace the tokens' at the positions the bool mask marks
        (every position when the mask is None); the token ids there are ignored (they must still be valid ids).
        Latent reasoning (soft tokens, lmx.decoding.latent) feeds its mixtures of embeddings this way."""
        cfg = self.cfg
        if state is not None and segment_ids_BT is not None:
            raise ValueError("segment_ids_BT (packed sequences) is for teacher-forced calls, not with a decode state")
        if state is not None and not self.is_initializing():
            # The same maths as the scan below, layer by layer on this call's slices of the stack (a copy on
            # XLA:CPU); decoding loops split the params once instead (decode_params).
            return forward(self, _split(self.cfg, self.variables["params"]), tokens_BT, state,
                           positions_BT=positions_BT, logits_at_B=logits_at_B, embeds_BTD=embeds_BTD,
                           use_embeds_BT=use_embeds_BT)
        check_tokens(tokens_BT, cfg.vocab_size)
        B, T = tokens_BT.shape
        _check_logits_at(logits_at_B, B, T)
        embed = Embed(cfg, name="embed")
        x_BTD = _with_embeds(embed(tokens_BT), embeds_BTD, use_embeds_BT)
        ctx = make_ctx(jnp.zeros((B,), jnp.int32), T, positions_BT, segment_ids_BT)
        unit = repeating_unit(cfg.layer_pattern)
        emit = cfg.exits is not None  # the stack also returns each unit's output, for the exit heads
        block, args = (BLOCKS[unit[0]], (cfg, emit)) if len(unit) == 1 else (Unit, (cfg, unit, emit))
        # LayerSkip's layer dropout (ExitConfig.layer_dropout, in training calls given a "dropout" rng): the scan's
        # per-layer input is each row's keep flag, drawn from the depth schedule; otherwise it is None.
        keep_UBK = None
        if emit and cfg.exits.layer_dropout > 0:
            from lmx.models.early_exit import layer_keep

            if len(unit) == 1:
                block, args = LayerDropped, (cfg, unit[0], emit)
            if self.has_rng("dropout") and not self.is_initializing():
                keep_UBK = layer_keep(cfg, self.make_rng("dropout"), B)
        stack = nn.scan(
            nn.remat(block, prevent_cse=False) if cfg.remat else block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=cfg.num_layers // len(unit),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(*args, name="layers")
        x_BTD, layer_outputs = stack(x_BTD, keep_UBK, ctx)
        final_norm = _norm(cfg, "final_norm")
        h_BTD = final_norm(x_BTD)
        if cfg.tie_embeddings:
            project = embed.attend
        else:
            w_DV = weight(self, "lm_head", dense_init(cfg.d_model, ("embed", "vocab")), (cfg.d_model, cfg.vocab_size),
                          jnp.dtype(cfg.param_dtype))
            project = lambda h: matmul(h, w_DV, jnp.dtype(cfg.dtype))  # noqa: E731
        logits_BTV = project(_rows_at(h_BTD, logits_at_B))
        aux = {"hidden_BTD": h_BTD}
        if keep_UBK is not None:
            aux["layer_keep_LB"] = jnp.moveaxis(keep_UBK, 2, 1).reshape(cfg.num_layers, B)  # which rows ran layer l
        if emit:
            from lmx.models.early_exit import exit_heads

            aux |= exit_heads(cfg, layer_outputs, final_norm, lambda h: project(_rows_at(h, logits_at_B)),
                              segment_ids_BT)
        if state is not None:  # initialising with a state: the params exist now
            return forward(self, _split(cfg, self.variables["params"]), tokens_BT, state, positions_BT=positions_BT,
                           logits_at_B=logits_at_B, embeds_BTD=embeds_BTD, use_embeds_BT=use_embeds_BT)
        return LMOutput(logits_BTV.astype(jnp.float32), None, aux)


def _check_logits_at(logits_at_B, B: int, T: int):
    if logits_at_B is not None and not isinstance(logits_at_B, jax.core.Tracer):
        at = np.asarray(logits_at_B)
        if at.ndim not in (1, 2) or at.shape[0] != B or at.size == 0 or at.min() < 0 or at.max() >= T:
            raise ValueError(f"logits_at_B={at.tolist()} must hold indices in [0, {T}), one ([B]) or K ([B, K]) "
                             f"per row ({B} rows)")


def _with_embeds(x_BTD, embeds_BTD, use_embeds_BT):
    """x_BTD with embeds_BTD at the positions use_embeds_BT marks (all when it is None); x_BTD itself, untouched,
    when no embeddings are given (so token-only calls stay bit-identical)."""
    if embeds_BTD is None:
        if use_embeds_BT is not None:
            raise ValueError("use_embeds_BT was given without embeds_BTD")
        return x_BTD
    if tuple(embeds_BTD.shape) != tuple(x_BTD.shape):
        raise ValueError(f"embeds_BTD has shape {tuple(embeds_BTD.shape)}, expected {tuple(x_BTD.shape)} "
                         f"(the tokens' [B, T] and d_model)")
    embeds_BTD = jnp.asarray(embeds_BTD).astype(x_BTD.dtype)
    if use_embeds_BT is None:
        return embeds_BTD
    if tuple(use_embeds_BT.shape) != tuple(x_BTD.shape[:2]):
        raise ValueError(f"use_embeds_BT has shape {tuple(use_embeds_BT.shape)}, expected the tokens' "
                         f"{tuple(x_BTD.shape[:2])}")
    if jnp.asarray(use_embeds_BT).dtype != jnp.bool_:
        raise ValueError(f"use_embeds_BT must be a bool mask, got dtype {jnp.asarray(use_embeds_BT).dtype}")
    return jnp.where(use_embeds_BT[..., None], embeds_BTD, x_BTD)


def _rows_at(h_BTD, logits_at_B):
    if logits_at_B is None:
        return h_BTD
    at = jnp.asarray(logits_at_B, jnp.int32)
    at_BK1 = at.reshape(at.shape[0], -1, 1)
    return jnp.take_along_axis(h_BTD, at_BK1, axis=1)


# ------------------------------------------------------------------------------------------------------------
# The layer loop in pieces: embed; run layers [a, b) with their states; final norm + LM head. They take the
# params split per layer (DecodeParams), which decoding loops make once per params object (decode_params).


@flax.struct.dataclass
class DecodeParams:
    """A params tree split for decoding: `layers[l]` is layer l's param tree, sliced out of the stack (so a decode
    step reads each layer's weights where they lie, instead of slicing the stack at every step, which XLA:CPU
    does by copying); `rest` holds the embedding, final norm and head."""

    rest: dict
    layers: tuple


def _split(cfg: ModelConfig, params) -> DecodeParams:
    unit = repeating_unit(cfg.layer_pattern)
    stacked = params["layers"]
    layers = []
    for l, kind in enumerate(cfg.layer_pattern):
        tree = stacked if len(unit) == 1 else stacked[f"{kind}_{l % len(unit)}"]
        layers.append(jax.tree.map(operator.itemgetter(l // len(unit)), tree))
    return DecodeParams({k: v for k, v in params.items() if k != "layers"}, tuple(layers))


def _split_for(model: nn.Module, params):
    hook = getattr(model, "split_params", None)
    return hook(params) if hook is not None else _split(model.cfg, params)


_SPLITS: dict = {}  # id of every leaf -> (weak references to the leaves, DecodeParams)
_MAX_SPLITS = 4


def decode_params(model: nn.Module, params) -> DecodeParams:
    """`params` split per layer for the layer-loop pieces: once per params object (cached on the identity of its
    arrays while they are alive; at most _MAX_SPLITS are kept), so a loop that calls `generate` repeatedly on the
    same params pays the copy once. A DecodeParams is returned as it is; under a trace the split is part of the
    traced program."""
    if isinstance(params, DecodeParams):
        return params
    leaves = jax.tree.leaves(params)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return _split_for(model, params)
    key = (model.cfg, tuple(map(id, leaves)))
    hit = _SPLITS.get(key)
    if hit is not None and all(ref() is x for ref, x in zip(hit[0], leaves, strict=True)):
        return hit[1]
    for k in [k for k, (refs, _) in _SPLITS.items() if any(ref() is None for ref in refs)]:
        del _SPLITS[k]  # entries of params that no longer exist
    split = _split_for(model, params)
    try:
        refs = [weakref.ref(x) for x in leaves]
    except TypeError:  # leaves that cannot be weakly referenced (Python scalars): not cached
        return split
    while len(_SPLITS) >= _MAX_SPLITS:
        del _SPLITS[next(iter(_SPLITS))]
    _SPLITS[key] = (refs, split)
    return split


def embed(model: nn.Module, params: DecodeParams, tokens_BT, embeds_BTD=None, use_embeds_BT=None):
    """Token embeddings x_BTD; given embeds_BTD replace them where use_embeds_BT marks (as in LM.__call__)."""
    x_BTD = Embed(model.cfg).apply({"params": params.rest["embed"]}, tokens_BT)
    return _with_embeds(x_BTD, embeds_BTD, use_embeds_BT)


def run_layers(model: nn.Module, params: DecodeParams, x_BTD, states, ctx: Ctx, start: int = 0,
               stop: int | None = None):
    """Layers [start, stop) on x_BTD: `states` holds those layers' states (None: teacher-forced). Returns
    (x_BTD, their new states, or None)."""
    cfg = model.cfg
    stop = cfg.num_layers if stop is None else stop
    if not 0 <= start <= stop <= cfg.num_layers:
        raise ValueError(f"run_layers: layers [{start}, {stop}) outside the model's {cfg.num_layers} layers")
    if states is not None and len(states) != stop - start:
        raise ValueError(f"run_layers: {len(states)} layer states for layers [{start}, {stop})")
    new = []
    for l in range(start, stop):
        block = BLOCKS[cfg.layer_pattern[l]](cfg)
        x_BTD, out = block.apply({"params": params.layers[l]}, x_BTD, None if states is None else states[l - start],
                                 ctx)
        new.append(out)
    return x_BTD, None if states is None else tuple(new)


def head(model: nn.Module, params: DecodeParams, x_BTD, logits_at_B=None, norm: str = "final_norm"):
    """Final norm + LM head: (logits_BTV float32, the final-normed h_BTD). logits_at_B as in LM.__call__; norm:
    the params of another norm to use (an early exit's own)."""
    cfg = model.cfg
    h_BTD = _norm(cfg).apply({"params": params.rest[norm]}, x_BTD)
    head_BTD = _rows_at(h_BTD, logits_at_B)
    if cfg.tie_embeddings:
        logits_BTV = Embed(cfg).apply({"params": params.rest["embed"]}, head_BTD, method=Embed.attend)
    else:
        logits_BTV = matmul(head_BTD, params.rest["lm_head"], jnp.dtype(cfg.dtype))
    return logits_BTV.astype(jnp.float32), h_BTD


def check_room(state: DecodeState, T: int):
    """Outside jit, refuse a call of T tokens that would write past max_len (inside jit: clamped and reported)."""
    if not isinstance(state.lengths_B, jax.core.Tracer):
        longest = int(np.max(np.asarray(state.lengths_B)))
        if longest + T > state.max_len:
            raise ValueError(f"a call of {T} tokens on a row of length {longest} needs {longest + T} cache "
                             f"positions, but the decode state holds max_len={state.max_len}")


def advance(state: DecodeState, layers: tuple, T: int) -> DecodeState:
    """The state after a call of T tokens that left `layers`: lengths + T, rows that ran out of room flagged."""
    return state.replace(lengths_B=state.lengths_B + T, layers=layers,
                         overflow_B=state.overflow_B | (state.lengths_B + T > state.max_len))


def forward(model: nn.Module, params: DecodeParams, tokens_BT, state: DecodeState, *, positions_BT=None,
            logits_at_B=None, embeds_BTD=None, use_embeds_BT=None) -> LMOutput:
    """embed -> every layer with its state -> head: what model.apply computes with a state, on split params (a
    variant's own `decode_forward` when it has one)."""
    hook = getattr(model, "decode_forward", None)
    if hook is not None:
        return hook(params, tokens_BT, state, positions_BT=positions_BT, logits_at_B=logits_at_B,
                    embeds_BTD=embeds_BTD, use_embeds_BT=use_embeds_BT)
    check_tokens(tokens_BT, model.cfg.vocab_size)
    B, T = tokens_BT.shape
    _check_logits_at(logits_at_B, B, T)
    check_room(state, T)
    x_BTD = embed(model, params, tokens_BT, embeds_BTD, use_embeds_BT)
    x_BTD, layers = run_layers(model, params, x_BTD, state.layers, make_ctx(state.lengths_B, T, positions_BT))
    logits_BTV, h_BTD = head(model, params, x_BTD, logits_at_B)
    return LMOutput(logits_BTV, advance(state, layers, T), {"hidden_BTD": h_BTD})


def build(cfg: ModelConfig) -> nn.Module:
    """The one model factory; variants (early exit, ParScale, recursion) plug in here (VARIANTS)."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build expects a ModelConfig, got {type(cfg).__name__}")
    variant = variant_module(cfg)
    return LM(cfg) if variant is None else variant.build(cfg)


def init_params(model: nn.Module, rng, seq_len: int = 8):
    """Unboxed parameter pytree (the logical-axis metadata is read separately by lmx.sharding)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    # One compiled program: far faster than running the initialisers op by op.
    return jax.jit(lambda r: nn.meta.unbox(model.init(r, tokens)["params"]))(rng)
