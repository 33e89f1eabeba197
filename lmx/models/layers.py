"""Basic layers: RMSNorm, rotary embeddings, SwiGLU MLP, token embedding."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmx.models.config import ModelConfig, RopeScaling
from lmx.models.quantize import matmul, weight

Dtype = jnp.dtype


def dense_init(fan_in: int, axes: tuple[str, ...]):
    """Truncated-normal init scaled by fan-in, annotated with logical axes for sharding."""
    return nn.with_logical_partitioning(nn.initializers.normal(1.0 / math.sqrt(fan_in)), axes)


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        scale_D = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x_BTD.shape[-1],),
            self.param_dtype,
        )
        x = x_BTD.astype(jnp.float32)  # statistics in f32, as HF does
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (scale_D.astype(jnp.float32) * x).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jnp.ndarray:
    """Inverse frequencies [H/2], with optional linear or Llama-3 scaling."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
    # Llama 3.1: keep high frequencies, divide low ones by factor, interpolate the band between.
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    mid = (1 - smooth) * inv / scaling.factor + smooth * inv
    out = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(is_mid, mid, out)


def apply_rope(x_BTNH, positions_BT, inv_freq_h):
    """Rotate-half RoPE (the Hugging Face Llama convention), computed in f32."""
    ang_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq_h
    cos, sin = jnp.cos(ang_BTh)[:, :, None, :], jnp.sin(ang_BTh)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        D, F = cfg.d_model, cfg.mlp_dim
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        gate_DF = weight(self, "gate", dense_init(D, ("embed", "mlp")), (D, F), pd)
        up_DF = weight(self, "up", dense_init(D, ("embed", "mlp")), (D, F), pd)
        down_FD = weight(self, "down", dense_init(F, ("mlp", "embed")), (F, D), pd)
        x = x_BTD.astype(dt)
        h_BTF = nn.silu(matmul(x, gate_DF, dt)) * matmul(x, up_DF, dt)
        h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "seq", "mlp"))
        return matmul(h_BTF, down_FD, dt)


class Embed(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embedding_VD = self.param(
            "embedding", dense_init(cfg.d_model, ("vocab", "embed")), (cfg.vocab_size, cfg.d_model),
            jnp.dtype(cfg.param_dtype),
        )

    def __call__(self, tokens_BT):
        return jnp.take(self.embedding_VD, tokens_BT, axis=0).astype(jnp.dtype(self.cfg.dtype))

    def attend(self, x_BTD):
        """Tied output projection: logits = x · Eᵀ."""
        dt = jnp.dtype(self.cfg.dtype)
        return jnp.einsum("BTD,VD->BTV", x_BTD.astype(dt), self.embedding_VD.astype(dt))
