"""Mamba-3 pinned against an independent float64 NumPy transcription of the reference layer.

The other Mamba-3 tests check lmx's forms against each other; this file checks the layer against the reference:
``state-spaces/mamba`` at e9594ce (2026-07-23), ``mamba_ssm/modules/mamba3.py`` (``Mamba3.__init__``,
``forward``, ``_preprocess``/``_postprocess``/``step``), with the maths of its kernels taken from the
references that upstream tests those kernels against: ``mamba3_siso_step_ref``
(``tests/ops/triton/test_mamba3_siso.py``), ``mamba3_MIMO_step_ref`` (``tests/ops/tilelang/test_mamba3_mimo.py``),
``apply_rotary_qk_inference_reference`` (``mamba_ssm/ops/triton/mamba3/mamba3_mimo_rotary_step.py``),
``angle_dt_fwd_kernel`` (``mamba_ssm/ops/triton/mamba3/angle_dt.py``) and ``rms_norm_ref``
(``mamba_ssm/ops/triton/layernorm_gated.py``). The transcription works on the reference's own parameters (one
fused ``in_proj`` split in the reference's order, ``norm.weight`` over d_inner, ``out_proj.weight`` as
torch stores it); `to_reference` maps lmx's param tree onto them. It uses nothing from lmx for the maths.

The layer is the reference with ``is_outproj_norm=True`` and ``ngroups=1`` (what lmx implements, see
Mamba3Mixer's docstring). The tests use A_floor = 0.5 (the default 1e-4 never binds at these scales) so the
floor is exercised, and norm eps 1e-5 (the reference hard-codes 1e-5 for B_norm, C_norm and norm).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.models import build, init_state, preset
from lmx.models.lm import decode_params
from lmx.models.mamba3 import Mamba3Mixer, Mamba3State

EPS = 1e-5  # RMSNormGated(..., eps=1e-5) for B_norm, C_norm and the output norm (reference __init__)
A_FLOOR = 0.5


# ---------------------------------------------------------------------------------------------------------
# The reference layer in float64 NumPy


def softplus(v):
    return np.logaddexp(0.0, v)


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def silu(v):
    return v * sigmoid(v)


def heavy_tail_activation(v):
    """modules/mamba3.py heavy_tail_activation: 1 + v for v >= 0, 1 / (1 - v) for v < 0."""
    return np.maximum(v, 0.0) + 1.0 / (1.0 - np.minimum(v, 0.0))


def rms_norm(v, weight, group_size=None, z=None):
    """layernorm_gated.rms_norm_ref with norm_before_gate=True, no bias: per group of the last axis
    v / sqrt(mean(v²) + eps) · weight, then · silu(z) when a gate is given."""
    shape = v.shape
    g = v.reshape(*shape[:-1], -1, group_size or shape[-1])
    out = (g / np.sqrt(np.mean(g * g, axis=-1, keepdims=True) + EPS)).reshape(shape) * weight
    return out if z is None else out * silu(z)


def apply_rotary(v, angle, pairwise):
    """Rotate v [..., d_state] by angle [..., num_angles] (broadcast over v's leading axes).

    pairwise (SISO, mamba3_siso_step_ref.apply_rotary_emb): pairs (2j, 2j+1), cos/sin padded with 1/0 beyond
    the angles. Otherwise (MIMO, the 'halved' branch of apply_rotary_qk_inference_reference and the TileLang
    kernel): pairs (j, j + d_state/2), cos/sin padded likewise to d_state/2."""
    d = v.shape[-1]
    pad = d // 2 - angle.shape[-1]
    cos = np.concatenate([np.cos(angle), np.ones(angle.shape[:-1] + (pad,))], axis=-1)
    sin = np.concatenate([np.sin(angle), np.zeros(angle.shape[:-1] + (pad,))], axis=-1)
    if pairwise:
        v0, v1 = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = v0 * cos - v1 * sin, v0 * sin + v1 * cos
        return out
    v0, v1 = v[..., : d // 2], v[..., d // 2:]
    return np.concatenate([v0 * cos - v1 * sin, v0 * sin + v1 * cos], axis=-1)


@dataclasses.dataclass(frozen=True)
class RefConfig:
    """Mamba3(d_model, d_state, headdim, rope_fraction, A_floor, is_mimo, mimo_rank, is_outproj_norm=True).
    The reference sets nheads = expand·d_model / headdim; here nheads is given directly."""

    d_model: int
    nheads: int
    headdim: int
    d_state: int
    mimo_rank: int = 1  # 1: is_mimo=False
    rope_fraction: float = 0.5
    A_floor: float = 1e-4
    rotate_pairwise: bool | None = None  # None: as the reference (pairwise for SISO, halved for MIMO)

    @property
    def num_rope_angles(self):  # __init__: split_tensor_size = int(d_state·rope_fraction), made even, halved
        split = int(self.d_state * self.rope_fraction)
        return (split - split % 2) // 2

    @property
    def pairwise(self):  # step(): rotate_pairwise = not self.is_mimo
        return self.mimo_rank == 1 if self.rotate_pairwise is None else self.rotate_pairwise


def reference_zero_state(cfg: RefConfig, batch: int):
    """allocate_inference_cache: (angle_dt_state, ssm_state, k_state, v_state); v_state is kept here already
    up-projected by mimo_x, as mamba3_MIMO_step_ref keeps V_State."""
    N, H, Z, M = cfg.nheads, cfg.headdim, cfg.d_state, cfg.mimo_rank
    return (np.zeros((batch, N, cfg.num_rope_angles)), np.zeros((batch, N, H, Z)), np.zeros((batch, M, N, Z)),
            np.zeros((batch, M, N, H)))


def reference_mamba3(u, p, cfg: RefConfig, state=None):
    """The reference Mamba3 forward on u [batch, seqlen, d_model] as a sequential recurrence, one token at a time
    (the reference's forward and step agree; its kernels are tested against these step refs). p: reference
    parameter names (see to_reference). Returns (out [batch, seqlen, d_model], final state)."""
    batch, seqlen, _ = u.shape
    N, H, Z, M, nA = cfg.nheads, cfg.headdim, cfg.d_state, cfg.mimo_rank, cfg.num_rope_angles
    d_inner = N * H

    # forward(): zxBCdtAtrap = in_proj(u), split as [z, x, B, C, dd_dt, dd_A, trap, angles].
    proj = u @ p["in_proj.weight"].T
    sizes = [d_inner, d_inner, Z * M, Z * M, N, N, N, nA]
    z, x, B, C, dd_dt, dd_A, trap, angles = np.split(proj, np.cumsum(sizes)[:-1], axis=-1)
    z = z.reshape(batch, seqlen, N, H)  # "b l (h p) -> b l h p"
    x = x.reshape(batch, seqlen, N, H)
    B = B.reshape(batch, seqlen, M, Z)  # "b l (r g n) -> b l r g n" with g = ngroups = 1
    C = C.reshape(batch, seqlen, M, Z)

    # forward(): _A = clamp(-heavy_tail_activation(dd_A), max=-A_floor); DT = softplus(dd_dt + dt_bias).
    A = np.minimum(-heavy_tail_activation(dd_A), -cfg.A_floor)  # [b, l, N]
    DT = softplus(dd_dt + p["dt_bias"])
    lam = sigmoid(trap)  # the kernels' sigmoid(Trap) (mamba3_siso_step_ref / _preprocess)
    # angle_dt_fwd_kernel: angle = tanh(angle_proj)·π, shared by all heads (angles expanded over nheads).
    omega = np.tanh(angles) * math.pi  # [b, l, nA]

    # forward(): B = B_norm(B), C = C_norm(C): RMSNorm over d_state, one weight shared by ranks and heads.
    B = rms_norm(B, p["B_norm.weight"])
    C = rms_norm(C, p["C_norm.weight"])
    # Kernel refs: q = Q + Q_bias, k = K + K_bias, per (head, rank), before the rotation; bias [N, M, Z].
    K_in = B[:, :, :, None, :] + np.swapaxes(p["B_bias"], 0, 1)  # [b, l, M, N, Z]
    Q_in = C[:, :, :, None, :] + np.swapaxes(p["C_bias"], 0, 1)
    # MIMO up-projection v_proj = einsum("bthd,hrd->btrhd", V, MIMO_V); SISO: xpj = ones (step()).
    mimo_x = p["mimo_x"] if M > 1 else np.ones((N, M, H))
    V = np.einsum("blhp,hrp->blrhp", x, mimo_x)  # [b, l, M, N, H]

    angle_state, ssm_state, k_state, v_state = reference_zero_state(cfg, batch) if state is None else state
    y = np.empty((batch, seqlen, M, N, H))
    for t in range(seqlen):
        # Angle_State += tanh(angle)·π·DT (mod 2π in the SISO ref; cos/sin do not care).
        angle_state = angle_state + omega[:, t, None, :] * DT[:, t, :, None]
        q = apply_rotary(Q_in[:, t], angle_state[:, None], cfg.pairwise)  # [b, M, N, Z]
        k = apply_rotary(K_in[:, t], angle_state[:, None], cfg.pairwise)
        v = V[:, t]  # [b, M, N, H]
        # alpha = exp(ADT), beta = (1 - trap)·dt·alpha, gamma = trap·dt (step refs and mamba3_step_fn).
        alpha = np.exp(A[:, t] * DT[:, t])[..., None, None]
        beta = ((1.0 - lam[:, t]) * DT[:, t])[..., None, None] * alpha
        gamma = (lam[:, t] * DT[:, t])[..., None, None]
        prev_kv = np.einsum("brhd,brhp->bhpd", k_state, v_state)  # Σ_r V_prev[r] ⊗ K_prev[r]
        curr_kv = np.einsum("brhd,brhp->bhpd", k, v)
        ssm_state = alpha * ssm_state + beta * prev_kv + gamma * curr_kv
        # out = SSM_State · q_rot, + D·v (v up-projected in MIMO).
        y[:, t] = np.einsum("bhpd,brhd->brhp", ssm_state, q) + p["D"][None, None, :, None] * v
        k_state, v_state = k, v

    # is_outproj_norm: norm(y, z) = RMSNorm over each head's headdim (group_size=headdim), · weight, · silu(z),
    # per rank with z·mimo_z in MIMO (_postprocess / the fused pregate norm), then Σ_r mimo_o[r]·y[r].
    zr = np.einsum("blhp,hrp->blrhp", z, p["mimo_z"]) if M > 1 else z[:, :, None]
    y = rms_norm(y.reshape(batch, seqlen, M, d_inner), p["norm.weight"], group_size=H,
                 z=zr.reshape(batch, seqlen, M, d_inner)).reshape(batch, seqlen, M, N, H)
    y = np.einsum("blrhp,hrp->blhp", y, p["mimo_o"]) if M > 1 else y[:, :, 0]
    out = y.reshape(batch, seqlen, d_inner) @ p["out_proj.weight"].T
    return out, (angle_state, ssm_state, k_state, v_state)


def to_reference(params) -> dict:
    """lmx Mamba3Mixer params -> the reference's parameters (float64), torch layouts (Linear weight [out, in])."""
    f = lambda a: np.asarray(a, np.float64)
    d_model, N, H = params["in_z"].shape
    M, Z = params["in_B"].shape[1:]
    dd = f(params["in_dt_A_trap"])  # [d_model, N, (dt, A, trap)]
    rows = [f(params["in_z"]).reshape(d_model, N * H).T, f(params["in_x"]).reshape(d_model, N * H).T,
            f(params["in_B"]).reshape(d_model, M * Z).T, f(params["in_C"]).reshape(d_model, M * Z).T,
            dd[:, :, 0].T, dd[:, :, 1].T, dd[:, :, 2].T, f(params["in_angles"]).T]
    p = {"in_proj.weight": np.concatenate(rows, axis=0), "dt_bias": f(params["dt_bias"]),
         "B_bias": f(params["B_bias"]), "C_bias": f(params["C_bias"]), "B_norm.weight": f(params["B_norm"]),
         "C_norm.weight": f(params["C_norm"]), "D": f(params["D"]),
         "norm.weight": f(params["out_norm"]).reshape(N * H),
         "out_proj.weight": f(params["out"]).reshape(N * H, d_model).T}
    for name in ("mimo_x", "mimo_z", "mimo_o"):
        if name in params:
            p[name] = f(params[name])  # [nheads, mimo_rank, headdim] in both
    return p


# ---------------------------------------------------------------------------------------------------------
# Random parameters (all of them, so biases, norm weights, D and the MIMO projections all matter)


def random_params(abstract, d_model: int, seed: int):
    """Random values in the shapes of `abstract` (an eval_shape of init: no compile of the initialisers)."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = getattr(path[-1], "key", None)
        if name.startswith("in_"):  # in-projections: entries of std ~1.5 from unit-RMS inputs
            v = 1.5 / math.sqrt(d_model) * rng.standard_normal(a.shape)
        elif name in ("out", "lm_head"):  # fan-in scaled
            v = rng.standard_normal(a.shape) / math.sqrt(math.prod(a.shape[:-1]))
        elif name == "embedding":
            v = rng.standard_normal(a.shape)
        elif name in ("dt_bias", "B_bias", "C_bias"):  # Δ = softplus(· + dt_bias) around 0.7; biases ~ B, C
            v = (0.5 if name == "dt_bias" else 1.0) * rng.standard_normal(a.shape)
        else:  # norm scales, D, mimo_x / mimo_z / mimo_o: around their init of 1 (or 1/M)
            v = 1.0 + 0.5 * rng.standard_normal(a.shape)
        return jnp.asarray(v, a.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract))


def assert_close(got, want, what):
    want = np.asarray(want)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


# ---------------------------------------------------------------------------------------------------------
# The mixer, teacher-forced and from a carried state


CASES = {  # name: (mimo_rank, rope_fraction, rope, also run on from the carried state)
    "siso": (1, 0.5, None, True),  # reference SISO: pairwise rotation, A = 2 < Z/2 (two pairs pass through)
    "mimo": (2, 0.5, None, True),  # reference MIMO: halved rotation
    "siso_rope1": (1, 1.0, None, False),  # every state pair rotates
    "siso_halves": (1, 0.5, "halves", False),  # lmx's layout override (the reference ties it to SISO/MIMO)
    "mimo_interleaved": (3, 0.5, "interleaved", False),
}


def assert_state_close(state, ref_state, mimo_x, what):
    """lmx's Mamba3State against the reference cache (angle_dt_state, ssm_state [b, N, headdim, d_state],
    k_state = the rotated B, v_state = x up-projected)."""
    angle, ssm, k, v = ref_state
    assert_close(state.ssm_BNHZ, ssm, f"{what}: ssm_state")
    assert_close(state.B_prev_BMNZ, k, f"{what}: k_state (rotated B)")
    np.testing.assert_allclose(np.exp(1j * np.asarray(state.angle_BNA, np.float64)), np.exp(1j * angle),
                               atol=1e-5, err_msg=f"{what}: angle_dt_state (mod 2π)")
    assert_close(np.asarray(state.x_prev_BNH)[:, None] * np.swapaxes(mimo_x, 0, 1), v, f"{what}: v_state")


@pytest.mark.parametrize("case", list(CASES))
def test_mixer_matches_reference_transcription(case):
    """Teacher-forced (chunked: 7 tokens in chunks of 3) output and final state; with `carry`, 7 more tokens
    chunked from that state (the same compiled program) and one O(1) decode step."""
    M, frac, rope, carry = CASES[case]
    D, N, H, Z, batch, T = 16, 2, 8, 8, 2, 7
    mixer = Mamba3Mixer(d_model=D, num_heads=N, head_dim=H, state_size=Z, mimo_rank=M, rope_fraction=frac,
                        chunk_size=3, rope=rope, A_floor=A_FLOOR, norm_eps=EPS)
    cfg = RefConfig(D, N, H, Z, M, frac, A_FLOOR, None if rope is None else rope == "interleaved")
    assert mixer.num_angles == cfg.num_rope_angles
    u = np.random.default_rng(1).standard_normal((batch, 2 * T + 1, D)).astype(np.float32)
    params = random_params(jax.eval_shape(mixer.init, jax.random.PRNGKey(0), u[:, :T])["params"], D, seed=2)
    p = to_reference(params)
    mimo_x = p.get("mimo_x", np.ones((N, M, H)))
    want, ref_state = reference_mamba3(u[:, :T].astype(np.float64), p, cfg)
    # The inputs make the A floor bind on some tokens (not all).
    dd_A = u.astype(np.float64) @ p["in_proj.weight"][2 * N * H + 2 * M * Z + N: 2 * N * H + 2 * M * Z + 2 * N].T
    assert 0.1 < np.mean(heavy_tail_activation(dd_A) < A_FLOOR) < 0.9

    apply = jax.jit(mixer.apply)
    if not carry:  # no state: the training / teacher-forced call
        y, state = apply({"params": params}, u[:, :T])
        assert_close(y, want, f"{case}: teacher-forced output")
        assert_state_close(state, ref_state, mimo_x, case)
        return
    zeros = Mamba3State.zeros(batch, N, H, Z, cfg.num_rope_angles, M)
    y1, s1 = apply({"params": params}, u[:, :T], zeros)
    assert_close(y1, want, f"{case}: teacher-forced output")
    assert_state_close(s1, ref_state, mimo_x, case)
    want, ref_state = reference_mamba3(u[:, T:].astype(np.float64), p, cfg, ref_state)
    y2, s2 = apply({"params": params}, u[:, T : 2 * T], s1)  # a prefill after a prefix
    y3, s3 = apply({"params": params}, u[:, 2 * T :], s2)  # T == 1 with a state: the decode step
    assert_close(jnp.concatenate([y2, y3], axis=1), want, f"{case}: from the carried state")
    assert_state_close(s3, ref_state, mimo_x, f"{case} after the step")


# ---------------------------------------------------------------------------------------------------------
# The LM: prefill then a decode step through the DecodeState rings, against the transcription inside a plain LM


def reference_lm(tokens, params, cfg_lm, ref_cfg):
    """embed -> per layer x + mixer(RMSNorm(x)) -> final RMSNorm -> lm_head: lmx's LM (lmx.models.lm, layers)
    around the reference mixer, on lmx's stacked params (each layer's tree from decode_params)."""
    f = lambda a: np.asarray(a, np.float64)
    norm = lambda v, w: v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + cfg_lm.norm_eps) * f(w)
    x = f(params["embed"]["embedding"])[tokens]
    for layer in decode_params(build(cfg_lm), params).layers:
        y, _ = reference_mamba3(norm(x, layer["norm"]["scale"]), to_reference(layer["mixer"]), ref_cfg)
        x = x + y
    return norm(x, params["final_norm"]["scale"]) @ f(params["lm_head"])


def test_lm_prefill_and_decode_step_match_reference():
    """A MIMO Mamba-3 LM (mamba3-tiny's widths, one layer): a 6-token prefill into a DecodeState (its pending
    record), then one decode token (which commits the record into the rings, reads the state back and takes
    the O(1) step). Both calls' logits equal the reference's on the same weights."""
    base = preset("mamba3-tiny")  # d_model 64, 8 heads of 16, state 16, chunk 4, norm_eps 1e-5
    assert base.norm_eps == EPS
    cfg = base.replace(num_layers=1, layer_pattern=("ssm",),
                       ssm=dataclasses.replace(base.ssm, mimo_rank=2, A_floor=A_FLOOR))
    s = cfg.ssm
    ref_cfg = RefConfig(cfg.d_model, s.num_heads, s.head_dim, s.state_size, s.mimo_rank, s.rope_fraction, A_FLOOR)
    model = build(cfg)
    batch, prompt = 2, 6
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (batch, prompt + 1)).astype(np.int32)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens[:, :prompt])["params"]
    params = random_params(abstract, cfg.d_model, seed=4)
    want = reference_lm(tokens, params, cfg, ref_cfg)

    apply = jax.jit(model.apply)
    out = apply({"params": params}, tokens[:, :prompt], state=init_state(cfg, batch, 16, rollback_window=0))
    step = apply({"params": params}, tokens[:, prompt:], state=out.state)
    assert_close(jnp.concatenate([out.logits_BTV, step.logits_BTV], axis=1), want, "prefill + decode-step logits")
