"""Mamba-3: chunked == recurrent step loop == sequential scan; degenerate cases pin the semantics."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.models.mamba3 import Mamba3Mixer, Mamba3State, mamba3_chunked, mamba3_naive, mamba3_step, rotate

naive = jax.jit(mamba3_naive, static_argnames=("rope",))
chunked = jax.jit(mamba3_chunked, static_argnames=("chunk_size", "rope"))
step = jax.jit(mamba3_step, static_argnames=("rope",))

BATCH, T, N, H, Z, A = 2, 13, 2, 4, 8, 3  # A < Z/2: one channel pair does not rotate
TOL = dict(rtol=1e-4, atol=1e-5)


def make_inputs(seed: int, rank: int | None, *, lam=None, omega=None):
    """rank=None: SISO arrays (B/C without a rank axis, no x_proj)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    M = rank or 1
    bc = (BATCH, T, N, Z) if rank is None else (BATCH, T, M, N, Z)
    args = dict(
        x_BTNH=f(BATCH, T, N, H),
        dt_BTN=np.log1p(np.exp(f(BATCH, T, N) - 1.0)),
        A_BTN=-np.exp(0.5 * f(BATCH, T, N)),
        B_BTMNZ=f(*bc),
        C_BTMNZ=f(*bc),
        lam_BTN=1.0 / (1.0 + np.exp(-f(BATCH, T, N))) if lam is None else np.full((BATCH, T, N), lam, np.float32),
        omega_BTNA=np.pi * np.tanh(f(BATCH, T, N, A)) if omega is None else np.full((BATCH, T, N, A), omega,
                                                                                  np.float32),
    )
    kw = dict(D_N=f(N), x_proj_NMH=None if rank is None else f(N, M, H))
    return args, kw


def random_state(seed: int, rank: int) -> Mamba3State:
    rng = np.random.default_rng(seed)
    return Mamba3State(
        ssm_BNHZ=jnp.asarray(rng.standard_normal((BATCH, N, H, Z)), jnp.float32),
        angle_BNA=jnp.asarray(rng.uniform(0, 2 * np.pi, (BATCH, N, A)), jnp.float32),
        B_prev_BMNZ=jnp.asarray(rng.standard_normal((BATCH, rank, N, Z)), jnp.float32),
        x_prev_BNH=jnp.asarray(rng.standard_normal((BATCH, N, H)), jnp.float32),
    )


def zero_state(rank: int | None) -> Mamba3State:
    return Mamba3State.zeros(BATCH, N, H, Z, A, rank or 1)


def step_loop(args, kw, state):
    ys = []
    for t in range(T):
        y, state = step(state, *(a[:, t] for a in args.values()), **kw)
        ys.append(y)
    return jnp.stack(ys, axis=1), state


def assert_states_close(s1: Mamba3State, s2: Mamba3State):
    np.testing.assert_allclose(s1.ssm_BNHZ, s2.ssm_BNHZ, **TOL)
    np.testing.assert_allclose(s1.B_prev_BMNZ, s2.B_prev_BMNZ, **TOL)
    np.testing.assert_allclose(s1.x_prev_BNH, s2.x_prev_BNH, **TOL)
    dangle = np.angle(np.exp(1j * (np.asarray(s1.angle_BNA, np.float64) - np.asarray(s2.angle_BNA))))
    np.testing.assert_allclose(dangle, 0.0, atol=1e-5)  # angles agree mod 2π


@pytest.mark.parametrize("rank", [None, 3], ids=["siso", "mimo"])
def test_chunked_equals_step_loop_equals_naive(rank):
    args, kw = make_inputs(0, rank)
    state = random_state(1, rank or 1)
    y_ref, s_ref = naive(*args.values(), state=state, **kw)
    assert y_ref.shape == ((BATCH, T, N, H) if rank is None else (BATCH, T, rank, N, H))
    y_step, s_step = step_loop(args, kw, state)
    np.testing.assert_allclose(y_step, y_ref, **TOL)
    assert_states_close(s_step, s_ref)
    for chunk_size in (4, 16) if rank is None else (5, 13):  # 13 % 4, 13 % 5 != 0; 16 > T; 13 == T
        y, s = chunked(*args.values(), chunk_size=chunk_size, state=state, **kw)
        np.testing.assert_allclose(y, y_ref, **TOL)
        assert_states_close(s, s_ref)


def numpy_complex_reference(args, kw):
    """The complex-diagonal form: b = B[0::2] + i B[1::2] (pairs past A have ω = 0), eigenvalue Δ(A − iω),
    h_t = e^{Δ_t(A_t − iω_t)} (h_{t−1} + (1−λ_t)Δ_t P_{t−1}) + λ_t Δ_t P_t, y_t[r] = Re(c̄_t[r]ᵀ h_t) + D X_t[r]."""
    a = {k: np.asarray(v, np.float64) for k, v in args.items()}
    B, C = a["B_BTMNZ"], a["C_BTMNZ"]
    if B.ndim == 4:
        B, C = B[:, :, None], C[:, :, None]
    M = B.shape[2]
    xp = np.ones((N, M, H)) if kw["x_proj_NMH"] is None else np.asarray(kw["x_proj_NMH"], np.float64)
    b, c = B[..., 0::2] + 1j * B[..., 1::2], C[..., 0::2] + 1j * C[..., 1::2]
    omega = np.concatenate([a["omega_BTNA"], np.zeros((BATCH, T, N, Z // 2 - A))], axis=-1)
    X = a["x_BTNH"][:, :, None] * xp.transpose(1, 0, 2)  # [B, T, M, N, H]
    dt, lam = a["dt_BTN"], a["lam_BTN"]
    h = np.zeros((BATCH, N, H, Z // 2), complex)
    P_prev = np.zeros_like(h)
    ys = []
    for t in range(T):
        P = np.einsum("bmnh,bmnz->bnhz", X[:, t], b[:, t])
        eig = np.exp(dt[:, t, :, None] * (a["A_BTN"][:, t, :, None] - 1j * omega[:, t]))  # [B, N, Z/2]
        h = eig[:, :, None] * (h + ((1 - lam[:, t]) * dt[:, t])[..., None, None] * P_prev)
        h = h + (lam[:, t] * dt[:, t])[..., None, None] * P
        y = np.einsum("bnhz,bmnz->bmnh", h, np.conj(c[:, t])).real + np.asarray(kw["D_N"])[:, None] * X[:, t]
        ys.append(y)
        P_prev = P
    y = np.stack(ys, axis=1)
    return y[:, :, 0] if args["B_BTMNZ"].ndim == 4 else y


@pytest.mark.parametrize("rank", [None, 3], ids=["siso", "mimo"])
def test_rotations_equal_complex_diagonal_state(rank):
    args, kw = make_inputs(3, rank)
    y_ref = numpy_complex_reference(args, kw)
    y, _ = naive(*args.values(), state=zero_state(rank), **kw)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    y, _ = chunked(*args.values(), chunk_size=5 if rank else 4, state=zero_state(rank), **kw)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [None, 3], ids=["siso", "mimo"])
def test_lambda_one_no_rotation_is_mamba2_euler(rank):
    """λ = 1, ω = 0: h_t = exp(Δ_t A_t) h_{t−1} + Δ_t Σ_r X_t[r] B_t[r]ᵀ, y_t[r] = h_t C_t[r] + D X_t[r]."""
    args, kw = make_inputs(4, rank, lam=1.0, omega=0.0)
    a = {k: np.asarray(v, np.float64) for k, v in args.items()}
    B, C = (a["B_BTMNZ"], a["C_BTMNZ"]) if rank else (a["B_BTMNZ"][:, :, None], a["C_BTMNZ"][:, :, None])
    xp = np.ones((N, 1, H)) if rank is None else np.asarray(kw["x_proj_NMH"], np.float64)
    X = a["x_BTNH"][:, :, None] * xp.transpose(1, 0, 2)
    h = np.zeros((BATCH, N, H, Z))
    ys = []
    for t in range(T):
        dt = a["dt_BTN"][:, t, :, None, None]
        h = np.exp(dt * a["A_BTN"][:, t, :, None, None]) * h + dt * np.einsum("bmnh,bmnz->bnhz", X[:, t], B[:, t])
        ys.append(np.einsum("bnhz,bmnz->bmnh", h, C[:, t]) + np.asarray(kw["D_N"])[:, None] * X[:, t])
    y_ref = np.stack(ys, axis=1)
    y_ref = y_ref if rank else y_ref[:, :, 0]
    state = zero_state(rank)  # explicit zeros: the same compiled programs as the tests above
    for y, _ in (naive(*args.values(), state=state, **kw),
                 chunked(*args.values(), chunk_size=5 if rank else 4, state=state, **kw)):
        np.testing.assert_allclose(y, y_ref, **TOL)


def test_halves_layout_is_a_permutation_of_interleaved():
    perm = np.stack([np.arange(Z // 2), np.arange(Z // 2) + Z // 2], axis=-1).reshape(-1)  # 0, Z/2, 1, Z/2+1..
    rng = np.random.default_rng(5)
    v = rng.standard_normal((3, N, Z)).astype(np.float32)
    theta = rng.standard_normal((3, N, A)).astype(np.float32)
    np.testing.assert_allclose(rotate(v, theta, "halves")[..., perm], rotate(v[..., perm], theta, "interleaved"),
                               rtol=1e-6, atol=1e-6)
    # End to end: the halves layout equals interleaved on permuted state channels.
    args, kw = make_inputs(6, 3)
    y_int, s_int = naive(*args.values(), state=zero_state(3), **kw)
    inv = np.argsort(perm)
    permuted = dict(args, B_BTMNZ=args["B_BTMNZ"][..., inv], C_BTMNZ=args["C_BTMNZ"][..., inv])
    y_half, s_half = naive(*permuted.values(), rope="halves", state=zero_state(3), **kw)
    np.testing.assert_allclose(y_half, y_int, **TOL)
    np.testing.assert_allclose(np.asarray(s_half.ssm_BNHZ)[..., perm], s_int.ssm_BNHZ, **TOL)


def test_bad_inputs_raise_clear_errors():
    args, kw = make_inputs(7, 3)
    for bad in (0, -2, 2.0):
        with pytest.raises(ValueError, match=f"chunk_size={bad}"):
            mamba3_chunked(*args.values(), chunk_size=bad, **kw)
    cases = {
        "C_BTMNZ": dict(args, C_BTMNZ=args["C_BTMNZ"][..., :6]),
        "dt_BTN": dict(args, dt_BTN=args["dt_BTN"][:, :5]),
        "omega_BTNA": dict(args, omega_BTNA=args["omega_BTNA"][:, :, :1]),
        "A=5 rotary angles": dict(args, omega_BTNA=np.zeros((BATCH, T, N, 5), np.float32)),
    }
    for name, bad_args in cases.items():
        with pytest.raises(ValueError, match=name):
            mamba3_naive(*bad_args.values(), **kw)
    with pytest.raises(ValueError, match="x_proj_NMH has M=2"):
        mamba3_naive(*args.values(), D_N=kw["D_N"], x_proj_NMH=kw["x_proj_NMH"][:, :2])
    with pytest.raises(ValueError, match=r"x_proj_NMH has shape \(2, 3, 3\)"):
        mamba3_naive(*args.values(), D_N=kw["D_N"], x_proj_NMH=kw["x_proj_NMH"][..., :3])
    with pytest.raises(ValueError, match="state.B_prev_BMNZ"):
        mamba3_chunked(*args.values(), chunk_size=4, state=random_state(0, 2), **kw)
    with pytest.raises(ValueError, match="rope='complex'"):
        mamba3_naive(*args.values(), rope="complex", **kw)
    with pytest.raises(ValueError, match="B_BMNZ has M=2"):
        mamba3_step(random_state(0, 3), *(a[:, 0] for a in dict(args, B_BTMNZ=args["B_BTMNZ"][:, :, :2]).values()),
                    **kw)


def random_params(mixer, x_BTD, seed=0):
    """Random values in the shapes `mixer.init` gives (eval_shape: no compile of the initialisers)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(mixer.init, jax.random.PRNGKey(0), x_BTD)["params"]
    return jax.tree.map(lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype), nn.unbox(abstract))


def test_mixer_decode_steps_equal_full_forward():
    """The chunked path (T > 1, no state: zeros) and the step path (T == 1 from a zero state) agree."""
    mixer = Mamba3Mixer(d_model=16, num_heads=2, head_dim=8, state_size=8, mimo_rank=2, chunk_size=4)
    x_BTD = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 16))
    params = random_params(mixer, x_BTD)
    apply = jax.jit(mixer.apply)
    y_full, s_full = apply({"params": params}, x_BTD)
    assert y_full.shape == x_BTD.shape and bool(jnp.all(jnp.isfinite(y_full)))
    state = Mamba3State.zeros(2, 2, 8, 8, mixer.num_angles, 2)
    ys = []
    for t in range(x_BTD.shape[1]):
        y_t, state = apply({"params": params}, x_BTD[:, t : t + 1], state)
        ys.append(y_t)
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), y_full, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.ssm_BNHZ, s_full.ssm_BNHZ, rtol=1e-4, atol=1e-5)


def test_mixer_params_and_errors():
    x_BTD = jnp.zeros((2, 5, 16))
    siso = Mamba3Mixer(d_model=16, num_heads=2, head_dim=8, state_size=8)
    abstract = nn.unbox(jax.eval_shape(siso.init, jax.random.PRNGKey(0), x_BTD)["params"])
    assert "mimo_x" not in abstract and abstract["in_B"].shape == (16, 1, 8)
    assert abstract["in_angles"].shape == (16, 2)  # rope_fraction 0.5 of Z=8 -> 2 angles
    y, state = jax.eval_shape(siso.apply, {"params": abstract}, x_BTD)
    assert y.shape == x_BTD.shape and state.B_prev_BMNZ.shape == (2, 1, 2, 8)
    with pytest.raises(ValueError, match="x_BTD"):
        jax.eval_shape(siso.apply, {"params": abstract}, x_BTD[..., :8])
    with pytest.raises(ValueError, match="state_size=7"):
        jax.eval_shape(Mamba3Mixer(16, 2, 8, state_size=7).init, jax.random.PRNGKey(0), x_BTD)


# ---------------------------------------------------------------------------------------------------------
# Packed segments, the decode-state commit, and Mamba-3 as an LM layer's config and state


@pytest.mark.parametrize("rank", [None, 3], ids=["siso", "mimo"])
def test_segment_start_resets_state_and_previous_token_term(rank):
    """Row 0 packs a (6 tokens, after a random initial state) and b (7 tokens); row 1 runs b alone from zeros.
    b's outputs agree in every form, so neither h nor the trapezoid's P_{t−1} term crosses the boundary."""
    args, kw = make_inputs(8, rank)
    for a in args.values():
        a[1, :7] = a[0, 6:]
    state = jax.tree.map(lambda a: a.at[1].set(0.0), random_state(9, rank or 1))
    seg = np.array([[3] * 6 + [1] * 7, [1] * 7 + [2] * 6], np.int32)
    y_ref, _ = naive(*args.values(), state=state, segment_ids_BT=seg, **kw)
    y_unpacked, _ = naive(*args.values(), state=state, **kw)
    assert np.abs(y_unpacked[0, 6:] - y_ref[0, 6:]).max() > 1e-2  # the reset changes b's outputs
    np.testing.assert_allclose(y_ref[0, 6:], y_ref[1, :7], **TOL)
    np.testing.assert_allclose(y_ref[0, :6], y_unpacked[0, :6], **TOL)  # a still starts from the state
    for chunk_size in (4, 5):  # the boundary inside a chunk (6 % 4) and on one (6 % 5 ... 5 + 1)
        y, _ = chunked(*args.values(), chunk_size=chunk_size, state=state, segment_ids_BT=seg, **kw)
        np.testing.assert_allclose(y, y_ref, **TOL)


def test_commit_writes_the_states_of_the_last_valid_positions():
    """commit folds the first `valid` tokens of a call into rings of Q slots: they then hold the states after the
    last Q valid positions (what the step loop computes from the state at `start`). Tokens past `valid`
    (padding) are ignored; slots before `start` stay as they were."""
    from lmx.models.mamba3 import commit, current_state

    Q, rank = 3, 2
    args, kw = make_inputs(10, rank)
    start, valid = np.array([5, 0]), np.array([11, 2])  # row 0 folds 8 tokens onto a state; row 1 < Q tokens
    init = random_state(11, rank)
    init = jax.tree.map(lambda a: a.at[1].set(0.0), init)  # row 1 is empty: its current state is zeros
    fields = lambda s: (s.ssm_BNHZ, s.angle_BNA, s.B_prev_BMNZ, s.x_prev_BNH)
    rng = np.random.default_rng(12)
    rings = [rng.standard_normal((BATCH, Q) + a.shape[1:]).astype(np.float32) for a in fields(init)]
    for ring, a in zip(rings, fields(init), strict=True):
        ring[0, (start[0] - 1) % Q] = a[0]  # row 0's state at length 5 sits in slot 4 % Q
    states = []
    state = init
    for t in range(T):  # per-position states, angles and rotated B from the step loop
        _, state = step(state, *(a[:, t] for a in args.values()), **kw)
        states.append(state)
    pending = (args["x_BTNH"], args["dt_BTN"], args["A_BTN"], args["lam_BTN"],
               jnp.stack([s.angle_BNA for s in states], 1), jnp.stack([s.B_prev_BMNZ for s in states], 1),
               jnp.broadcast_to(kw["x_proj_NMH"], (BATCH, N, rank, H)))
    out = jax.jit(commit)(tuple(map(jnp.asarray, rings)), pending, jnp.asarray(start), jnp.asarray(valid))
    for b in range(BATCH):
        end = start[b] + valid[b]
        for p in range(end - Q, end):
            got = [ring[b, p % Q] for ring in out]
            if p < start[b]:  # not written: the ring slot (row 1 position -1) is as it was
                for g, ring in zip(got, rings, strict=True):
                    np.testing.assert_array_equal(g, ring[b, p % Q])
                continue
            want = fields(states[p - start[b]])
            for name, g, w in zip(("ssm", "angle", "K", "x"), got, want, strict=True):
                w = np.asarray(w[b])
                if name == "angle":
                    g, w = np.exp(1j * np.asarray(g, np.float64)), np.exp(1j * w.astype(np.float64))
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"row {b} position {p} {name}")
    now = current_state(out, jnp.asarray(start + valid))
    np.testing.assert_allclose(now.ssm_BNHZ[0], states[valid[0] - 1].ssm_BNHZ[0], rtol=1e-4, atol=1e-5)


def test_decode_state_helpers_on_mamba3_state():
    import dataclasses

    from lmx.models import Mamba3LayerState, Mamba3Pending, init_state, preset, repeat, select, truncate

    base = preset("mamba3-tiny")
    cfg = base.replace(ssm=dataclasses.replace(base.ssm, mimo_rank=2))
    s = cfg.ssm
    state = init_state(cfg, 3, 8)
    assert all(isinstance(x, Mamba3LayerState) for x in state.layers) and state.layers[0].rollback_window == 4
    assert [[a.shape for a in x.rings] for x in state.layers] == [
        [(3, 5, 8, 16, 16), (3, 5, 8, s.num_angles), (3, 5, 2, 8, 16), (3, 5, 8, 16)]] * 2
    # Distinct rows, with a pending record (MIMO: it carries the x-projection per row), gathered and repeated.
    r = np.random.default_rng(0)
    fill = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)

    def layer(x):
        pending = Mamba3Pending(jnp.asarray([1, 2, 3]), fill(3, 5, 8, 16), fill(3, 5, 8), fill(3, 5, 8),
                                fill(3, 5, 8), fill(3, 5, 8, 4), fill(3, 5, 2, 8, 16), fill(3, 8, 2, 16))
        return x.with_rings([fill(*a.shape) for a in x.rings]).replace(pending=pending)

    state = state.replace(lengths_B=jnp.asarray([6, 7, 8]), layers=tuple(map(layer, state.layers)))
    picked = select(state, [2, 0, 0])
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(picked), strict=True):
        np.testing.assert_array_equal(b, np.take(a, [2, 0, 0], axis=0))  # every array is batch-major
    twice = repeat(state, 2)
    np.testing.assert_array_equal(twice.layers[1].pending.x_proj_BNMH[3], state.layers[1].pending.x_proj_BNMH[1])
    np.testing.assert_array_equal(twice.layers[0].K_BQMNZ[5], state.layers[0].K_BQMNZ[2])

    committed = state.replace(layers=tuple(x.replace(pending=None, floor_B=jnp.asarray([4, 5, 6]))
                                           for x in state.layers))
    assert truncate(committed, [4, 6, 8]).lengths_B.tolist() == [4, 6, 8]
    with pytest.raises(ValueError, match=r"rows \[1\] roll back to lengths \[4\].*>= \[5\].*rollback_window=4"):
        truncate(committed, [4, 4, 8])
    # truncate commits the pending call (starts 1, 2, 3; rows keep 2, 5 and 0 of its 5 tokens), and the floor
    # becomes length - rollback_window where that is higher: row 1 can no longer go below length 3.
    after = truncate(state, [3, 7, 3])
    assert all(x.pending is None and x.floor_B.tolist() == [0, 3, 0] for x in after.layers)
    with pytest.raises(ValueError, match=r"rows \[1\] roll back to lengths \[2\]"):
        truncate(after, [3, 2, 3])


@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="mamba3", n_groups=2), r"ssm.n_groups=2 is a mamba2 option \(no effect with variant='mamba3'\)"),
    (dict(variant="mamba3", conv_width=3), r"ssm.conv_width=3 is a mamba2 option"),
    (dict(variant="mamba3", dt_limit=(0.0, 1.0)), r"ssm.dt_limit=\(0.0, 1.0\) is a mamba2 option"),
    (dict(mimo_rank=2), r"ssm.mimo_rank=2 is a mamba3 option \(no effect with variant='mamba2'\); leave it at 1"),
    (dict(rope="halves"), r"ssm.rope='halves' is a mamba3 option"),
    (dict(variant="mamba3", mimo_rank=0), r"ssm.mimo_rank=0 must be >= 1"),
    (dict(variant="mamba3", state_size=15), r"ssm.state_size=15 must be even for mamba3"),
    (dict(variant="mamba3", rope_fraction=0.0), r"ssm.rope_fraction=0.0 must be in \(0, 1\]"),
    (dict(variant="mamba3", rope_fraction=0.1), r"ssm.rope_fraction=0.1 .* at least one rotary angle"),
    (dict(variant="mamba3", rope="complex"), r"ssm.rope='complex' must be one of \(None, 'interleaved', 'halves'\)"),
    (dict(variant="mamba3", A_floor=-1e-3), r"ssm.A_floor=-0.001 must be >= 0"),
    (dict(variant="mamba3", impl="pallas"), r"ssm.impl='pallas': there is no Mamba-3 kernel"),
])
def test_invalid_mamba3_config(kwargs, match):
    from lmx.models import SSMConfig

    with pytest.raises(ValueError, match=match):
        SSMConfig(**kwargs)


def test_mamba3_inner_width_is_checked():
    from lmx.models import ModelConfig, SSMConfig

    with pytest.raises(ValueError, match=r"ssm.num_heads \* ssm.head_dim = 8 \* 16 = 128 must equal the inner width"):
        ModelConfig(d_model=32, num_layers=1, layer_pattern=("ssm",),
                    ssm=SSMConfig(variant="mamba3", num_heads=8, head_dim=16))
