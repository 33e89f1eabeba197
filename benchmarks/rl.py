"""RL step time: lmx `rl_step` vs `trl`'s `GRPOTrainer`, seconds per RL step (rollout + update), same model,
prompts, group size, completion length and loss.

Both sides start from the same random-weight tiny Llama (built with `transformers`, loaded into lmx with
`lmx.models.load_hf`; f32 on both sides; the first prompt's logits are checked to agree). One RL step: sample G
completions of exactly `--max_new_tokens` tokens for each of B prompts of `--prompt_len` random tokens (temperature
1, untruncated), reward each completion (the fraction of its tokens with an id below `--reward_below`, default
V/2: cheap and deterministic, so rewards are not the bottleneck, and every group's rewards vary), group-normalised
advantages, one policy update (μ = 1, β = 0, clip ε = 0.2; DAPO: ε_high = 0.28 and the token-mean), global-norm
clipping to 1.0, AdamW (b1 0.9, b2 0.999, eps 1e-8, no weight decay, constant lr). Default model: hidden 128,
4 layers, 4 heads / 2 KV heads, intermediate 384, vocab 2048 (1.3M params); B = 4 prompts of 16 tokens, G = 8,
T = 32.

- lmx: `lmx.train.rl_loop.rl_step` with `RLConfig(group_size=G, max_new_tokens=T, loss=...)` (no stop tokens, so
  every completion has T tokens) and `make_train_step(model, make_optimizer(...), make_policy_loss(cfg))`. The
  first step compiles (reported as `rl/<loss>/compile`); the update batch shapes are static, so no later step
  recompiles (checked: the trace count of `generate` stays put).
- trl: `GRPOTrainer` (transformers generation, no vLLM) with `num_generations=G`, `per_device_train_batch_size =
  generation_batch_size = B·G` (one generation per optimizer step), `num_iterations=1`, `beta=0`, `loss_type` =
  the same loss, `max_completion_length=T` and `generation_kwargs={"min_new_tokens": T}` (the tokenizer's eos can
  never end a completion early), f32 (`bf16=False`), `gradient_checkpointing=False` (trl's default is True; it
  would only add recomputation), `lr_scheduler_type="constant"`, no logging, `report_to="none"`. The tokenizer is
  a word-level `tokenizers` object built in code (token i is the word "t<i>"), the prompts a `datasets.Dataset`
  of their texts; nothing is downloaded.
- Timing: trl's step is the wall time of its training loop from one `on_step_end` to the next (dataloader, generation,
  rewards, loss, backward, optimizer, its per-step bookkeeping). The lmx steps run inside that callback, after trl's
  clock stops and before it restarts, so none of their time is counted as trl's. trl's first `--warmup` steps at each
  thread count are dropped. The sides are interleaved round by round (lmx, trl@2, trl@1 then trl@1, trl@2, lmx, ...),
  as `benchmarks._common.interleaved` does; torch runs at each of `--torch_threads` and the faster median is the
  baseline (a thread count more than 2x slower than the fastest for one loss is not timed again for the next: OpenMP
  oversubscription on a loaded machine, see benchmarks/RESULTS.md). Medians; ratio = trl s/step / lmx s/step. The
  split of each side's step is reported beside it: lmx_rollout_s (generate, rewards, advantages, the update batch) and
  lmx_update_s (the train step); trl_generate_s (its `_generate_single_turn`: HF generate and eos masking, timed by
  wrapping it) and trl_rest_s (the rest of its step: tokenizing, decoding, rewards, advantages, loss, backward,
  optimizer), medians at the baseline's thread count.

    python -m benchmarks.rl            # default config: ~2 min on a 2-core CPU
    python -m benchmarks.rl --quick    # smoke run: smaller model, 2 rounds, GRPO only
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks._common import add_model_args, emit, environment, llama_pair, median, timed
from lmx.decoding import cost
from lmx.train import OptimConfig, TrainState, make_optimizer, make_train_step
from lmx.train.rl_loop import RLConfig, make_policy_loss, rl_step

TARGET = 3.0  # trl s/step / lmx s/step on a 2-core CPU, from the issue
LR, CLIP, B1, B2, EPS = 1e-5, 1.0, 0.9, 0.999, 1e-8
PAD_ID, EOS_ID = 0, 1  # the word-level tokenizer's specials; prompts use ids >= 2
GENERATE = importlib.import_module("lmx.decoding.generate")  # the module (lmx.decoding.generate is the function)
PAUSE = 0.2  # seconds between sides: the other runtime's worker threads stop spinning


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.set_defaults(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, vocab=2048)
    p.add_argument("--prompts", type=int, default=4, help="B: prompts per RL step")
    p.add_argument("--group_size", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--prompt_len", type=int, default=16, help="tokens per prompt (all prompts alike)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="T: tokens per completion (always all of them)")
    p.add_argument("--losses", default="grpo,dapo", help="comma-separated: grpo, dapo")
    p.add_argument("--rounds", type=int, default=4, help="timed steps per side (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed trl steps per torch thread count")
    p.add_argument("--torch_threads", default=f"{os.cpu_count()},1",
                   help="comma-separated torch thread counts to time; the faster is the baseline")
    p.add_argument("--reward_below", type=int, default=None,
                   help="reward = fraction of a completion's tokens with an id below this (default: vocab // 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: smaller model, 2 rounds, GRPO only")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 64, 2, 4, 2, 128
        args.vocab, args.max_new_tokens, args.rounds, args.losses = 512, 16, 2, "grpo"
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    args.torch_threads = list(dict.fromkeys(ints(args.torch_threads)))
    args.losses = [s for s in args.losses.split(",") if s]
    if bad := set(args.losses) - {"grpo", "dapo"}:
        p.error(f"unknown --losses {sorted(bad)} (this benchmark compares grpo and dapo)")
    if args.reward_below is None:
        args.reward_below = args.vocab // 2
    if not 2 < args.reward_below < args.vocab:
        p.error(f"--reward_below={args.reward_below} must be in (2, {args.vocab})")
    return args


# ------------------------------------------------------------------------------------------------------ trl side


def word_tokenizer(vocab: int):
    """A transformers fast tokenizer built in code: id i <-> the word "t<i>" (0 = <pad>, 1 = <eos>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD_ID, "<eos>": EOS_ID, **{f"t{i}": i for i in range(2, vocab)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>",
                                   padding_side="left")


def as_text(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


class Interleaver:
    """A transformers TrainerCallback that drives the whole comparison from inside trl's training loop: the
    schedule is a list of "lmx" and ("trl", threads) items; the lmx items between two trl steps run in on_step_end
    after trl's clock stopped, then torch's thread count is set for the next trl step and its clock restarts."""

    def __init__(self, schedule, lmx_step):
        from transformers import TrainerCallback

        self.queue, self.lmx_step = list(schedule), lmx_step
        self.trl_times: list[tuple[int, float, float]] = []  # (threads, loop seconds, on_step_begin->end seconds)
        self.lmx_times: list[float] = []
        self._threads = self._start = self._begin = None
        outer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                outer._next()

            def on_step_begin(self, args, state, control, **kw):
                outer._begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                now = time.perf_counter()
                outer.trl_times.append((outer._threads, now - outer._start, now - outer._begin))
                outer._next()

        self.callback = _Callback()

    def _next(self):
        while self.queue and self.queue[0] == "lmx":
            self.queue.pop(0)
            time.sleep(PAUSE)
            self.lmx_times.append(timed(self.lmx_step))
        if self.queue:
            _, self._threads = self.queue.pop(0)
            torch.set_num_threads(self._threads)
        time.sleep(PAUSE)
        self._start = time.perf_counter()

    def finish(self):
        """Run the lmx items left after trl's last step."""
        self._next()
        if self.queue:
            raise RuntimeError(f"schedule not exhausted: {self.queue[:4]} ...")


def trl_trainer(hf, tok, prompt_rows, args, loss: str, out_dir: str, callback, reward_log: list, gen_log: list):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    B, G, T = args.prompts, args.group_size, args.max_new_tokens

    def fraction_reward(completions, completion_ids, **kw):  # the same reward as lmx_side's
        reward_log.append([len(c) for c in completion_ids])
        return [sum(t < args.reward_below for t in c) / max(len(c), 1) for c in completion_ids]

    config = GRPOConfig(
        output_dir=out_dir, report_to="none", disable_tqdm=True, logging_strategy="no", save_strategy="no",
        use_vllm=False, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=args.seed,
        per_device_train_batch_size=B * G, generation_batch_size=B * G, gradient_accumulation_steps=1,
        num_generations=G, num_iterations=1, max_completion_length=T, generation_kwargs={"min_new_tokens": T},
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type=loss, epsilon=0.2,
        epsilon_high=0.28 if loss == "dapo" else 0.2, scale_rewards="group", shuffle_dataset=False,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=B1,
        adam_beta2=B2, adam_epsilon=EPS, max_grad_norm=CLIP, max_steps=len(prompt_rows) // B,
        dataloader_num_workers=0, log_completions=False,
    )
    dataset = Dataset.from_dict({"prompt": [as_text(r) for r in prompt_rows]})
    from transformers.trainer_callback import PrinterCallback

    trainer = GRPOTrainer(model=hf, reward_funcs=fraction_reward, args=config, train_dataset=dataset,
                          processing_class=tok, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training summary: stdout holds JSON lines only
    generate_completions = trainer._generate_single_turn  # HF generate + eos masking: trl's rollout, timed apart

    def timed_generation(*a, **kw):
        t0 = time.perf_counter()
        out = generate_completions(*a, **kw)
        gen_log.append(time.perf_counter() - t0)
        return out

    trainer._generate_single_turn = timed_generation
    return trainer


# ------------------------------------------------------------------------------------------------------ lmx side


def lmx_side(model, params, prompt_rows, args, loss: str, metrics_log: list):
    """(step(): one lmx RL step on the next B prompts, blocking; RLConfig)."""
    B, T = args.prompts, args.max_new_tokens
    cfg = RLConfig(group_size=args.group_size, max_new_tokens=T, temperature=1.0, updates_per_rollout=1,
                   loss=loss, stop_tokens=())
    optimizer = make_optimizer(OptimConfig(lr=LR, warmup_steps=0, total_steps=10**9, min_lr_ratio=1.0,
                                           weight_decay=0.0, b1=B1, b2=B2, eps=EPS, clip_norm=CLIP))
    params = jax.tree.map(jnp.copy, params)  # the train step donates its state
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32),
                       jax.random.key_data(jax.random.key(args.seed)))
    train_step = make_train_step(model, optimizer, loss_fn=make_policy_loss(cfg))

    def reward_fn(gen):
        tokens_BRT, lengths_BR = np.asarray(gen.tokens_BRT), np.asarray(gen.lengths_BR)
        inside = np.arange(tokens_BRT.shape[-1]) < lengths_BR[..., None]
        return ((tokens_BRT < args.reward_below) & inside).sum(-1) / np.maximum(lengths_BR, 1)

    k = 0

    def step():
        nonlocal state, k
        prompts = [list(map(int, r)) for r in prompt_rows[(k * B) % len(prompt_rows):][:B]]
        state, metrics = rl_step(state, prompts, reward_fn, model=model, train_step=train_step, cfg=cfg)
        metrics_log.append(metrics)  # plain floats: the step has finished
        k += 1

    return step, cfg


# ----------------------------------------------------------------------------------------------------------- main


def schedule(rounds: int, threads: list[int], warmup: int) -> list:
    """trl warm-up steps, then rounds of (lmx, trl@t1, trl@t2, ...) in alternating order."""
    sides = ["lmx", *[("trl", n) for n in threads]]
    out = [("trl", n) for n in threads for _ in range(warmup)]
    for r in range(rounds):
        out += sides if r % 2 == 0 else sides[::-1]
    return out


def check_same_weights(hf, model, params, prompt):
    """The two models' logits on one prompt agree (same weights, same maths)."""
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([prompt])).logits[0].numpy()
    got = np.asarray(model.apply({"params": params}, jnp.asarray([prompt], jnp.int32)).logits_BTV[0])
    err = float(np.max(np.abs(got - ref)))
    if not np.allclose(got, ref, atol=1e-4, rtol=1e-4):
        raise SystemExit(f"FAIL: lmx and transformers logits differ by up to {err:.3g} on the same weights")
    return err


def run_loss(loss: str, hf0, model, params0, tok, prompt_rows, args):
    B, G, T = args.prompts, args.group_size, args.max_new_tokens
    lmx_metrics: list = []
    lmx_step, cfg = lmx_side(model, params0, prompt_rows, args, loss, lmx_metrics)

    # lmx warm-up: the first step compiles; the second must not (static shapes), the trace count proves it.
    first = timed(lmx_step)
    traces = GENERATE._trace_count
    second = timed(lmx_step)

    sched = schedule(args.rounds, args.torch_threads, args.warmup)
    trl_steps = sum(1 for s in sched if s != "lmx")
    need = trl_steps * B
    rows = np.resize(prompt_rows, (max(need, len(prompt_rows)), args.prompt_len))[:need]
    driver = Interleaver(sched, lmx_step)
    trl_lengths: list = []
    trl_generate: list = []
    hf = copy.deepcopy(hf0)  # both sides start from the same weights
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(hf, tok, rows, args, loss, tmp, driver.callback, trl_lengths, trl_generate)
        trainer.train()
        driver.finish()
    if GENERATE._trace_count != traces:
        raise SystemExit(f"FAIL: lmx's generate recompiled after its first step ({loss})")

    # Equal work: every completion on both sides has exactly T tokens.
    lmx_lengths = [(m["completion_len_min"], m["completion_len_max"]) for m in lmx_metrics]
    if any(lo != T or hi != T for lo, hi in lmx_lengths) or any(n != T for r in trl_lengths for n in r):
        raise SystemExit(f"FAIL: completion lengths differ from max_new_tokens={T} (lmx {lmx_lengths[:3]}, trl "
                         f"{trl_lengths[:1]})")
    if len(trl_lengths) != trl_steps or any(len(r) != B * G for r in trl_lengths):
        raise SystemExit(f"FAIL: trl ran {len(trl_lengths)} generations (expected {trl_steps} of {B * G} rows)")

    warm = args.warmup * len(args.torch_threads)
    timed_trl = driver.trl_times[warm:]
    loop = {n: [t for m, t, _ in timed_trl if m == n] for n in args.torch_threads}
    inner = {n: [t for m, _, t in timed_trl if m == n] for n in args.torch_threads}
    gen = {n: [g for (m, _, _), g in zip(timed_trl, trl_generate[warm:], strict=True) if m == n]
           for n in args.torch_threads}
    t_lmx = median(driver.lmx_times)
    med = {n: median(v) for n, v in loop.items()}
    best = min(med, key=med.get)
    timed_metrics = lmx_metrics[2:]  # the two warm-up steps excluded
    rollout, update = (median([m[k] for m in timed_metrics]) for k in ("rollout_s", "update_s"))
    emit(f"rl/{loss}/compile", "seconds", first - t_lmx, first_call_s=first, second_call_s=second,
         steady_call_s=t_lmx, note="lmx's first rl_step (generate + train step compile) minus its median step")
    nominal = os.cpu_count()
    return emit("rl/step", "seconds_per_step", t_lmx, med[best], med[best] / t_lmx, loss=loss,
               baseline_name=f"trl {_trl_version()} GRPOTrainer ({best} torch threads)",
               target=None if args.quick else TARGET, met=None if args.quick else med[best] / t_lmx >= TARGET,
               **({f"ratio_vs_torch_t{nominal}": med[nominal] / t_lmx} if nominal in med else {}),
               ratio_vs_trl_step_begin_to_end=median(inner[best]) / t_lmx,
               reward=f"fraction of completion tokens with id < {args.reward_below}", prompts=B, group_size=G,
               prompt_len=args.prompt_len, max_new_tokens=T, rollouts_per_step=B * G,
               updates_per_rollout=cfg.updates_per_rollout, beta=0.0, temperature=cfg.temperature,
               lmx_rollout_s=rollout, lmx_update_s=update, trl_generate_s=median(gen[best]),
               trl_rest_s=median([a - g for a, g in zip(loop[best], gen[best], strict=True)]),
               lmx_s=driver.lmx_times, **{f"trl_t{n}_s": v for n, v in loop.items()},
               **{f"trl_t{n}_step_begin_to_end_s": v for n, v in inner.items()},
               lmx_reward_mean=float(np.mean([m["reward_mean"] for m in lmx_metrics])),
               lmx_last_loss=lmx_metrics[-1]["loss"], torch_threads_timed=list(args.torch_threads))


def _trl_version() -> str:
    import trl

    return trl.__version__


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    env = environment("benchmarks.rl")
    emit("rl/env", "info", None, trl=_trl_version(), **env)

    hf, model, params = llama_pair(vocab=args.vocab, hidden=args.hidden, intermediate=args.intermediate,
                                   layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, seed=args.seed)
    hf.train()
    rng = np.random.default_rng(args.seed)
    prompt_rows = rng.integers(2, args.vocab, (64 * args.prompts, args.prompt_len), dtype=np.int32)
    tok = word_tokenizer(args.vocab)
    if tok(as_text(prompt_rows[0]))["input_ids"] != prompt_rows[0].tolist():
        raise SystemExit("FAIL: the word-level tokenizer does not round-trip the prompt ids")
    err = check_same_weights(hf, model, params, prompt_rows[0].tolist())
    emit("rl/model", "params", cost.param_count(model.cfg), hidden=args.hidden, layers=args.layers,
         heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab,
         dtype="float32", logits_max_abs_diff=err)
    for loss in args.losses:
        rec = run_loss(loss, hf, model, params, tok, prompt_rows, args)
        # A thread count more than 2x slower than the fastest (OpenMP oversubscribed on a loaded machine, see
        # benchmarks/RESULTS.md) cannot be the baseline: it is not timed again for the next losses.
        best = min(median(rec[f"trl_t{n}_s"]) for n in args.torch_threads)
        args.torch_threads = [n for n in args.torch_threads if median(rec[f"trl_t{n}_s"]) <= 2 * best]


if __name__ == "__main__":
    main()
