"""The models with impl="pallas" against impl="xla", end to end on one GPU: what the per-op benchmarks cannot show
(the models' dispatch to each kernel, the prefill's cond, "auto"'s compile probe never needed with "pallas").

Two bf16 models with random weights: Llama-3.2-1B's shapes cut to 4 layers (GQA 4, head dim 64) and a
Mamba-2-130m-shaped model of 4 layers (SSD, chunk 256 run by the kernels in chunks of 64).
- train: loss and gradient of a packed [8, 2048] batch (4 segments a row): max |logit difference|, the relative
  difference of the gradients, and seconds per step for each impl (ratio = xla / pallas), interleaved rounds;
- generate: greedy, 8 prompts of 1024 tokens, 128 new tokens: share of rows whose tokens equal the XLA model's
  (bf16 rounding may flip a near-tie), the mean length of the agreeing prefix, and seconds per call for each impl.
quick=True (the CPU smoke test): llama-tiny and mamba2-tiny (chunk 16) with the kernels interpreted, the logit
difference only; no timings off a GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import interleaved, median
from benchmarks.kernels import gpu_ready, max_abs_err
from lmx.decoding import generate

B, T, SEGMENTS, PROMPT, NEW = 8, 2048, 4, 1024, 128


def _configs(quick: bool) -> dict:
    import lmx.models as lm

    if quick:
        return {"llama": lm.preset("llama-tiny"),
                "mamba2": lm.preset("mamba2-tiny", ssm=dataclasses.replace(lm.preset("mamba2-tiny").ssm,
                                                                          chunk_size=16))}
    mamba = lm.ModelConfig(vocab_size=50288, d_model=768, num_layers=4, layer_pattern=("ssm",) * 4, norm_eps=1e-5,
                           tie_embeddings=True, dtype="bfloat16", param_dtype="bfloat16",
                           ssm=lm.SSMConfig(num_heads=24, head_dim=64, state_size=128, chunk_size=256))
    return {"llama3.2-1b/4-layers": lm.preset("llama3.2-1b", num_layers=4), "mamba2-130m/4-layers": mamba}


def _impl(cfg, impl: str):
    kw = {}
    if cfg.num_attn_layers:
        kw["attention"] = dataclasses.replace(cfg.attention, impl=impl)
    if cfg.num_ssm_layers:
        kw["ssm"] = dataclasses.replace(cfg.ssm, impl=impl)
    return cfg.replace(**kw)


def _batch(vocab: int, b: int, t: int, segments: int):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)
    seg = jnp.asarray(np.repeat(np.arange(segments), -(-t // segments))[:t][None].repeat(b, 0), jnp.int32)
    return tokens, seg


def _loss(model, params, tokens_BT, seg_BT):
    out = model.apply({"params": params}, tokens_BT, segment_ids_BT=seg_BT)
    logp_BTV = jax.nn.log_softmax(out.logits_BTV[:, :-1])
    return -jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], -1).mean(), out.logits_BTV


def _rel(a, b) -> float:
    num = sum(float(jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    den = sum(float(jnp.sum(y.astype(jnp.float32) ** 2)) for y in jax.tree.leaves(b))
    return (num / max(den, 1e-30)) ** 0.5


def run(emit, quick: bool) -> None:
    if not (quick or gpu_ready(emit, "models")):
        return
    for name, cfg in _configs(quick).items():
        _compare(emit, name, cfg, quick)


def _compare(emit, name: str, cfg, quick: bool) -> None:
    import lmx.models as lm

    models = {impl: lm.build(_impl(cfg, impl)) for impl in ("xla", "pallas")}
    params = lm.init_params(models["xla"], jax.random.key(0))
    b, t = (2, 20) if quick else (B, T)
    tokens, seg = _batch(cfg.vocab_size, b, t, 2 if quick else SEGMENTS)
    steps = {impl: jax.jit(jax.value_and_grad(lambda p, m=m: _loss(m, p, tokens, seg), has_aux=True))
             for impl, m in models.items()}
    outs = {impl: jax.block_until_ready(step(params)) for impl, step in steps.items()}
    (_, logits_x), grads_x = outs["xla"]
    (_, logits_p), grads_p = outs["pallas"]
    logit_err = max_abs_err(logits_p, logits_x)
    if quick:
        emit(f"models/quick/{name}", "max_abs_logit_err", logit_err, shape=f"B{b} T{t}")
        return
    times = interleaved({impl: (lambda s=s: jax.block_until_ready(s(params))) for impl, s in steps.items()},
                        rounds=6)
    tx, tp = median(times["xla"]), median(times["pallas"])
    emit(f"models/{name}/train_step", "seconds", tp, baseline=tx, ratio=tx / tp, max_abs_logit_err=logit_err,
         grad_rel_err=_rel(grads_p, grads_x), shape=f"B{B} T{T} packed x{SEGMENTS}")

    prompts, _ = _batch(cfg.vocab_size, B, PROMPT, 1)
    lengths = jnp.full((B,), PROMPT, jnp.int32)
    call = {impl: (lambda m=m: jax.block_until_ready(generate(m, params, (prompts, lengths), max_new_tokens=NEW)))
            for impl, m in models.items()}
    gens = {impl: c() for impl, c in call.items()}  # compile + the outputs compared
    same = np.asarray(gens["pallas"].tokens_BRT[:, 0]) == np.asarray(gens["xla"].tokens_BRT[:, 0])
    prefix = np.where(same.all(1), NEW, np.argmin(same, 1))
    times = interleaved(call, rounds=4)
    tx, tp = median(times["xla"]), median(times["pallas"])
    emit(f"models/{name}/generate", "seconds", tp, baseline=tx, ratio=tx / tp,
         rows_equal=float(same.all(1).mean()), mean_agreeing_prefix=float(prefix.mean()),
         shape=f"B{B} prompt {PROMPT} new {NEW} greedy")
