"""quant_matmul: the kernel (Pallas interpret mode) vs the jnp reference, forward and dx; quantization error bounds;
cross-lowering of the model configurations for CUDA; bad input. Tiny shapes with partial blocks over B and O."""

import importlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.pallas._compat import cuda_export
from lmx.pallas.quant_matmul import dequantize, quant_matmul, quantize, unsupported
from tests.pallas.hw import INTERPRET, f32_tol

qm = importlib.import_module("lmx.pallas.quant_matmul")  # the module (lmx.pallas.quant_matmul is the function)
RNG = np.random.default_rng(0)


def _w(I, O):
    w = RNG.standard_normal((I, O)).astype(np.float32)
    w[: I // 2, :5] *= 8  # a few wide-range groups (what the mixed scheme gives 4 bits)
    return jnp.asarray(w)


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    scale = np.abs(want).max()
    tol = f32_tol(1e-5) if dtype == jnp.float32 else 1e-2  # bf16: a rounding of the output (2^-8), operands
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


# bits, group, activation dtype, B, I, O, blocks (block_b, block_o), frac4 / tile for mixed, check dx.
# Every case has a partial O block; B = 17 with block_b = 16 a partial B block, B = 1 and 3 rows padded to 16.
CASES = [
    (8, 32, jnp.float32, 17, 96, 40, (16, 16), {}, True),
    (4, 32, jnp.bfloat16, 3, 64, 40, (None, None), {}, False),
    (2, 64, jnp.float32, 1, 128, 40, (None, 32), {}, False),
    ("mixed", 64, jnp.bfloat16, 17, 192, 72, (16, 16), {"frac4": 0.34, "tile": 32}, True),
]


@pytest.mark.parametrize("bits,group,dtype,B,I,O,blocks,kw,grad", CASES, ids=lambda v: str(v))
def test_kernel_matches_reference(bits, group, dtype, B, I, O, blocks, kw, grad):
    qw = quantize(_w(I, O), bits, group, **kw)
    if bits == "mixed":
        assert qw.scale4.shape == (1, O) and qw.slots.shape == (3, 3)  # one 4-bit slot per tile of 32 columns
    x = jnp.asarray(RNG.standard_normal((B, I)), dtype)
    kernel = lambda x, qw: quant_matmul(x, qw, impl="pallas", interpret=INTERPRET, block_b=blocks[0],  # noqa: E731
                                        block_o=blocks[1])
    ref = lambda x, qw: quant_matmul(x, qw, impl="xla")  # noqa: E731
    if not grad:
        _close(jax.jit(kernel)(x, qw), jax.jit(ref)(x, qw), dtype)
        return
    dy = jnp.asarray(RNG.standard_normal((B, O)), dtype)
    run = jax.jit(lambda f, x, qw, dy: (lambda y, vjp: (y, vjp(dy)[0]))(*jax.vjp(lambda x: f(x, qw), x)),
                  static_argnums=0)
    (y, dx), (y_ref, dx_ref) = run(kernel, x, qw, dy), run(ref, x, qw, dy)
    _close(y, y_ref, dtype)
    _close(dx, dx_ref, dtype)
    assert dx.dtype == dtype


@pytest.mark.parametrize("bits", [2, 3, 4, 8, "mixed"])
def test_quantization_error_within_half_a_step(bits):
    """Every weight is within half its group's step of its dequantized value, the step is the min-max one (up to
    bf16 rounding), and a group that does not divide I is padded, not dropped."""
    I, O, group = 100, 24, 24  # 5 groups, the last one padded
    w = _w(I, O)
    qw = quantize(w, bits, group, frac4=0.3, tile=16)
    err = np.abs(np.asarray(jax.jit(dequantize)(qw)) - np.asarray(w))
    wg = np.pad(np.asarray(w), ((0, 120 - I), (0, 0)), mode="edge").reshape(5, group, O)
    rng_GO = wg.max(1) - wg.min(1)
    if bits == "mixed":  # per column, each group's step from the plane that holds it
        slot_GO = np.argsort(np.asarray(qw.slots), axis=1).repeat(16, axis=0)[:O].T
        steps = np.concatenate([np.asarray(qw.scale, np.float32), np.asarray(qw.scale4, np.float32)])
        step_GO = np.take_along_axis(steps, slot_GO, axis=0)
        levels_GO = np.where(slot_GO < 3, 3, 15)  # round(0.3 * 5) = 2 groups per tile 4-bit
        assert (levels_GO == 15).sum(0).tolist() == [2] * O
        wide = np.argsort(-(rng_GO[:, :16] ** 2).sum(1))[:2]  # the widest groups of the first tile get 4 bits
        assert set(np.nonzero(levels_GO[:, 0] == 15)[0]) == set(wide)
    else:
        step_GO, levels_GO = np.asarray(qw.scale, np.float32), 2**bits - 1
    assert (err.reshape(-1) <= np.repeat(step_GO, group, 0)[:I].reshape(-1) * 0.5 * (1 + 1e-5) + 1e-6).all()
    # the step is the group's range / levels, enlarged only by rounding offset down and scale up to bf16
    assert (step_GO <= (rng_GO + np.abs(wg).max(1) * 2**-7) / levels_GO * (1 + 2**-7) + 1e-30).all()
    assert err.max() > 0


def _leaves(qw):
    leaves, treedef = jax.tree.flatten(qw)
    return tuple(leaves), treedef


MODEL_CONFIGS = [(8, 64), (4, 64), (2, 64), ("mixed", 64)]


@pytest.mark.parametrize("bits,group", MODEL_CONFIGS, ids=str)
def test_cross_lowers_for_cuda(bits, group):
    """The Triton lowering accepts the configurations models use: bf16 rows B = 1 and 16, forward and dx."""
    qw = jax.eval_shape(lambda: quantize(jnp.zeros((1024, 640)), bits, group))
    leaves, treedef = _leaves(qw)
    f = lambda x, leaves: quant_matmul(x, treedef.unflatten(leaves), impl="pallas")  # noqa: E731
    for B in (1, 16):
        x = jax.ShapeDtypeStruct((B, 1024), jnp.bfloat16)
        assert f"quant_matmul_{bits}" in cuda_export(f, x, leaves).mlir_module()
    dx = lambda x, l: jax.vjp(lambda x: f(x, l), x)[1](jnp.ones((16, 640), jnp.bfloat16))[0]  # noqa: E731
    assert f"quant_matmul_{bits}_dx" in cuda_export(dx, x, leaves).mlir_module()


def test_illegal_blocks_fail():
    """A non-power-of-two block fails the Triton lowering; a tl.dot dimension below 16 (4-bit groups of 16 rows:
    8-row slabs), which only the GPU compiler would catch, fails cuda_export's check of the kernel's dots."""
    qw = jax.eval_shape(lambda: quantize(jnp.zeros((192, 72)), 4, 64))
    x = jax.ShapeDtypeStruct((17, 192), jnp.float32)
    c = qm._Cfg(4, 64, 17, 192, 72, 0, 0, 16, 24, False)
    with pytest.raises(ValueError, match="power of 2"):
        cuda_export(lambda x, p, s, z: qm._forward(c, x, (p, s, z)), x, qw.packed, qw.scale, qw.offset)
    qw16 = jax.eval_shape(lambda: quantize(jnp.zeros((192, 72)), 4, 16))
    c16 = qm._Cfg(4, 16, 17, 192, 72, 0, 0, 16, 32, False)
    with pytest.raises(ValueError, match="below 16"):
        cuda_export(lambda x, p, s, z: qm._forward(c16, x, (p, s, z)), x, qw16.packed, qw16.scale, qw16.offset)
    assert "group=16" in unsupported(x, qw16)  # what impl="pallas" raises and "auto" falls back on


@pytest.mark.parametrize("what", ["bits", "group", "dtype", "block"])
def test_bad_input_raises_under_pallas_and_falls_back_under_auto(what, caplog):
    w = _w(96, 40)
    qw = quantize(w, 3 if what == "bits" else 4, 40 if what == "group" else 32)  # 3-bit, or groups of 40 rows
    x = jnp.asarray(RNG.standard_normal((3, 96)), jnp.int32 if what == "dtype" else jnp.float32)
    kw = {"block_o": 48} if what == "block" else {}
    named = {"bits": "bits=3", "group": "group=40", "dtype": "int32", "block": "block_o=48"}[what]
    with pytest.raises(ValueError, match=named):
        quant_matmul(x, qw, impl="pallas", interpret=True, **kw)
    with caplog.at_level(logging.INFO, logger="lmx.pallas"):
        y = quant_matmul(x, qw, impl="auto", interpret=True, **kw)
    assert "falls back" in caplog.text and named in caplog.text
    np.testing.assert_allclose(y, np.asarray(x, np.float32) @ np.asarray(jax.jit(dequantize)(qw)), rtol=1e-5,
                               atol=1e-4)


def test_quantize_refuses_invalid_arguments():
    w = _w(64, 16)
    for kw, named in [({"bits": 9}, "bits=9"), ({"bits": 1}, "bits=1"), ({"bits": 4, "group": 3}, "group=3"),
                      ({"bits": "mixed", "frac4": 1.0}, "frac4=1.0"), ({"bits": "mixed", "tile": 24}, "tile=24")]:
        with pytest.raises(ValueError, match=named):
            quantize(w, **{"group": 32, **kw})
    with pytest.raises(ValueError, match="int32"):
        quantize(w.astype(jnp.int32), 8, 32)
    with pytest.raises(ValueError, match="I=64"):
        quant_matmul(jnp.ones((2, 65)), quantize(w, 8, 32))
