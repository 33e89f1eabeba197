"""Mamba-2 (SSD) state-space mixer: the scan in three equivalent forms, the decode-state ring buffers, and the
Linen mixer (matching `transformers` Mamba2Mixer).

Per head, with state h [H, Z] (DESIGN §2 letters; U groups share B and C; J = number of chunks):
    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ        y_t = h_t C_t   (the mixer adds D x_t)
- `ssd_naive`: a sequential `lax.scan` over time, the reference.
- `ssd_step`: one step, O(1) in the sequence length (decoding).
- `ssd_chunked`: the SSD block decomposition (Dao & Gu, 2024). Within a chunk of C steps the output is a
  masked quadratic form, like causal attention with decay weights exp(Σ Δ A); across chunks only the J chunk
  states are passed along (by a small (J+1)×(J+1) decay matrix: no sequential loop). Training and prefill use
  it; it is the reference for a Pallas kernel.
All three take an initial state, return the final state, and reset the state wherever `segment_ids_BT`
changes value (packed sequences). Internally the scan works on the discretised inputs Δx and ΔA.
"""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from lmx.models.backend import computed_once, ring_read, ring_write, unroll_chunk_pass, write_before_read
from lmx.models.config import ModelConfig
from lmx.models.layers import dense_init
from lmx.models.quantize import matmul, weight
from lmx.pallas._compat import model_interpret
from lmx.pallas.ssd import ssd as pallas_ssd
from lmx.sharding import per_shard

F32 = jnp.float32


def _heads(a, num_heads: int, axis: int):
    """Expand a per-group axis to heads: group u serves heads u·N/U .. (u+1)·N/U - 1 (as HF repeat_interleave)."""
    return jnp.repeat(a, num_heads // a.shape[axis], axis=axis)


def _starts(segment_ids_BT):
    """True where a new segment starts (the segment id changes), never at position 0."""
    return jnp.pad(segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1], ((0, 0), (1, 0)))


def _runs(segment_ids_BT):
    """Run index of each position: 0 for the first segment, +1 at every change of segment id."""
    return jnp.cumsum(_starts(segment_ids_BT), axis=1, dtype=jnp.int32)


def _segsum(log_decay):
    """[..., S] -> [..., S, S]: out[..., t, s] = a[s+1] + ... + a[t] for s <= t (the log decay from step s to t),
    -inf above the diagonal. Summed term by term, with no differences of large cumulative sums."""
    S = log_decay.shape[-1]
    lower = lambda k: jnp.tril(jnp.ones((S, S), bool), k)
    terms = jnp.where(lower(-1), log_decay[..., :, None], 0.0)  # [..., j, s]: a_j where j > s
    return jnp.where(lower(0), jnp.cumsum(terms, axis=-2), -jnp.inf)


def _step(h_BNHZ, dtx_BNH, dtA_BN, B_BUZ, C_BUZ=None):
    """One step on discretised inputs; C=None skips the output. Extra leading axes broadcast (ring_step runs it
    on a one-slot ring [B, 1, N, H, Z])."""
    N = h_BNHZ.shape[-3]
    h_BNHZ = jnp.exp(dtA_BN)[..., None, None] * h_BNHZ + dtx_BNH[..., None] * _heads(B_BUZ, N, -2)[..., None, :]
    y_BNH = None if C_BUZ is None else jnp.einsum("...NHZ,...NZ->...NH", h_BNHZ, _heads(C_BUZ, N, -2))
    return y_BNH, h_BNHZ


def ssd_step(
    h_BNHZ: Float[Array, "B N H Z"], x_BNH: Float[Array, "B N H"], dt_BN: Float[Array, "B N"],
    A_N: Float[Array, " N"], B_BUZ: Float[Array, "B U Z"], C_BUZ: Float[Array, "B U Z"],
):
    """One recurrence step (f32): returns (y_BNH, new h_BNHZ)."""
    dt_BN = dt_BN.astype(F32)
    return _step(h_BNHZ.astype(F32), x_BNH.astype(F32) * dt_BN[..., None], dt_BN * A_N, B_BUZ.astype(F32),
                 C_BUZ.astype(F32))


def ssd_naive(
    x_BTNH: Float[Array, "B T N H"], dt_BTN: Float[Array, "B T N"], A_N: Float[Array, " N"],
    B_BTUZ: Float[Array, "B T U Z"], C_BTUZ: Float[Array, "B T U Z"], *, initial_state_BNHZ=None, segment_ids_BT=None,
):
    """Sequential reference: (y_BTNH, final_state_BNHZ), f32."""
    Bn, T, N, H = x_BTNH.shape
    h0 = jnp.zeros((Bn, N, H, B_BTUZ.shape[-1]), F32) if initial_state_BNHZ is None else initial_state_BNHZ
    reset_BT = jnp.zeros((Bn, T), bool) if segment_ids_BT is None else _starts(segment_ids_BT)

    def body(h, inputs):
        x, dt, B, C, reset = inputs
        y, h = ssd_step(jnp.where(reset[:, None, None, None], 0.0, h), x, dt, A_N, B, C)
        return h, y

    time_major = lambda a: jnp.swapaxes(a, 0, 1)
    h, y_TBNH = lax.scan(body, h0.astype(F32), tuple(map(time_major, (x_BTNH, dt_BTN, B_BTUZ, C_BTUZ, reset_BT))))
    return time_major(y_TBNH), h


def ssd_chunked(
    x_BTNH: Float[Array, "B T N H"], dt_BTN: Float[Array, "B T N"], A_N: Float[Array, " N"],
    B_BTUZ: Float[Array, "B T U Z"], C_BTUZ: Float[Array, "B T U Z"], *, chunk_size: int, initial_state_BNHZ=None,
    segment_ids_BT=None,
):
    """Chunked SSD: (y_BTNH, final_state_BNHZ), f32. Any T works: the last chunk is padded with Δ = 0 steps,
    and chunks are at most T long."""
    dt_BTN = dt_BTN.astype(F32)
    return _chunked(x_BTNH.astype(F32) * dt_BTN[..., None], dt_BTN * A_N, B_BTUZ.astype(F32), C_BTUZ.astype(F32),
                    chunk_size, initial_state_BNHZ, segment_ids_BT)


def _chunked(dtx_BTNH, dtA_BTN, B_BTUZ, C_BTUZ, chunk_size, h0_BNHZ=None, segment_ids_BT=None):
    """ssd_chunked on discretised inputs. C_BTUZ=None computes only the final state."""
    Bn, T, N, H = dtx_BTNH.shape
    Z = B_BTUZ.shape[-1]
    C = min(chunk_size, T)
    pad = -T % C
    J = (T + pad) // C
    runs_BT = jnp.zeros((Bn, T), jnp.int32) if segment_ids_BT is None else _runs(segment_ids_BT)
    # Padding steps have Δ = 0: no decay, no input; they stay in the last run.
    chunk = lambda a, mode="constant": jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode=mode).reshape(
        Bn, J, C, *a.shape[2:])
    dtx_BJTNH, dtA_BJTN, B_BJTUZ, runs_BJT = chunk(dtx_BTNH), chunk(dtA_BTN), chunk(B_BTUZ), chunk(runs_BT, "edge")
    cum_BJTN = jnp.cumsum(dtA_BJTN, axis=2)  # log decay from the chunk start through step t
    last_BJ = runs_BJT[:, :, -1]
    enter_BJ = jnp.concatenate([runs_BJT[:, :1, 0], last_BJ[:, :-1]], axis=1)  # run of the state entering chunk j

    # 1. Each chunk's own contribution to the state at its end (positions in the chunk's last run only).
    to_end_BJTN = jnp.exp(cum_BJTN[:, :, -1:] - cum_BJTN) * (runs_BJT == last_BJ[..., None])[..., None]
    local_BJNHZ = jnp.einsum("BJTN,BJTNH,BJTNZ->BJNHZ", to_end_BJTN, dtx_BJTNH, _heads(B_BJTUZ, N, 3))

    # 2. Pass states across chunks. O and o both index the J + 1 chunk boundaries (O: the boundary whose state is
    # computed, o: an entry summed into it). Entry 0 is the initial state, entry j + 1 chunk j's local state; the
    # state after boundary O sums the entries o <= O, decayed through the chunks in between unless a segment
    # starts there. Like step 1, a parallel form (a (J+1)×(J+1) decay matrix), except for few chunks.
    h0_BNHZ = jnp.zeros((Bn, N, H, Z), F32) if h0_BNHZ is None else h0_BNHZ.astype(F32)
    last_BO = jnp.concatenate([runs_BT[:, :1], last_BJ], axis=1)  # the run at each boundary
    if unroll_chunk_pass(J):  # the same sum as a recurrence, unrolled (backend.py)
        afters = [h0_BNHZ]
        for j in range(J):
            keep_B = last_BO[:, j + 1] == last_BO[:, j]
            decay_BN = jnp.where(keep_B[:, None], jnp.exp(cum_BJTN[:, j, -1]), 0.0)
            afters.append(decay_BN[..., None, None] * afters[-1] + local_BJNHZ[:, j])
        after_BONHZ = jnp.stack(afters, axis=1)
    else:
        local_BoNHZ = jnp.concatenate([h0_BNHZ[:, None], local_BJNHZ], axis=1)
        chunk_decay_BNO = jnp.pad(cum_BJTN[:, :, -1], ((0, 0), (1, 0), (0, 0))).swapaxes(1, 2)
        same_BOo = last_BO[:, :, None] == last_BO[:, None, :]
        pass_BOoN = jnp.where(same_BOo[..., None], jnp.moveaxis(jnp.exp(_segsum(chunk_decay_BNO)), 1, -1), 0.0)
        after_BONHZ = jnp.einsum("BOoN,BoNHZ->BONHZ", pass_BOoN, local_BoNHZ)
    enter_BJNHZ, final_BNHZ = after_BONHZ[:, :-1], after_BONHZ[:, -1]
    if C_BTUZ is None:
        return None, final_BNHZ

    # 3. Outputs: the intra-chunk quadratic form plus the decayed entering state.
    C_BJTUZ = chunk(C_BTUZ)
    same_BJTS = runs_BJT[:, :, :, None] == runs_BJT[:, :, None, :]
    decay_BJTSN = jnp.where(same_BJTS[..., None], jnp.moveaxis(jnp.exp(_segsum(jnp.moveaxis(dtA_BJTN, 3, 2))), 2, -1),
                            0.0)
    CB_BJTSN = _heads(jnp.einsum("BJTUZ,BJSUZ->BJTSU", C_BJTUZ, B_BJTUZ), N, 4)
    y_BJTNH = jnp.einsum("BJTSN,BJSNH->BJTNH", CB_BJTSN * decay_BJTSN, dtx_BJTNH)
    from_enter_BJTN = jnp.exp(cum_BJTN) * (runs_BJT == enter_BJ[..., None])[..., None]
    y_BJTNH += jnp.einsum("BJTNZ,BJNHZ,BJTN->BJTNH", _heads(C_BJTUZ, N, 3), enter_BJNHZ, from_enter_BJTN)
    return y_BJTNH.reshape(Bn, J * C, N, H)[:, :T], final_BNHZ


# ------------------------------------------------------------------------------------ decode-state rings
# A row's conv ring (W slots) holds the conv input of position p in slot p % W; its state ring (Q slots) holds
# the state after position p in slot p % Q (Mamba2LayerState below).


def conv_window(conv_BWY, lengths_B, size: int):
    """Conv inputs of positions lengths-size .. lengths-1 (zeros before position 0): [B, size, Y]."""
    pos_BS = lengths_B[:, None] - size + jnp.arange(size)
    win_BSY = conv_BWY[jnp.arange(conv_BWY.shape[0])[:, None], pos_BS % conv_BWY.shape[1]]
    return jnp.where((pos_BS >= 0)[..., None], win_BSY, 0)


def current_state(ssm_BQNHZ, lengths_B):
    """The state after position lengths-1 (zeros for an empty row), f32."""
    h_BNHZ = ring_read(ssm_BQNHZ, lengths_B - 1)
    return jnp.where((lengths_B > 0)[:, None, None, None], h_BNHZ, 0.0).astype(F32)


def ring_step(ssm_BQNHZ, lengths_B, x_BNH, dt_BN, A_N, B_BUZ, C_BUZ):
    """`ssd_step` from the current state of a state ring, with the new state written into slot lengths % Q in place:
    returns (y_BNH, ring). A one-slot ring (rollback window 0, as `generate` uses) is updated in its own
    [B, 1, ...] shape, which XLA computes in place (a [B, N, H, Z] state written into slot 0 was copied)."""
    dt_BN = dt_BN.astype(F32)
    dtx_BNH, dtA_BN, B_BUZ = computed_once(x_BNH.astype(F32) * dt_BN[..., None]), dt_BN * A_N, computed_once(
        B_BUZ.astype(F32))
    if ssm_BQNHZ.shape[1] == 1:
        h_B1NHZ = jnp.where((lengths_B > 0).reshape(-1, 1, 1, 1, 1), ssm_BQNHZ, 0.0)  # an empty row starts at 0
        _, ssm_BQNHZ = _step(h_B1NHZ, dtx_BNH[:, None], dtA_BN[:, None], B_BUZ[:, None])
        h_BNHZ = ssm_BQNHZ[:, 0]
    else:
        _, h_BNHZ = _step(current_state(ssm_BQNHZ, lengths_B), dtx_BNH, dtA_BN, B_BUZ)
        ssm_BQNHZ, h_BNHZ = write_before_read(ssm_BQNHZ, lengths_B, h_BNHZ)
    return jnp.einsum("BNHZ,BNZ->BNH", h_BNHZ, _heads(C_BUZ.astype(F32), h_BNHZ.shape[1], 1)), ssm_BQNHZ


def commit(conv_BWY, ssm_BQNHZ, pending, start_B, valid_B, chunk_size: int = 64):
    """Fold the first valid_B[b] steps of a multi-token call that started at length start_B into the rings.

    pending = (dtx_BTNH, dtA_BTN, B_BTUZ, xbc_BTY): the call's discretised SSM inputs and raw conv inputs.
    Steps past valid_B are dropped, so right padding never reaches the state. The state ring gets the states
    after the last Q valid positions: everything older is folded by one masked chunked scan, then Q steps."""
    dtx_BTNH, dtA_BTN, B_BTUZ, xbc_BTY = pending
    Bn, T = dtA_BTN.shape[:2]
    W, Q = conv_BWY.shape[1], ssm_BQNHZ.shape[1]
    end_B = start_B + valid_B

    # Conv ring: slot j takes the input of the newest position p < end with p % W == j.
    seq_BSY = jnp.concatenate([conv_window(conv_BWY, start_B, W), xbc_BTY.astype(conv_BWY.dtype)], axis=1)
    last_B1 = end_B[:, None] - 1
    pos_BW = last_B1 - (last_B1 - jnp.arange(W)) % W
    conv_BWY = seq_BSY[jnp.arange(Bn)[:, None], pos_BW - start_B[:, None] + W]

    # State ring: fold steps [0, valid - Q) at once, then step through the last Q, writing each state.
    t_T = jnp.arange(T)
    fold_BT = t_T < jnp.maximum(valid_B - Q, 0)[:, None]
    _, h_BNHZ = _chunked(dtx_BTNH * fold_BT[..., None, None], dtA_BTN * fold_BT[..., None], B_BTUZ, None,
                         chunk_size, current_state(ssm_BQNHZ, start_B))

    def step(carry, k):
        h_BNHZ, ring_BQNHZ = carry
        rel_B = valid_B - Q + k  # position within the call
        live_B = rel_B >= 0
        at = lambda a: a[jnp.arange(Bn), jnp.clip(rel_B, 0, T - 1)]
        _, h_new = _step(h_BNHZ, at(dtx_BTNH), at(dtA_BTN), at(B_BTUZ))
        h_BNHZ = jnp.where(live_B[:, None, None, None], h_new, h_BNHZ)
        pos_B = start_B + rel_B  # rows that are not live write their slot's own value back
        value_BNHZ = jnp.where(live_B[:, None, None, None], h_BNHZ, ring_read(ring_BQNHZ, pos_B))
        return (h_BNHZ, ring_write(ring_BQNHZ, pos_B, value_BNHZ)), None

    (_, ssm_BQNHZ), _ = lax.scan(step, (h_BNHZ, ssm_BQNHZ), jnp.arange(Q))
    return conv_BWY, ssm_BQNHZ


class RingState:
    """Commit and rollback shared by the SSM layer states (Mamba2LayerState, mamba3.Mamba3LayerState): flax
    dataclasses with rings of Q = rollback window + 1 state slots (`ssm_BQNHZ` first), a rollback floor `floor_B`
    and the `pending` record of a multi-token call (None once committed). Subclasses define `_fold`."""

    @property
    def rollback_window(self) -> int:
        return self.ssm_BQNHZ.shape[1] - 1

    def commit(self, lengths_B):
        """Fold the pending call's first lengths_B - start_B tokens into the rings (the rest is dropped)."""
        p = self.pending
        if p is None:
            return self
        valid_B = jnp.clip(lengths_B - p.start_B, 0, p.num_tokens)
        floor_B = jnp.maximum(self.floor_B, p.start_B + valid_B - self.rollback_window)
        return self._fold(p, valid_B).replace(floor_B=floor_B, pending=None)

    def stepped(self, lengths_B, **rings):
        """The state after a one-token step from lengths_B that wrote `rings`."""
        return self.replace(**rings, floor_B=jnp.maximum(self.floor_B, lengths_B + 1 - self.rollback_window))

    def rollback(self, lengths_B):
        """Commit up to lengths_B, then restore the state after position lengths_B - 1: the rings are indexed by
        position, so only the caller's lengths change. Below `floor_B` the state is gone: a ValueError when the
        lengths are concrete; under jit it is the caller's contract."""
        state = self.commit(lengths_B)
        if not any(isinstance(a, jax.core.Tracer) for a in (lengths_B, state.floor_B)):
            lengths, floor = np.asarray(lengths_B), np.asarray(state.floor_B)
            rows = np.flatnonzero(lengths < floor)[:8].tolist()
            if rows:
                raise ValueError(
                    f"truncate: rows {rows} roll back to lengths {lengths[rows].tolist()}, but their SSM states can "
                    f"only be restored to lengths >= {floor[rows].tolist()}: SSM layers keep only the last "
                    f"rollback_window={self.rollback_window} committed steps (SSMConfig's, or init_state's override)"
                    + (" (rollback is disabled)" if self.rollback_window == 0 else ""))
        return state


@flax.struct.dataclass
class Mamba2Pending:
    """The not-yet-committed steps of one Mamba-2 layer's last multi-token call."""

    start_B: jax.Array  # int32: each row's length when the call started
    dtx_BTNH: jax.Array  # Δ·x (f32)
    dtA_BTN: jax.Array  # Δ·A, the log decay (f32)
    B_BTUZ: jax.Array  # f32
    xbc_BTY: jax.Array  # conv inputs

    @property
    def num_tokens(self) -> int:
        return self.dtA_BTN.shape[1]


@flax.struct.dataclass
class Mamba2LayerState(RingState):
    """One Mamba-2 layer's decode state (letters: W conv-input slots, Q state slots, Y conv channels; R_w the
    rollback window):
    - `conv_BWY`: the conv inputs of the last W = conv_width - 1 + R_w positions, position p in slot p % W;
    - `ssm_BQNHZ`: the states after each of the last Q = R_w + 1 positions, position p in slot p % Q (f32);
    - `floor_B`: the shortest length a rollback can restore (length - R_w after a write);
    - `pending`: a multi-token call's inputs, folded in by `commit` once the valid lengths are known.
    A step writes one slot of each ring in place, so rolling back j <= R_w steps moves only the lengths."""

    conv_BWY: jax.Array
    ssm_BQNHZ: jax.Array
    floor_B: jax.Array
    pending: Mamba2Pending | None = None

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype, rollback_window: int | None = None):
        s = cfg.ssm
        R_w = s.rollback_window if rollback_window is None else rollback_window
        return cls(conv_BWY=jnp.zeros((batch, s.conv_width - 1 + R_w, s.conv_dim), dtype),
                   ssm_BQNHZ=jnp.zeros((batch, R_w + 1, s.num_heads, s.head_dim, s.state_size), F32),
                   floor_B=jnp.zeros((batch,), jnp.int32))

    def _fold(self, p: Mamba2Pending, valid_B):
        conv_BWY, ssm_BQNHZ = commit(self.conv_BWY, self.ssm_BQNHZ, (p.dtx_BTNH, p.dtA_BTN, p.B_BTUZ, p.xbc_BTY),
                                     p.start_B, valid_B)
        return self.replace(conv_BWY=conv_BWY, ssm_BQNHZ=ssm_BQNHZ)


# ----------------------------------------------------------------------------------------------- mixer


def causal_conv(xbc_BTY, w_WY, b_Y, prev_BWY=None, runs_BT=None):
    """Depthwise causal conv, out_t = b + Σ_k w_k in_{t-W+1+k} (HF conv1d order). prev_BWY: the W - 1 inputs before
    position 0 (zeros if None). With runs_BT, inputs from another segment count as zero."""
    W, (Bn, T, Y) = w_WY.shape[0], xbc_BTY.shape
    if prev_BWY is None:
        prev_BWY = jnp.zeros((Bn, W - 1, Y), xbc_BTY.dtype)
    full_BSY = jnp.concatenate([prev_BWY.astype(F32), xbc_BTY.astype(F32)], axis=1)
    out_BTY = jnp.broadcast_to(b_Y.astype(F32), (Bn, T, Y))
    for k in range(W):
        tap_BTY = full_BSY[:, k : k + T] * w_WY[k].astype(F32)
        lag = W - 1 - k
        if runs_BT is not None and lag:
            earlier_BT = jnp.pad(runs_BT, ((0, 0), (lag, 0)), constant_values=-1)[:, :T]
            tap_BTY = jnp.where((earlier_BT == runs_BT)[..., None], tap_BTY, 0.0)
        out_BTY += tap_BTY
    return out_BTY


class GatedRMSNorm(nn.Module):
    """RMSNorm(y · silu(z)) over groups of the inner width (HF MambaRMSNormGated, norm after the gate)."""

    groups: int
    eps: float
    dtype: jnp.dtype = F32
    param_dtype: jnp.dtype = F32

    @nn.compact
    def __call__(self, y_BTI, z_BTI):
        scale_I = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("ssm_inner",)),
                             (y_BTI.shape[-1],), self.param_dtype)
        y = y_BTI.astype(F32) * nn.silu(z_BTI.astype(F32))
        y = y.reshape(*y.shape[:-1], self.groups, -1)
        y = y * lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
        return (scale_I.astype(F32) * y.reshape(y_BTI.shape)).astype(self.dtype)


def _dt_bias_init(s):
    """softplus⁻¹ of Δ drawn log-uniformly in [dt_min, dt_max] (floored at dt_floor), as Mamba does."""

    def init(key, shape, dtype=F32):
        lo, hi = math.log(s.dt_min), math.log(s.dt_max)
        dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape, F32, lo, hi)), s.dt_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


class Mamba2Mixer(nn.Module):
    """in_proj -> (z | xBC | dt); causal conv + silu on xBC; SSD with per-head A = -exp(A_log), Δ =
    clip(softplus(dt + dt_bias), dt_limit) and D skip; gated group RMSNorm with z; out_proj."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, state: Mamba2LayerState | None = None, lengths_B=None, segment_ids_BT=None):
        """state: None (teacher-forced) or this layer's Mamba2LayerState at lengths_B (a pending call is committed
        first). Returns (y_BTD, new state): None without a state; after one token the rings hold the new step;
        after more, the call is recorded as pending (its inputs), folded in once the valid lengths are known
        (by `truncate`, or at the next call)."""
        cfg, s = self.cfg, self.cfg.ssm
        D, N, H, U, Z, I, Y, W = (cfg.d_model, s.num_heads, s.head_dim, s.n_groups, s.state_size, s.inner_dim,
                                  s.conv_dim, s.conv_width)
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        ones, zeros = nn.initializers.ones, nn.initializers.zeros
        part = nn.with_logical_partitioning
        in_proj = weight(self, "in_proj", dense_init(D, ("embed", "ssm_proj")), (D, I + Y + N), pd)
        conv_WY = self.param("conv", dense_init(W, ("conv_width", "ssm_conv")), (W, Y), pd)
        conv_bias_Y = (self.param("conv_bias", part(zeros, ("ssm_conv",)), (Y,), pd) if s.use_conv_bias
                       else jnp.zeros((Y,), pd))
        dt_bias_N = self.param("dt_bias", part(_dt_bias_init(s), ("ssm_heads",)), (N,), pd)
        A_log_N = self.param("A_log", part(lambda k, sh, d: jnp.log(jnp.arange(1, N + 1, dtype=d)), ("ssm_heads",)),
                             (N,), pd)
        D_N = self.param("D", part(ones, ("ssm_heads",)), (N,), pd)
        out_proj = weight(self, "out_proj", dense_init(I, ("ssm_inner", "embed")), (I, D), pd)

        Bn, T, _ = x_BTD.shape
        zxbcdt = matmul(x_BTD.astype(dt), in_proj, dt)  # z | xBC | dt
        if s.use_bias:
            zxbcdt += self.param("in_proj_bias", part(zeros, ("ssm_proj",)), (I + Y + N,), pd).astype(dt)
        z_BTI, xbc_BTY, dt_BTN = jnp.split(zxbcdt, [I, I + Y], axis=-1)

        runs_BT = None if segment_ids_BT is None else _runs(segment_ids_BT)
        if state is not None:
            state = state.commit(lengths_B)
        step = state is not None and T == 1
        if step and state.conv_BWY.shape[1] >= W:
            # Write this position's conv input first, then read the W - 1 before it from the written ring (a
            # read unordered with the in-place write makes XLA copy the ring).
            conv_BWY = ring_write(state.conv_BWY, lengths_B, xbc_BTY[:, 0])
            prev_BWY = conv_window(conv_BWY, lengths_B, W - 1)
        else:  # also a ring of W - 1 slots (rollback_window 0), which the write would overwrite first
            prev_BWY = None if state is None else conv_window(state.conv_BWY, lengths_B, W - 1)
            conv_BWY = ring_write(state.conv_BWY, lengths_B, xbc_BTY[:, 0]) if step else None
        xbc_act_BTY = nn.silu(causal_conv(xbc_BTY, conv_WY, conv_bias_Y, prev_BWY, runs_BT))
        x_BTNH = xbc_act_BTY[..., :I].reshape(Bn, T, N, H)
        B_BTUZ, C_BTUZ = (a.reshape(Bn, T, U, Z) for a in jnp.split(xbc_act_BTY[..., I:], 2, axis=-1))
        delta_BTN = jnp.clip(jax.nn.softplus(dt_BTN.astype(F32) + dt_bias_N.astype(F32)), *s.dt_limit)
        A_N = -jnp.exp(A_log_N.astype(F32))

        if step:  # decoding: one recurrent step, written into the rings
            y_BNH, ssm_BQNHZ = ring_step(state.ssm_BQNHZ, lengths_B, x_BTNH[:, 0], delta_BTN[:, 0], A_N,
                                         B_BTUZ[:, 0], C_BTUZ[:, 0])
            y_BTNH = y_BNH[:, None]
            state = state.stepped(lengths_B, conv_BWY=conv_BWY, ssm_BQNHZ=ssm_BQNHZ)
        else:
            h0_BNHZ = None if state is None else current_state(state.ssm_BQNHZ, lengths_B)
            if s.impl == "xla":
                y_BTNH, _ = ssd_chunked(x_BTNH, delta_BTN, A_N, B_BTUZ, C_BTUZ, chunk_size=s.chunk_size,
                                        initial_state_BNHZ=h0_BNHZ, segment_ids_BT=segment_ids_BT)
            else:  # lmx.pallas's SSD kernels (its "auto" falls back to ssd_chunked off a GPU), per row shard under
                # a mesh (XLA cannot partition a pallas_call; the mixer's own axes are not sharded)
                rows = lambda n: ("batch",) + (None,) * (n - 1)  # noqa: E731
                scan = per_shard(lambda x, d, a, b, c, h, seg: pallas_ssd(
                    x, d, a, b, c, chunk=s.chunk_size, initial_state=h, segment_ids=seg, impl=s.impl,
                    interpret=model_interpret(s.impl)), (rows(4), rows(3), (None,), rows(4), rows(4), rows(4),
                                                         ("batch", "seq")), (rows(4), rows(4)))
                y_BTNH, _ = scan(x_BTNH, delta_BTN, A_N, B_BTUZ, C_BTUZ, h0_BNHZ, segment_ids_BT)
            if state is not None:
                state = state.replace(pending=Mamba2Pending(lengths_B, x_BTNH * delta_BTN[..., None],
                                                            delta_BTN * A_N, B_BTUZ, xbc_BTY))
        y_BTNH = y_BTNH + x_BTNH * D_N.astype(F32)[:, None]
        y_BTI = GatedRMSNorm(U, cfg.norm_eps, F32, pd, name="norm")(y_BTNH.reshape(Bn, T, I), z_BTI)
        y_BTD = matmul(y_BTI.astype(dt), out_proj, dt)
        if s.use_bias:
            y_BTD += self.param("out_proj_bias", part(zeros, ("embed",)), (D,), pd).astype(dt)
        return y_BTD, state
