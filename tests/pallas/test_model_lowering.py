"""Every kernel configuration the models use at real sizes, cross-lowered for CUDA on the CPU: the shipped presets
(and a Mamba-2-130m-shaped model, a sliding-window model, head dim 128, quantized weights) with impl="pallas", on
abstract params (jax.eval_shape: nothing allocated). Lowered under `lowering_for_gpu`, the kernels take their GPU
form (Triton), so a block shape the GPU compiler refuses fails here, in CI, as it would on the H100/H200:
  - one train step's loss gradient on packed rows (flash attention / SSD, forward and backward kernels);
  - the whole `generate` program: the prefill (its cond's two branches: flash attention for empty rows, decode
    attention's T queries per row onto a non-empty cache; SSD with a state) and the decode loop (decode attention,
    the quantized matmul).
Layer counts are cut to one repeating unit (every layer of a unit lowers the same kernels)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import lmx.models as lm
from lmx.decoding import Greedy
from lmx.decoding.generate import AllFinished, _compiled
from lmx.pallas._compat import cuda_export, lowering_for_gpu

MAMBA2_130M = lm.ModelConfig(  # state-spaces/mamba2-130m's shapes (chunk 256: the kernels run it in chunks of 64)
    vocab_size=50288, d_model=768, num_layers=1, layer_pattern=("ssm",), norm_eps=1e-5, tie_embeddings=True,
    dtype="bfloat16", param_dtype="bfloat16",
    ssm=lm.SSMConfig(num_heads=24, head_dim=64, state_size=128, n_groups=1, chunk_size=256))


def _pallas(cfg: lm.ModelConfig) -> lm.ModelConfig:
    kw = {}
    if cfg.attention is not None and cfg.num_attn_layers:
        kw["attention"] = dataclasses.replace(cfg.attention, impl="pallas")
    if cfg.ssm is not None and cfg.num_ssm_layers:
        kw["ssm"] = dataclasses.replace(cfg.ssm, impl="pallas")
    return cfg.replace(**kw)


CONFIGS = {
    "qwen2.5-0.5b": lm.preset("qwen2.5-0.5b", num_layers=1),  # 14 query / 2 kv heads (GQA 7), head dim 64, bf16
    "llama3.2-1b": lm.preset("llama3.2-1b", num_layers=1),  # GQA 4, head dim 64
    "head128-window": lm.preset("llama3.2-1b", num_layers=1, attention=dataclasses.replace(  # 8B-style heads
        lm.preset("llama3.2-1b").attention, num_heads=16, num_kv_heads=2, head_dim=128, sliding_window=384)),
    "mamba2-130m": MAMBA2_130M,
    "hybrid": MAMBA2_130M.replace(layer_pattern=("ssm", "attn"), num_layers=2, mlp_dim=2048,
                                  attention=lm.AttentionConfig(num_heads=12, num_kv_heads=4, head_dim=64)),
}


def _abstract(cfg, bits=None):
    model = lm.build(_pallas(cfg))
    params = jax.eval_shape(lambda: lm.init_params(model, jax.random.PRNGKey(0)))
    if bits is not None:
        params = jax.eval_shape(lambda p: lm.quantize_params(model, p, bits=bits, group=64, impl="pallas"), params)
    return model, params


def _loss(model, params, tokens_BT, segment_ids_BT):
    logits_BTV = model.apply({"params": params}, tokens_BT, segment_ids_BT=segment_ids_BT).logits_BTV
    return jax.nn.logsumexp(logits_BTV[:, :-1], -1).mean() - jnp.take_along_axis(
        logits_BTV[:, :-1], tokens_BT[:, 1:, None], -1).mean()


def _kernels(exported) -> int:
    return exported.mlir_module().count("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_step_gradient_cross_lowers(name):
    model, params = _abstract(CONFIGS[name])
    T = 320  # not a multiple of the kernels' blocks or of the SSD chunk
    tokens = jax.ShapeDtypeStruct((2, T), jnp.int32)
    with lowering_for_gpu():
        exported = cuda_export(jax.grad(lambda p, t, s: _loss(model, p, t, s)), params, tokens, tokens)
    cfg = model.cfg  # per layer: flash forward, dq, dk/dv; SSD's 4 forward and 4 backward stages
    assert _kernels(exported) == 3 * cfg.num_attn_layers + 8 * cfg.num_ssm_layers


@pytest.mark.parametrize("name,bits", [("qwen2.5-0.5b", None), ("llama3.2-1b", 4), ("head128-window", None),
                                       ("mamba2-130m", None), ("hybrid", "mixed")])
def test_generate_cross_lowers(name, bits):
    model, params = _abstract(CONFIGS[name], bits)
    run = _compiled(model, Greedy(), (), 1, AllFinished(), 8, 200, 0)
    args = (jax.ShapeDtypeStruct((2, 150), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32),
            jax.eval_shape(lambda: jax.random.key(0)))
    with lowering_for_gpu():
        exported = cuda_export(lambda p, *a: run(lm.decode_params(model, p), *a), params, *args)
    assert _kernels(exported) >= model.cfg.num_layers + (bits is not None)


def test_without_lowering_for_gpu_the_models_interpret_the_kernels():
    model, params = _abstract(CONFIGS["llama3.2-1b"])
    exported = cuda_export(lambda p, t: model.apply({"params": p}, t).logits_BTV, params,
                           jax.ShapeDtypeStruct((1, 64), jnp.int32))
    assert _kernels(exported) == 0  # interpret mode: the kernel became plain HLO
