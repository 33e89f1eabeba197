"""`impl="auto"` on a GPU compiles each kernel configuration once on its own before using it, and falls back to the
XLA reference (logging why) when the lowering or the compiler fails: the Triton compiler runs only on a GPU, at
XLA compile time, where an error would otherwise end the caller's whole program. Here the "GPU" is the CPU with
`on_gpu` patched: a compiled (not interpreted) Pallas kernel really fails to build on it, so every op's probe
takes its fallback path."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.pallas import _compat, decode_attention, flash_attention, quant_matmul, quantize, ssd
from lmx.pallas.flash_attention import flash_attention_reference

R = np.random.default_rng(0)
f32 = lambda *s: jnp.asarray(R.standard_normal(s), jnp.float32)  # noqa: E731


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(_compat, "on_gpu", lambda: True)


def test_auto_takes_the_kernel_only_when_the_probe_builds(fake_gpu, caplog):
    calls = []
    builds = lambda why: lambda: calls.append(why) or why  # noqa: E731
    assert _compat.resolve_impl("op", "auto", None, probe=builds(None)) == "pallas"
    with caplog.at_level(logging.WARNING, "lmx.pallas"):
        assert _compat.resolve_impl("op", "auto", None, probe=builds("it broke")) == "xla"
    assert "op: impl='auto' falls back to the XLA reference: it broke" in caplog.text
    # No probe where it cannot matter: explicit impls, interpret mode, unsupported inputs.
    assert _compat.resolve_impl("op", "pallas", None, probe=builds("x")) == "pallas"
    assert _compat.resolve_impl("op", "auto", None, interpret=True, probe=builds("x")) == "pallas"
    assert _compat.resolve_impl("op", "auto", "bad dtype", probe=builds("x")) == "xla"
    assert calls == [None, "it broke"]


def _ops():
    q, k, v = f32(1, 20, 4, 16), f32(1, 20, 2, 16), f32(1, 20, 2, 16)
    kc, vc = f32(2, 2, 16, 24), f32(2, 2, 24, 16)
    x, dt, A, B, C = f32(1, 20, 2, 16), jnp.abs(f32(1, 20, 2)) * 0.1, -jnp.abs(f32(2)), f32(1, 20, 1, 16), \
        f32(1, 20, 1, 16)
    qd, xq, qw = f32(2, 4, 16), f32(3, 64), quantize(f32(64, 32), 4, 32)
    return {
        "flash_attention": (lambda impl: flash_attention(q, k, v, impl=impl),
                            lambda: flash_attention_reference(q, k, v)),
        "decode_attention": (lambda impl: decode_attention(qd, kc, vc, jnp.array([5, 24]), impl=impl),
                             None),
        "ssd": (lambda impl: ssd(x, dt, A, B, C, chunk=16, impl=impl)[0], None),
        "quant_matmul": (lambda impl: quant_matmul(xq, qw, impl=impl), None),
    }


@pytest.mark.parametrize("op", ["flash_attention", "decode_attention", "ssd", "quant_matmul"])
def test_auto_falls_back_when_the_kernel_fails_to_build(op, fake_gpu, caplog):
    run, reference = _ops()[op]
    with caplog.at_level(logging.WARNING, "lmx.pallas"):
        got = run("auto")
    assert f"{op}: impl='auto' falls back to the XLA reference: the kernel failed to build" in caplog.text
    np.testing.assert_allclose(got, run("xla") if reference is None else reference(), rtol=1e-6, atol=1e-6)
    built = len(_compat._BUILDS)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "lmx.pallas"):
        jax.jit(lambda: run("auto"))()  # same shapes under a trace: the kept answer, no second build
    assert len(_compat._BUILDS) == built and "failed to build" in caplog.text
