"""Mamba-2 decoding: constant per-token cost and state vs a transformer, and lmx vs `transformers` generate.

Part 1 (`ssm_decode/step/...`): cached decode steps `model.apply({"params": p}, tok_B1, state=state)` in one
jitted fori_loop of --steps steps (each feeding its argmax token to the next, as in `generate`'s loop), batch 1,
for a random-weight Mamba-2 (preset "mamba2-tiny" scaled up) and a Llama-style transformer of similar parameter
count (preset "llama-tiny" scaled up), with the decode state's lengths set to each context (512, 2048, 8192 by
default). The transformer's state is `init_state(cfg, 1, ctx + 8)` (a KV cache of ctx + 8 slots); the SSM's
state has the same size at every context, and the SSM is timed twice: `ssm` with the config's rollback window
(4: rings of 5 states, what speculative decoding keeps) and `ssm_w0` with window 0 (one state slot per layer,
the state `generate` uses). The state is carried through the loop (donated between calls) with its lengths
reset to the context every step; cache values don't matter for timing. All (model, context) cases are timed
interleaved (order alternating every round; medians over rounds of one loop call). Reported: seconds per step
at each context, the 8192/512 ratio for each case (SSM target <= 1.2), the SSM/transformer throughput ratio at
the longest context, and decode-state bytes (sum of the nbytes of the state pytree's leaves).

Part 2 (`ssm_decode/generate/...`): lmx `lmx.decoding.generate` vs `transformers` `Mamba2ForCausalLM.generate` on
the same weights (a random HF Mamba2, `save_pretrained`, `lmx.models.load_hf`, split once into the decode layout
with `decode_params`, as a serving loop would), greedy, exactly `--new_tokens` new tokens (no eos), batch 1 and
8; generated tokens must be identical. transformers runs at torch threads = nproc and 1; the faster is the
baseline (conservative). Target: lmx >= 5x tokens/s.
With `--bounds`, per batch also (`ssm_decode/generate/b{B}/bounds`): lmx's prefill and per-step time (generate
of 1 token vs --new_tokens tokens, medians of --rounds), two floors of the same step on the same weights, batch B,
in a jitted fori_loop (`floor_seconds`): dense (only the weight matmuls: in_proj, out_proj of every layer, the LM
head) and state (those plus each layer's [B, N, H, Z] state update and output), and transformers' time per
generated step at each thread count (its generate median / new tokens).

    python -m benchmarks.ssm_decode            # both parts (~4-6 min on a loaded 2-core CPU)
    python -m benchmarks.ssm_decode --quick    # smoke run
    python -m benchmarks.ssm_decode --skip_step --bounds   # part 2 only, with the per-step bounds
    python -m benchmarks.ssm_decode --skip_step --profile  # part 2 with lmx's op time per step by op kind
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks._common import emit, environment, interleaved, median, op_profile, timed
from lmx.decoding import Greedy, generate
from lmx.decoding.generate import decode_step
from lmx.models import build, decode_params, init_params, init_state, load_hf, preset

STEP_RATIO_TARGET = 1.2  # SSM step time at the longest context / shortest, from the issue
GENERATE_TARGET = 5.0  # lmx / transformers tokens/s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="512,2048,8192", help="comma-separated decode contexts (part 1)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ssm_layers", type=int, default=8)
    p.add_argument("--ssm_heads", type=int, default=8, help="Mamba-2 heads; head_dim = 2 * hidden / heads")
    p.add_argument("--state_size", type=int, default=64)
    p.add_argument("--attn_layers", type=int, default=4)
    p.add_argument("--attn_heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20, help="decode steps timed per round per case (part 1)")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (part 2)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per side (alternating order)")
    p.add_argument("--torch_threads", default=f"{os.cpu_count()},1",
                   help="comma-separated torch thread counts for transformers; the faster is the baseline")
    p.add_argument("--skip_step", action="store_true", help="skip part 1")
    p.add_argument("--skip_generate", action="store_true", help="skip part 2")
    p.add_argument("--bounds", action="store_true", help="part 2: also time lmx's prefill and step, and a "
                   "dense floor of the step (weight matmuls only)")
    p.add_argument("--profile", action="store_true", help="part 2: also profile lmx's generate per batch: XLA "
                   "op time per decode step by op kind (benchmarks._common.op_profile)")
    p.add_argument("--quick", action="store_true", help="small models, short contexts: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.ssm_layers, args.attn_layers, args.intermediate, args.vocab = 64, 2, 2, 192, 256
        args.state_size, args.contexts, args.steps, args.rounds = 16, "128,512", 5, 1
        args.new_tokens, args.batches = 16, "1,2"
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.torch_threads = list(dict.fromkeys(int(n) for n in args.torch_threads.split(",")))
    return args


def ssm_cfg(args, max_seq_len: int):
    base = preset("mamba2-tiny")
    ssm = dataclasses.replace(base.ssm, num_heads=args.ssm_heads, head_dim=2 * args.hidden // args.ssm_heads,
                              state_size=args.state_size, n_groups=1, chunk_size=64)
    return base.replace(vocab_size=args.vocab, d_model=args.hidden, num_layers=args.ssm_layers,
                        layer_pattern=("ssm",) * args.ssm_layers, ssm=ssm, max_seq_len=max_seq_len)


def attn_cfg(args, max_seq_len: int):
    base = preset("llama-tiny")
    attn = dataclasses.replace(base.attention, num_heads=args.attn_heads, num_kv_heads=args.kv_heads,
                               head_dim=args.hidden // args.attn_heads)
    return base.replace(vocab_size=args.vocab, d_model=args.hidden, num_layers=args.attn_layers,
                        layer_pattern=None, mlp_dim=args.intermediate, attention=attn, max_seq_len=max_seq_len)


def nbytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def n_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def step_part(args):
    """Per-token decode latency and state bytes vs context, SSM and transformer side by side."""
    max_ctx = max(args.contexts)
    models = {}
    for name, cfg in (("ssm", ssm_cfg(args, max_ctx + 64)), ("attn", attn_cfg(args, max_ctx + 64))):
        model = build(cfg)
        params = jax.device_put(init_params(model, jax.random.key(0)))
        models[name] = (model, params, None)
        emit(f"ssm_decode/step/{name}/model", "params", n_params(params), d_model=cfg.d_model,
             layers=cfg.num_layers, vocab=cfg.vocab_size, dtype=cfg.dtype,
             **({"ssm": {k: getattr(cfg.ssm, k) for k in ("num_heads", "head_dim", "state_size", "n_groups",
                                                            "conv_width", "rollback_window")}}
                if name == "ssm" else
                {"attention": {k: getattr(cfg.attention, k) for k in ("num_heads", "num_kv_heads", "head_dim")},
                 "mlp_dim": cfg.mlp_dim}))
    models["ssm_w0"] = (*models["ssm"][:2], 0)  # the same model with generate's state: rollback window 0

    def make_case(model, params, ctx, window):
        # One compiled loop of --steps steps per (model, state shape), inside one program as in generate's loop
        # (no per-token dispatch from Python); each step feeds its argmax token to the next, and keeps the input's
        # lengths, so every step decodes at this context. The state is donated and reused in place.
        params = decode_params(model, params)  # split per layer once

        @functools.partial(jax.jit, donate_argnums=2)
        def steps(p, tok_B1, st):
            def body(_, carry):
                tok_B1, st = carry
                logits_BV, new = decode_step(model, p, tok_B1[:, 0], st)
                tok_B1 = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)[:, None]
                return tok_B1, new.replace(lengths_B=st.lengths_B)

            return jax.lax.fori_loop(0, args.steps, body, (tok_B1, st))

        st = init_state(model.cfg, 1, ctx + 8, rollback_window=window).replace(lengths_B=jnp.full((1,), ctx, jnp.int32))
        st = st.replace(layers=tuple(x.replace(floor_B=jnp.full((1,), ctx, jnp.int32)) if hasattr(x, "floor_B") else x
                                     for x in st.layers))
        box = {"tok": jnp.zeros((1, 1), jnp.int32), "st": st}
        state_bytes = nbytes(st)

        def run():
            box["tok"], box["st"] = jax.block_until_ready(steps(params, box["tok"], box["st"]))

        run()  # compile + warm up
        return run, state_bytes

    cases, state_bytes = {}, {}
    for name, (model, params, window) in models.items():
        for ctx in args.contexts:
            cases[(name, ctx)], state_bytes[(name, ctx)] = make_case(model, params, ctx, window)
    times = interleaved({f"{n}@{c}": fn for (n, c), fn in cases.items()}, args.rounds, pause=0.05)
    per_step = {k: median(v) / args.steps for k, v in times.items()}

    lo, hi = min(args.contexts), max(args.contexts)
    for name in models:
        for ctx in args.contexts:
            emit(f"ssm_decode/step/{name}/ctx{ctx}", "seconds_per_token", per_step[f"{name}@{ctx}"],
                 tokens_per_s=1 / per_step[f"{name}@{ctx}"], state_bytes=state_bytes[(name, ctx)],
                 rounds_s=times[f"{name}@{ctx}"], steps_per_round=args.steps)
        r = per_step[f"{name}@{hi}"] / per_step[f"{name}@{lo}"]
        target = STEP_RATIO_TARGET if name != "attn" and not args.quick else None
        emit(f"ssm_decode/step/{name}/growth", f"seconds_per_token_ctx{hi}_over_ctx{lo}", r,
             baseline=per_step[f"{name}@{lo}"], ratio=r, target=target,
             met=None if target is None else r <= target,
             state_bytes_ratio=state_bytes[(name, hi)] / state_bytes[(name, lo)])
    r = per_step[f"attn@{hi}"] / per_step[f"ssm@{hi}"]
    emit(f"ssm_decode/step/ctx{hi}", "ssm_over_attn_tokens_per_s", r, baseline=1 / per_step[f"attn@{hi}"], ratio=r,
         ssm_tokens_per_s=1 / per_step[f"ssm@{hi}"], attn_tokens_per_s=1 / per_step[f"attn@{hi}"],
         ssm_state_bytes=state_bytes[("ssm", hi)], attn_state_bytes=state_bytes[("attn", hi)],
         state_bytes_attn_over_ssm=state_bytes[("attn", hi)] / state_bytes[("ssm", hi)],
         ssm_w0_over_attn_tokens_per_s=per_step[f"attn@{hi}"] / per_step[f"ssm_w0@{hi}"],
         ssm_w0_state_bytes=state_bytes[("ssm_w0", hi)])


def hf_mamba2_pair(args):
    """(hf_model, lmx_model, lmx_params): one random f32 transformers Mamba2ForCausalLM, saved and loaded
    into lmx. No bos/eos/pad ids, so HF generation never stops early."""
    import transformers

    heads = args.ssm_heads
    hf_cfg = transformers.Mamba2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.ssm_layers, num_heads=heads,
        head_dim=2 * args.hidden // heads, expand=2, state_size=args.state_size, n_groups=1, conv_kernel=4,
        chunk_size=64, layer_norm_epsilon=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(hf_cfg).to(torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, params = load_hf(tmp, dtype="float32")
    return hf, model, jax.device_put(params)


def floor_seconds(params, batch: int, ssm_dims=None, steps: int = 200, repeats: int = 5) -> float:
    """Seconds per step of a stripped-down decode step on the model's own weights, best of `repeats`.
    Without ssm_dims, the dense floor: only the weight matmuls (in_proj, out_proj of every layer, LM head), the
    floor any implementation pays per step, reading all the weights once. With ssm_dims = (N, H, Z), the state
    floor: also each layer's state update h = a h + x Bᵀ on an [B, N, H, Z] f32 state carried in place, and its
    output h C (no conv, norms, gates or sampling). A chain (each op feeds the next) so none can be skipped."""
    mixer = params["layers"]["mixer"]
    w_in_LDP, w_out_LID, w_head_DV = mixer["in_proj"], mixer["out_proj"], params["lm_head"]
    L, D, I = w_in_LDP.shape[0], w_in_LDP.shape[1], w_out_LID.shape[1]
    w_in = [w_in_LDP[i] for i in range(L)]  # per-layer buffers, as generate's loop reads them
    w_out = [w_out_LID[i] for i in range(L)]

    def body(_, carry):
        x_BD, hs = carry
        new = []
        for i in range(L):
            p_BP = x_BD @ w_in[i]
            y_BI = jnp.tanh(p_BP[:, :I])
            if ssm_dims is not None:
                N, H, Z = ssm_dims
                b_BZ, c_BZ, a_BN = p_BP[:, I:I + Z], p_BP[:, I + Z:I + 2 * Z], jax.nn.sigmoid(p_BP[:, -N:])
                h_BNHZ = hs[i] * a_BN[..., None, None] + y_BI.reshape(-1, N, H)[..., None] * b_BZ[:, None, None]
                new.append(h_BNHZ)
                y_BI = jnp.einsum("BNHZ,BZ->BNH", h_BNHZ, c_BZ).reshape(-1, I)
            x_BD = x_BD + y_BI @ w_out[i]
        return x_BD + 1e-3 * (x_BD @ w_head_DV)[:, :D], tuple(new)

    run = jax.jit(lambda x, hs: jax.lax.fori_loop(0, steps, body, (x, hs)), donate_argnums=1)
    x_BD = jnp.ones((batch, D), w_in_LDP.dtype)
    box = [() if ssm_dims is None else tuple(jnp.zeros((batch, *ssm_dims), jnp.float32) for _ in range(L))]

    def once():
        box[0] = jax.block_until_ready(run(x_BD, box[0]))[1]

    once()
    return min(timed(once) for _ in range(repeats)) / steps


def generate_part(args):
    hf, model, params = hf_mamba2_pair(args)
    split = decode_params(model, params)  # split once at load (generate would also split once per params object)
    P, N = args.prompt_len, args.new_tokens
    emit("ssm_decode/generate/model", "params", n_params(params), hf_params=sum(p.numel() for p in hf.parameters()),
         d_model=args.hidden, layers=args.ssm_layers, vocab=args.vocab, state_size=args.state_size,
         prompt_len=P, new_tokens=N, hf_fast_kernels=bool(getattr(
             sys.modules.get("transformers.models.mamba2.modeling_mamba2"), "is_fast_path_available", False)))
    rng = np.random.default_rng(0)
    for B in args.batches:
        tokens_BT = rng.integers(0, args.vocab, (B, P), dtype=np.int32)
        lengths_B = np.full((B,), P, np.int32)
        ids = torch.from_numpy(tokens_BT.astype(np.int64))
        outputs = {}

        def run_lmx(tokens_BT=tokens_BT, lengths_B=lengths_B, outputs=outputs):
            gen = generate(model, split, (tokens_BT, lengths_B), max_new_tokens=N, sampler=Greedy())
            outputs["lmx"] = np.asarray(gen.tokens_BRT[:, 0])

        def make_hf(threads, ids=ids, outputs=outputs):
            def run_hf():
                torch.set_num_threads(threads)
                with torch.inference_mode():
                    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                                      min_new_tokens=N, do_sample=False, num_beams=1, pad_token_id=0)
                outputs.setdefault("hf", []).append(out[:, P:].numpy())
            return run_hf

        run_lmx()  # compile + warm up
        sides = {"lmx": run_lmx, **{f"hf_t{n}": make_hf(n) for n in args.torch_threads}}
        times = interleaved(sides, args.rounds)
        for hf_BT in outputs["hf"]:
            if hf_BT.shape != (B, N) or not np.array_equal(hf_BT, outputs["lmx"]):
                bad = np.argwhere(hf_BT != outputs["lmx"]) if hf_BT.shape == (B, N) else None
                sys.exit(f"FAIL: lmx and transformers greedy tokens differ at batch {B}: shape {hf_BT.shape}, "
                         f"first (row, pos) {None if bad is None else bad[np.argmin(bad[:, 1])].tolist()}")
        emit(f"ssm_decode/generate/b{B}/parity", "tokens_identical", True, rows=B, tokens=N,
             rounds_checked=len(outputs["hf"]))
        med = {k: median(v) for k, v in times.items()}
        tps = {k: B * N / t for k, t in med.items()}
        best = max((k for k in tps if k != "lmx"), key=tps.get)
        ratio = tps["lmx"] / tps[best]
        target = None if args.quick else GENERATE_TARGET
        nominal = f"hf_t{os.cpu_count()}"
        emit(f"ssm_decode/generate/b{B}", "tokens_per_s", tps["lmx"], tps[best], ratio,
             baseline_name=f"transformers Mamba2ForCausalLM.generate ({best[4:]} torch threads)",
             target=target, met=None if target is None else ratio >= target,
             **({f"ratio_vs_{nominal}": tps["lmx"] / tps[nominal]} if nominal in tps else {}),
             **{f"tokens_per_s_{k}": v for k, v in tps.items() if k != "lmx"},
             **{f"{k}_s": v for k, v in times.items()})
        if args.bounds:
            one = lambda: generate(model, split, (tokens_BT, lengths_B), max_new_tokens=1,  # noqa: B023
                                   sampler=Greedy()).tokens_BRT.block_until_ready()
            one()
            t1 = interleaved({"one": one, "all": run_lmx}, args.rounds)
            prefill, full = median(t1["one"]), median(t1["all"])
            step = (full - prefill) / (N - 1)
            s = model.cfg.ssm
            floor = floor_seconds(params, B)
            state_floor = floor_seconds(params, B, (s.num_heads, s.head_dim, s.state_size))
            emit(f"ssm_decode/generate/b{B}/bounds", "lmx_step_over_state_floor", step / state_floor, state_floor,
                 step / state_floor, lmx_prefill_s=prefill, lmx_generate_s=full, lmx_step_ms=step * 1e3,
                 state_floor_step_ms=state_floor * 1e3, dense_floor_step_ms=floor * 1e3,
                 **{f"{k}_step_ms": med[k] / N * 1e3 for k in med if k != "lmx"},
                 lmx_tokens_per_s_at_state_floor=B * N / (prefill + (N - 1) * state_floor),
                 lmx_tokens_per_s_at_dense_floor=B * N / (prefill + (N - 1) * floor))
        if args.profile:
            kinds_us = op_profile(run_lmx, N - 1)  # the decode loop runs N - 1 steps
            total = sum(kinds_us.values())
            emit(f"ssm_decode/generate/b{B}/profile", "op_us_per_step", total, steps=N - 1,
                 note="XLA op time per decode step by op kind, profiler overhead included",
                 **{f"{k}_us": v for k, v in list(kinds_us.items())[:12]},
                 **{f"{k}_share": v / total for k, v in list(kinds_us.items())[:6]})


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    emit("ssm_decode/env", "info", None, **environment("benchmarks.ssm_decode"))
    if not args.skip_step:
        step_part(args)
    if not args.skip_generate:
        generate_part(args)
    try:
        emit("ssm_decode/env_end", "info", None, loadavg_1_5_15=os.getloadavg())
    except OSError:
        pass


if __name__ == "__main__":
    main()
