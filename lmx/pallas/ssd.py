"""Mamba-2 SSD chunked scan as Pallas Triton kernels, forward and backward (`ssd`).

The stages follow mamba-ssm's (Dao & Gu, 2024). Per batch row and head, with chunks of C steps, discretised
inputs X_t = Δ_t x_t, log decays a_t = Δ_t A and cum_t = a_1 + ... + a_t within the chunk:
  1. chunk cumsum of Δ A (jnp: O(B·T·N), next to the O(B·T·N·H·Z) kernels);
  2. `_chunk_state_kernel`: each chunk's own contribution to its end state, S_j = Σ_t w_t X_t B_tᵀ,
     w_t = exp(cum_end - cum_t);
  3. `_pass_kernel`: the states entering each chunk, h_{j+1} = g_j h_j + S_j, g_j = exp(cum_end) (a loop over
     the J chunks in one program per (batch, head, state block): sequential in j, parallel in everything else);
  4. `_chunk_scan_kernel`: y = (C Bᵀ ∘ L) X + e ∘ (C h_jᵀ), L[t, s] = exp(cum_t - cum_s) for s <= t, e_t =
     exp(cum_t): the intra-chunk quadratic form plus the decayed entering state.
Segment resets (packed sequences) cut every decay that crosses a segment start, as `lmx.models.ssm._chunked`
does with its runs: positions carry their run relative to the run entering their chunk (`rel`), and a decay
from s to t (or from the chunk start, or to the chunk end) is kept only within one run.

The backward (`jax.custom_vjp`) recomputes stages 2-3 (only the inputs are saved), then runs
`_dstate_kernel` (each chunk's output's pull on its entering state), `_pass_bwd_kernel` (the reverse of stage 3,
also the cotangent of every g_j), and `_chunk_bwd_kernel` (the reverse of stages 2 and 4 for one chunk: dx, the
Δ and cum cotangents, dB and dC). Stage 1 and the per-position bookkeeping are jnp, differentiated by JAX.

Kernels compute in float32 (inputs may be bfloat16) and return float32 like the reference. Their dots run at
the default precision, which the Triton lowering maps to TF32 tensor cores for f32 operands on a GPU (interpret
mode computes in f32). Every tile a kernel loads, stores or computes on has power-of-two dims (C, H, Z, a state
column block; a block may span several heads or all J chunks, read one at a time), and every dot dim is >= 16.
Partial chunks (T not a multiple of C) are padded with Δ = 0 steps: the small [B, N, T] arrays in jnp, while x,
B, C and dy are loaded with a row mask (zeros past T, never the NaN padding of interpret mode nor out-of-bounds
memory on a GPU) and y, dx are stored with one.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from lmx.pallas._compat import kernel_compiles, pl, pltriton, resolve_impl, triton_params

F32 = jnp.float32
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
MAX_CHUNK = 64  # kernel chunk cap: a program holds several [C, C] f32 tiles (the result does not depend on C)
MAX_DIM = 128  # largest head dim / state size a program holds whole
STATE_BLOCK = 32  # state columns per program of the state-passing kernels
MIN_PROGRAMS = 264  # about two waves of an H100's 132 SMs: heads are grouped per program only above this


class _Config(NamedTuple):
    T: int  # true sequence length (the arrays of per-position scalars are padded to J·C)
    chunk: int
    heads: int  # heads per program of the chunk kernels (a divisor of N/U: one B/C group per program)
    interpret: bool


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _unsupported(x_BTNH, dt_BTN, B_BTUZ, C_BTUZ, chunk: int) -> str | None:
    """Why the kernels cannot take these inputs, or None."""
    for name, a in (("x", x_BTNH), ("dt", dt_BTN), ("B", B_BTUZ), ("C", C_BTUZ)):
        if jnp.dtype(a.dtype) not in DTYPES:
            return f"{name}.dtype={jnp.dtype(a.dtype).name} (the kernels take float32 or bfloat16)"
    if not (_is_pow2(chunk) and chunk >= 16):
        return f"chunk={chunk} must be a power of two >= 16"
    for name, n in (("head dim H", x_BTNH.shape[-1]), ("state size Z", B_BTUZ.shape[-1])):
        if not (_is_pow2(n) and 16 <= n <= MAX_DIM):
            return f"{name}={n} must be a power of two in [16, {MAX_DIM}]"
    return None


def ssd(
    x_BTNH: Float[Array, "B T N H"], dt_BTN: Float[Array, "B T N"], A_N: Float[Array, " N"],
    B_BTUZ: Float[Array, "B T U Z"], C_BTUZ: Float[Array, "B T U Z"], *, chunk: int = 64, initial_state=None,
    segment_ids=None, impl: str = "auto", interpret: bool = False,
):
    """Mamba-2 SSD scan: (y_BTNH, final_state_BNHZ), float32, with `lmx.models.ssm.ssd_chunked`'s semantics.

    dt_BTN is Δ, already softplus'ed and clamped; no D skip, no gating. initial_state: [B, N, H, Z] or None;
    segment_ids: [B, T] ints, the state resets wherever the id changes. Head n uses B/C group n // (N/U).
    impl: "xla" (the jnp reference), "pallas" (the kernels; ValueError for inputs they cannot take) or "auto"
    (the kernels on a GPU, or under interpret=True, for supported inputs; else the reference, logged).
    chunk: a power of two >= 16; the kernels use min(chunk, MAX_CHUNK), which changes only the rounding.
    Differentiable in x, dt, A, B, C and initial_state."""
    why = _unsupported(x_BTNH, dt_BTN, B_BTUZ, C_BTUZ, chunk)

    def total(*args):  # forward and backward kernels, for "auto"'s compile probe
        y_BTNH, h_BNHZ = ssd_pallas(*args[:5], chunk=min(chunk, MAX_CHUNK), initial_state=args[5],
                                    segment_ids=args[6], interpret=interpret)
        return y_BTNH.sum() + h_BNHZ.sum()

    probe = lambda: kernel_compiles("ssd", min(chunk, MAX_CHUNK), jax.grad(total, tuple(range(5))), x_BTNH, dt_BTN,
                                    A_N, B_BTUZ, C_BTUZ, initial_state, segment_ids)
    if resolve_impl("ssd", impl, why, interpret, probe) == "xla":
        from lmx.models.ssm import ssd_chunked  # lazily: ssm.py's mixer calls this function

        return ssd_chunked(x_BTNH, dt_BTN, A_N, B_BTUZ, C_BTUZ, chunk_size=chunk, initial_state_BNHZ=initial_state,
                           segment_ids_BT=segment_ids)
    return ssd_pallas(x_BTNH, dt_BTN, A_N, B_BTUZ, C_BTUZ, chunk=min(chunk, MAX_CHUNK), initial_state=initial_state,
                      segment_ids=segment_ids, interpret=interpret)


def heads_per_program(batch: int, chunks: int, num_heads: int, groups: int) -> int:
    """Heads one chunk-kernel program loops over: the most of one group (B, C and C Bᵀ loaded or computed once,
    dB and dC summed in registers) that still leaves MIN_PROGRAMS programs, else 1."""
    G = num_heads // groups
    for hb in sorted((d for d in range(1, G + 1) if G % d == 0), reverse=True):
        if batch * chunks * (num_heads // hb) >= MIN_PROGRAMS:
            return hb
    return 1


def ssd_pallas(x_BTNH, dt_BTN, A_N, B_BTUZ, C_BTUZ, *, chunk: int, initial_state=None, segment_ids=None,
               heads: int | None = None, interpret: bool = False):
    """The kernel path of `ssd`, with no input checks (tests cross-lower illegal shapes through it). heads: heads
    per chunk-kernel program (default `heads_per_program`)."""
    Bn, T, N, H = x_BTNH.shape
    U, Z = B_BTUZ.shape[2:]
    if N % U:
        raise ValueError(f"ssd: B/C groups U={U} must divide the heads N={N}")
    C = chunk
    J = -(-T // C)
    pad = J * C - T
    heads = heads_per_program(Bn, J, N, U) if heads is None else heads
    if (N // U) % heads:
        raise ValueError(f"ssd: heads={heads} per program must divide the heads per group N/U={N // U}")

    # Stage 1 (jnp): Δ and the chunk-local cumsum of Δ A, as [B, N, J·C] rows; the last chunk is padded with
    # Δ = 0 steps (no decay, no input), which stay in the last run as in the reference.
    dt_BNT = jnp.pad(dt_BTN.astype(F32), ((0, 0), (0, pad), (0, 0))).transpose(0, 2, 1)
    cum_BNJC = jnp.cumsum((dt_BNT * A_N.astype(F32)[:, None]).reshape(Bn, N, J, C), axis=-1)
    # Runs: +1 at every change of segment id; rel = a position's run minus the run of the state entering its
    # chunk, so rel == 0 means "reached by the entering state" and equal rel within a chunk means "same run".
    if segment_ids is None:
        runs_BT = jnp.zeros((Bn, T), jnp.int32)
    else:
        runs_BT = jnp.cumsum(jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0))), axis=1,
                             dtype=jnp.int32)
    runs_BJC = jnp.pad(runs_BT, ((0, 0), (0, pad)), mode="edge").reshape(Bn, J, C)
    enter_BJ = jnp.pad(runs_BJC[:, :-1, -1], ((0, 0), (1, 0)))
    rel_BJC = runs_BJC - enter_BJ[..., None]
    # Decay of the entering state through the whole chunk, 0 where a segment starts inside it.
    g_BNJ = jnp.where((rel_BJC[:, None, :, -1] == 0), jnp.exp(cum_BNJC[..., -1]), 0.0)
    h0_BNHZ = jnp.zeros((Bn, N, H, Z), F32) if initial_state is None else initial_state.astype(F32)
    cfg = _Config(T, C, heads, interpret)
    return _scan(x_BTNH, B_BTUZ, C_BTUZ, dt_BNT, cum_BNJC.reshape(Bn, N, J * C), g_BNJ, h0_BNHZ,
                 rel_BJC.reshape(Bn, J * C), cfg)


# ------------------------------------------------------------------------------------------------ kernels
# Chunk kernels: grid (batch b, chunk j, head block n) and a loop over the `hb` heads of the block, which all
# read one B/C group. State-passing kernels: grid (batch, head, state column block) and a loop over chunks.


def _dot(a, b, trans_a: bool = False, trans_b: bool = False):
    """a @ b (f32 accumulation) with either operand transposed in the contraction, not in memory. Refuses what
    Triton's tl.dot refuses on a GPU (a dim below 16), which interpret mode and the lowering would accept."""
    if min(a.shape + b.shape) < 16:
        raise ValueError(f"ssd kernel: dot of {a.shape} and {b.shape}: every dot dim must be >= 16")
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=F32)


def _rows(ref, valid_C):
    """Load a [C, ...] block whose rows past T are padding: zeros there, never NaN or out-of-bounds memory."""
    return pltriton.load(ref, mask=valid_C[:, None], other=0).astype(F32)


def _valid(T: int, C: int):
    return pl.program_id(1) * C + jnp.arange(C) < T


def _chunk_masks(rel_C, C: int):
    """[C, C] 'same run and s <= t' mask of the intra-chunk decays."""
    t = jnp.arange(C)
    return (t[:, None] >= t[None, :]) & (rel_C[:, None] == rel_C[None, :])


def _decay(cum_C, causal_CC):
    """L[t, s] = exp(cum_t - cum_s) where allowed, else 0 (exp(-inf): no inf * 0 above the diagonal)."""
    return jnp.exp(jnp.where(causal_CC, cum_C[:, None] - cum_C[None, :], -jnp.inf))


def _chunk_state_kernel(x_ref, b_ref, dt_ref, cum_ref, rel_ref, s_ref, *, cfg: _Config):
    valid = _valid(cfg.T, cfg.chunk)
    B_CZ = _rows(b_ref, valid)
    to_end = rel_ref[...] == rel_ref[cfg.chunk - 1]  # positions in the chunk's last run reach its end

    def head(i, carry):
        cum_C = cum_ref[i, :]
        w_C = jnp.where(to_end, jnp.exp(cum_ref[i, cfg.chunk - 1] - cum_C), 0.0) * dt_ref[i, :]
        x_CH = _rows(x_ref.at[:, i, :], valid)
        s_ref[i] = _dot(x_CH * w_C[:, None], B_CZ, trans_a=True)  # [H, Z]
        return carry

    lax.fori_loop(0, cfg.heads, head, 0)


def _chunk_scan_kernel(x_ref, b_ref, c_ref, dt_ref, cum_ref, rel_ref, h_ref, y_ref, *, cfg: _Config):
    valid = _valid(cfg.T, cfg.chunk)
    B_CZ, C_CZ = _rows(b_ref, valid), _rows(c_ref, valid)
    CB_CC = _dot(C_CZ, B_CZ, trans_b=True)
    rel_C = rel_ref[...]
    causal_CC = _chunk_masks(rel_C, cfg.chunk)

    def head(i, carry):
        cum_C = cum_ref[i, :]
        x_CH = _rows(x_ref.at[:, i, :], valid)
        y_CH = _dot(CB_CC * _decay(cum_C, causal_CC) * dt_ref[i, :][None, :], x_CH)
        e_C = jnp.where(rel_C == 0, jnp.exp(cum_C), 0.0)  # the entering state's decay to t, within its run
        y_CH += e_C[:, None] * _dot(C_CZ, h_ref[i], trans_b=True)
        pltriton.store(y_ref.at[:, i, :], y_CH.astype(y_ref.dtype), mask=valid[:, None])
        return carry

    lax.fori_loop(0, cfg.heads, head, 0)


def _pass_kernel(s_ref, g_ref, h0_ref, enter_ref, final_ref, *, J: int):
    def step(j, h_HZ):
        enter_ref[j] = h_HZ
        return g_ref[j] * h_HZ + s_ref[j]

    final_ref[...] = lax.fori_loop(0, J, step, h0_ref[...])


def _dstate_kernel(dy_ref, c_ref, cum_ref, rel_ref, q_ref, *, cfg: _Config):
    """Q_j = Σ_t e_t dy_t C_tᵀ: the cotangent of chunk j's entering state from chunk j's own outputs."""
    valid = _valid(cfg.T, cfg.chunk)
    C_CZ = _rows(c_ref, valid)
    from_enter = rel_ref[...] == 0

    def head(i, carry):
        e_C = jnp.where(from_enter, jnp.exp(cum_ref[i, :]), 0.0)
        dy_CH = _rows(dy_ref.at[:, i, :], valid)
        q_ref[i] = _dot(dy_CH * e_C[:, None], C_CZ, trans_a=True)  # [H, Z]
        return carry

    lax.fori_loop(0, cfg.heads, head, 0)


def _pass_bwd_kernel(q_ref, g_ref, dfinal_ref, enter_ref, ds_ref, dh0_ref, dg_ref, *, J: int):
    """Reverse of `_pass_kernel`: dH_j = g_j dH_{j+1} + Q_j from dH_J = d final. Writes dS_j = dH_{j+1} (the
    cotangent of chunk j's own state), dg_j = <dH_{j+1}, h_j> (this state block's part) and dh0 = dH_0."""

    def step(k, dH_HZ):
        j = J - 1 - k
        ds_ref[j] = dH_HZ
        dg_ref[j] = jnp.sum(dH_HZ * enter_ref[j])
        return g_ref[j] * dH_HZ + q_ref[j]

    dh0_ref[...] = lax.fori_loop(0, J, step, dfinal_ref[...])


def _chunk_bwd_kernel(x_ref, b_ref, c_ref, dt_ref, cum_ref, rel_ref, h_ref, ds_ref, dy_ref,
                      dx_ref, ddt_ref, dcum_ref, db_ref, dc_ref, *, cfg: _Config):
    """One chunk's reverse of y = (C Bᵀ ∘ L) X + e ∘ (C hᵀ) and S = Xᵀ diag(w) B, given dy and dS."""
    C = cfg.chunk
    valid = _valid(cfg.T, C)
    B_CZ, C_CZ = _rows(b_ref, valid), _rows(c_ref, valid)
    CB_CC = _dot(C_CZ, B_CZ, trans_b=True)
    rel_C = rel_ref[...]
    causal_CC = _chunk_masks(rel_C, C)
    from_enter, to_end = rel_C == 0, rel_C == rel_ref[C - 1]
    last_C = jnp.arange(C) == C - 1

    def head(i, carry):
        dB_CZ, dC_CZ = carry
        cum_C, dt_C = cum_ref[i, :], dt_ref[i, :]
        L_CC = _decay(cum_C, causal_CC)
        e_C = jnp.where(from_enter, jnp.exp(cum_C), 0.0)
        w_C = jnp.where(to_end, jnp.exp(cum_ref[i, C - 1] - cum_C), 0.0)
        x_CH = _rows(x_ref.at[:, i, :], valid)
        X_CH = x_CH * dt_C[:, None]
        dy_CH = _rows(dy_ref.at[:, i, :], valid)
        h_HZ, dS_HZ = h_ref[i], ds_ref[i]

        BdS_CH = _dot(B_CZ, dS_HZ, trans_b=True)  # row s: dS B_s
        dX_CH = _dot(CB_CC * L_CC, dy_CH, trans_a=True) + w_C[:, None] * BdS_CH
        dCB_CC = _dot(dy_CH, X_CH, trans_b=True) * L_CC  # cotangent of C Bᵀ: (dy_t · X_s) L[t, s]
        dC_CZ += _dot(dCB_CC, B_CZ) + e_C[:, None] * _dot(dy_CH, h_HZ)
        dB_CZ += _dot(dCB_CC, C_CZ, trans_a=True) + w_C[:, None] * _dot(X_CH, dS_HZ)
        # cum cotangent: L[t, s] pulls +cum_t, -cum_s; e_t pulls cum_t; w_s pulls cum_end - cum_s.
        P_CC = dCB_CC * CB_CC
        R_C = w_C * jnp.sum(X_CH * BdS_CH, axis=1)
        ChT_CH = _dot(C_CZ, h_HZ, trans_b=True)
        dcum_C = (jnp.sum(P_CC, axis=1) - jnp.sum(P_CC, axis=0) + e_C * jnp.sum(dy_CH * ChT_CH, axis=1) - R_C
                  + jnp.where(last_C, jnp.sum(R_C), 0.0))
        pltriton.store(dx_ref.at[:, i, :], (dX_CH * dt_C[:, None]).astype(dx_ref.dtype), mask=valid[:, None])
        ddt_ref[i, :] = jnp.sum(dX_CH * x_CH, axis=1)
        dcum_ref[i, :] = dcum_C
        return dB_CZ, dC_CZ

    zeros = jnp.zeros((C, B_CZ.shape[1]), F32)
    dB_CZ, dC_CZ = lax.fori_loop(0, cfg.heads, head, (zeros, zeros))
    db_ref[...] = dB_CZ
    dc_ref[...] = dC_CZ


# ------------------------------------------------------------------------------------------------ pallas_calls


def _chunk_call(kernel, name: str, cfg: _Config, shapes, ins: str, outs, *args):
    """pallas_call of a chunk kernel. ins: one letter per argument naming its layout; outs: (layout, shape,
    dtype) per output. Layouts: x [B,T,N,H] (hb heads), b [B,T,U,Z] (the block's group), v [B,N,J·C] (hb rows),
    r [B,J·C], s [B,J,N,H,Z] (hb heads), p [B,J·C,N/hb,Z] (one row per head block)."""
    Bn, N, G, J = shapes
    C, hb = cfg.chunk, cfg.heads
    Hx = args[0].shape[-1]
    Z = next(a.shape[-1] for a, kind in zip(args, ins, strict=True) if kind == "b")
    specs = {
        "x": lambda: pl.BlockSpec((None, C, hb, Hx), lambda b, j, n: (b, j, n, 0)),
        "b": lambda: pl.BlockSpec((None, C, None, Z), lambda b, j, n: (b, j, n * hb // G, 0)),
        "v": lambda: pl.BlockSpec((None, hb, C), lambda b, j, n: (b, n, j)),
        "r": lambda: pl.BlockSpec((None, C), lambda b, j, n: (b, j)),
        "s": lambda: pl.BlockSpec((None, None, hb, Hx, Z), lambda b, j, n: (b, j, n, 0, 0)),
        "p": lambda: pl.BlockSpec((None, C, None, Z), lambda b, j, n: (b, j, n, 0)),
    }
    # A program holds several [C, C], [C, Z] and [H, Z] f32 tiles: more warps (registers) for the larger ones.
    num_warps = 8 if C * max(Hx, Z) >= 64 * 64 else 4
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=(Bn, J, N // hb),
        in_specs=[specs[k]() for k in ins],
        out_specs=[specs[k]() for k, _, _ in outs],
        out_shape=[jax.ShapeDtypeStruct(shape, dtype) for _, shape, dtype in outs],
        compiler_params=triton_params(num_warps=num_warps, num_stages=2),
        interpret=cfg.interpret,
        name=name,
    )(*args)


def _pass_call(kernel, name: str, J: int, interpret: bool, ins: str, outs, *args):
    """pallas_call of a state-passing kernel, grid (B, N, Z / STATE_BLOCK). Layouts: s [B,J,N,H,Z] (all J),
    g [B,N,J], h [B,N,H,Z], d [B,N,Z/STATE_BLOCK,J]."""
    Bn, N, H, Z = next(a.shape for a, kind in zip(args, ins, strict=True) if kind == "h")
    zb = min(Z, STATE_BLOCK)
    specs = {
        "s": pl.BlockSpec((None, J, None, H, zb), lambda b, n, z: (b, 0, n, 0, z)),
        "g": pl.BlockSpec((None, None, J), lambda b, n, z: (b, n, 0)),
        "h": pl.BlockSpec((None, None, H, zb), lambda b, n, z: (b, n, 0, z)),
        "d": pl.BlockSpec((None, None, None, J), lambda b, n, z: (b, n, z, 0)),
    }
    return pl.pallas_call(
        functools.partial(kernel, J=J),
        grid=(Bn, N, Z // zb),
        in_specs=[specs[k] for k in ins],
        out_specs=[specs[k] for k, _ in outs],
        out_shape=[jax.ShapeDtypeStruct(shape, F32) for _, shape in outs],
        compiler_params=triton_params(num_warps=4, num_stages=1),
        interpret=interpret,
        name=name,
    )(*args)


def _states(x_BTNH, B_BTUZ, dt_BNT, cum_BNT, g_BNJ, h0_BNHZ, rel_BT, cfg: _Config):
    """Stages 2-3: the states entering the chunks [B, J, N, H, Z] and the final state [B, N, H, Z]."""
    Bn, _, N, H = x_BTNH.shape
    U, Z = B_BTUZ.shape[2:]
    J = cum_BNT.shape[-1] // cfg.chunk
    states = (Bn, J, N, H, Z)
    (local_BJNHZ,) = _chunk_call(_chunk_state_kernel, "ssd_chunk_state", cfg, (Bn, N, N // U, J), "xbvvr",
                                 [("s", states, F32)], x_BTNH, B_BTUZ, dt_BNT, cum_BNT, rel_BT)
    return _pass_call(_pass_kernel, "ssd_state_pass", J, cfg.interpret, "sgh", [("s", states), ("h", h0_BNHZ.shape)],
                      local_BJNHZ, g_BNJ, h0_BNHZ)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _scan(x_BTNH, B_BTUZ, C_BTUZ, dt_BNT, cum_BNT, g_BNJ, h0_BNHZ, rel_BT, cfg: _Config):
    """(y_BTNH, final_BNHZ) from the padded per-position rows of stage 1; differentiable except in rel_BT."""
    return _scan_fwd(x_BTNH, B_BTUZ, C_BTUZ, dt_BNT, cum_BNT, g_BNJ, h0_BNHZ, rel_BT, cfg)[0]


def _scan_fwd(x_BTNH, B_BTUZ, C_BTUZ, dt_BNT, cum_BNT, g_BNJ, h0_BNHZ, rel_BT, cfg: _Config):
    Bn, T, N, H = x_BTNH.shape
    J = cum_BNT.shape[-1] // cfg.chunk
    enter_BJNHZ, final_BNHZ = _states(x_BTNH, B_BTUZ, dt_BNT, cum_BNT, g_BNJ, h0_BNHZ, rel_BT, cfg)
    (y_BTNH,) = _chunk_call(_chunk_scan_kernel, "ssd_chunk_scan", cfg, (Bn, N, N // B_BTUZ.shape[2], J), "xbbvvrs",
                            [("x", (Bn, T, N, H), F32)], x_BTNH, B_BTUZ, C_BTUZ, dt_BNT, cum_BNT, rel_BT, enter_BJNHZ)
    # Residuals: only the inputs (the [B, J, N, H, Z] states are recomputed in the backward).
    return (y_BTNH, final_BNHZ), (x_BTNH, B_BTUZ, C_BTUZ, dt_BNT, cum_BNT, g_BNJ, h0_BNHZ, rel_BT)


def _scan_bwd(cfg: _Config, residuals, cotangents):
    x_BTNH, B_BTUZ, C_BTUZ, dt_BNT, cum_BNT, g_BNJ, h0_BNHZ, rel_BT = residuals
    dy_BTNH, dfinal_BNHZ = (c.astype(F32) for c in cotangents)
    Bn, T, N, H = x_BTNH.shape
    U, Z = B_BTUZ.shape[2:]
    C, hb = cfg.chunk, cfg.heads
    J = cum_BNT.shape[-1] // C
    shapes = (Bn, N, N // U, J)
    states = (Bn, J, N, H, Z)
    enter_BJNHZ, _ = _states(x_BTNH, B_BTUZ, dt_BNT, cum_BNT, g_BNJ, h0_BNHZ, rel_BT, cfg)
    (q_BJNHZ,) = _chunk_call(_dstate_kernel, "ssd_bwd_dstate", cfg, shapes, "xbvr", [("s", states, F32)],
                             dy_BTNH, C_BTUZ, cum_BNT, rel_BT)
    zblocks = Z // min(Z, STATE_BLOCK)
    ds_BJNHZ, dh0_BNHZ, dg_BNzJ = _pass_call(
        _pass_bwd_kernel, "ssd_bwd_state_pass", J, cfg.interpret, "sghs",
        [("s", states), ("h", h0_BNHZ.shape), ("d", (Bn, N, zblocks, J))], q_BJNHZ, g_BNJ, dfinal_BNHZ, enter_BJNHZ)
    rows = (Bn, N, J * C)
    part = (Bn, J * C, N // hb, Z)  # dB, dC per head block, summed over the blocks of a group below
    dx_BTNH, ddt_BNT, dcum_BNT, dB_part, dC_part = _chunk_call(
        _chunk_bwd_kernel, "ssd_bwd_chunk", cfg, shapes, "xbbvvrssx",
        [("x", x_BTNH.shape, x_BTNH.dtype), ("v", rows, F32), ("v", rows, F32), ("p", part, F32), ("p", part, F32)],
        x_BTNH, B_BTUZ, C_BTUZ, dt_BNT, cum_BNT, rel_BT, enter_BJNHZ, ds_BJNHZ, dy_BTNH)
    group_sum = lambda p, like: p.reshape(Bn, J * C, U, -1, Z).sum(3)[:, :T].astype(like.dtype)
    return (dx_BTNH, group_sum(dB_part, B_BTUZ), group_sum(dC_part, C_BTUZ), ddt_BNT, dcum_BNT, dg_BNzJ.sum(2),
            dh0_BNHZ, None)


_scan.defvjp(_scan_fwd, _scan_bwd)
