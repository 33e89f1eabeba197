"""Compute and memory accounting for decoding (approximate forward-pass FLOPs, KV-cache bytes).

Formulas (forward pass only, one multiply-add = 2 FLOPs):
- matmul FLOPs per token = 2 · matmul_params, where matmul_params is every weight a token is multiplied by:
  all parameters except the embedding lookup table (a gather, no FLOPs); with tied embeddings the table is
  the LM head, so it is counted once. Norm scales and biases are included (negligible).
- attention FLOPs per token = 2 · 2 · L_attn · ctx · N · H (q·kᵀ and p·v over ctx keys, N heads of dim H),
  where ctx = min(position + 1, sliding_window) keys are attended. SSM (Mamba-2 and Mamba-3) layers count only
  their projections (in matmul_params); the scan itself, O(N·H·Z) per token (O(R·N·H·Z) for Mamba-3 MIMO), is
  not counted.
- KV-cache bytes per token = 2 (k and v) · L_attn · K · H · bytes(cfg.dtype).
- SSM state bytes per row (constant in the sequence length; lmx.models.state documents the layouts), per layer:
  Mamba-2: (W − 1 + R_w)·Y·bytes(cfg.dtype) conv ring + (R_w + 1)·N·H·Z·4 state ring (W conv taps, Y = N·H + 2·U·Z);
  Mamba-3: (R_w + 1)·(N·H·Z + N·A + M·N·Z + N·H)·4 (state, angles, rotated B, x; A angles, M MIMO rank).

Bytes moved (the memory side of Kinetics' eFLOPs, ALGORITHMS §5), counted as lmx's loops run:
- every model call reads the weights once (`weight_bytes`: all parameters at param_dtype), whatever its batch;
- each row reads, per position it processes, the KV entries it attends to (the same key counts as the attention
  FLOPs: its own rows' copies, since `repeat` gives every sample its own prompt cache) and its SSM state once
  (`state_bytes_read`). Activations, logits and writes are not counted.
eFLOPs = FLOPs + I·bytes, I = the chip's peak FLOP/s ÷ memory bytes/s (`INTENSITY`; Kinetics, arXiv 2506.05333).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from lmx.models.config import ModelConfig


def ssm_layer_params(cfg: ModelConfig) -> int:
    """A Mamba-2 block: in_proj, conv (+ bias), dt_bias, A_log, D, gated norm, out_proj (+ biases), block norm."""
    s, D = cfg.ssm, cfg.d_model
    if s.variant == "mamba3":
        return _mamba3_layer_params(cfg)
    P = s.inner_dim + s.conv_dim + s.num_heads  # in_proj outputs: z, xBC, dt
    conv = s.conv_width * s.conv_dim + (s.conv_dim if s.use_conv_bias else 0)
    return D * P + conv + 3 * s.num_heads + s.inner_dim + s.inner_dim * D + ((P + D) if s.use_bias else 0) + D


def _mamba3_layer_params(cfg: ModelConfig) -> int:
    """A Mamba-3 block (lmx.models.mamba3.Mamba3Mixer): in-projections z, x [N·H], B, C [R·Z], (Δ, A, λ) per head
    and the A angles; dt_bias and D [N]; B/C norm scales [Z] and biases [N·R·Z]; MIMO W_x, W_z, W_o [N·R·H] when
    R > 1; the gated output norm [N·H]; out [N·H·D]; the block norm [D]."""
    s, D = cfg.ssm, cfg.d_model
    N, H, Z, R, A = s.num_heads, s.head_dim, s.state_size, s.mimo_rank, s.num_angles
    proj_in = D * (2 * N * H + 2 * R * Z + 3 * N + A)
    mimo = 3 * N * R * H if R > 1 else 0
    return proj_in + 2 * N + 2 * Z + 2 * N * R * Z + mimo + N * H + N * H * D + D


def _streams(cfg: ModelConfig) -> tuple[int, int]:
    """(P, prefix tokens per stream) of a ParScale model; (1, 0) otherwise."""
    ps = cfg.parscale
    return (1, 0) if ps is None or ps.P == 1 else (ps.P, ps.n_prefix)


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of `lmx.models.build(cfg)` (attention, SSM and hybrid layer patterns; a
    recursive model's own count). ParScale's prefixes and aggregation are not counted: they are few and, being
    activations' keys, cost FLOPs as context (forward_flops)."""
    if cfg.recursion is not None:
        from lmx.models.recursive import param_count as recursive_count

        return recursive_count(cfg)
    D, V = cfg.d_model, cfg.vocab_size
    ssm = ssm_layer_params(cfg) * cfg.num_ssm_layers if cfg.num_ssm_layers else 0
    return V * D + cfg.num_attn_layers * attn_layer_params(cfg) + ssm + D + (0 if cfg.tie_embeddings else D * V)


def attn_layer_params(cfg: ModelConfig) -> int:
    """One attention block: q, k, v, o (+ qkv biases), the SwiGLU MLP, the attention and MLP norm scales."""
    a = cfg.attention
    D, N, K, H, F = cfg.d_model, a.num_heads, a.num_kv_heads, a.head_dim, cfg.mlp_dim
    return D * N * H + 2 * D * K * H + N * H * D + ((N + 2 * K) * H if a.qkv_bias else 0) + 3 * D * F + 2 * D


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters a token is multiplied by (all but the untied embedding table)."""
    return param_count(cfg) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


def flops_per_token(cfg: ModelConfig, context_len) -> float:
    """Forward FLOPs for one token that attends to `context_len` keys (itself included)."""
    a = cfg.attention
    ctx = context_len if a.sliding_window is None else np.minimum(context_len, a.sliding_window)
    return 2.0 * matmul_params(cfg) + 4.0 * cfg.num_attn_layers * ctx * a.num_heads * a.head_dim


def _keys_before(cfg: ModelConfig, n):
    """Σ_{p<n} min(p + 1, window): keys attended by positions 0..n-1 (float: n² overflows int32)."""
    n = jnp.asarray(n, jnp.float32)
    W = cfg.attention.sliding_window
    full = n * (n + 1) / 2
    if W is None:
        return full
    return jnp.where(n <= W, full, W * (W + 1) / 2 + (n - W) * W)


def forward_flops(cfg: ModelConfig, start, stop):
    """Forward FLOPs to process positions [start, stop) of one sequence (elementwise over arrays). A recursive
    model decodes its N merged depths, so the N-layer figure holds. ParScale (P > 1): the layers run for P streams,
    each position also attends to the stream's prefix, and the aggregation adds 2·(P·D·D + D·P) per token; the
    final norm and head run once."""
    a = cfg.attention
    n_tokens = jnp.asarray(stop, jnp.float32) - jnp.asarray(start, jnp.float32)
    keys = _keys_before(cfg, stop) - _keys_before(cfg, start)
    P, n = _streams(cfg)
    if P == 1:
        return 2.0 * matmul_params(cfg) * n_tokens + 4.0 * cfg.num_attn_layers * a.num_heads * a.head_dim * keys
    D = cfg.d_model
    head = D * cfg.vocab_size + D
    layers = 2.0 * (matmul_params(cfg) - head) * n_tokens + 4.0 * cfg.num_attn_layers * a.num_heads * a.head_dim * (
        keys + n * n_tokens)
    return P * layers + (2.0 * head + 2.0 * (P * D * D + D * P)) * n_tokens


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    """Bytes one position occupies in the KV cache (all attention layers, k and v; all P ParScale streams)."""
    a = cfg.attention
    return _streams(cfg)[0] * 2 * cfg.num_attn_layers * a.num_kv_heads * a.head_dim * jnp.dtype(cfg.dtype).itemsize


def ssm_state_bytes_per_row(cfg: ModelConfig, rollback_window: int | None = None) -> int:
    """Bytes of one row's SSM decode state (all SSM layers, rings included; 0 without SSM layers), for rings of
    `rollback_window` (default cfg.ssm.rollback_window; see init_state)."""
    if not cfg.num_ssm_layers:
        return 0
    s = cfg.ssm
    R_w = s.rollback_window if rollback_window is None else rollback_window
    N, H, Z, Q = s.num_heads, s.head_dim, s.state_size, R_w + 1
    if s.variant == "mamba3":
        per_layer = Q * (N * H * Z + N * s.num_angles + s.mimo_rank * N * Z + N * H) * 4
    else:
        conv = (s.conv_width - 1 + R_w) * s.conv_dim * jnp.dtype(cfg.dtype).itemsize
        per_layer = conv + Q * N * H * Z * 4
    return cfg.num_ssm_layers * per_layer


def weight_bytes(cfg: ModelConfig) -> int:
    """Bytes of all parameters at cfg.param_dtype: what each model call reads once."""
    return param_count(cfg) * jnp.dtype(cfg.param_dtype).itemsize


def state_bytes_read(cfg: ModelConfig, start, stop, rollback_window: int | None = 0):
    """Decode-state bytes one row reads to process positions [start, stop): the KV entries each position attends
    to (sliding window respected) plus its SSM state (rings included, sized by `rollback_window`) once per
    position. Elementwise over arrays."""
    keys = _keys_before(cfg, stop) - _keys_before(cfg, start)
    n_tokens = jnp.asarray(stop, jnp.float32) - jnp.asarray(start, jnp.float32)
    return kv_bytes_per_token(cfg) * keys + ssm_state_bytes_per_row(cfg, rollback_window) * n_tokens


@dataclass(frozen=True)
class Hardware:
    """A chip's peak dense FLOP/s and memory bandwidth (vendor spec sheets); intensity I = their ratio."""

    name: str
    flops_per_s: float
    bytes_per_s: float

    @property
    def intensity(self) -> float:
        return self.flops_per_s / self.bytes_per_s


# bf16 dense peaks and HBM bandwidths from the vendors' data sheets (TPU: per chip).
HARDWARE = {h.name: h for h in (
    Hardware("h100-sxm", 989e12, 3.35e12), Hardware("h200", 989e12, 4.8e12), Hardware("b200", 2250e12, 8e12),
    Hardware("a100-80gb", 312e12, 2.039e12), Hardware("tpu-v5e", 197e12, 819e9), Hardware("tpu-v5p", 459e12, 2.765e12),
)}
INTENSITY = {name: h.intensity for name, h in HARDWARE.items()}


def intensity_of(hardware: str | float) -> float:
    """I for a preset name (`HARDWARE`) or a number (FLOPs per byte)."""
    if isinstance(hardware, str):
        if hardware not in HARDWARE:
            raise ValueError(f"unknown hardware {hardware!r}; presets: {sorted(HARDWARE)} (or pass I as a number)")
        return HARDWARE[hardware].intensity
    if not float(hardware) >= 0:
        raise ValueError(f"arithmetic intensity I={hardware!r} must be >= 0 FLOPs per byte")
    return float(hardware)


def eflops(stats, hardware: str | float = "h100-sxm") -> float:
    """Kinetics eFLOPs of a result's stats: flops + I·bytes_moved."""
    return float(stats["flops"]) + intensity_of(hardware) * float(stats["bytes_moved"])


def cost_of_pass(cost: float, accuracy: float) -> float:
    """Expected cost of one correct answer: cost / accuracy (inf when nothing is solved)."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy={accuracy!r} must lie in [0, 1]")
    return math.inf if accuracy == 0 else float(cost) / accuracy
