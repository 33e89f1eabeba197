"""Decode state: the per-layer caches that `model.apply` reads and returns, and pure helpers on them.

Attention layers. KV cache slot s of row b holds the token at position s of that row (no left padding), so a
row's next write goes to slot `lengths_B[b]`. Right-padded prompts are prefilled whole and then `truncate`d to
their true lengths: the padding slots are simply overwritten by the next tokens.

SSM layers (Mamba-2) keep O(1) state per row, so they cannot roll back by lengths alone. Each SSM layer holds
two ring buffers of its own (a tuple field holds one array per SSM layer, in layer_pattern order, like the KV
cache), indexed by position like the KV cache (extra letters: W conv-input slots, Q state slots, Y conv
channels = N·H + 2·G·Z; rollback window R_w = SSMConfig.rollback_window, conv width K_w):
- `conv_BWY`: the conv inputs (x | B | C before the conv) of the last W = K_w - 1 + R_w positions, position p
  in slot p % W. The conv at the next position reads the K_w - 1 before it.
- `ssm_BQNHZ`: the states after each of the last Q = R_w + 1 positions, position p in slot p % Q. The
  current state is the one after position length - 1 (zeros for an empty row).
A decode step reads the current state's slot and writes the new state (and conv input) into slot length % Q
(% W) of each layer's own buffers, in place: nothing else of the rings is read or written (per-layer buffers,
not an [L, ...] stack, whose slicing and restacking copied every ring at every step; see ssm.ring_write).
So rolling back j <= R_w steps is free: only `lengths_B` changes, and the next writes overwrite the stale
slots. `floor_B` is the shortest length each row can still be restored to: length - R_w after a write, and
unchanged by `truncate`. R_w = 0 disables rollback across calls; `init_state(..., rollback_window=)` overrides
the config's R_w for one state (`generate` uses 0: one slot per layer, which a step updates in place, elementwise).
Memory per SSM layer and row, in bytes: (K_w - 1 + R_w)·Y·bytes(dtype) + (R_w + 1)·N·H·Z·4 (states are f32);
e.g. Mamba2-130m dims (N=24, H=64, Z=128, G=1, K_w=4) with R_w=4: 7·1792·2 + 5·196608·4 ≈ 3.9 MB per layer
(R_w = 0: 0.8 MB).

Multi-token calls. A call of T > 1 tokens with a state (prefill, speculative verification) does not touch
the rings: it returns `SSMCache.pending`, its discretised SSM inputs and conv inputs (one array per layer in
each tuple field; per layer and row, T·(N·H + N + G·Z)·4 + T·Y·bytes(dtype) bytes), and `lengths_B` advances
by T. The pending steps are folded into the rings by `truncate` — only the first `lengths - start_B` of them,
so a right-padded prefill followed by `truncate` to the true lengths is exact for any amount of padding, and
the padding never touches a row's state — or, all of them, at the start of the next model call. Until then
the pytree holds the pending arrays (its structure differs from a committed state's), so a loop that carries
state across a multi-token call should `truncate` after it, as `generate` and speculative decoding do.

Mamba-3 SSM layers (`ssm.variant="mamba3"`, lmx.models.mamba3) have no conv, but a step needs more than h: the
rotary angles θ and the previous token's rotated B and x (the trapezoid's P_{t-1} term). `Mamba3Cache` keeps
rings of the last Q = R_w + 1 per-position states, each field of `Mamba3State`, position p in slot p % Q
(extra letters: A rotary angles = SSMConfig.num_angles, R MIMO rank = SSMConfig.mimo_rank), again one buffer
per layer in each tuple field, written in place at slot length % Q:
`ssm_BQNHZ` (h), `angle_BQNA` (θ mod 2π), `K_BQRNZ` (rotated B), `x_BQNH` (x before the MIMO projection),
all float32. Rollback, `floor_B` and the pending record work exactly as for Mamba-2 (Q slots: rolling back
j <= R_w steps moves only `lengths_B`). Memory per layer and row, in bytes: (R_w + 1)·(N·H·Z + N·A + R·N·Z +
N·H)·4; e.g. d_model 768 with N=24, H=64, Z=128, A=32, R=1 and R_w=4: 5·201984·4 ≈ 4.0 MB (R_w = 0: 0.8 MB).
Its pending record (`Mamba3Pending`) holds each token's x, Δ, A, λ, θ and rotated B as the call computed them,
T·(N·H + 3·N + N·A + R·N·Z)·4 bytes per layer and row, plus the MIMO x-projection (N·R·H·4; a parameter, kept
per row so that `select`/`repeat` see a batch axis; absent for R = 1); `truncate` or the next call commits it
with `lmx.models.mamba3.commit` (right padding never reaches the state).

`truncate` below `floor_B` (more than R_w steps before the last commit) raises a ValueError when the
lengths are concrete; under `jit` it cannot check, and the restored SSM state is undefined.

Every decoding algorithm touches state only through `init_state`, `select`, `repeat` and `truncate`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lmx.models import mamba3
from lmx.models.config import ModelConfig
from lmx.models.ssm import commit


@flax.struct.dataclass
class KVCache:
    """One buffer per attention layer (in layer_pattern order), not an [L, ...] stack: a decode step writes
    and reads each layer's cache in place, where slicing a stack copied it (see lmx.models.attention)."""

    k_BKHS: tuple[jax.Array, ...]  # keys [B, K, H, S]: slots last, so q·kᵀ is a plain matmul
    v_BKSH: tuple[jax.Array, ...]  # values [B, K, S, H]


def _per_layer(*fields) -> tuple[tuple, ...]:
    """Tuple fields (one entry per SSM layer) regrouped per layer; a None field gives None in every layer."""
    n = len(next(f for f in fields if f is not None))
    return tuple(zip(*((None,) * n if f is None else f for f in fields), strict=True))


def _per_field(layers) -> tuple:
    """Inverse of _per_layer: per-layer tuples regrouped into tuple fields (None where every layer has None)."""
    return tuple(None if all(a is None for a in f) else tuple(f) for f in zip(*layers, strict=True))


@flax.struct.dataclass
class SSMPending:
    """The not-yet-committed steps of the last multi-token call (tuple fields: one array per SSM layer)."""

    start_B: jax.Array  # int32: each row's length when the call started
    dtx_BTNH: tuple[jax.Array, ...]  # Δ·x (f32)
    dtA_BTN: tuple[jax.Array, ...]  # Δ·A, the log decay (f32)
    B_BTGZ: tuple[jax.Array, ...]  # f32
    xbc_BTY: tuple[jax.Array, ...]  # conv inputs

    @property
    def layers(self) -> tuple[tuple[jax.Array, ...], ...]:
        """Per SSM layer, its pending arrays (what the mixer returned; `ssm.commit`'s `pending`)."""
        return _per_layer(self.dtx_BTNH, self.dtA_BTN, self.B_BTGZ, self.xbc_BTY)


@flax.struct.dataclass
class SSMCache:
    """Mamba-2 layers' rings, one buffer per SSM layer (in layer_pattern order) in each tuple field. Like
    Mamba3Cache: the rings come first (the fields `ssm_cache_from_layers` fills), then floor_B and the pending
    record of the last multi-token call."""

    conv_BWY: tuple[jax.Array, ...]  # ring of conv inputs
    ssm_BQNHZ: tuple[jax.Array, ...]  # ring of states (f32)
    floor_B: jax.Array  # int32: shortest length `truncate` can restore
    pending: SSMPending | None = None
    pending_class: ClassVar[type] = SSMPending

    @property
    def rollback_window(self) -> int:
        return self.ssm_BQNHZ[0].shape[1] - 1

    @property
    def rings(self) -> tuple[tuple[jax.Array, ...], ...]:
        """Per SSM layer, its rings (conv_BWY, ssm_BQNHZ): the mixer's cache."""
        return _per_layer(self.conv_BWY, self.ssm_BQNHZ)


@flax.struct.dataclass
class Mamba3Pending:
    """The not-yet-committed tokens of the last multi-token call of Mamba-3 layers (all f32; tuple fields: one
    array per SSM layer)."""

    start_B: jax.Array  # int32: each row's length when the call started
    x_BTNH: tuple[jax.Array, ...]
    dt_BTN: tuple[jax.Array, ...]  # Δ
    A_BTN: tuple[jax.Array, ...]
    lam_BTN: tuple[jax.Array, ...]  # λ, the trapezoid's mixing weight
    angle_BTNA: tuple[jax.Array, ...]  # θ mod 2π
    K_BTRNZ: tuple[jax.Array, ...]  # rotated B
    x_proj_BNRH: tuple[jax.Array, ...] | None = None  # the MIMO x-projection (a parameter) per row; None for R = 1

    @property
    def layers(self) -> tuple[tuple, ...]:
        """Per SSM layer, its pending record (`mamba3.commit`'s `pending`)."""
        return _per_layer(self.x_BTNH, self.dt_BTN, self.A_BTN, self.lam_BTN, self.angle_BTNA, self.K_BTRNZ,
                          self.x_proj_BNRH)


@flax.struct.dataclass
class Mamba3Cache:
    """Mamba-3 layers' rings of the last Q per-position states (the fields of mamba3.Mamba3State), f32, one buffer
    per SSM layer in each tuple field."""

    ssm_BQNHZ: tuple[jax.Array, ...]  # h
    angle_BQNA: tuple[jax.Array, ...]  # θ (mod 2π)
    K_BQRNZ: tuple[jax.Array, ...]  # the position's rotated B: the next token's P_{t-1} = Σ_r x[r] K[r]ᵀ
    x_BQNH: tuple[jax.Array, ...]  # the position's x (before the MIMO projection)
    floor_B: jax.Array  # int32: shortest length `truncate` can restore
    pending: Mamba3Pending | None = None
    pending_class: ClassVar[type] = Mamba3Pending

    @property
    def rollback_window(self) -> int:
        return self.ssm_BQNHZ[0].shape[1] - 1

    @property
    def rings(self) -> tuple[tuple[jax.Array, ...], ...]:
        """Per SSM layer, its rings (ssm_BQNHZ, angle_BQNA, K_BQRNZ, x_BQNH): the mixer's cache."""
        return _per_layer(self.ssm_BQNHZ, self.angle_BQNA, self.K_BQRNZ, self.x_BQNH)


def ssm_cache_from_layers(cls, rings, floor_B, pending=None):
    """An SSMCache / Mamba3Cache from per-layer rings (each layer's tuple in field order)."""
    return cls(*_per_field(rings), floor_B=floor_B, pending=pending)


def pending_from_layers(cls, start_B, layers):
    """An SSMPending / Mamba3Pending from per-layer pending records (what each mixer returned)."""
    return cls(start_B, *_per_field(layers))


@flax.struct.dataclass
class DecodeState:
    lengths_B: jax.Array  # int32: number of valid positions per row
    kv: KVCache | None = None  # attention layers, one buffer per layer in layer_pattern order
    ssm: SSMCache | Mamba3Cache | None = None  # SSM layers (by ssm.variant), one set of rings per layer

    @property
    def batch_size(self) -> int:
        return self.lengths_B.shape[0]

    @property
    def max_len(self) -> int:
        return self.kv.v_BKSH[0].shape[2] if self.kv is not None else 0


def init_state(cfg: ModelConfig, batch: int, max_len: int, dtype=None, rollback_window: int | None = None
               ) -> DecodeState:
    """Empty state for `batch` rows and KV caches of `max_len` positions. `dtype` (default cfg.dtype) is that
    of the KV caches and conv rings; SSM states (all Mamba-3 rings) are always float32. `rollback_window`
    (default cfg.ssm.rollback_window) sizes the SSM rings: a caller that never rolls back further than the
    multi-token call it just made (plain sampling: `generate`) passes 0 and keeps one state slot per layer,
    which a decode step updates in place, elementwise (see ssm.ring_step)."""
    if max_len <= 0 or batch <= 0:
        raise ValueError(f"init_state needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
    if rollback_window is not None and (isinstance(rollback_window, bool) or not isinstance(rollback_window, int)
                                        or rollback_window < 0):
        raise ValueError(f"init_state: rollback_window={rollback_window!r} must be an int >= 0 (or None)")
    if rollback_window is not None and cfg.num_ssm_layers:
        cfg = cfg.replace(ssm=dataclasses.replace(cfg.ssm, rollback_window=rollback_window))
    dtype = jnp.dtype(dtype or cfg.dtype)
    a = cfg.attention
    kv = ssm = None
    if cfg.num_attn_layers:
        K, H, L = a.num_kv_heads, a.head_dim, cfg.num_attn_layers
        kv = KVCache(tuple(jnp.zeros((batch, K, H, max_len), dtype) for _ in range(L)),
                     tuple(jnp.zeros((batch, K, max_len, H), dtype) for _ in range(L)))
    if cfg.num_ssm_layers:
        s, L, Q = cfg.ssm, cfg.num_ssm_layers, cfg.ssm.rollback_window + 1
        ring = lambda slots, *shape, dt=jnp.float32: tuple(jnp.zeros((batch, slots, *shape), dt) for _ in range(L))
        N, H, Z = s.num_heads, s.head_dim, s.state_size
        floor_B = jnp.zeros((batch,), jnp.int32)
        if s.variant == "mamba3":
            ssm = Mamba3Cache(ring(Q, N, H, Z), ring(Q, N, s.num_angles), ring(Q, s.mimo_rank, N, Z), ring(Q, N, H),
                              floor_B=floor_B)
        else:
            ssm = SSMCache(conv_BWY=ring(s.conv_width - 1 + s.rollback_window, s.conv_dim, dt=dtype),
                           ssm_BQNHZ=ring(Q, N, H, Z), floor_B=floor_B)
    return DecodeState(lengths_B=jnp.zeros((batch,), jnp.int32), kv=kv, ssm=ssm)


def commit_pending(ssm: SSMCache | Mamba3Cache, lengths_B) -> SSMCache | Mamba3Cache:
    """Fold the pending steps of the last multi-token call into the rings, up to each row's `lengths_B`."""
    p = ssm.pending
    if p is None:
        return ssm
    if isinstance(ssm, Mamba3Cache):
        T, fold = p.dt_BTN[0].shape[1], mamba3.commit
    else:
        T, fold = p.dtA_BTN[0].shape[1], lambda rings, *a: commit(*rings, *a)
    valid_B = jnp.clip(lengths_B - p.start_B, 0, T)
    rings = [fold(r, pending, p.start_B, valid_B) for r, pending in zip(ssm.rings, p.layers, strict=True)]
    floor_B = jnp.maximum(ssm.floor_B, p.start_B + valid_B - ssm.rollback_window)
    return ssm_cache_from_layers(type(ssm), rings, floor_B)


def _map_rows(obj, fn):
    """Apply fn(array, batch_axis) to every array of a state; the batch axis is where "B" sits in the
    field's shape suffix (lengths_B: 0; a tuple field like k_BKHS or ssm_BQNHZ holds one such array per layer)."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = _map_rows(value, fn)
        elif isinstance(value, tuple):
            changes[f.name] = tuple(fn(v, f.name.rsplit("_", 1)[1].index("B")) for v in value)
        elif value is not None:
            changes[f.name] = fn(value, f.name.rsplit("_", 1)[1].index("B"))
    return obj.replace(**changes)


def select(state: DecodeState, idx_B) -> DecodeState:
    """Gather rows: new row i is old row idx_B[i] (resampling, beam reordering)."""
    idx_B = jnp.asarray(idx_B, jnp.int32)
    return _map_rows(state, lambda x, axis: jnp.take(x, idx_B, axis=axis))


def repeat(state: DecodeState, num_samples: int) -> DecodeState:
    """Each row repeated `num_samples` times consecutively: row b -> rows b*R .. b*R+R-1."""
    return _map_rows(state, lambda x, axis: jnp.repeat(x, num_samples, axis=axis))


def _concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def truncate(state: DecodeState, lengths_B) -> DecodeState:
    """Roll each row back to `lengths_B` positions (never forward). Stale KV slots past the length are masked
    by attention and overwritten by the next write, so for attention only the lengths change. SSM layers
    first commit a pending multi-token call up to the new lengths, then roll back within their rings (see
    the module docstring for the limits)."""
    lengths_B = jnp.minimum(jnp.asarray(lengths_B, jnp.int32), state.lengths_B)
    ssm = state.ssm
    if ssm is not None:
        ssm = commit_pending(ssm, lengths_B)
        if _concrete(lengths_B, ssm.floor_B) and bool(np.any(np.asarray(lengths_B) < np.asarray(ssm.floor_B))):
            rows = np.flatnonzero(np.asarray(lengths_B) < np.asarray(ssm.floor_B)).tolist()
            raise ValueError(
                f"truncate: rows {rows[:8]} roll back to lengths {np.asarray(lengths_B)[rows[:8]].tolist()}, but "
                f"their SSM states can only be restored to lengths >= {np.asarray(ssm.floor_B)[rows[:8]].tolist()}: "
                f"SSM layers keep only the last rollback_window={ssm.rollback_window} committed steps (SSMConfig's, "
                f"or init_state's override)"
                + (" (rollback is disabled)" if ssm.rollback_window == 0 else "")
            )
    return state.replace(lengths_B=lengths_B, ssm=ssm)
