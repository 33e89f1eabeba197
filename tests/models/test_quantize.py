"""Model quantization: the large weight matrices become QuantizedWeight leaves that the layers consume through
lmx.models.quantize.matmul; with plain weights that helper is the layers' old einsum / @, op for op."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmx.decoding import generate
from lmx.models import ExitConfig, quantize_params
from lmx.models.quantize import QuantizedWeight, dequantize_params, matmul, weight_bytes

T = 16  # the logits test's tokens and the generate test's prompt + new tokens: one compiled shape per weight format


@pytest.fixture(scope="module")
def llama(tiny):
    model, params = tiny("llama-tiny")
    return model, params, jax.jit(lambda p, t: model.apply({"params": p}, t).logits_BTV)


def _rel_rms(a, b):
    return float(jnp.sqrt(jnp.mean((a - b) ** 2) / jnp.mean(b**2)))


def test_plain_weights_take_the_unquantized_ops():
    x = jnp.ones((2, 3, 8), jnp.float32)
    w3, w2 = jnp.ones((8, 4, 2), jnp.bfloat16), jnp.ones((8, 5), jnp.bfloat16)
    assert str(jax.make_jaxpr(lambda x, w: matmul(x, w, jnp.float32, "BTD,DNH->BTNH"))(x, w3)) == str(
        jax.make_jaxpr(lambda x, w: jnp.einsum("BTD,DNH->BTNH", x, w.astype(jnp.float32)))(x, w3))
    assert str(jax.make_jaxpr(lambda x, w: matmul(x, w, jnp.float32))(x, w2)) == str(
        jax.make_jaxpr(lambda x, w: x @ w.astype(jnp.float32))(x, w2))


def test_quantize_params_replaces_the_weight_matrices(llama):
    model, params, _ = llama
    qp = quantize_params(model, params, 4, 32, head=False)
    layers = qp["layers"]
    for leaf in [*(layers["attn"][n] for n in "qkvo"), *(layers["mlp"][n] for n in ("gate", "up", "down"))]:
        assert isinstance(leaf, QuantizedWeight) and leaf.stack_shape == (model.cfg.num_layers,)
    assert layers["attn"]["o"].shape == (4, 16, 64) and layers["attn"]["o"].in_dims == 2
    assert not isinstance(qp["lm_head"], QuantizedWeight)
    assert qp["embed"]["embedding"] is params["embed"]["embedding"]
    assert layers["attn_norm"]["scale"] is params["layers"]["attn_norm"]["scale"]
    with pytest.raises(ValueError, match="quantized already"):
        quantize_params(model, qp, 4, 32)
    assert weight_bytes(quantize_params(model, params, 4, 32)) < weight_bytes(qp) < weight_bytes(params)


# Stated bounds on the logits' relative RMS error vs the f32 model, groups of 32 rows (measured on this random-weight
# model, which has none of a trained model's redundancy: 0.017 at int8, 0.27 at int4, 1.07 at 2-bit). The mixed
# scheme is checked against the reference in tests/pallas/test_quant_matmul.py and measured in experiments/quantize.
BOUNDS = {8: 0.04, 4: 0.45, 2: 1.5}


def test_quantized_logits_within_bounds(llama):
    model, params, logits = llama
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, T)), jnp.int32)
    ref = logits(params, tokens)
    errs = {}
    for bits, bound in BOUNDS.items():
        qp = quantize_params(model, params, bits, 32)
        out = logits(qp, tokens)
        errs[bits] = _rel_rms(out, ref)
        assert errs[bits] < bound, (bits, errs[bits])
        if bits == 4:  # the quantized model is the f32 model on the dequantized weights (same compiled shape)
            np.testing.assert_allclose(out, logits(jax.jit(dequantize_params)(qp), tokens), rtol=1e-5, atol=1e-5)
    assert errs[8] < errs[4] < errs[2]


def test_generate_with_quantized_params_matches_teacher_forcing(llama):
    """Greedy cached decoding (decode_params splits the QuantizedWeight stacks per layer) picks each position's
    argmax of the teacher-forced quantized model."""
    model, params, logits = llama
    qp = quantize_params(model, params, 4, 32)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    gen = generate(model, qp, prompts, max_new_tokens=T - 4)
    new_BT = np.asarray(gen.tokens_BRT[:, 0])
    assert new_BT.shape == (2, T - 4)
    lg = np.asarray(logits(qp, jnp.asarray(np.concatenate([np.array(prompts), new_BT], 1), jnp.int32)))[:, 3:-1]
    picked = np.take_along_axis(lg, new_BT[..., None], -1)[..., 0]
    np.testing.assert_allclose(picked, lg.max(-1), atol=1e-4)  # the argmax, up to ties


def test_quantize_params_refuses_variants(llama):
    model, params, _ = llama
    exits = type(model)(model.cfg.replace(exits=ExitConfig(layers=(1,))))
    with pytest.raises(NotImplementedError, match="variant"):
        quantize_params(exits, params, 8, 32)
