"""Mamba-2 SSD: chunked == recurrent step == sequential scan == a plain numpy loop (initial state, segment
resets, lengths that are not a multiple of the chunk); the ring-buffer commit; config validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.models import (
    Mamba2LayerState,
    Mamba2Pending,
    ModelConfig,
    SSMConfig,
    init_state,
    preset,
    repeat,
    select,
    truncate,
)
from lmx.models.backend import ring_read, ring_write
from lmx.models.ssm import commit, current_state, ring_step, ssd_chunked, ssd_naive, ssd_step

B, T, N, H, Z, U = 2, 11, 4, 3, 5, 2
CHUNKS = (1, 3, 4, 16)  # 16 > T: a single padded chunk


def _inputs(seed=0):
    r = np.random.default_rng(seed)
    x = r.standard_normal((B, T, N, H)).astype(np.float32)
    dt = np.log1p(np.exp(r.standard_normal((B, T, N)))).astype(np.float32)  # softplus: > 0
    A = -np.exp(r.standard_normal(N)).astype(np.float32)
    Bm, Cm = (r.standard_normal((B, T, U, Z)).astype(np.float32) for _ in range(2))
    h0 = r.standard_normal((B, N, H, Z)).astype(np.float32)
    # row 1: segments start at 3 (inside a chunk of 4, on a boundary of 3) and at 8 (a boundary of 4);
    # ids need not increase, only change
    seg = np.array([[0] * T, [7, 7, 7, 2, 2, 2, 2, 2, 7, 7, 7]], np.int32)
    return x, dt, A, Bm, Cm, h0, seg


def _numpy_ssd(x, dt, A, Bm, Cm, h0, seg):
    """Independent loop: h <- exp(dt A) h + dt x Bᵀ, y = h C; h <- 0 where the segment id changes."""
    y, hs = np.zeros_like(x), []
    rep = N // U
    for b in range(B):
        h = h0[b].astype(np.float64)
        for t in range(T):
            if t and seg[b, t] != seg[b, t - 1]:
                h = np.zeros_like(h)
            for n in range(N):
                u = n // rep
                h[n] = np.exp(dt[b, t, n] * A[n]) * h[n] + dt[b, t, n] * np.outer(x[b, t, n], Bm[b, t, u])
                y[b, t, n] = h[n] @ Cm[b, t, u]
        hs.append(h)
    return y, np.stack(hs)


@jax.jit
def _all_forms(x, dt, A, Bm, Cm, h0, seg):
    out = {"naive": ssd_naive(x, dt, A, Bm, Cm, initial_state_BNHZ=h0, segment_ids_BT=seg)}
    for c in CHUNKS:
        out[f"chunk{c}"] = ssd_chunked(x, dt, A, Bm, Cm, chunk_size=c, initial_state_BNHZ=h0, segment_ids_BT=seg)
    h, ys = h0, []
    for t in range(T):
        reset = seg[:, t] != seg[:, t - 1] if t else jnp.zeros((B,), bool)
        y, h = ssd_step(jnp.where(reset[:, None, None, None], 0.0, h), x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t])
        ys.append(y)
    out["step"] = (jnp.stack(ys, 1), h)
    out["plain"] = ssd_chunked(x, dt, A, Bm, Cm, chunk_size=4)  # no initial state, no segments
    return out


def test_chunked_step_and_naive_agree():
    args = _inputs()
    want_y, want_h = _numpy_ssd(*args)
    assert np.abs(want_h).max() > 0.5  # the initial state and inputs really matter
    out = _all_forms(*map(jnp.asarray, args))
    for name, (y, h) in out.items():
        if name == "plain":
            continue
        err = max(float(np.abs(y - want_y).max()), float(np.abs(h - want_h).max()))
        print(f"{name}: max abs err vs numpy loop {err:.1e}")
        np.testing.assert_allclose(y, want_y, atol=2e-5, rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(h, want_h, atol=2e-5, rtol=2e-5, err_msg=name)
    x, dt, A, Bm, Cm, _, _ = args
    plain_y, plain_h = _numpy_ssd(x, dt, A, Bm, Cm, np.zeros((B, N, H, Z), np.float32), np.zeros((B, T), np.int32))
    np.testing.assert_allclose(out["plain"][0], plain_y, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(out["plain"][1], plain_h, atol=2e-5, rtol=2e-5)


def test_commit_keeps_the_last_states_and_conv_inputs():
    """Folding the first `valid` steps of a call writes the states after the last Q valid positions and the
    conv inputs of the last W valid positions into the rings; padding steps past `valid` are ignored."""
    x, dt, A, Bm, _, h0, _ = _inputs(1)
    Q, W, Y = 3, 4, 6
    xbc = np.random.default_rng(2).standard_normal((B, T, Y)).astype(np.float32)
    start, valid = np.array([0, 5]), np.array([T, 2])  # row 1: fewer valid steps than ring slots
    # Row 0 starts empty; row 1 at length 5 with state h0[1] and conv inputs 10.. for positions 1..4.
    ssm_ring = np.zeros((B, Q, N, H, Z), np.float32)
    ssm_ring[1, (5 - 1) % Q] = h0[1]
    conv_ring = np.zeros((B, W, Y), np.float32)
    for p in range(1, 5):
        conv_ring[1, p % W] = 10 + p
    pending = (x * dt[..., None], dt * A, Bm, xbc)
    conv, ring = jax.jit(commit, static_argnums=5)(conv_ring, ssm_ring, pending, start, valid, 4)
    for b in range(B):
        h = h0[1].copy() if b else np.zeros((N, H, Z), np.float32)
        states = {start[b] - 1: h.copy()}
        for t in range(valid[b]):
            for n in range(N):
                u = n // (N // U)
                h[n] = np.exp(dt[b, t, n] * A[n]) * h[n] + dt[b, t, n] * np.outer(x[b, t, n], Bm[b, t, u])
            states[start[b] + t] = h.copy()
        end = start[b] + valid[b]
        for p in range(end - Q, end):
            np.testing.assert_allclose(ring[b, p % Q], states[p], atol=1e-5, err_msg=f"row {b} position {p}")
        for p in range(end - W, end):
            want = xbc[b, p - start[b]] if p >= start[b] else conv_ring[b, p % W]
            np.testing.assert_array_equal(conv[b, p % W], want)
    np.testing.assert_allclose(current_state(ring, jnp.asarray(start + valid))[1], states[6], atol=1e-5)


@pytest.mark.parametrize("rows, slots, shape", [(1, 5, (4,)), (3, 1, (4,)), (3, 5, (4,)), (3, 5, (64, 256))],
                         ids=["one-row", "one-slot", "select", "scatter"])
def test_ring_write_paths_write_one_slot_per_row(rows, slots, shape):
    """ring_write picks its write by size (dynamic-update-slice, elementwise, one-hot select, scatter): all write
    slot pos % Q of each row and nothing else."""
    r = np.random.default_rng(0)
    ring = r.standard_normal((rows, slots, *shape)).astype(np.float32)
    value = r.standard_normal((rows, *shape)).astype(np.float32)
    pos = np.array([7, 3, 9][:rows])
    got = jax.jit(ring_write)(jnp.asarray(ring), jnp.asarray(pos), jnp.asarray(value))
    want = ring.copy()
    want[np.arange(rows), pos % slots] = value
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ring_read(got, jnp.asarray(pos)), value)


def test_ring_step_with_one_slot_equals_the_ring():
    """The one-slot ring (no rollback window: generate's state) updates in place, by its own code path; it must
    give ssd_step's output and state, like a ring of several slots."""
    x, dt, A, Bm, Cm, h0, _ = _inputs(3)
    lengths = jnp.asarray([4, 0])  # row 1 is empty: its current state is zeros, whatever the ring holds
    outs = []
    for slots in (1, 3):
        ring = jnp.broadcast_to(jnp.asarray(h0)[:, None], (B, slots, N, H, Z))
        y, ring = jax.jit(ring_step)(ring, lengths, x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0])
        outs.append((y, ring_read(ring, lengths)))
    h_in = np.where(np.asarray(lengths > 0)[:, None, None, None], h0, 0)
    want_y, want_h = ssd_step(h_in, x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0])
    for y, h in outs:
        np.testing.assert_allclose(y, want_y, atol=1e-5)
        np.testing.assert_allclose(h, want_h, atol=1e-6)


def test_select_repeat_and_truncate_limits_on_ssm_state():
    cfg = preset("mamba2-tiny")
    state = init_state(cfg, 3, 8)
    s = cfg.ssm
    assert all(isinstance(x, Mamba2LayerState) for x in state.layers) and len(state.layers) == 2
    assert state.layers[0].conv_BWY.shape == (3, s.conv_width - 1 + s.rollback_window, s.conv_dim)
    assert state.layers[1].ssm_BQNHZ.shape == (3, s.rollback_window + 1, s.num_heads, s.head_dim, s.state_size)
    # Distinct rows (as after a multi-token call, with its pending steps), then gather and repeat them.
    r = np.random.default_rng(0)
    fill = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)

    def layer(x):
        pending = Mamba2Pending(jnp.asarray([1, 2, 3]), fill(3, 5, 8, 16), fill(3, 5, 8), fill(3, 5, 2, 16),
                                fill(3, 5, s.conv_dim))
        return Mamba2LayerState(fill(*x.conv_BWY.shape), fill(*x.ssm_BQNHZ.shape), jnp.asarray([4, 5, 6]), pending)

    state = state.replace(lengths_B=jnp.asarray([6, 7, 8]), layers=tuple(map(layer, state.layers)))
    picked = select(state, [2, 0, 0])
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(picked), strict=True):
        np.testing.assert_array_equal(b, np.take(a, [2, 0, 0], axis=0))  # every array is batch-major
    twice = repeat(state, 2)
    np.testing.assert_array_equal(twice.layers[0].pending.start_B, [1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(twice.layers[1].ssm_BQNHZ[4], state.layers[1].ssm_BQNHZ[2])
    np.testing.assert_array_equal(twice.layers[0].conv_BWY[5], state.layers[0].conv_BWY[2])

    committed = state.replace(layers=tuple(x.replace(pending=None) for x in state.layers))
    assert truncate(committed, [4, 6, 8]).lengths_B.tolist() == [4, 6, 8]
    with pytest.raises(ValueError, match=r"rows \[1\] roll back to lengths \[4\].*>= \[5\].*rollback_window=4"):
        truncate(committed, [4, 4, 8])
    off = init_state(cfg.replace(ssm=dataclasses.replace(s, rollback_window=0)), 1, 8)
    override = init_state(cfg, 1, 8, rollback_window=0)  # the same rings, by init_state's override
    assert jax.tree.map(jnp.shape, override) == jax.tree.map(jnp.shape, off)
    with pytest.raises(ValueError, match=r"rollback_window=-1 must be an int >= 0"):
        init_state(cfg, 1, 8, rollback_window=-1)
    off = off.replace(lengths_B=jnp.asarray([3]), layers=tuple(x.replace(floor_B=jnp.asarray([3])) for x in off.layers))
    with pytest.raises(ValueError, match=r"rollback_window=0 .*\(rollback is disabled\)"):
        truncate(off, [2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=6, n_groups=4), r"ssm.n_groups=4 must divide ssm.num_heads=6"),
    (dict(chunk_size=0), r"ssm.chunk_size=0 must be > 0"),
    (dict(head_dim=-1), r"ssm.head_dim=-1 must be > 0"),
    (dict(conv_width=1), r"ssm.conv_width=1 must be >= 2"),
    (dict(rollback_window=-1), r"ssm.rollback_window=-1"),
    (dict(dt_limit=(0.5, 0.1)), r"ssm.dt_limit=\(0.5, 0.1\)"),
    (dict(variant="s4"), r"ssm.variant='s4' must be one of \('mamba2', 'mamba3'\)"),
])
def test_invalid_ssm_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSMConfig(**kwargs)


def test_invalid_model_config_with_ssm():
    with pytest.raises(ValueError, match=r"ssm.num_heads \* ssm.head_dim = 8 \* 16 = 128 must equal the inner width "
                                         r"ssm.expand \* d_model = 2 \* 32 = 64"):
        ModelConfig(d_model=32, num_layers=1, layer_pattern=("ssm",), ssm=SSMConfig(num_heads=8, head_dim=16))
    with pytest.raises(ValueError, match="has 'ssm' layers, so ssm must be an SSMConfig, got None"):
        ModelConfig(num_layers=2, layer_pattern=("ssm", "attn"))
