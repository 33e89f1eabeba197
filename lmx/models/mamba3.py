"""Mamba-3 state-space recurrence: sequential reference, chunked (training/prefill) and one-token step (decode).

Mamba-3 (Lahoti, Li, Chen, Wang, Bick, Kolter, Dao, Gu, "Mamba-3: Improved Sequence Modeling using State
Space Principles") changes Mamba-2's SSD recurrence in three ways. The equations below are the ones the
reference code implements; they were read from ``state-spaces/mamba``: the recurrent references
``mamba3_siso_step_ref`` (``tests/ops/triton/test_mamba3_siso.py``) and ``mamba3_MIMO_step_ref``
(``tests/ops/tilelang/test_mamba3_mimo.py``), the chunked reference ``mamba3_siso_fwd_ref`` (same SISO test
file: the "shifted gamma" form used below), the decode kernel ``mamba_ssm/ops/cute/mamba3/mamba3_step_fn.py``
(``alpha = exp(A dt)``, ``gamma = trap * dt``, ``beta = (1 - trap) * dt * alpha``), the rotary step
``mamba_ssm/ops/triton/mamba3/mamba3_mimo_rotary_step.py`` and the layer ``mamba_ssm/modules/mamba3.py``.

Shape letters (DESIGN.md §2): B batch, T time, N heads, H head dim, Z state size, M MIMO rank, C chunk
length, J number of chunks; and here A = number of rotary angles (state channel pairs that rotate, A <= Z/2).
Per head n and token t, with inputs x_t ∈ R^H, Δ_t > 0, A_t < 0, λ_t ∈ [0, 1], ω_t ∈ R^A, B_t, C_t ∈ R^{M×Z}:

1. Exponential-trapezoidal discretisation::

       α_t = exp(Δ_t A_t),   γ_t = λ_t Δ_t,   β_t = (1 − λ_t) Δ_t α_t
       h_t = α_t h_{t−1} + β_t P_{t−1} + γ_t P_t,   P_t = Σ_r X_t[r] K_t[r]ᵀ ∈ R^{H×Z}

   (λ is the reference's ``sigmoid(trap)``; λ ≡ 1 gives Mamba-2's Euler rule h_t = α_t h_{t−1} + Δ_t B_t x_t.)
   The state before the first token carries P_{−1} from the previous call (zero for a fresh sequence).
2. Complex state as data-dependent RoPE: cumulative angles θ_t = θ_{t−1} + Δ_t ω_t (kept mod 2π; the
   reference uses ω = π·tanh(angle_proj)), and K_t[r] = Rot(θ_t) B_t[r], Q_t[r] = Rot(θ_t) C_t[r], where Rot
   rotates channel pair j (j < A) by θ_t[j] — pairs (2j, 2j+1) for ``rope="interleaved"`` (reference SISO) or
   (j, j + Z/2) for ``rope="halves"`` (reference MIMO TileLang kernel); the other channels pass through.
   Equivalently, for M=1 and Z = 2A, with b = B[0::2] + i B[1::2] etc., a complex diagonal state
   h_t = exp(Δ_t (A_t − i ω_t)) (h_{t−1} + (1−λ_t) Δ_t b_{t−1} x_{t−1}ᵀ) + λ_t Δ_t b_t x_tᵀ, y_t = Re(c̄_tᵀ h_t).
3. MIMO rank M: X_t[r] = x_t ⊙ W_x[r] (``x_proj_NMH``, the reference's ``mimo_x``; all-ones when omitted,
   which with M=1 is SISO), so each step adds a rank-M sum of outer products, and the output has a rank
   axis::

       y_t[r] = h_t Q_t[r] + D X_t[r] ∈ R^H         (y_BTMNH; the mixer gates and sums it over r)

Chunked form. With β̃_t = (1 − λ_t) Δ_t (so β_t = β̃_t α_t), the shifted state h̃_t = h_t + β̃_{t+1} P_t obeys
a plain SSD recurrence with input scale s_t = γ_t + β̃_{t+1}:  h̃_t = α_t h̃_{t−1} + s_t P_t, and
y_t[r] = h̃_t Q_t[r] − β̃_{t+1} Σ_q (Q_t[r]·K_t[q]) X_t[q] + D X_t[r]. Inside one call β̃_{T} := 0, so the
final h̃ is the true final h, and h̃_{−1} = h_{−1} + β̃_0 P_{−1}. That SSD is computed chunk by chunk
(intra-chunk quadratic form, chunk states, a scan over chunks), after rotating B and C.

Packed sequences: where `segment_ids_BT` changes value a new segment starts from h = 0 and without the previous
token's P_{t−1} term (β̃_t := 0 there). θ keeps accumulating across the boundary; outputs only see angle
differences within a segment, so they equal the segment's own run from θ = 0.

Decode-state rings (see lmx.models.state for the layout and rollback rules): `rings` is the tuple
(ssm_BQNHZ, angle_BQNA, K_BQMNZ, x_BQNH) — the four Mamba3State fields after each of the last Q positions,
position p in slot p % Q. `current_state` reads a row's state, `write_rings` writes one, and `commit` folds the
first `valid` tokens of a multi-token call (its pending record) into them.

Everything is computed in float32; y is returned in x's dtype, the state stays float32.
"""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lmx.models.backend import computed_once, ring_read, ring_write, write_before_read
from lmx.models.layers import dense_init
from lmx.models.ssm import RingState, _starts

TWO_PI = 2.0 * math.pi
ROPE_LAYOUTS = ("interleaved", "halves")


@flax.struct.dataclass
class Mamba3State:
    """Recurrent state of one Mamba-3 layer (float32).

    ssm_BNHZ: h after the last token; angle_BNA: θ of the last token (mod 2π); B_prev_BMNZ: the last token's
    *rotated* B (K); x_prev_BNH: the last token's x (before the MIMO x-projection). The last two give the
    trapezoid's β_t P_{t−1} term at the next token.
    """

    ssm_BNHZ: jax.Array
    angle_BNA: jax.Array
    B_prev_BMNZ: jax.Array
    x_prev_BNH: jax.Array

    @classmethod
    def zeros(cls, batch: int, num_heads: int, head_dim: int, state_size: int, num_angles: int, rank: int = 1):
        f = jnp.float32
        return cls(
            ssm_BNHZ=jnp.zeros((batch, num_heads, head_dim, state_size), f),
            angle_BNA=jnp.zeros((batch, num_heads, num_angles), f),
            B_prev_BMNZ=jnp.zeros((batch, rank, num_heads, state_size), f),
            x_prev_BNH=jnp.zeros((batch, num_heads, head_dim), f),
        )


# ---------------------------------------------------------------------------------------------------------
# Validation and shared pieces


def _shape_error(name: str, got, want) -> ValueError:
    return ValueError(f"{name} has shape {tuple(got)}, expected {tuple(want)}")


def _check_shape(name: str, arr, want):
    if arr is not None and tuple(arr.shape) != tuple(want):
        raise _shape_error(name, arr.shape, want)


def _prepare(x, dt, A, B, C, lam, omega, x_proj, D, state, rope, *, time_axis: bool):
    """Validate shapes and bring everything to float32 with an explicit rank axis.

    With time_axis, arrays are [B, T, ...]; without (decode step), [B, ...]. B/C may omit the rank axis
    (SISO). Returns (arrays, siso) with B/C as [..., M, N, Z] and x_proj as [M, N, H].
    """
    if rope not in ROPE_LAYOUTS:
        raise ValueError(f"rope={rope!r} must be one of {ROPE_LAYOUTS}")
    lead = 2 if time_axis else 1
    tag = "BT" if time_axis else "B"
    if x.ndim != lead + 2:
        raise ValueError(f"x_{tag}NH must have {lead + 2} dims, got shape {tuple(x.shape)}")
    lead_shape = tuple(x.shape[:lead])
    N, H = x.shape[lead:]
    siso = B.ndim == lead + 2
    if B.ndim not in (lead + 2, lead + 3):
        raise ValueError(f"B must be [{tag}, N, Z] (SISO) or [{tag}, M, N, Z] (MIMO), got shape {tuple(B.shape)}")
    M, Z = (1 if siso else B.shape[-3]), B.shape[-1]
    if not siso and C.ndim == B.ndim and x_proj is not None and x_proj.ndim == 3:
        ranks = {f"B_{tag}MNZ": M, f"C_{tag}MNZ": C.shape[-3], "x_proj_NMH": x_proj.shape[1]}
        if len(set(ranks.values())) > 1:
            raise ValueError(f"MIMO rank M disagrees: {', '.join(f'{k} has M={v}' for k, v in ranks.items())}")
    want = lead_shape + ((N, Z) if siso else (M, N, Z))
    _check_shape(f"B_{tag}{'' if siso else 'M'}NZ", B, want)
    _check_shape(f"C_{tag}{'' if siso else 'M'}NZ", C, want)
    if siso:
        B, C = B[..., None, :, :], C[..., None, :, :]
    for name, arr in (("dt", dt), ("A", A), ("lam", lam)):
        _check_shape(f"{name}_{tag}N", arr, lead_shape + (N,))
    if omega.ndim != lead + 2 or tuple(omega.shape[:-1]) != lead_shape + (N,):
        raise _shape_error(f"omega_{tag}NA", omega.shape, lead_shape + (N, "A"))
    num_angles = omega.shape[-1]
    if Z % 2 or not 0 <= num_angles <= Z // 2:
        raise ValueError(f"state size Z={Z} must be even and hold the A={num_angles} rotary angles (A <= Z/2)")
    if x_proj is None:
        x_proj = jnp.ones((M, N, H), jnp.float32)
    else:
        _check_shape("x_proj_NMH", x_proj, (N, M, H))
        x_proj = jnp.swapaxes(x_proj, 0, 1).astype(jnp.float32)
    _check_shape("D_N", D, (N,))
    if state is not None:
        batch = lead_shape[0]
        _check_shape("state.ssm_BNHZ", state.ssm_BNHZ, (batch, N, H, Z))
        _check_shape("state.angle_BNA", state.angle_BNA, (batch, N, num_angles))
        _check_shape("state.B_prev_BMNZ", state.B_prev_BMNZ, (batch, M, N, Z))
        _check_shape("state.x_prev_BNH", state.x_prev_BNH, (batch, N, H))
        state = jax.tree.map(lambda a: a.astype(jnp.float32), state)
    f32 = lambda a: None if a is None else a.astype(jnp.float32)
    arrays = tuple(map(f32, (x, dt, A, B, C, lam, omega))) + (x_proj, f32(D), state)
    return arrays, siso


def rotate(v_Z, theta_A, rope: str = "interleaved"):
    """Rotate channel pairs of v by the angles θ (the real form of multiplying by e^{iθ}).

    v: [..., Z]; theta: [..., A] broadcastable against v's leading axes, A <= Z/2. Pair j < A is
    (2j, 2j+1) for "interleaved" and (j, j + Z/2) for "halves"; other channels are unchanged.
    """
    Z, A = v_Z.shape[-1], theta_A.shape[-1]
    if A == 0:
        return v_Z
    cos, sin = jnp.cos(theta_A), jnp.sin(theta_A)
    if rope == "interleaved":
        pairs = v_Z[..., : 2 * A].reshape(*v_Z.shape[:-1], A, 2)
        v0, v1 = pairs[..., 0], pairs[..., 1]
        rot = jnp.stack([v0 * cos - v1 * sin, v0 * sin + v1 * cos], axis=-1)
        rot = rot.reshape(*rot.shape[:-2], 2 * A)
        return jnp.concatenate([rot, jnp.broadcast_to(v_Z[..., 2 * A:], rot.shape[:-1] + (Z - 2 * A,))], -1)
    if rope == "halves":
        half = Z // 2
        v0, v1 = v_Z[..., :half], v_Z[..., half:]
        pad = [(0, 0)] * (theta_A.ndim - 1) + [(0, half - A)]
        cos, sin = jnp.pad(cos, pad, constant_values=1.0), jnp.pad(sin, pad)
        return jnp.concatenate([v0 * cos - v1 * sin, v0 * sin + v1 * cos], axis=-1)
    raise ValueError(f"rope={rope!r} must be one of {ROPE_LAYOUTS}")


def _wrap(theta):
    return jnp.mod(theta, TWO_PI)


def _finish(y_BTMNH, siso: bool, dtype):
    y = y_BTMNH[..., 0, :, :] if siso else y_BTMNH
    return y.astype(dtype)


def _segment_starts(segment_ids_BT, batch: int, T: int):
    """True where a packed segment starts (never at position 0); all False without segment ids."""
    if segment_ids_BT is None:
        return jnp.zeros((batch, T), bool)
    _check_shape("segment_ids_BT", segment_ids_BT, (batch, T))
    return _starts(segment_ids_BT)


def _rows(mask_B, like):
    """Reshape a per-row mask to broadcast against `like` ([B, ...])."""
    return mask_B.reshape(mask_B.shape + (1,) * (like.ndim - 1))


def _advance(h_BNHZ, X_prev_BMNH, K_prev_BMNZ, X_BMNH, K_BMNZ, dt_BN, A_BN, lam_BN):
    """One token of the trapezoid, h_t = α_t h_{t−1} + β_t P_{t−1} + γ_t P_t, on rotated B (K) and projected x (X)."""
    alpha = jnp.exp(dt_BN * A_BN)
    e = lambda v: v[..., None, None]
    P = lambda X, K: jnp.einsum("BMNH,BMNZ->BNHZ", X, K)
    return (e(alpha) * h_BNHZ + e((1.0 - lam_BN) * dt_BN * alpha) * P(X_prev_BMNH, K_prev_BMNZ)
            + e(lam_BN * dt_BN) * P(X_BMNH, K_BMNZ))


# ---------------------------------------------------------------------------------------------------------
# The three forms


def mamba3_naive(
    x_BTNH: Float[Array, "B T N H"],
    dt_BTN: Float[Array, "B T N"],
    A_BTN: Float[Array, "B T N"],
    B_BTMNZ: Float[Array, "B T M N Z"],
    C_BTMNZ: Float[Array, "B T M N Z"],
    lam_BTN: Float[Array, "B T N"],
    omega_BTNA: Float[Array, "B T N A"],
    *,
    x_proj_NMH: Float[Array, "N M H"] | None = None,
    D_N: Float[Array, " N"] | None = None,
    state: Mamba3State | None = None,
    rope: str = "interleaved",
    segment_ids_BT=None,
):
    """Ground truth: the literal recurrence h_t = α_t h_{t−1} + β_t P_{t−1} + γ_t P_t, one `lax.scan` step
    per token (h and P_{t−1} reset where a packed segment starts). B/C may be [B, T, N, Z] (SISO; y is then
    [B, T, N, H]) or [B, T, M, N, Z] (y: [B, T, M, N, H]). Returns (y, final Mamba3State)."""
    (x, dt, A, B, C, lam, om, xp_MNH, D, state), siso = _prepare(
        x_BTNH, dt_BTN, A_BTN, B_BTMNZ, C_BTMNZ, lam_BTN, omega_BTNA, x_proj_NMH, D_N, state, rope,
        time_axis=True)
    Bsz, T, N, H = x.shape
    M, Z = B.shape[2], B.shape[-1]
    if state is None:
        state = Mamba3State.zeros(Bsz, N, H, Z, om.shape[-1], M)
    theta_BTNA = state.angle_BNA[:, None] + jnp.cumsum(dt[..., None] * om, axis=1)
    K = rotate(B, theta_BTNA[:, :, None], rope)  # [B, T, M, N, Z]
    Q = rotate(C, theta_BTNA[:, :, None], rope)
    X = x[:, :, None] * xp_MNH  # [B, T, M, N, H]
    K_prev = jnp.concatenate([state.B_prev_BMNZ[:, None], K[:, :-1]], axis=1)
    X_prev = jnp.concatenate([state.x_prev_BNH[:, None, None] * xp_MNH, X[:, :-1]], axis=1)
    starts_BT = _segment_starts(segment_ids_BT, Bsz, T)

    def body(h_BNHZ, inp):
        x_t, xp_t, k_t, kp_t, q_t, dt_t, a_t, lam_t, start_t = inp
        h_BNHZ = jnp.where(start_t[:, None, None, None], 0.0, h_BNHZ)  # a new segment: no state, no P_{t−1}
        alpha = jnp.exp(dt_t * a_t)[..., None, None]
        beta = jnp.where(start_t[:, None], 0.0, (1.0 - lam_t) * dt_t)[..., None, None] * alpha
        gamma = (lam_t * dt_t)[..., None, None]
        h = (alpha * h_BNHZ + beta * jnp.einsum("BMNH,BMNZ->BNHZ", xp_t, kp_t)
             + gamma * jnp.einsum("BMNH,BMNZ->BNHZ", x_t, k_t))
        y = jnp.einsum("BNHZ,BMNZ->BMNH", h, q_t)
        if D is not None:
            y = y + D[:, None] * x_t
        return h, y

    time_major = lambda a: jnp.moveaxis(a, 1, 0)
    inputs = tuple(map(time_major, (X, X_prev, K, K_prev, Q, dt, A, lam, starts_BT)))
    h, y_TBMNH = jax.lax.scan(body, state.ssm_BNHZ, inputs)
    final = Mamba3State(ssm_BNHZ=h, angle_BNA=_wrap(theta_BTNA[:, -1]), B_prev_BMNZ=K[:, -1], x_prev_BNH=x[:, -1])
    return _finish(jnp.moveaxis(y_TBMNH, 0, 1), siso, x_BTNH.dtype), final


def mamba3_step(
    state: Mamba3State,
    x_BNH: Float[Array, "B N H"],
    dt_BN: Float[Array, "B N"],
    A_BN: Float[Array, "B N"],
    B_BMNZ: Float[Array, "B M N Z"],
    C_BMNZ: Float[Array, "B M N Z"],
    lam_BN: Float[Array, "B N"],
    omega_BNA: Float[Array, "B N A"],
    *,
    x_proj_NMH: Float[Array, "N M H"] | None = None,
    D_N: Float[Array, " N"] | None = None,
    rope: str = "interleaved",
    store_h=None,
):
    """One decode token in O(1): advance θ, rotate B/C, apply the trapezoid with the carried (K, x) of the
    previous token. B/C may be [B, N, Z] (SISO; y: [B, N, H]) or [B, M, N, Z] (y: [B, M, N, H]).
    store_h: optional h_BNHZ -> h_BNHZ, applied to the new state before the output reads it (an LM writes h into
    its ring there and may return it read back: see Mamba3Mixer.with_rings). Returns (y, new Mamba3State)."""
    (x, dt, A, B, C, lam, om, xp_MNH, D, state), siso = _prepare(
        x_BNH, dt_BN, A_BN, B_BMNZ, C_BMNZ, lam_BN, omega_BNA, x_proj_NMH, D_N, state, rope, time_axis=False)
    theta_BNA = _wrap(state.angle_BNA + dt[..., None] * om)
    K = rotate(B, theta_BNA[:, None], rope)  # [B, M, N, Z]
    Q = rotate(C, theta_BNA[:, None], rope)
    X = x[:, None] * xp_MNH  # [B, M, N, H]
    X_prev = state.x_prev_BNH[:, None] * xp_MNH
    # The state update reads each input element H or Z times: computed_once keeps XLA from recomputing the
    # inputs' projections, norms and rotations inside it (as in ssm.ring_step).
    once = computed_once
    h = _advance(state.ssm_BNHZ, X_prev, state.B_prev_BMNZ, once(X), once(K), once(dt), once(A), once(lam))
    y = jnp.einsum("BNHZ,BMNZ->BMNH", h if store_h is None else store_h(h), Q)
    if D is not None:
        y = y + D[:, None] * X
    new_state = Mamba3State(ssm_BNHZ=h, angle_BNA=theta_BNA, B_prev_BMNZ=K, x_prev_BNH=x)
    y = y[:, 0] if siso else y
    return y.astype(x_BNH.dtype), new_state


def _add_mod_2pi(a, b):
    return _wrap(a + b)


def mamba3_chunked(
    x_BTNH: Float[Array, "B T N H"],
    dt_BTN: Float[Array, "B T N"],
    A_BTN: Float[Array, "B T N"],
    B_BTMNZ: Float[Array, "B T M N Z"],
    C_BTMNZ: Float[Array, "B T M N Z"],
    lam_BTN: Float[Array, "B T N"],
    omega_BTNA: Float[Array, "B T N A"],
    *,
    chunk_size: int,
    x_proj_NMH: Float[Array, "N M H"] | None = None,
    D_N: Float[Array, " N"] | None = None,
    state: Mamba3State | None = None,
    rope: str = "interleaved",
    segment_ids_BT=None,
):
    """Chunked (block-decomposition) form for training and prefill: the trapezoid rewritten as an SSD with
    input scale s_t = λ_t Δ_t + (1 − λ_{t+1}) Δ_{t+1} over RoPE-rotated B/C, plus a diagonal correction
    (module docstring). T need not be a multiple of chunk_size (the tail is padded with Δ = 0, which leaves
    the state unchanged); chunks are at most T long. Same arguments and return value as `mamba3_naive`."""
    y, final, _, _ = _chunked(x_BTNH, dt_BTN, A_BTN, B_BTMNZ, C_BTMNZ, lam_BTN, omega_BTNA, chunk_size=chunk_size,
                              x_proj_NMH=x_proj_NMH, D_N=D_N, state=state, rope=rope, segment_ids_BT=segment_ids_BT)
    return y, final


def _chunked(x_BTNH, dt_BTN, A_BTN, B_BTMNZ, C_BTMNZ, lam_BTN, omega_BTNA, *, chunk_size, x_proj_NMH, D_N, state,
             rope, segment_ids_BT):
    """`mamba3_chunked`, also returning every token's angles θ (mod 2π, [B, T, N, A]) and rotated B (K,
    [B, T, M, N, Z]): what a decode state's pending record keeps to commit the call later."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
    (x, dt, A, B, C, lam, om, xp_MNH, D, state), siso = _prepare(
        x_BTNH, dt_BTN, A_BTN, B_BTMNZ, C_BTMNZ, lam_BTN, omega_BTNA, x_proj_NMH, D_N, state, rope,
        time_axis=True)
    Bsz, T, N, H = x.shape
    M, Z = B.shape[2], B.shape[-1]
    if state is None:
        state = Mamba3State.zeros(Bsz, N, H, Z, om.shape[-1], M)
    starts = _segment_starts(segment_ids_BT, Bsz, T)
    Cl = min(chunk_size, T)
    J = -(-T // Cl)
    pad = J * Cl - T

    def padt(a):  # zero-pad the time axis (Δ = 0 there: no decay, no input, no rotation)
        return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) if pad else a

    x, dt, A, B, C, lam, om, starts = map(padt, (x, dt, A, B, C, lam, om, starts))
    chunks = lambda a: a.reshape(Bsz, J, Cl, *a.shape[2:])  # [B, T, ...] -> [B, J, C, ...]

    # Cumulative angles: cumsum inside each chunk, chunk offsets by a mod-2π scan (keeps θ small for long T).
    local_BJCNA = jnp.cumsum(chunks(dt[..., None] * om), axis=2)
    starts_BJNA = jnp.concatenate([state.angle_BNA[:, None], _wrap(local_BJCNA[:, :-1, -1])], axis=1)
    offsets_BJNA = jax.lax.associative_scan(_add_mod_2pi, starts_BJNA, axis=1)
    theta_BJCNA = offsets_BJNA[:, :, None] + local_BJCNA
    K = rotate(chunks(B), theta_BJCNA[:, :, :, None], rope)  # [B, J, C, M, N, Z]
    Q = rotate(chunks(C), theta_BJCNA[:, :, :, None], rope)
    X = chunks(x)[:, :, :, None] * xp_MNH  # [B, J, C, M, N, H]

    # Packed segments: run index per position (padding stays in the last run); the state passes from s to t
    # only within a run, and into chunk j only if the run it leaves chunk j-1 in ("enter") is still going.
    runs_BJC = chunks(jnp.cumsum(starts, axis=1, dtype=jnp.int32))
    last_BJ = runs_BJC[:, :, -1]
    enter_BJ = jnp.concatenate([runs_BJC[:, :1, 0], last_BJ[:, :-1]], axis=1)

    # Trapezoid coefficients. bt = β̃_t = (1 − λ_t) Δ_t (0 at a segment start); bt_next_t = β̃_{t+1} (0 after the
    # last token).
    bt = jnp.where(starts[..., None], 0.0, (1.0 - lam) * dt)
    bt_next = jnp.concatenate([bt[:, 1:], jnp.zeros_like(bt[:, :1])], axis=1)
    s_BJCN = chunks(lam * dt + bt_next)
    L_BJCN = jnp.cumsum(chunks(A * dt), axis=2)  # log-decay from the chunk start, inclusive

    # Intra-chunk (quadratic) part: y_t[r] += Σ_{s<=t} e^{L_t − L_s} s_s Σ_q (Q_t[r]·K_s[q]) X_s[q].
    diff = L_BJCN[:, :, :, None, :] - L_BJCN[:, :, None, :, :]  # [B, J, t, s, N]
    linked_BJCC = jnp.tril(jnp.ones((Cl, Cl), bool)) & (runs_BJC[:, :, :, None] == runs_BJC[:, :, None, :])
    w_BJCCN = jnp.exp(jnp.where(linked_BJCC[..., None], diff, -jnp.inf)) * s_BJCN[:, :, None, :, :]
    QK = jnp.einsum("BJtrNZ,BJsqNZ->BJtrsqN", Q, K)
    y = jnp.einsum("BJtrsqN,BJtsN,BJsqNH->BJtrNH", QK, w_BJCCN, X)

    # Chunk states (contribution of each chunk's last run to h̃ at its end) and the scan over chunks.
    to_end = jnp.exp(L_BJCN[:, :, -1:] - L_BJCN) * s_BJCN * (runs_BJC == last_BJ[..., None])[..., None]
    S_BJNHZ = jnp.einsum("BJsN,BJsqNH,BJsqNZ->BJNHZ", to_end, X, K)
    X_prev = state.x_prev_BNH[:, None] * xp_MNH
    h0 = state.ssm_BNHZ + bt[:, 0, :, None, None] * jnp.einsum("BMNH,BMNZ->BNHZ", X_prev, state.B_prev_BMNZ)
    chunk_decay_BJN = jnp.exp(L_BJCN[:, :, -1]) * (last_BJ == enter_BJ)[..., None]  # 0: a segment starts inside

    def carry_over(h, inp):
        decay_BN, S_BNHZ = inp
        return decay_BN[..., None, None] * h + S_BNHZ, h

    h_final, h_in_JBNHZ = jax.lax.scan(carry_over, h0, (jnp.moveaxis(chunk_decay_BJN, 1, 0),
                                                         jnp.moveaxis(S_BJNHZ, 1, 0)))
    from_enter_BJCN = jnp.exp(L_BJCN) * (runs_BJC == enter_BJ[..., None])[..., None]
    y = y + jnp.einsum("BJtN,BJtrNZ,JBNHZ->BJtrNH", from_enter_BJCN, Q, h_in_JBNHZ)

    # h_t = h̃_t − β̃_{t+1} P_t: remove the part of P_t that only enters at t+1; then the D skip.
    QK_diag = jnp.einsum("BJtrNZ,BJtqNZ->BJtrqN", Q, K)
    y = y - jnp.einsum("BJtN,BJtrqN,BJtqNH->BJtrNH", chunks(bt_next), QK_diag, X)
    if D is not None:
        y = y + D[:, None] * X
    y = y.reshape(Bsz, J * Cl, M, N, H)[:, :T]

    per_token = lambda a: a.reshape(Bsz, J * Cl, *a.shape[3:])[:, :T]
    theta_BTNA, K_BTMNZ = _wrap(per_token(theta_BJCNA)), per_token(K)
    final = Mamba3State(ssm_BNHZ=h_final, angle_BNA=theta_BTNA[:, -1], B_prev_BMNZ=K_BTMNZ[:, -1],
                        x_prev_BNH=x[:, T - 1])
    return _finish(y, siso, x_BTNH.dtype), final, theta_BTNA, K_BTMNZ


# ---------------------------------------------------------------------------------------------------------
# Decode-state rings (module docstring; layout and rollback rules in lmx.models.state)


def current_state(rings, lengths_B) -> Mamba3State:
    """The state after position lengths-1 of each row (zeros for an empty row)."""

    def pick(ring):
        v = ring_read(ring, lengths_B - 1)
        return jnp.where(_rows(lengths_B > 0, v), v, 0.0)

    return Mamba3State(*map(pick, rings))


def write_rings(rings, pos_B, state: Mamba3State, live_B=None):
    """Write each row's state into slot pos % Q, in place (ssm.ring_write); rows where live_B is False keep their
    rings (they write the slot's own value back)."""
    values = (state.ssm_BNHZ, state.angle_BNA, state.B_prev_BMNZ, state.x_prev_BNH)
    if live_B is not None:
        values = tuple(jnp.where(_rows(live_B, v), v, ring_read(r, pos_B)) for r, v in zip(rings, values, strict=True))
    return tuple(ring_write(r, pos_B, v) for r, v in zip(rings, values, strict=True))


def commit(rings, pending, start_B, valid_B):
    """Fold the first valid_B[b] tokens of a multi-token call that started at length start_B into the rings.

    pending = (x_BTNH, dt_BTN, A_BTN, lam_BTN, angle_BTNA, K_BTMNZ, x_proj_BNMH or None): the call's per-token
    SSM inputs, with the angles and rotated B it computed (so no rotation happens here). Tokens past valid_B are
    dropped, so right padding never reaches the state. The rings get the states after the last Q valid
    positions: the tokens before those are folded in one weighted sum, then Q trapezoid steps write the rest."""
    x_BTNH, dt_BTN, A_BTN, lam_BTN, angle_BTNA, K_BTMNZ, x_proj_BNMH = pending
    Bn, T, N, H = x_BTNH.shape
    M, Q = K_BTMNZ.shape[2], rings[0].shape[1]
    xp_BMNH = jnp.ones((Bn, M, N, H), jnp.float32) if x_proj_BNMH is None else jnp.swapaxes(x_proj_BNMH, 1, 2)
    X_BTMNH = x_BTNH[:, :, None] * xp_BMNH[:, None]
    start = current_state(rings, start_B)

    # Fold tokens [0, fold) in the shifted form (module docstring) with β̃_fold := 0, which gives the true
    # h_{fold−1} = e^{Σ_t ΔA_t} h̃_{−1} + Σ_t e^{Σ_{j>t} ΔA_j} s_t P_t (sums over the folded tokens only).
    fold_B = jnp.maximum(valid_B - Q, 0)
    in_BT = jnp.arange(T) < fold_B[:, None]
    masked = lambda a: jnp.where(in_BT[..., None], a, 0.0)
    dtA_BTN, bt_BTN = masked(dt_BTN * A_BTN), masked((1.0 - lam_BTN) * dt_BTN)
    next_ = lambda a: jnp.pad(a[:, 1:], ((0, 0), (0, 1), (0, 0)))  # a_{t+1}, 0 after the last token
    s_BTN = masked(lam_BTN * dt_BTN) + next_(bt_BTN)
    after_BTN = jnp.flip(jnp.cumsum(jnp.flip(next_(dtA_BTN), 1), axis=1), 1)  # Σ_{j>t} ΔA_j
    P_prev = jnp.einsum("BMNH,BMNZ->BNHZ", start.x_prev_BNH[:, None] * xp_BMNH, start.B_prev_BMNZ)
    h_BNHZ = (jnp.exp(dtA_BTN.sum(1))[..., None, None] * (start.ssm_BNHZ + bt_BTN[:, 0, :, None, None] * P_prev)
              + jnp.einsum("BTN,BTMNH,BTMNZ->BNHZ", jnp.exp(after_BTN) * s_BTN, X_BTMNH, K_BTMNZ))

    at = lambda a, t_B: a[jnp.arange(Bn), jnp.clip(t_B, 0, T - 1)]
    folded = lambda a, b: jnp.where(_rows(fold_B > 0, a), a, b)  # the last folded token's, else the start's
    last_B = fold_B - 1
    state = Mamba3State(h_BNHZ, folded(at(angle_BTNA, last_B), start.angle_BNA),
                        folded(at(K_BTMNZ, last_B), start.B_prev_BMNZ), folded(at(x_BTNH, last_B), start.x_prev_BNH))

    def step(carry, k):
        state, rings = carry
        t_B = valid_B - Q + k  # token index within the call; < 0: this row has fewer than Q valid tokens
        live_B = t_B >= 0
        h = _advance(state.ssm_BNHZ, state.x_prev_BNH[:, None] * xp_BMNH, state.B_prev_BMNZ, at(X_BTMNH, t_B),
                     at(K_BTMNZ, t_B), at(dt_BTN, t_B), at(A_BTN, t_B), at(lam_BTN, t_B))
        new = Mamba3State(h, at(angle_BTNA, t_B), at(K_BTMNZ, t_B), at(x_BTNH, t_B))
        state = jax.tree.map(lambda n, o: jnp.where(_rows(live_B, n), n, o), new, state)
        return (state, write_rings(rings, start_B + t_B, new, live_B)), None

    (_, rings), _ = jax.lax.scan(step, (state, tuple(rings)), jnp.arange(Q))
    return rings


@flax.struct.dataclass
class Mamba3Pending:
    """The not-yet-committed tokens of one Mamba-3 layer's last multi-token call (all f32): what `commit` folds."""

    start_B: jax.Array  # int32: each row's length when the call started
    x_BTNH: jax.Array
    dt_BTN: jax.Array  # Δ
    A_BTN: jax.Array
    lam_BTN: jax.Array  # λ, the trapezoid's mixing weight
    angle_BTNA: jax.Array  # θ mod 2π
    K_BTMNZ: jax.Array  # rotated B
    x_proj_BNMH: jax.Array | None = None  # the MIMO x-projection (a parameter), per row; None for M = 1

    @property
    def num_tokens(self) -> int:
        return self.dt_BTN.shape[1]


@flax.struct.dataclass
class Mamba3LayerState(RingState):
    """One Mamba-3 layer's decode state: rings of the last Q = rollback window + 1 per-position Mamba3States,
    position p in slot p % Q, all f32 (A rotary angles, M MIMO rank), a rollback floor and the pending record of
    a multi-token call, with the commit and rollback rules of ssm.RingState."""

    ssm_BQNHZ: jax.Array  # h
    angle_BQNA: jax.Array  # θ (mod 2π)
    K_BQMNZ: jax.Array  # the position's rotated B: the next token's P_{t-1} = Σ_r x[r] K[r]ᵀ
    x_BQNH: jax.Array  # the position's x (before the MIMO projection)
    floor_B: jax.Array
    pending: Mamba3Pending | None = None

    @classmethod
    def init(cls, cfg, batch: int, max_len: int, dtype, rollback_window: int | None = None):
        s = cfg.ssm
        Q = (s.rollback_window if rollback_window is None else rollback_window) + 1
        ring = lambda *shape: jnp.zeros((batch, Q, *shape), jnp.float32)
        N, H, Z = s.num_heads, s.head_dim, s.state_size
        return cls(ring(N, H, Z), ring(N, s.num_angles), ring(s.mimo_rank, N, Z), ring(N, H),
                   floor_B=jnp.zeros((batch,), jnp.int32))

    @property
    def rings(self) -> tuple:
        return self.ssm_BQNHZ, self.angle_BQNA, self.K_BQMNZ, self.x_BQNH

    def with_rings(self, rings):
        return self.replace(**dict(zip(("ssm_BQNHZ", "angle_BQNA", "K_BQMNZ", "x_BQNH"), rings, strict=True)))

    def _fold(self, p: Mamba3Pending, valid_B):
        pending = (p.x_BTNH, p.dt_BTN, p.A_BTN, p.lam_BTN, p.angle_BTNA, p.K_BTMNZ, p.x_proj_BNMH)
        return self.with_rings(commit(self.rings, pending, p.start_B, valid_B))


# ---------------------------------------------------------------------------------------------------------
# Linen mixer


def _rms(v, eps):
    return v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)


def _heavy_tail(v):
    """The reference's ``heavy_tail_activation`` for the data-dependent A (state-spaces/mamba c69aaab, which
    replaced softplus for stability): 1 + v for v >= 0, 1 / (1 − v) for v < 0 (positive, C¹ at 0)."""
    return jnp.maximum(v, 0.0) + 1.0 / (1.0 - jnp.minimum(v, 0.0))


def _dt_bias_init(dt_min: float, dt_max: float, floor: float):
    """Inverse-softplus of Δ ~ log-uniform[dt_min, dt_max] (clamped at floor), as in Mamba-2/3."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


class Mamba3Mixer(nn.Module):
    """Mamba-3 mixer: in-projection -> Mamba-3 SSM -> gated RMSNorm -> out-projection.

    Follows ``mamba_ssm/modules/mamba3.py`` (with ``is_outproj_norm=True``, ``ngroups=1``): from x the
    in-projection makes z, x [N, H], B, C [M, Z], and per head dd_Δ, dd_A, λ-logit, plus A angle logits shared
    by the heads; Δ = softplus(dd_Δ + dt_bias), A = min(−f(dd_A), −A_floor) with the reference's heavy-tail f
    (`_heavy_tail`; softplus before state-spaces/mamba c69aaab), λ = sigmoid(·), ω = π·tanh(·); B, C are
    RMS-normed over Z, then get a per-(head, rank) bias (init 1), before the rotation. No short conv.
    MIMO (mimo_rank > 1) adds W_x, W_z, W_o [N, M, H]: X[r] = x ⊙ W_x[r], the output of rank r is
    RMSNorm_H(y[r]) ⊙ silu(z ⊙ W_z[r]), and the ranks are summed with weights W_o[r].

    ``__call__(x_BTD, state=None, segment_ids_BT=None) -> (y_BTD, Mamba3State)``: the chunked form for any T
    (prefill/training, starting from `state` or zeros; packed segments reset the state), the O(1) step when a
    state is given and T == 1. In an LM (`ssm.variant="mamba3"`), `with_rings` applies it to decode-state rings.
    """

    d_model: int
    num_heads: int
    head_dim: int
    state_size: int = 64
    mimo_rank: int = 1
    rope_fraction: float = 0.5
    chunk_size: int = 64
    rope: str | None = None  # None: "interleaved" for SISO, "halves" for MIMO, as the reference kernels do
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_floor: float = 1e-4
    norm_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, cfg, **kw) -> Mamba3Mixer:
        """The mixer of a ModelConfig's SSM layers (cfg.ssm.variant == "mamba3")."""
        s = cfg.ssm
        return cls(d_model=cfg.d_model, num_heads=s.num_heads, head_dim=s.head_dim, state_size=s.state_size,
                   mimo_rank=s.mimo_rank, rope_fraction=s.rope_fraction, chunk_size=s.chunk_size, rope=s.rope,
                   dt_min=s.dt_min, dt_max=s.dt_max, dt_init_floor=s.dt_floor, A_floor=s.A_floor,
                   norm_eps=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), **kw)

    @property
    def num_angles(self) -> int:
        return int(self.state_size * self.rope_fraction) // 2

    def with_rings(self, x_BTD, state: Mamba3LayerState | None, lengths_B, segment_ids_BT=None):
        """The LM's block contract (as Mamba2Mixer's): state None (teacher-forced) -> (y_BTD, None); a
        Mamba3LayerState at lengths_B (a pending call committed first) and one token -> the state with the new
        step written at lengths_B; more tokens -> the state with the call recorded as pending."""
        if state is None:
            return self(x_BTD, segment_ids_BT=segment_ids_BT)[0], None
        state = state.commit(lengths_B)
        rings = state.rings
        if x_BTD.shape[1] == 1:
            written = []

            def store_h(h_BNHZ):  # h written into its ring before the output reads it (backend.write_before_read)
                ring, h_BNHZ = write_before_read(rings[0], lengths_B, h_BNHZ)
                written.append(ring)
                return h_BNHZ

            y_BTD, new = self(x_BTD, current_state(rings, lengths_B), store_h=store_h)
            rest = (new.angle_BNA, new.B_prev_BMNZ, new.x_prev_BNH)
            rings = (written[0], *(ring_write(r, lengths_B, v) for r, v in zip(rings[1:], rest, strict=True)))
            return y_BTD, state.with_rings(rings).stepped(lengths_B)
        y_BTD, _, pending = self(x_BTD, current_state(rings, lengths_B), return_pending=True)
        return y_BTD, state.replace(pending=Mamba3Pending(lengths_B, *pending))

    def _check(self):
        for name in ("d_model", "num_heads", "head_dim", "state_size", "mimo_rank", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Mamba3Mixer.{name}={getattr(self, name)} must be > 0")
        if self.state_size % 2:
            raise ValueError(f"Mamba3Mixer.state_size={self.state_size} must be even (rotary pairs)")
        if not 0.0 < self.rope_fraction <= 1.0 or self.num_angles < 1:
            raise ValueError(f"Mamba3Mixer.rope_fraction={self.rope_fraction} must be in (0, 1] and give at "
                             f"least one rotary angle for state_size={self.state_size}")

    @nn.compact
    def __call__(self, x_BTD, state: Mamba3State | None = None, segment_ids_BT=None, *, return_pending=False,
                 store_h=None):
        """-> (y_BTD, final Mamba3State), plus the pending record of `commit` with return_pending (chunked).
        store_h: passed to `mamba3_step` (one-token step only)."""
        self._check()
        D, N, H, Z, M, A = self.d_model, self.num_heads, self.head_dim, self.state_size, self.mimo_rank, self.num_angles
        if x_BTD.ndim != 3 or x_BTD.shape[-1] != D:
            raise ValueError(f"x_BTD has shape {tuple(x_BTD.shape)}, expected [B, T, {D}]")
        pd, dt_ = self.param_dtype, self.dtype
        rope = self.rope or ("interleaved" if M == 1 else "halves")
        lp = nn.with_logical_partitioning
        w = lambda name, shape, axes: self.param(name, dense_init(D, axes), shape, pd).astype(dt_)
        x = x_BTD.astype(dt_)
        z_BTNH = jnp.einsum("BTD,DNH->BTNH", x, w("in_z", (D, N, H), ("embed", "heads", "head_dim")))
        x_BTNH = jnp.einsum("BTD,DNH->BTNH", x, w("in_x", (D, N, H), ("embed", "heads", "head_dim")))
        B_BTMZ = jnp.einsum("BTD,DMZ->BTMZ", x, w("in_B", (D, M, Z), ("embed", None, None)))
        C_BTMZ = jnp.einsum("BTD,DMZ->BTMZ", x, w("in_C", (D, M, Z), ("embed", None, None)))
        dd_BTN3 = jnp.einsum("BTD,DNk->BTNk", x, w("in_dt_A_trap", (D, N, 3), ("embed", "heads", None)))
        ang_BTA = jnp.einsum("BTD,DA->BTA", x, w("in_angles", (D, A), ("embed", None)))

        f32 = jnp.float32
        dt_bias_N = self.param("dt_bias", lp(_dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor),
                                             ("heads",)), (N,), f32)
        dd_BTN3 = dd_BTN3.astype(f32)
        dt_BTN = jax.nn.softplus(dd_BTN3[..., 0] + dt_bias_N)
        A_BTN = jnp.minimum(-_heavy_tail(dd_BTN3[..., 1]), -self.A_floor)
        lam_BTN = jax.nn.sigmoid(dd_BTN3[..., 2])
        omega_BTNA = jnp.broadcast_to((math.pi * jnp.tanh(ang_BTA.astype(f32)))[:, :, None], (*x.shape[:2], N, A))

        ones = lambda axes: lp(nn.initializers.ones, axes)
        bc = {}
        for name, v in (("B", B_BTMZ), ("C", C_BTMZ)):
            scale_Z = self.param(f"{name}_norm", ones(("norm",)), (Z,), pd).astype(f32)
            bias_NMZ = self.param(f"{name}_bias", ones(("heads", None, None)), (N, M, Z), pd).astype(f32)
            v = _rms(v.astype(f32), self.norm_eps) * scale_Z
            bc[name] = v[:, :, :, None, :] + jnp.transpose(bias_NMZ, (1, 0, 2))  # [B, T, M, N, Z]

        def const(value):
            return lambda key, shape, dtype=f32: jnp.full(shape, value, dtype)

        mimo = lambda name, value: self.param(name, lp(const(value), ("heads", None, "head_dim")), (N, M, H), f32)
        x_proj_NMH = mimo("mimo_x", 1.0 / M) if M > 1 else None
        D_N = self.param("D", ones(("heads",)), (N,), f32)

        args = (x_BTNH, dt_BTN, A_BTN, bc["B"], bc["C"], lam_BTN, omega_BTNA)
        kw = dict(x_proj_NMH=x_proj_NMH, D_N=D_N, rope=rope)
        if state is not None and x.shape[1] == 1 and not return_pending:
            y_BMNH, new_state = mamba3_step(state, *(a[:, 0] for a in args), store_h=store_h, **kw)
            y_BTMNH = y_BMNH[:, None]
        else:
            y_BTMNH, new_state, theta_BTNA, K_BTMNZ = _chunked(*args, chunk_size=self.chunk_size, state=state,
                                                               segment_ids_BT=segment_ids_BT, **kw)

        # Gated RMSNorm per head (norm before gate), then the MIMO down-projection over ranks.
        norm_NH = self.param("out_norm", ones(("heads", "head_dim")), (N, H), pd).astype(f32)
        z = z_BTNH.astype(f32)[:, :, None]  # [B, T, 1, N, H]
        if M > 1:
            z = z * jnp.transpose(mimo("mimo_z", 1.0), (1, 0, 2))
        y = _rms(y_BTMNH.astype(f32), self.norm_eps) * norm_NH * jax.nn.silu(z)
        if M > 1:
            y_BTNH = jnp.einsum("BTMNH,NMH->BTNH", y, mimo("mimo_o", 1.0 / M))
        else:
            y_BTNH = y[:, :, 0]
        w_out = self.param("out", dense_init(N * H, ("heads", "head_dim", "embed")), (N, H, D), pd)
        y_BTD = jnp.einsum("BTNH,NHD->BTD", y_BTNH.astype(dt_), w_out.astype(dt_))
        if not return_pending:
            return y_BTD, new_state
        # x_proj is a parameter, but `commit` runs outside the model: the record carries it, once per row.
        x_proj_BNMH = None if M == 1 else jnp.broadcast_to(x_proj_NMH, (x.shape[0], N, M, H))
        pending = (x_BTNH.astype(f32), dt_BTN, A_BTN, lam_BTN, theta_BTNA, K_BTMNZ, x_proj_BNMH)
        return y_BTD, new_state, pending
