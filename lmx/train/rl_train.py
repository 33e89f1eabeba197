"""The RL run loop (issue 10, items 6–8): config in, an RL-trained policy + metrics out.

`train_rl(cfg, run_dir)` starts from an SFT run directory (`cfg.init_from`: the params of its latest checkpoint),
trains one first under run_dir/sft/ with `lmx.train.loop.train` (`cfg.init_from = ""`), or starts from a random
init (`cfg.init_from = "random"`, for tests), then runs `cfg.train.steps` RL steps (`lmx.train.rl_loop.rl_step`)
on a built-in task with its exact verifier plus the reward terms of `cfg.reward`.

Run directory layout: config.json, metrics.jsonl, tb/ (TensorBoard), checkpoints/<step>/ (the TrainState: policy
params, opt_state, step, rng; plus the data position and LEAD's EMA), reference/ (π_ref, the frozen starting
policy, only when the loss's β > 0), sft/ (when the SFT run is trained here).
Step k means "after k RL steps" (each of μ = updates_per_rollout optimizer updates, so TrainState.step = μ·k).
The prompts of step k depend only on (cfg.seed, k) and the rollouts' randomness only on the TrainState, so a run
resumed from checkpoint k reproduces the uninterrupted run bit for bit (timings aside). metrics.jsonl step 0 holds
the initial policy's held-out evaluation, the last step the final one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from lmx.data import held_out_problems, prompt_batch
from lmx.data.batching import step_rng
from lmx.decoding import Sampler, generate
from lmx.models import ModelConfig, build
from lmx.train import rewards as rw
from lmx.train import rl
from lmx.train.checkpoint import Checkpointer
from lmx.train.loop import (
    as_dict,
    cached_optimizer,
    check_finite,
    is_due,
    optim_config,
    run_setup,
    train,
    write_config,
)
from lmx.train.metrics import MetricsWriter, read_metrics
from lmx.train.optim import OptimConfig, lr_schedule
from lmx.train.rl_loop import RLConfig, make_policy_loss, rl_step
from lmx.train.sft import evaluate, make_train_step
from lmx.train.state import TrainState, abstract_state
from lmx.train.treepo import TreeConfig

# Timings differ between runs; every other metric of a resumed run equals the uninterrupted run's.
TIMING_KEYS = ("rollout_s", "update_s", "tokens_per_s")
DATA_SEED_OFFSET = 0x5EED  # RL prompts come from a stream apart from the SFT batches (seed, step)
REFERENCE_SEED_OFFSET = 0x5EF  # O1-Pruner's reference samples: a stream of their own


@dataclass
class RLResult:
    state: TrainState
    history: list[dict[str, Any]]  # every record of run_dir/metrics.jsonl, earlier (resumed) runs included
    eval: dict[str, Any] | None  # the final held-out evaluation of this call (None if none ran)
    init_eval: dict[str, Any] | None  # the initial policy's (None on a resumed run or when eval is off)

    @property
    def params(self):
        return self.state.params


def parse_reward_spec(spec: str, kwargs=None) -> tuple[rw.RewardTerm, ...]:
    """"correctness+kimi_length" or "correctness+0.5*kimi_length" -> RewardTerms (unknown names fail, listing the
    registered rewards). kwargs: {reward name: {config field: value}} (cfg.reward_kwargs)."""
    kwargs = as_dict(kwargs or {})
    terms = []
    for part in str(spec).replace(" ", "").split("+"):
        if not part:
            raise ValueError(f"config.reward={spec!r}: empty term (write e.g. 'correctness+kimi_length')")
        weight, _, name = part.rpartition("*")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"config.reward={spec!r}: weight {weight!r} of {name!r} is not a number") from None
        rw.get_reward(name)
        config = rw.reward_config(name, **as_dict(kwargs[name])) if name in kwargs else None
        terms.append(rw.RewardTerm(name, config=config, weight=w))
    unused = set(kwargs) - {t.name for t in terms}
    if unused:
        raise ValueError(f"config.reward_kwargs names {sorted(unused)}, which config.reward={spec!r} does not use")
    return tuple(terms)


def _reward_terms(cfg) -> tuple[rw.RewardTerm, ...]:
    return parse_reward_spec(cfg.reward, cfg.get("reward_kwargs"))


def needs_reference_stats(terms) -> bool:
    """O1-Pruner with the paper's L̄_ref, Ā_ref: sampled from the reference policy for each step's prompts."""
    return any(t.name == "o1_pruner" and not (t.config and t.config.ref_from_group) for t in terms)


def uses_lead(terms) -> bool:
    return any(t.name == "lead" for t in terms)


def rl_config(cfg, stop_id: int) -> RLConfig:
    """The RLConfig of cfg. A reward spec naming `lead` trains with LEAD's two-stream advantage (cfg.advantage must
    then be left at "group_normalized" or set to "lead"; cfg.advantage_kwargs configure LEADConfig)."""
    r = cfg.rl
    loss_kwargs = as_dict(cfg.get("loss_kwargs", {}))
    adv_kwargs = as_dict(cfg.get("advantage_kwargs", {}))
    advantage = str(cfg.advantage)
    if uses_lead(_reward_terms(cfg)):
        if advantage not in ("group_normalized", "lead"):
            raise ValueError(f"config.reward={cfg.reward!r} trains with LEAD's two-stream advantage, but "
                             f"config.advantage={advantage!r}; leave it at 'group_normalized' or set 'lead'")
        advantage = "lead"
    return RLConfig(
        group_size=int(r.group_size), max_new_tokens=int(r.max_new_tokens), temperature=float(r.temperature),
        updates_per_rollout=int(r.updates_per_rollout), loss=str(cfg.loss),
        loss_config=rl.loss_config(str(cfg.loss), **loss_kwargs) if loss_kwargs else None,
        advantage=advantage,
        advantage_config=rl.advantage_config(advantage, **adv_kwargs) if adv_kwargs else None,
        stop_tokens=(stop_id,), dynamic_rounds=int(r.dynamic_rounds),
        micro_batches=int(r.get("micro_batches", 1)), tree=_tree_config(r))


def _tree_config(r) -> TreeConfig | None:
    """cfg.rl.tree = {segment_len, branching}: TreePO rollouts (segment_len 0: independent samples)."""
    tree = r.get("tree")
    if tree is None or not int(tree.get("segment_len", 0)):
        return None
    return TreeConfig(int(tree.segment_len), tuple(int(b) for b in tree.branching), int(r.max_new_tokens))


def _beta(rl_cfg: RLConfig) -> float:
    loss_cfg = rl_cfg.loss_config if rl_cfg.loss_config is not None else rl.loss_config(rl_cfg.loss)
    return float(getattr(loss_cfg, "beta", 0.0))


@functools.lru_cache(maxsize=8)
def _rl_train_step(model_cfg: ModelConfig, opt_cfg: OptimConfig, rl_cfg: RLConfig):
    """Cached so a resumed run in the same process reuses the compiled update."""
    return make_train_step(build(model_cfg), cached_optimizer(opt_cfg), loss_fn=make_policy_loss(rl_cfg),
                           lr_fn=lr_schedule(opt_cfg), micro_batches=rl_cfg.micro_batches)


def sft_config(cfg) -> ml_collections.ConfigDict:
    """The SFT run trained first when cfg.init_from is empty: cfg's task, model and seed, cfg.sft's train/optim."""
    s = cfg.sft
    return ml_collections.ConfigDict({
        "seed": int(cfg.seed), "task": as_dict(cfg.task), "model": as_dict(cfg.model),
        "train": as_dict(s.train), "optim": as_dict(s.optim),
        "eval": {"num_problems": 0, "batch_size": 1, "max_new_tokens": 1, "seed": 0, "samples_logged": 0},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1}})


def _init_params(cfg, run_dir: Path, model, progress: bool):
    """(params, SFT data streams for the held-out set) of the initial policy."""
    src = str(cfg.init_from)
    if src == "random":
        return None, []
    if src:
        sft_dir = Path(src)
        cfg_path = sft_dir / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"config.init_from={src!r} is not an SFT run directory (no config.json)")
        sft_cfg = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    else:
        sft_dir, sft_cfg = run_dir / "sft", sft_config(cfg)
        logging.info("no config.init_from: training %d SFT steps in %s", int(sft_cfg.train.steps), sft_dir)
        train(sft_cfg, sft_dir, progress=progress)
    optimizer = cached_optimizer(optim_config(sft_cfg))
    with Checkpointer(sft_dir / "checkpoints", every=1, keep=1) as ckpt:
        restored = ckpt.restore_latest(abstract_state(model, optimizer))
        if restored is None:
            raise FileNotFoundError(f"no complete checkpoint under {sft_dir / 'checkpoints'}")
        sft_state, data = restored
    streams = [(int(sft_cfg.train.batch_size), int(sft_cfg.seed), int(data.get("data_step", 0)))]
    return sft_state.params, streams


def _budget_fn(budget):
    """cfg.budget = {min, max, template} (L1/LCPO: the budget n_gold in the prompt; max 0: off) ->
    add(problems, rng) -> (problems with their budget in the prompt, budgets_B float32 | None)."""
    lo, hi = (int(budget.get("min", 0)), int(budget.get("max", 0))) if budget else (0, 0)
    if not hi:
        return lambda problems, rng: (problems, None)
    if not 1 <= lo <= hi:
        raise ValueError(f"config.budget min={lo}, max={hi}: need 1 <= min <= max tokens (max 0 turns it off)")
    template = str(budget.get("template", "Think for {n} tokens. {prompt}"))

    def add(problems, rng):
        n_B = rng.integers(lo, hi + 1, size=len(problems))
        return ([replace(p, prompt=template.format(n=int(n), prompt=p.prompt))
                 for p, n in zip(problems, n_B, strict=True)], n_B.astype(np.float32))

    return add


def _initial_state(model, optimizer, params, seed: int) -> TrainState:
    state = TrainState.create(model, optimizer, jax.random.PRNGKey(seed))
    if params is None:
        return state
    # One placement for every leaf: restored params arrive committed to the device while fresh arrays are not,
    # and jit keys its cache on that, so without this the rollout and update compile again at step 2.
    return jax.device_put(TrainState(params, jax.jit(optimizer.init)(params), state.step, state.rng),
                          jax.devices()[0])


def _eval_streams(cfg, sft_streams) -> list[tuple[int, int, int]]:
    """The training streams a held-out set must avoid: the SFT run's, and every RL step's prompts (and one step
    past the end)."""
    B, rounds = int(cfg.rl.batch_size), int(cfg.rl.dynamic_rounds)
    return [tuple(s) for s in sft_streams] + [(B * rounds, int(cfg.seed) + DATA_SEED_OFFSET, int(cfg.train.steps) + 1)]


def rl_held_out(cfg, run_dir: str | Path, n: int | None = None) -> list:
    """The held-out problems `train_rl(cfg, run_dir)` evaluates on (without L1 budgets): cfg.eval.num_problems of
    them (n: that many, drawn the same way), none seen in the SFT run it started from or in any RL step. run_dir:
    a run train_rl has started (it holds the SFT streams)."""
    path = Path(run_dir) / "sft_streams.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a started train_rl run")
    _, task, *_ = run_setup(cfg)
    n = int(cfg.eval.num_problems) if n is None else n
    return _held_out(task, _eval_streams(cfg, json.loads(path.read_text())), n, int(cfg.eval.seed))


def _held_out(task, streams, n: int, seed: int):
    """`held_out_problems`, but a task too small to leave `n` unseen problems is an error, not an endless loop."""
    seen = {p.prompt for batch_size, stream_seed, steps in streams for step in range(int(steps))
            for p in task.sample(step_rng(int(stream_seed), step), int(batch_size))}
    probe = {p.prompt for p in task.sample(np.random.default_rng([seed, 7]), 20 * n)} - seen
    if len(probe) < n:
        raise ValueError(f"config.eval.num_problems={n}: only {len(probe)} of {20 * n} fresh draws of task "
                         f"{getattr(task, 'name', task)!r} are unseen in SFT and RL training (a task too small for "
                         "a held-out set); lower eval.num_problems or widen the task")
    return held_out_problems(task, streams, n, seed)[0]


def _decode(tok, tokens_BRT, lengths_BR) -> list[list[str]]:
    """Completion texts, cut at (and without) the stop token, as `evaluate` scores them."""
    tokens_BRT, lengths_BR = np.asarray(tokens_BRT), np.asarray(lengths_BR)
    out = []
    for b in range(lengths_BR.shape[0]):
        row = []
        for r in range(lengths_BR.shape[1]):
            ids = tokens_BRT[b, r, : int(lengths_BR[b, r])].tolist()
            if tok.eos_id in ids:
                ids = ids[: ids.index(tok.eos_id)]
            row.append(tok.decode(ids))
        out.append(row)
    return out


def make_reward_fn(task, tok, problems, terms, log: list, *, budgets_B=None, reference=None):
    """reward_fn(gen) -> rewards_BR: the task's verifier scores, then Σ weight·reward over `terms`. Appends
    (scores_BR, {label: reward_BR}) to `log` for the per-reward metrics. With a `lead` term it returns LEAD's two
    streams (correctness_BR, efficiency_BR): the other terms' sum (the verifier's correctness when there are none)
    and the lead term(s). budgets_B: the prompts' token budgets (L1). reference() -> (ref_lengths_B,
    ref_accuracy_B): O1-Pruner's reference statistics of these prompts."""
    lead = uses_lead(terms)
    if lead and all(t.name == "lead" for t in terms):
        terms = (rw.RewardTerm("correctness"), *terms)

    def reward_fn(gen):
        scores = rw.score_completions(task, problems, _decode(tok, gen.tokens_BRT, gen.lengths_BR), on_error="nan")
        ref_lengths_B, ref_accuracy_B = reference() if reference is not None else (None, None)
        inputs = rw.make_reward_inputs(scores, gen.tokens_BRT, gen.lengths_BR, budgets_B=budgets_B,
                                       ref_lengths_B=ref_lengths_B, ref_accuracy_B=ref_accuracy_B,
                                       think_ids=(tok.think_id, tok.end_think_id))
        total, parts = rw.compute_rewards(inputs, terms)
        log.append((scores, {k: np.asarray(v) for k, v in parts.items()}))
        if not lead:
            return np.asarray(total)
        eff = sum(t.weight * np.asarray(parts[t.label or t.name]) for t in terms if t.name == "lead")
        return np.asarray(total) - eff, eff

    return reward_fn


def _reward_metrics(log) -> dict[str, float]:
    """accuracy (mean verifier score), NaN-score fraction and each reward term's mean/std over every generation
    round of the step (like rl_step's reward_mean)."""
    scores = np.concatenate([s for s, _ in log])
    out = {"accuracy": float(np.nanmean(scores)) if np.isfinite(scores).any() else math.nan,
           "reward_nan_frac": float(np.mean(np.isnan(scores)))}
    for label in log[0][1]:
        v = np.concatenate([p[label] for _, p in log])
        v = v[np.isfinite(v)]
        out[f"reward/{label}_mean"] = float(v.mean()) if v.size else math.nan
        out[f"reward/{label}_std"] = float(v.std()) if v.size else math.nan
    return out


def train_rl(cfg: ml_collections.ConfigDict, run_dir: str | Path, *, stop_at: int | None = None,
             batch_hook: Callable[[int, dict], dict] | None = None, progress: bool = True) -> RLResult:
    """Run (or resume) the RL run `cfg` describes, writing everything under `run_dir`.

    stop_at: stop after this many steps without a final save, as if the job were killed.
    batch_hook(step, batch) -> batch: may edit each update batch (tests inject NaNs with it).
    Raises FloatingPointError, saving nothing, when the loss, gradient norm or updated-parameter norm is not
    finite; earlier checkpoints stay as they were."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc, ev = cfg.train, cfg.eval
    total = int(tc.steps)
    tok, task, model_cfg, model, opt_cfg, optimizer = run_setup(cfg)
    rl_cfg = rl_config(cfg, tok.eos_id)
    terms = _reward_terms(cfg)
    B, rounds = int(cfg.rl.batch_size), rl_cfg.dynamic_rounds
    data_seed = int(cfg.seed) + DATA_SEED_OFFSET
    add_budgets = _budget_fn(cfg.get("budget"))

    def step_problems(step: int):
        """All the prompts step `step` may use: B per generation round, from (data_seed, step) alone; with
        cfg.budget, each with its token budget (None otherwise)."""
        problems = task.sample(step_rng(data_seed, step), B * rounds)
        return add_budgets(problems, np.random.default_rng([data_seed, step, 1]))

    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(
            Checkpointer(run_dir / "checkpoints", every=int(tc.ckpt_every), keep=int(tc.keep_checkpoints)))
        abstract = abstract_state(model, optimizer)
        restored = ckpt.restore_latest(abstract)
        sft_streams_path = run_dir / "sft_streams.json"
        lead = rl_cfg.advantage == "lead"
        ref_ckpt = stack.enter_context(Checkpointer(run_dir / "reference", every=1, keep=1)) if (
            _beta(rl_cfg) > 0 or needs_reference_stats(terms)) else None
        if restored is None:
            params, sft_streams = _init_params(cfg, run_dir, model, progress)
            sft_streams_path.write_text(json.dumps(sft_streams))
            state, start = _initial_state(model, optimizer, params, int(cfg.seed)), 0
            adv_state = rl.lead_init_state() if lead else None
            if ref_ckpt is not None:  # π_ref: a frozen copy of the starting policy (train_step donates the state's)
                ref_params = jax.tree.map(jnp.copy, state.params)
                ref_ckpt.save(0, ref_params, force=True)
        else:
            state, data_pos = restored
            start = int(data_pos["data_step"])
            sft_streams = json.loads(sft_streams_path.read_text()) if sft_streams_path.exists() else []
            adv_state = {"w_c": jnp.float32(data_pos["lead_w_c"])} if lead else None
            if ref_ckpt is not None:
                ref_params, _ = ref_ckpt.restore_latest(abstract.params)
            logging.info("resuming %s from RL step %d", run_dir, start)
        if ref_ckpt is None:
            ref_params = None
        write_config(cfg, run_dir, start)

        train_step = _rl_train_step(model_cfg, opt_cfg, rl_cfg)
        n_eval = int(ev.num_problems)
        eval_problems = []
        if n_eval > 0:  # unseen in SFT and in every RL step's prompts
            eval_problems, eval_budgets = add_budgets(_held_out(task, _eval_streams(cfg, sft_streams), n_eval,
                                                                int(ev.seed)),
                                                      np.random.default_rng([int(ev.seed), 1]))
            if eval_budgets is not None:  # evaluate scores the answers; the budgets only shape the prompts
                logging.info("held-out prompts carry budgets of mean %.1f tokens", float(eval_budgets.mean()))
        run_eval = lambda params: evaluate(model, params, task, tok, eval_problems,  # noqa: E731
                                           int(ev.max_new_tokens), int(ev.batch_size))
        writer = stack.enter_context(MetricsWriter(run_dir, resume_step=start))
        init_eval = last_eval = None
        if start == 0 and n_eval > 0:
            init_eval = run_eval(state.params)
            writer.write(0, {f"eval/{k}": v for k, v in init_eval.items() if k != "samples"})
        end = total if stop_at is None else min(stop_at, total)
        bar = stack.enter_context(tqdm(total=total, initial=start, desc="rl", disable=not progress,
                                       dynamic_ncols=True))
        def reference_stats(prompts, chunk, key):
            """O1-Pruner's L̄_ref, Ā_ref: G samples per prompt from π_ref (mean token length, mean score)."""
            gen = generate(model, ref_params, prompts, max_new_tokens=rl_cfg.max_new_tokens,
                           sampler=Sampler(rl_cfg.temperature), rng=key, num_samples=rl_cfg.group_size,
                           stop_tokens=rl_cfg.stop_tokens)
            scores = rw.score_completions(task, chunk, _decode(tok, gen.tokens_BRT, gen.lengths_BR), on_error="nan")
            with np.errstate(all="ignore"):  # a prompt whose samples are all unscorable: NaN accuracy
                return np.asarray(gen.lengths_BR, np.float32).mean(1), np.nanmean(scores, 1)

        ref_key = jax.random.PRNGKey(int(cfg.seed) + REFERENCE_SEED_OFFSET)
        for step in range(start + 1, end + 1):
            problems, budgets = step_problems(step)
            log: list = []

            def group(r: int, problems=problems, budgets=budgets, log=log, step=step):
                chunk = problems[r * B:(r + 1) * B]
                prompts = prompt_batch(tok, chunk)
                reference = None
                if needs_reference_stats(terms):
                    key = jax.random.fold_in(ref_key, step * rounds + r)
                    reference = functools.partial(reference_stats, prompts, chunk, key)
                return prompts, make_reward_fn(task, tok, chunk, terms, log, reference=reference,
                                               budgets_B=None if budgets is None else budgets[r * B:(r + 1) * B])

            prompts, reward_fn = group(0)
            step_fn = train_step if batch_hook is None else (
                lambda s, b, _step=step: train_step(s, batch_hook(_step, b)))
            out = rl_step(state, prompts, reward_fn, model=model, train_step=step_fn, cfg=rl_cfg,
                          refill=group if rounds > 1 else None, ref_params=ref_params, adv_state=adv_state)
            state, metrics, adv_state = out if lead else (*out, None)
            guard = check_finite(metrics, step, ckpt, "RL")
            record = {}
            if is_due(step, int(tc.log_every), total):
                record.update(metrics)
                record.update(_reward_metrics(log))
            if step == total and n_eval > 0:
                last_eval = run_eval(state.params)
                record.update({f"eval/{k}": v for k, v in last_eval.items() if k != "samples"})
            if record:
                writer.write(step, record)
            # LEAD's EMA is a float32 scalar: its float64 JSON form round-trips exactly.
            data_pos = {"data_step": step} | ({"lead_w_c": float(adv_state["w_c"])} if lead else {})
            ckpt.save(step, state, data_pos, force=step == total)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{guard['loss']:.4f}", refresh=False)
        if start == total and n_eval > 0:  # re-run of a finished run: its final evaluation again (not re-logged)
            last_eval = run_eval(state.params)
    return RLResult(state=state, history=read_metrics(run_dir), eval=last_eval, init_eval=init_eval)


def comparable(record: dict) -> dict:
    """A metrics record without its timings: what a resumed run must reproduce exactly."""
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


__all__ = ["RLResult", "comparable", "make_reward_fn", "parse_reward_spec", "rl_config", "sft_config", "train_rl"]
