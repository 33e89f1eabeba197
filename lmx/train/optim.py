"""AdamW with global-norm clipping and a linear-warmup + cosine-decay learning rate.

Weight decay is decoupled (AdamW) and applied only to weight matrices: parameters named `scale`
(norm gains), `*bias*` and `embedding` (token embeddings, also the output head when tied) are not
decayed. Names, not ndim, decide: stacked layers add a leading L axis, so a norm scale is 2-D too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

NO_DECAY_NAMES = ("scale", "embedding", "A_log", "D")  # Mamba keeps A_log and the D skip undecayed


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 100  # linear warmup: lr * (step + 1) / warmup_steps
    total_steps: int = 1000  # cosine decay ends here (at lr * min_lr_ratio) and stays flat after
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0  # None or <= 0: no clipping

    def __post_init__(self):
        checks = {
            "lr": self.lr >= 0, "warmup_steps": self.warmup_steps >= 0, "total_steps": self.total_steps > 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1, "weight_decay": self.weight_decay >= 0,
            "b1": 0 <= self.b1 < 1, "b2": 0 <= self.b2 < 1, "eps": self.eps > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"OptimConfig.{name}={getattr(self, name)!r} is out of range")

    @classmethod
    def from_dict(cls, d) -> OptimConfig:
        """From a mapping (e.g. an ml_collections ConfigDict), ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(d).items() if k in names})


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Step s (0-based, the update being computed) -> learning rate. Warmup starts at lr / warmup_steps,
    not 0, so the first update already moves the params."""

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * jnp.minimum(1.0, (s + 1) / max(cfg.warmup_steps, 1))
        decay_len = max(cfg.total_steps - cfg.warmup_steps, 1)
        progress = jnp.clip((s - cfg.warmup_steps) / decay_len, 0.0, 1.0)
        cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(s < cfg.warmup_steps, warm, cfg.lr * cosine)

    return schedule


def decay_mask(params):
    """True for the leaves that get weight decay (see the module docstring)."""

    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name in NO_DECAY_NAMES or "bias" in name)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_norm is not None and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
