"""Speculative decoding: lmx `speculative_generate` vs lmx `generate`, and at batch 1 greedy vs `transformers`
`generate` and assisted `generate(assistant_model=...)` on the same weights.

A target and a draft (configs from experiments/configs/speculative.py, i.e. the quickstart's arithmetic task)
are trained briefly with `lmx.train.loop.train`, or restored from `--model_dir` on reruns (the directory is
keyed by the whole training config). Prompts: `--num_prompts` held-out arithmetic prompts (unseen by either
training stream), bos + CharTokenizer ids; every side stops at eos and after `--max_new_tokens`. Batch B runs the
prompts in consecutive calls of B; times are of all calls, medians of `--rounds` interleaved rounds after a
warm-up call of every side (compilation excluded; a side under 0.3 s repeats within each round).

Cases: greedy and sampled (temperature 1); batch 1 and 8; model draft at each γ in --gammas and adaptive
(γ ≤ --adaptive_gamma); self-draft SelfDraft(num_layers=L//2) at each γ in --self_gammas. Each case prints one
`speculative/<sampler>/b<B>/<draft>/<γ>` line: alpha, tokens_per_target_call, theory_tokens_per_call
(1 - α^{γ+1})/(1 - α), speedup_vs_generate (generated tokens/s ratio; greedy tokens must be identical), and at
batch 1 greedy speedup_vs_hf / speedup_vs_hf_assisted. The transformers sides (HF `generate`, do_sample=False,
float32, `eos_token_id` = the lmx stop token) run at each of --torch_threads; the faster is the baseline (see
benchmarks/RESULTS.md; a thread count more than 2x slower than the fastest in the first, plain-generate
comparison is not timed again). Assisted baselines: HF with the same draft (or `assistant_early_exit=E` for the
self-draft) at the same γ (`num_assistant_tokens=γ`, constant schedule, no confidence cut-off; adaptive: HF's
"heuristic" schedule), and at HF's default assistant settings (20 tokens, confidence threshold 0.4); the
fastest is the baseline. Every HF round's tokens are checked against lmx greedy `generate`.

    python -m benchmarks.speculative            # ~10 min on a 2-core CPU the first time (training), ~5 after
    python -m benchmarks.speculative --quick    # smoke run: barely trained models, few cases
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

from benchmarks._common import emit, environment
from experiments.configs import speculative as spec_config
from experiments.speculative import calls_of, compare, held_out, trained
from lmx.data import CharTokenizer, prompt_batch
from lmx.decoding import Greedy, Sampler, SelfDraft, cost
from lmx.models import save_hf

TOLERANCE = 0.05  # |tokens_per_target_call / theory - 1| within this counts as matching theory


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target_steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--draft_steps", type=int, default=None)
    p.add_argument("--model_dir", default="runs/speculative/models", help="trained-params cache")
    p.add_argument("--num_prompts", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=40)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--samplers", default="greedy,sampled", help="greedy and/or sampled (temperature 1)")
    p.add_argument("--gammas", default="2,4,8")
    p.add_argument("--adaptive_gamma", type=int, default=8, help="largest γ of the adaptive case (0: no case)")
    p.add_argument("--self_gammas", default="4", help="γ values for SelfDraft(L//2) ('' for none)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per side (interleaved)")
    p.add_argument("--torch_threads", default=f"{os.cpu_count()},1")
    p.add_argument("--seed", type=int, default=0, help="sampling key of the sampled cases")
    p.add_argument("--quick", action="store_true", help="smoke run: 30 training steps, γ=4 only, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.target_steps, args.draft_steps, args.rounds, args.num_prompts = 30, 30, 1, 4
        args.gammas, args.self_gammas, args.batches = "4", "4", "1,4"
        args.model_dir = os.path.join(args.model_dir, "quick")
    ints = lambda s: [int(x) for x in s.split(",") if x]
    args.batches, args.gammas, args.self_gammas = ints(args.batches), ints(args.gammas), ints(args.self_gammas)
    args.torch_threads = list(dict.fromkeys(ints(args.torch_threads)))
    args.samplers = [s for s in args.samplers.split(",") if s]
    if bad := set(args.samplers) - {"greedy", "sampled"}:
        p.error(f"unknown --samplers {sorted(bad)}")
    return args


# ------------------------------------------------------------------------------------------------ transformers


def load_hf_pair(target, tparams, draft, dparams, tmp: str):
    """The target and draft as transformers float32 models, written with lmx `save_hf` and read back."""
    import transformers

    transformers.logging.set_verbosity_error()
    out = []
    for name, (m, p) in {"target": (target, tparams), "draft": (draft, dparams)}.items():
        path = save_hf(m, p, os.path.join(tmp, name))
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        out.append(hf.eval())
    return out


ASSIST_KEYS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


def hf_side(hf, prompts, outputs: list, *, threads: int, max_new_tokens: int, eos_id: int, pad_id: int,
            assistant_model=None, early_exit: int | None = None, assist: dict | None = None):
    """One transformers side: greedy `generate` on each prompt in turn (batch 1); appends each round's new tokens.
    `assist` sets the assistant's generation_config (which HF's candidate generator reads) for the call."""
    ids = [torch.tensor([p], dtype=torch.long) for p in prompts]
    kw = {"assistant_model": assistant_model} if assistant_model is not None else {}
    if early_exit is not None:
        kw["assistant_early_exit"] = early_exit
    owner = assistant_model if assistant_model is not None else hf  # early exit drafts with hf itself

    def run():
        torch.set_num_threads(threads)
        saved = {k: getattr(owner.generation_config, k) for k in ASSIST_KEYS}
        for k, v in (assist or {}).items():
            setattr(owner.generation_config, k, v)
        try:
            new = []
            with torch.inference_mode():
                for x in ids:
                    out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      do_sample=False, num_beams=1, eos_token_id=eos_id, pad_token_id=pad_id, **kw)
                    new.append(out[0, x.shape[1]:].numpy())
            outputs.append(new)
        finally:
            for k, v in saved.items():
                setattr(owner.generation_config, k, v)
    return run


def hf_sides(hf, hf_draft, calls, args, eos_id, pad_id, *, draft_kind: str, gamma: int | None, adaptive: bool,
             early_exit: int | None):
    """{side name: fn} for HF plain generate and (unless gamma is None) assisted generate, at each thread
    count; and {side name: list of rounds' outputs}."""
    assisted = {}
    if gamma is not None:
        src = {"assistant_model": hf_draft} if draft_kind == "model" else {"early_exit": early_exit}
        same = ({"num_assistant_tokens": gamma, "num_assistant_tokens_schedule": "heuristic"} if adaptive else
                {"num_assistant_tokens": gamma, "num_assistant_tokens_schedule": "constant"})
        assisted = {"hf_assisted": {**src, "assist": {**same, "assistant_confidence_threshold": 0.0}},
                    "hf_assisted_default": {**src, "assist": {"num_assistant_tokens": 20,
                                                              "num_assistant_tokens_schedule": "constant",
                                                              "assistant_confidence_threshold": 0.4}}}
    kinds = {"hf": {}, **assisted}
    sides, outputs = {}, {}
    for kind, kw in kinds.items():
        for n in args.torch_threads:
            name = f"{kind}_t{n}"
            outputs[name] = []
            sides[name] = hf_side(hf, [c[0] for c in calls], outputs[name], threads=n,
                                  max_new_tokens=args.max_new_tokens, eos_id=eos_id, pad_id=pad_id, **kw)
    return sides, outputs


def check_hf_parity(case: str, lmx_gens, hf_outputs: dict):
    """Every HF round of every side must equal lmx greedy generate's tokens (lengths included)."""
    ref = [np.asarray(g.tokens_BRT[0, 0, : int(g.lengths_BR[0, 0])]) for g in lmx_gens]
    for side, rounds in hf_outputs.items():
        for new in rounds:
            for i, (a, b) in enumerate(zip(ref, new, strict=True)):
                if a.shape != b.shape or np.any(a != b):
                    n = min(len(a), len(b))
                    pos = int(np.flatnonzero(a[:n] != b[:n])[0]) if np.any(a[:n] != b[:n]) else n
                    emit(f"{case}/hf_parity", "first_mismatch_position", pos, side=side, prompt=i,
                         lmx_len=len(a), hf_len=len(b))
                    sys.exit(f"FAIL: {case}: {side} tokens differ from lmx generate's (prompt {i}, position {pos})")
    return sum(len(r) for r in hf_outputs.values())


def fastest(seconds: dict, *kinds: str) -> str:
    """The fastest side among those named <kind>_t<threads>."""
    return min((k for k in seconds if k.rsplit("_t", 1)[0] in kinds), key=seconds.get)


def kept(seconds: dict, threads: list[int], slack: float = 2.0) -> list[int]:
    """The torch thread counts whose plain HF time is within `slack` of the fastest: the others (OpenMP
    oversubscribed on a loaded machine, see RESULTS.md) cannot be the baseline and are not timed again."""
    best = min(seconds[f"hf_t{n}"] for n in threads)
    return [n for n in threads if seconds[f"hf_t{n}"] <= slack * best]


# ------------------------------------------------------------------------------------------------------ main


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    emit("speculative/env", "info", None, **environment("benchmarks.speculative"))
    cfg = spec_config.get_config()
    if args.target_steps:
        cfg.target.train.steps = args.target_steps
    if args.draft_steps:
        cfg.draft.train.steps = args.draft_steps
    target, tparams, tdir = trained(cfg.target, args.model_dir)
    draft, dparams, ddir = trained(cfg.draft, args.model_dir)
    tc, dc = target.cfg, draft.cfg
    emit("speculative/models", "params", cost.param_count(tc), baseline=cost.param_count(dc),
         ratio=cost.param_count(tc) / cost.param_count(dc), note="value: target params; baseline: draft params",
         target=dict(layers=tc.num_layers, d_model=tc.d_model, steps=int(cfg.target.train.steps), dir=str(tdir)),
         draft=dict(layers=dc.num_layers, d_model=dc.d_model, steps=int(cfg.draft.train.steps), dir=str(ddir)),
         matmul_params_ratio=cost.matmul_params(tc) / cost.matmul_params(dc))

    tok = CharTokenizer()
    _, problems = held_out(cfg, args.num_prompts)
    prompts = prompt_batch(tok, problems)
    E = tc.num_layers // 2
    stop = (tok.eos_id,)
    cases = [("model", g, False) for g in args.gammas] + [("model", args.adaptive_gamma, True)] * bool(
        args.adaptive_gamma) + [(f"self{E}", g, False) for g in args.self_gammas]
    samplers = {"greedy": Greedy(), "sampled": Sampler(temperature=1.0)}

    with tempfile.TemporaryDirectory() as tmp:
        hf, hf_draft = load_hf_pair(target, tparams, draft, dparams, tmp) if 1 in args.batches else (None, None)
        if 1 in args.batches and "greedy" in args.samplers:  # lmx generate vs HF generate and assisted, no spec
            b1 = calls_of(prompts, 1)
            gamma = args.gammas[0] if args.gammas else 4
            sides, hf_out = hf_sides(hf, hf_draft, b1, args, tok.eos_id, tok.pad_id, draft_kind="model",
                                     gamma=gamma, adaptive=False, early_exit=None)
            r = compare(target, tparams, b1, sampler=Greedy(), max_new_tokens=args.max_new_tokens,
                        stop_tokens=stop, rounds=args.rounds, spec=None, extra_sides=sides)
            rounds_checked = check_hf_parity("speculative/baseline", r["outputs"]["generate"], hf_out)
            s = r["seconds"]
            best_hf, best_as = fastest(s, "hf"), fastest(s, "hf_assisted", "hf_assisted_default")
            emit("speculative/baseline/greedy/b1", "speedup_vs_hf", s[best_hf] / s["generate"],
                 baseline_name=f"transformers generate ({best_hf})", hf_tokens_identical=True,
                 hf_rounds_checked=rounds_checked, speedup_vs_hf_assisted=s[best_as] / s["generate"],
                 hf_assisted_baseline=best_as, assisted_gamma=gamma, seconds=s,
                 torch_threads_kept=kept(s, args.torch_threads),
                 note="lmx plain generate (no speculation) vs transformers, the same prompts and weights")
            args.torch_threads = kept(s, args.torch_threads)
        for sname in args.samplers:
            sampler = samplers[sname]
            for B in args.batches:
                calls = calls_of(prompts, B)
                for kind, gamma, adaptive in cases:
                    d = (draft, dparams) if kind == "model" else SelfDraft(num_layers=E)
                    case = f"speculative/{sname}/b{B}/{kind}/{'adaptive' if adaptive else f'g{gamma}'}"
                    with_hf = B == 1 and sname == "greedy"
                    sides, hf_out = hf_sides(hf, hf_draft, calls, args, tok.eos_id, tok.pad_id,
                                             draft_kind="model" if kind == "model" else "self", gamma=gamma,
                                             adaptive=adaptive, early_exit=E) if with_hf else ({}, {})
                    r = compare(target, tparams, calls, sampler=sampler, max_new_tokens=args.max_new_tokens,
                                stop_tokens=stop, rounds=args.rounds,
                                spec={"draft": d, "gamma": gamma, "adaptive": adaptive}, extra_sides=sides,
                                seed=args.seed)
                    if r["tokens_identical"] is False:
                        emit(f"{case}/parity", "first_mismatch", r["first_mismatch"], note="(call, row, position)")
                        sys.exit(f"FAIL: {case}: greedy speculative tokens differ from generate's at (call, row, "
                                 f"position) {r['first_mismatch']}")
                    s, extra = r["seconds"], {}
                    if with_hf:
                        extra["hf_rounds_checked"] = check_hf_parity(case, r["outputs"]["generate"], hf_out)
                        best_hf, best_as = fastest(s, "hf"), fastest(s, "hf_assisted", "hf_assisted_default")
                        extra.update(speedup_vs_hf=s[best_hf] / s["speculative"], hf_baseline=best_hf,
                                     speedup_vs_hf_assisted=s[best_as] / s["speculative"],
                                     hf_assisted_baseline=best_as, hf_tokens_identical=True)
                    st = r["stats"]
                    emit(case, "speedup_vs_generate", r["speedup_vs_generate"], ratio=r["speedup_vs_generate"],
                         alpha=r["alpha"], tokens_per_target_call=r["tokens_per_target_call"],
                         theory_tokens_per_call=r["theory_tokens_per_call"], tpc_over_theory=r["tpc_over_theory"],
                         within_5pct_of_theory=abs(r["tpc_over_theory"] - 1) <= TOLERANCE,
                         gamma=gamma, adaptive=adaptive, gamma_mean=r["gamma_mean"], batch=B, calls=len(calls),
                         speedup_vs_generate=r["speedup_vs_generate"], **extra,
                         tokens_identical=r["tokens_identical"], tokens=r["tokens"],
                         target_calls=st["target_calls"], draft_calls=st["draft_calls"],
                         draft_flops_share=st["draft_flops"] / max(st["flops"], 1), seconds=s)


if __name__ == "__main__":
    main()
