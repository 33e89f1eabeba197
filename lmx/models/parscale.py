"""ParScale (arXiv 2505.10475, QwenLM/ParScale): P parallel streams of each input through the same weights.

Stream p sees its own learnable prefix K/V in every attention layer ([P, K, n_prefix, H] per layer; like the
reference, the prefix keys are not rotated by RoPE and every position sees them), the B·P stream rows run through
the base blocks as one batch, and after the final norm a learned softmax mixes the streams per token:
    w_BTP = softmax(Linear(P·D→D) → SiLU → Linear(D→P)) of the concatenated stream states,
    w ← w(1−ε) + ε/P,    h_BTD = Σ_p w_p h_p  → LM head.
P = 1 is exactly the base model (the reference adds the prefix and the aggregation only for P > 1): `build` then
returns `LM` itself.

Params: the base layout as it is (embed, layers, final_norm, lm_head: `load_hf` weights fit) plus one subtree
"parscale" (`ParScaleParams`): prefix_k / prefix_v [L, P, K, n, H], agg_in [D·P, D] (input index d·P + p, the
reference's "(h n)" concatenation, so its aggregate_layer weights map over transposed), agg_in_bias [D],
agg_out [D, P], agg_out_bias [P]. Post-training a pretrained base (the paper's cheap mode): `add_parscale_params`
then an optimizer wrapped in `parscale_only`, which trains the "parscale" subtree alone.

Prefix slots. Attention's cached path does the prefix: in a buffer of n + S slots, slots [0, n) hold the prefix
and position s goes to slot n + s, so causal masking over slots lets every position see the whole prefix while
RoPE still uses the token positions. Teacher-forced calls run it on a fresh buffer of n + T slots; decoding keeps
each layer's buffers for a sample's P streams together in a `StreamsKVState` (leaves [B, P, ...]: the batch on
axis 0, so select / repeat / truncate stay generic). Stream rows are ordered b·P + p.

Not supported with P > 1: SSM layers and sliding-window attention (its window would slide over the prefix slots).
Packed sequences (segment_ids_BT, teacher-forced): each segment sees its stream's prefix and its own tokens
(attention's segment mask for a cached call, `own_keys_segment_mask`), as if it ran alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from lmx.models.attention import KVState
from lmx.models.config import ModelConfig
from lmx.models.layers import Embed, dense_init
from lmx.models.lm import (
    BLOCKS,
    LM,
    AttnBlock,
    Ctx,
    DecodeParams,
    LMOutput,
    _check_logits_at,
    _norm,
    _rows_at,
    _split,
    _with_embeds,
    advance,
    check_room,
    check_tokens,
    embed,
    init_params,
    make_ctx,
    run_layers,
)

PREFIX_INIT_STD = 0.02  # the reference's initializer_range: small prefixes barely move a pretrained base at first


@dataclass(frozen=True)
class ParScaleConfig:
    """P: parallel streams (1 = the base model); n_prefix: prefix K/V slots per stream and layer; eps: the
    smoothing ε of the aggregation weights, w(1−ε) + ε/P (keeps every stream in use)."""

    P: int
    n_prefix: int = 48
    eps: float = 0.01

    def __post_init__(self):
        for name, low in (("P", 1), ("n_prefix", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"parscale.{name}={value!r} must be an int >= {low}")
        ok = not isinstance(self.eps, bool) and isinstance(self.eps, (int, float)) and 0 <= self.eps < 1
        if not ok:
            raise ValueError(f"parscale.eps={self.eps!r} must be a float in [0, 1)")


def check_model_config(cfg: ModelConfig):
    """Refuse what ParScale does not support (see the module docstring), naming the offending value."""
    ps = cfg.parscale
    if not isinstance(ps, ParScaleConfig):
        raise TypeError(f"ModelConfig.parscale must be a ParScaleConfig, got {ps!r}")
    if ps.P == 1:
        return
    ssm = [i for i, kind in enumerate(cfg.layer_pattern) if kind != "attn"]
    if ssm:
        raise ValueError(f"ParScale with P={ps.P} supports attention layers only, but layer_pattern="
                         f"{cfg.layer_pattern} has 'ssm' layers at {ssm}")
    if cfg.attention.sliding_window is not None:
        raise ValueError(f"ParScale with P={ps.P} does not support attention.sliding_window="
                         f"{cfg.attention.sliding_window} (the window would slide over the prefix)")


def build(cfg: ModelConfig) -> nn.Module:
    check_model_config(cfg)
    return LM(cfg) if cfg.parscale.P == 1 else ParScaleLM(cfg)


def layer_state_classes(cfg: ModelConfig) -> tuple[type, ...]:
    check_model_config(cfg)
    if cfg.parscale.P == 1:
        return tuple(BLOCKS[kind].state_class(cfg) for kind in cfg.layer_pattern)
    return (StreamsKVState,) * cfg.num_layers


# ------------------------------------------------------------------------------------------------ pieces


def _rows(a):
    """[B, P, ...] -> [B·P, ...] (row b·P + p)."""
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _streams(a, P: int):
    """[B·P, ...] -> [B, P, ...]."""
    return a.reshape(a.shape[0] // P, P, *a.shape[1:])


def _stream_ctx(lengths_B, T: int, positions_BT, P: int, n: int, segment_ids_BT=None) -> Ctx:
    """The Ctx of the B·P stream rows: each sample's RoPE positions and segments; cache slots and lengths shifted
    past the n prefix slots."""
    ctx = make_ctx(lengths_B, T, positions_BT)
    rep = lambda a: None if a is None else jnp.repeat(a, P, axis=0)
    return Ctx(rep(ctx.positions_BT), rep(ctx.slots_BT) + n, rep(ctx.lengths_B) + n, rep(segment_ids_BT))


@flax.struct.dataclass
class StreamsKVState:
    """One attention layer's KV buffers for each sample's P streams: keys [B, P, K, H, n + max_len], values
    [B, P, K, n + max_len, H] (KVState's layouts with a stream axis). Slots [0, n) hold the stream's prefix and
    slot n + s position s. The state is made without params, so every call (re)writes the prefix: n·K·H entries
    per stream, little next to the attention read over the cache."""

    k_BPKHS: jax.Array
    v_BPKSH: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype, rollback_window: int | None = None):
        P, n, a = cfg.parscale.P, cfg.parscale.n_prefix, cfg.attention
        K, H, S = a.num_kv_heads, a.head_dim, n + max_len
        return cls(jnp.zeros((batch, P, K, H, S), dtype), jnp.zeros((batch, P, K, S, H), dtype))

    def commit(self, lengths_B) -> StreamsKVState:
        return self

    def rollback(self, lengths_B) -> StreamsKVState:
        return self  # as KVState: slots past a row's length are masked and overwritten, lengths alone roll back

    def rows(self, prefix_k_PKSH, prefix_v_PKSH) -> KVState:
        """A KVState of the B·P stream rows with the prefix written in slots [0, n)."""
        B, P, K, H, _ = self.k_BPKHS.shape
        n = prefix_k_PKSH.shape[2]
        k_BPKHS = jax.lax.dynamic_update_slice(self.k_BPKHS, jnp.broadcast_to(
            jnp.swapaxes(prefix_k_PKSH, 2, 3), (B, P, K, H, n)).astype(self.k_BPKHS.dtype), (0,) * 5)
        v_BPKSH = jax.lax.dynamic_update_slice(self.v_BPKSH, jnp.broadcast_to(
            prefix_v_PKSH, (B, P, K, n, H)).astype(self.v_BPKSH.dtype), (0,) * 5)
        return KVState(_rows(k_BPKHS), _rows(v_BPKSH))

    @classmethod
    def from_rows(cls, kv: KVState, P: int) -> StreamsKVState:
        return cls(_streams(kv.k_BKHS, P), _streams(kv.v_BKSH, P))


def aggregate(p: dict, h_BPTD, eps: float, dtype):
    """(h_BTD, w_BTP): the streams' final-normed states mixed per token by the smoothed softmax weights, from the
    "parscale" params p. The weights and the weighted sum are float32, as in the reference."""
    B, P, T, D = h_BPTD.shape
    dt = jnp.dtype(dtype)
    concat = jnp.transpose(h_BPTD, (0, 2, 3, 1)).reshape(B, T, D * P).astype(dt)  # [B, T, D·P], index d·P + p
    z_BTD = nn.silu(concat @ p["agg_in"].astype(dt) + p["agg_in_bias"].astype(dt))
    s_BTP = z_BTD @ p["agg_out"].astype(dt) + p["agg_out_bias"].astype(dt)
    w_BTP = jax.nn.softmax(s_BTP.astype(jnp.float32), axis=-1) * (1 - eps) + eps / P
    h_BTD = jnp.einsum("BTP,BPTD->BTD", w_BTP, h_BPTD.astype(jnp.float32))
    return h_BTD.astype(h_BPTD.dtype), w_BTP


class ParScaleParams(nn.Module):
    """The params ParScale adds to the base model: the "parscale" subtree (see the module docstring)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self) -> dict:
        cfg, a = self.cfg, self.cfg.attention
        L, P, n, D = cfg.num_layers, cfg.parscale.P, cfg.parscale.n_prefix, cfg.d_model
        pd = jnp.dtype(cfg.param_dtype)
        prefix = nn.with_logical_partitioning(nn.initializers.normal(PREFIX_INIT_STD),
                                              ("layers", None, "kv_heads", None, "head_dim"))
        zeros = lambda axis: nn.with_logical_partitioning(nn.initializers.zeros, (axis,))
        shape = (L, P, a.num_kv_heads, n, a.head_dim)
        return {
            "prefix_k": self.param("prefix_k", prefix, shape, pd),
            "prefix_v": self.param("prefix_v", prefix, shape, pd),
            "agg_in": self.param("agg_in", dense_init(P * D, (None, "embed")), (P * D, D), pd),
            "agg_in_bias": self.param("agg_in_bias", zeros("embed"), (D,), pd),
            "agg_out": self.param("agg_out", dense_init(D, ("embed", None)), (D, P), pd),
            "agg_out_bias": self.param("agg_out_bias", zeros(None), (P,), pd),
        }


class _PrefixedBlock(AttnBlock):
    """AttnBlock (the same params) in the teacher-forced scan: its attention runs the cached path on a fresh
    buffer that holds this layer's prefix, the code decoding runs. x: the [B·P, T, D] stream rows."""

    @nn.compact
    def __call__(self, x, prefix, ctx: Ctx):
        P = self.cfg.parscale.P
        empty = StreamsKVState.init(self.cfg, x.shape[0] // P, x.shape[1], jnp.dtype(self.cfg.dtype))
        x, _ = super().__call__(x, empty.rows(*prefix), ctx)
        return x, None


class ParScaleLM(nn.Module):
    """ParScale with P >= 2 streams. apply has LM's signature and returns an LMOutput whose aux adds
    "stream_hidden_BPTD" (each stream's final-normed state) and "stream_weights_BTP" (the aggregation weights).
    Without a state the layers run as one nn.scan; with one, through `decode_forward` on split params."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, state=None, segment_ids_BT=None, logits_at_B=None,
                 embeds_BTD=None, use_embeds_BT=None):
        cfg = self.cfg
        P, n = cfg.parscale.P, cfg.parscale.n_prefix
        if state is not None and segment_ids_BT is not None:
            raise ValueError("segment_ids_BT (packed sequences) is for teacher-forced calls, not with a decode state")
        kw = dict(positions_BT=positions_BT, logits_at_B=logits_at_B, embeds_BTD=embeds_BTD,
                  use_embeds_BT=use_embeds_BT)
        if state is not None and not self.is_initializing():
            return self.decode_forward(self._own_split(), tokens_BT, state, **kw)
        check_tokens(tokens_BT, cfg.vocab_size)
        B, T = tokens_BT.shape
        _check_logits_at(logits_at_B, B, T)
        emb = Embed(cfg, name="embed")
        x_BTD = _with_embeds(emb(tokens_BT), embeds_BTD, use_embeds_BT)
        extra = ParScaleParams(cfg, name="parscale")()
        stack = nn.scan(
            nn.remat(_PrefixedBlock, prevent_cse=False) if cfg.remat else _PrefixedBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        x_BPTD = jnp.broadcast_to(x_BTD[:, None], (B, P, T, cfg.d_model))  # the input copied to every stream
        x = stack(_rows(x_BPTD), (extra["prefix_k"], extra["prefix_v"]),
                  _stream_ctx(jnp.zeros((B,), jnp.int32), T, positions_BT, P, n, segment_ids_BT))[0]
        h_BPTD = _streams(_norm(cfg, "final_norm")(x), P)
        h_BTD, w_BTP = aggregate(extra, h_BPTD, cfg.parscale.eps, cfg.dtype)
        head_BTD = _rows_at(h_BTD, logits_at_B)
        if cfg.tie_embeddings:
            logits_BTV = emb.attend(head_BTD)
        else:
            w_DV = self.param("lm_head", dense_init(cfg.d_model, ("embed", "vocab")), (cfg.d_model, cfg.vocab_size),
                              jnp.dtype(cfg.param_dtype))
            logits_BTV = head_BTD @ w_DV.astype(jnp.dtype(cfg.dtype))
        if state is not None:  # initialising with a state: the params exist now
            return self.decode_forward(self._own_split(), tokens_BT, state, **kw)
        return LMOutput(logits_BTV.astype(jnp.float32), None,
                        {"hidden_BTD": h_BTD, "stream_hidden_BPTD": h_BPTD, "stream_weights_BTP": w_BTP})

    def _own_split(self) -> DecodeParams:
        return self.split_params(nn.meta.unbox(self.variables["params"]))  # boxed while initialising

    @nn.nowrap
    def split_params(self, params) -> DecodeParams:
        """The base split (lmx.models.lm.decode_params) with the prefixes split per layer too."""
        split = _split(self.cfg, {k: v for k, v in params.items() if k != "parscale"})
        extra = dict(params["parscale"])
        for name in ("prefix_k", "prefix_v"):
            extra[name] = tuple(extra[name][l] for l in range(self.cfg.num_layers))
        return DecodeParams({**split.rest, "parscale": extra}, split.layers)

    @nn.nowrap
    def decode_forward(self, params: DecodeParams, tokens_BT, state, *, positions_BT=None, logits_at_B=None,
                       embeds_BTD=None, use_embeds_BT=None) -> LMOutput:
        """embed -> P streams through every layer with their states -> final norm -> aggregation -> head."""
        cfg = self.cfg
        P, n = cfg.parscale.P, cfg.parscale.n_prefix
        check_tokens(tokens_BT, cfg.vocab_size)
        B, T = tokens_BT.shape
        _check_logits_at(logits_at_B, B, T)
        check_room(state, T)
        x_BTD = embed(self, params, tokens_BT, embeds_BTD, use_embeds_BT)
        extra = params.rest["parscale"]
        kv = tuple(layer.rows(pk, pv) for layer, pk, pv in zip(state.layers, extra["prefix_k"], extra["prefix_v"],
                                                                 strict=True))
        x_BPTD = jnp.broadcast_to(x_BTD[:, None], (B, P, T, cfg.d_model))
        x, kv = run_layers(self, params, _rows(x_BPTD), kv, _stream_ctx(state.lengths_B, T, positions_BT, P, n))
        h_BPTD = _streams(_norm(cfg).apply({"params": params.rest["final_norm"]}, x), P)
        h_BTD, w_BTP = aggregate(extra, h_BPTD, cfg.parscale.eps, cfg.dtype)
        head_BTD = _rows_at(h_BTD, logits_at_B)
        if cfg.tie_embeddings:
            logits_BTV = Embed(cfg).apply({"params": params.rest["embed"]}, head_BTD, method=Embed.attend)
        else:
            logits_BTV = head_BTD @ params.rest["lm_head"].astype(jnp.dtype(cfg.dtype))
        layers = tuple(StreamsKVState.from_rows(s, P) for s in kv)
        return LMOutput(logits_BTV.astype(jnp.float32), advance(state, layers, T),
                        {"hidden_BTD": h_BTD, "stream_hidden_BPTD": h_BPTD, "stream_weights_BTP": w_BTP})


# ------------------------------------------------------------------------------------- post-training


def init_parscale_params(cfg: ModelConfig, rng) -> dict:
    """A freshly initialised "parscale" subtree for cfg ({} for P = 1: the base model adds nothing)."""
    check_model_config(cfg)
    if cfg.parscale.P == 1:
        return {}
    return jax.jit(lambda r: nn.meta.unbox(ParScaleParams(cfg).init(r)["params"]))(rng)


def add_parscale_params(cfg: ModelConfig, base_params, rng) -> dict:
    """Params of build(cfg) from a base model's (e.g. `load_hf`'s, whose cfg is cfg without parscale): the base
    params as they are plus fresh ParScale params. The base params' shapes are checked against cfg first."""
    check_model_config(cfg)
    if "parscale" in base_params:
        raise ValueError("base_params already hold a 'parscale' subtree")
    shapes = lambda tree: {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
                           jax.tree_util.tree_leaves_with_path(tree)}
    got = shapes(base_params)
    want = shapes(jax.eval_shape(lambda: init_params(LM(cfg.replace(parscale=None)), jax.random.key(0))))
    if got != want:
        bad = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
        raise ValueError(f"base_params do not fit cfg's base model; mismatched entries (got vs expected): "
                         f"{[(k, got.get(k), want.get(k)) for k in bad[:8]]}")
    extra = init_parscale_params(cfg, rng)
    return {**base_params, "parscale": extra} if extra else dict(base_params)


def trainable_mask(params):
    """True for the ParScale params (the "parscale" subtree), False for the base model's."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[0], "key", None) == "parscale", params)


def parscale_only(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` on the ParScale params alone: the base params get zero updates and no optimizer state (the
    paper's post-training of a pretrained base)."""
    labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params))
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)
