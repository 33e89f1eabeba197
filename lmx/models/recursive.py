"""Relaxed Recursive Transformer (Bae et al., arXiv 2410.20672): K unique attention blocks looped N/K times, each
depth l with its own low-rank relaxation of the shared weights, h = W′x + B_l A_l x.

Sharing is the paper's CYCLE: depth l = j·K + k (loop j, position k in the loop) runs unique block k. LoRA relaxes
every dense matmul of the block (attention q, k, v, o; MLP gate, up, down); with qkv_bias each depth also offsets
the q/k/v biases (a few numbers per depth, and trained Qwen-style biases differ a lot by layer); norms stay shared
with the unique block. In lmx's row-vector layout a weight W [in, out] (q's [D, heads, head_dim] viewed as
[D, heads·head_dim], o's as [heads·head_dim, D]) becomes W′ + a_l b_l with a_l [in, r] and b_l [r, out] (the
paper's A_lᵀ, B_lᵀ).

Params: the K-block LM's own tree (embed, layers with a leading K axis, final_norm, lm_head) plus, when r > 0,
lora/{attn,mlp}/{name}/{a, b} (and lora/attn/{q,k,v}_bias) with a leading depth axis N. Each depth runs the base
AttnBlock on its effective params W′ + a_l b_l: the exact maths, at the cost of one [in, r]·[r, out] product per
matrix and depth (small next to the B·T token products in training). Teacher-forced, the depths run as a scan over
the loops of a scan over the K blocks, so compile time stays flat in depth.

Decoding: `split_params` merges each depth's effective weights once per params object (lmx.models.decode_params),
so the base layer-loop pieces (forward, run_layers, head) run unchanged on N layers with one KV cache per depth;
the decode weights then take the memory of N full layers, like the base model's (a decode path that keeps only the
K shared blocks and the factors resident would apply x·a_l·b_l on the side instead). Depth-wise early exit on the
loops: with `loop_exits`, the teacher-forced aux holds the logits after every loop (`loop_logits_EBTV`, E = N/K,
the last equal to logits_BTV), for exit losses; at decode time the same boundaries are the exits of early-exit
decoding (`lmx.decoding.early_exit.EarlyExit`, through this module's `decode_exits` hook): a token stops after
loop j when confident, the skipped depths' KV filled from its exited state.

`from_base` converts a trained N-layer LM: W′ is the mean of the tied layers, a_l b_l the truncated SVD (rank r) of
W_l − W′; at full rank the converted model equals the base.

N = num_layers and K = num_unique are the paper's letters, in prose only; names in code keep lmx's letters
(L depths, E loops = exits, N heads, K kv heads).
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmx.models import lm
from lmx.models.config import ModelConfig

SHARINGS = ("cycle",)

# The matmuls LoRA relaxes: (module in AttnBlock, param name, how many leading axes of W are its fan-in).
TARGETS = (("attn", "q", 1), ("attn", "k", 1), ("attn", "v", 1), ("attn", "o", 2),
           ("mlp", "gate", 1), ("mlp", "up", 1), ("mlp", "down", 1))
BIASES = ("q_bias", "k_bias", "v_bias")  # offset per depth when cfg.attention.qkv_bias


@dataclasses.dataclass(frozen=True)
class RecursionConfig:
    """ModelConfig.recursion: num_unique K blocks looped num_layers / K times (num_layers = N stays the effective
    depth); lora_rank r of each depth's relaxation (0: a plain parameter-shared, looped model); sharing "cycle"
    (depth l runs block l mod K); loop_exits: also return the logits after every loop (teacher-forced aux)."""

    num_unique: int
    lora_rank: int = 0
    sharing: str = "cycle"
    loop_exits: bool = False

    def __post_init__(self):
        for name, low in (("num_unique", 1), ("lora_rank", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ValueError(f"recursion.{name}={value!r} must be an int >= {low}")
        if self.sharing not in SHARINGS:
            raise ValueError(f"recursion.sharing={self.sharing!r} must be one of {SHARINGS}")
        if not isinstance(self.loop_exits, bool):
            raise ValueError(f"recursion.loop_exits={self.loop_exits!r} must be a bool")


def check(cfg: ModelConfig) -> RecursionConfig:
    """cfg.recursion, after checking that it fits cfg (clear errors naming the values)."""
    rc = cfg.recursion
    if not isinstance(rc, RecursionConfig):
        raise TypeError(f"ModelConfig.recursion must be a RecursionConfig, got {type(rc).__name__}: {rc!r:.80}")
    other = sorted(set(cfg.layer_pattern) - {"attn"})
    if other:
        raise ValueError(f"recursion supports only 'attn' layers; layer_pattern has {other}")
    if cfg.num_layers % rc.num_unique:
        raise ValueError(f"num_layers={cfg.num_layers} is not a multiple of recursion.num_unique={rc.num_unique}")
    return rc


def decode_exits(cfg: ModelConfig):
    """lmx.models.lm's hook for early-exit decoding: with loop_exits, a token may stop after any loop j·K (j >= 1)
    before the last, on the shared final norm + head (the teacher-forced loop_logits_EBTV); None otherwise."""
    from lmx.models.early_exit import ExitConfig

    rc = check(cfg)
    loops = tuple(range(rc.num_unique, cfg.num_layers, rc.num_unique))
    return ExitConfig(layers=loops) if rc.loop_exits and loops else None


def unique_config(cfg: ModelConfig) -> ModelConfig:
    """The config of the K-block LM whose params the recursive model extends."""
    return cfg.replace(num_layers=cfg.recursion.num_unique, recursion=None)


def _matrix_shape(shape, n_in: int) -> tuple[int, int]:
    return int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))


def with_lora(block: dict, lora: dict | None) -> dict:
    """One depth's AttnBlock params: every target W replaced by W′ + a·b (computed at full f32 precision, so a zero
    relaxation leaves W exactly as it is), and qkv biases offset."""
    if lora is None:
        return block
    out = {name: dict(sub) for name, sub in block.items()}
    for mod, name, _ in TARGETS:
        w = jnp.asarray(block[mod][name])
        ab = jnp.matmul(lora[mod][name]["a"], lora[mod][name]["b"], precision=jax.lax.Precision.HIGHEST)
        out[mod][name] = w + ab.reshape(w.shape).astype(w.dtype)
    for name in BIASES:
        if name in lora["attn"]:
            out["attn"][name] = block["attn"][name] + lora["attn"][name]
    return out


def depth_params(cfg: ModelConfig, params: dict, l: int) -> dict:
    """Depth l's effective AttnBlock params: unique block l mod K (CYCLE) with depth l's relaxation."""
    block = jax.tree.map(operator.itemgetter(l % cfg.recursion.num_unique), params["layers"])
    lora = params.get("lora")
    return with_lora(block, None if lora is None else jax.tree.map(operator.itemgetter(l), lora))


def _lora_init(cfg: ModelConfig):
    """Standard LoRA init: a ~ N(0, 1/in), b = 0, so a fresh relaxed model starts as the looped one."""
    L, r = cfg.num_layers, cfg.recursion.lora_rank
    shapes = _target_shapes(cfg)

    def init(rng):
        tree = {}
        for i, (mod, name, n_in) in enumerate(TARGETS):
            fan_in, fan_out = _matrix_shape(shapes[mod][name], n_in)
            a = jax.random.normal(jax.random.fold_in(rng, i), (L, fan_in, r), jnp.dtype(cfg.param_dtype))
            b = jnp.zeros((L, r, fan_out), jnp.dtype(cfg.param_dtype))
            tree.setdefault(mod, {})[name] = {
                "a": nn.LogicallyPartitioned(a / np.sqrt(fan_in), ("layers", None, None)),
                "b": nn.LogicallyPartitioned(b, ("layers", None, None)),
            }
        for name in BIASES if cfg.attention.qkv_bias else ():
            heads = "heads" if name == "q_bias" else "kv_heads"
            zeros = jnp.zeros((L, *shapes["attn"][name[0]][1:]), jnp.dtype(cfg.param_dtype))
            tree["attn"][name] = nn.LogicallyPartitioned(zeros, ("layers", heads, "head_dim"))
        return tree

    return init


def _target_shapes(cfg: ModelConfig) -> dict:
    """The shapes of one AttnBlock's target params, without building anything."""
    a = cfg.attention
    D, F, N, K, H = cfg.d_model, cfg.mlp_dim, a.num_heads, a.num_kv_heads, a.head_dim
    return {"attn": {"q": (D, N, H), "k": (D, K, H), "v": (D, K, H), "o": (N, H, D)},
            "mlp": {"gate": (D, F), "up": (D, F), "down": (F, D)}}


def run_depths(cfg: ModelConfig, params: dict, x_BTD, ctx: lm.Ctx):
    """All N depths, teacher-forced: a scan over the N/K loops of a scan over the K unique blocks, each depth on its
    effective params. Returns (x_BTD, the stream after every loop [E, B, T, D], or None without loop_exits)."""
    rc = cfg.recursion
    E = cfg.num_layers // rc.num_unique
    lora = params.get("lora")  # [L, ...] -> [E, num_unique, ...]: depth j·K + k is loop j's k-th block (CYCLE)
    lora_by_loop = None if lora is None else jax.tree.map(lambda w: w.reshape(E, rc.num_unique, *w.shape[1:]), lora)
    block = lm.AttnBlock(cfg, parent=None)

    def one_depth(x_BTD, block_and_lora):
        p = with_lora(*block_and_lora)
        return block.apply({"params": p}, x_BTD, None, ctx)[0], None

    if cfg.remat:
        one_depth = jax.checkpoint(one_depth, prevent_cse=False)

    def one_loop(x_BTD, loop_lora):
        x_BTD, _ = jax.lax.scan(one_depth, x_BTD, (params["layers"], loop_lora))
        return x_BTD, x_BTD if rc.loop_exits else None

    return jax.lax.scan(one_loop, x_BTD, lora_by_loop, length=E)


class RecursiveLM(nn.Module):
    """model.apply({"params": params}, tokens_BT, positions_BT=None, state=None, segment_ids_BT=None,
    logits_at_B=None, embeds_BTD=None, use_embeds_BT=None) -> LMOutput, as lmx.models.LM (see the module
    docstring). Without a state the depths run as scans; with one, through the base layer-loop pieces on the
    merged per-depth params."""

    cfg: ModelConfig

    def setup(self):
        check(self.cfg)
        # The K-block LM's params (embed, layers [K], final_norm, lm_head) live at the top level of ours.
        self.unique = lm.LM(unique_config(self.cfg))
        nn.share_scope(self, self.unique)

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, state=None, segment_ids_BT=None, logits_at_B=None,
                 embeds_BTD=None, use_embeds_BT=None):
        cfg, rc = self.cfg, self.cfg.recursion
        if state is not None and segment_ids_BT is not None:
            raise ValueError("segment_ids_BT (packed sequences) is for teacher-forced calls, not with a decode state")
        if self.is_initializing():
            self.unique(tokens_BT)  # creates the shared params
        if rc.lora_rank > 0:
            self.param("lora", _lora_init(cfg))
        params = nn.meta.unbox(self.variables["params"])
        if state is not None:
            return lm.forward(self, self.split_params(params), tokens_BT, state, positions_BT=positions_BT,
                              logits_at_B=logits_at_B, embeds_BTD=embeds_BTD, use_embeds_BT=use_embeds_BT)
        lm.check_tokens(tokens_BT, cfg.vocab_size)
        B, T = tokens_BT.shape
        lm._check_logits_at(logits_at_B, B, T)
        rest = lm.DecodeParams(_rest(params), ())
        x_BTD = lm.embed(self, rest, tokens_BT, embeds_BTD, use_embeds_BT)
        ctx = lm.make_ctx(jnp.zeros((B,), jnp.int32), T, positions_BT, segment_ids_BT)
        x_BTD, x_EBTD = run_depths(cfg, params, x_BTD, ctx)
        logits_BTV, h_BTD = lm.head(self, rest, x_BTD, logits_at_B)
        aux = {"hidden_BTD": h_BTD}
        if rc.loop_exits:  # the shared final norm + head after every loop
            aux["loop_logits_EBTV"] = jax.vmap(lambda x: lm.head(self, rest, x, logits_at_B)[0])(x_EBTD)
        return lm.LMOutput(logits_BTV, None, aux)

    @nn.nowrap
    def split_params(self, params) -> lm.DecodeParams:
        """decode_params' hook: layer l of the result is depth l's merged effective block (once per params
        object), so lm.forward / run_layers / head run as for a base LM of N layers."""
        return lm.DecodeParams(_rest(params), _merge_depths(self.cfg, {k: params[k] for k in ("layers", "lora")
                                                                      if k in params}))


@functools.partial(jax.jit, static_argnums=0)  # one program, not N·7 eager merges
def _merge_depths(cfg: ModelConfig, params: dict) -> tuple:
    return tuple(depth_params(cfg, params, l) for l in range(cfg.num_layers))


def _rest(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in ("layers", "lora")}


def build(cfg: ModelConfig) -> RecursiveLM:
    check(cfg)
    return RecursiveLM(cfg)


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of build(cfg): the K-block LM's plus r·(in + out) per target and depth (the
    N-layer count lmx.decoding.cost.param_count gives is what each token is multiplied by)."""
    from lmx.decoding import cost

    r, shapes = check(cfg).lora_rank, _target_shapes(cfg)
    lora = r * sum(sum(_matrix_shape(shapes[mod][name], n_in)) for mod, name, n_in in TARGETS)
    a = cfg.attention
    biases = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim if a.qkv_bias and r > 0 else 0
    return cost.param_count(unique_config(cfg)) + cfg.num_layers * (lora + biases)


# ------------------------------------------------------------------------------------------------------------
# Conversion from a trained N-layer LM.


def _fold_norms(layers: dict) -> dict:
    """Each layer's pre-norm scales folded into the matmuls they feed (RMSNorm(x)·W = x̂·diag(s)W), the scales set to
    one: per-layer norm differences then land in the residuals the SVD keeps, so full rank stays exact."""
    out = {name: dict(sub) for name, sub in layers.items()}
    s_attn, s_mlp = layers["attn_norm"]["scale"], layers["mlp_norm"]["scale"]  # [L, D]
    for name in ("q", "k", "v"):
        out["attn"][name] = layers["attn"][name] * s_attn[:, :, None, None]
    for name in ("gate", "up"):
        out["mlp"][name] = layers["mlp"][name] * s_mlp[:, :, None]
    out["attn_norm"] = {"scale": np.ones_like(s_attn)}
    out["mlp_norm"] = {"scale": np.ones_like(s_mlp)}
    return out


def _truncated_svd(resid_Lio, r: int):
    """a [L, in, r], b [L, r, out] with a·b the best rank-r approximation of each residual (zero-padded past its
    rank): a = U_r S_r^½, b = S_r^½ V_rᵀ."""
    U, S, Vt = np.linalg.svd(resid_Lio, full_matrices=False)
    q = min(r, S.shape[-1])
    root = np.sqrt(S[:, :q])
    L, i, o = resid_Lio.shape
    a, b = np.zeros((L, i, r)), np.zeros((L, r, o))
    a[:, :, :q] = U[:, :, :q] * root[:, None, :]
    b[:, :q, :] = root[:, :, None] * Vt[:, :q, :]
    return a, b


def from_base(base_cfg: ModelConfig, base_params: dict, recursion: RecursionConfig, *, fold_norms: bool = True):
    """(cfg, params) of a relaxed recursive model initialised from a trained N-layer attention LM: the K unique
    blocks are the means W′ of their tied layers (l ≡ k mod K) and depth l's relaxation the truncated SVD (rank r)
    of W_l − W′. fold_norms (default) first folds each layer's norm scales into the matmuls after them, so norm
    differences are relaxed too; otherwise the norms are averaged. qkv biases are averaged, each depth's difference
    kept as its offset. The new params are in cfg.param_dtype. With r = full rank the result computes the base
    model's function."""
    if base_cfg.recursion is not None:
        raise ValueError(f"from_base expects a base LM config, got one with recursion={base_cfg.recursion!r}")
    cfg = base_cfg.replace(recursion=recursion)
    check(cfg)
    L, r = cfg.num_layers, recursion.lora_rank
    E = L // recursion.num_unique
    layers = jax.tree.map(lambda w: np.asarray(w, np.float64), base_params["layers"])
    if fold_norms:
        layers = _fold_norms(layers)
    tied = jax.tree.map(lambda w: w.reshape(E, -1, *w.shape[1:]), layers)  # depth j·K + k -> [j, k] (CYCLE)
    shared = jax.tree.map(lambda w: w.mean(0), tied)
    cast = lambda w: jax.device_put(np.asarray(w, jnp.dtype(cfg.param_dtype)))  # noqa: E731
    params = {k: v for k, v in base_params.items() if k != "layers"}
    params["layers"] = jax.tree.map(cast, shared)
    if r > 0:
        params["lora"] = {}
        for mod, name, n_in in TARGETS:
            w_tied, w_shared = tied[mod][name], shared[mod][name]
            i, o = _matrix_shape(w_shared.shape[1:], n_in)
            a, b = _truncated_svd((w_tied - w_shared[None]).reshape(L, i, o), r)
            params["lora"].setdefault(mod, {})[name] = {"a": cast(a), "b": cast(b)}
        for name in BIASES if cfg.attention.qkv_bias else ():
            w_tied, w_shared = tied["attn"][name], shared["attn"][name]
            params["lora"]["attn"][name] = cast((w_tied - w_shared[None]).reshape(L, *w_shared.shape[1:]))
    return cfg, params
