"""Search over continuations: length-normalised beam search, and particle filtering with a prefix scorer.

Both are built from generate's pieces (prepare, prefill, decode_step, Record.append, keep_going, base_stats,
to_generation) and the state helpers: beams and particles are rows of one DecodeState, reordered with `select`.

- `beam_search`: one jitted program. Each step every live beam proposes its top-K next tokens; finished beams (and
  beams out of budget) stay in the pool as themselves; the K best of the pool by Σ logp / len^α survive.
- `particle_filter` (arXiv 2502.01618): the process scorer runs on the host on decoded text, so the loop over
  steps (not tokens) is in Python; each step's tokens are one jitted call that continues from the carried
  DecodeState until every particle has emitted the step delimiter or stopped, then the pool is resampled by
  another jitted call that gathers rows with `select`.
- `astar_search` (arXiv 2505.13672): best-first over steps with the same pieces: each round pops a prompt's
  best partial path by log r (discounted each time it was expanded), samples `expand` children of it to the next
  delimiter, scores them on the host and keeps the best `frontier` paths; the first goal popped (or the best path
  when the token budget is spent) is the answer.
Rows are X = B·R, row b·R + r (the order of `lmx.models.repeat`), R = beams or particles per prompt.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lmx.decoding import cost
from lmx.decoding.generate import (
    AllFinished,
    Generation,
    Record,
    _int_at_least,
    base_stats,
    decode_step,
    gather_rows,
    keep_going,
    prefill,
    prepare,
    to_generation,
)
from lmx.decoding.sampling import Greedy, Sampler, sample, token_logprobs
from lmx.models.lm import check_tokens, decode_params
from lmx.models.state import init_state, repeat, select, truncate

RESAMPLE_SALT = 0x7FFFFFFF  # resampling keys fold_in(fold_in(rng, SALT), step); token keys fold_in(rng, t), t small
# Particles that wait for the others are fed too (static shapes) and rolled back one position: SSM rings keep one
# extra slot for that (attention rolls back by lengths alone).
ROLLBACK = 1
MIN_REWARD = 1e-6  # scorer rewards are clipped into [MIN_REWARD, 1 - MIN_REWARD] so logit(r) stays finite




def _stats(cfg, lengths_B, R, record: Record, *, calls, flops, read, tokens, max_len, rollback_window, overflow_X):
    """base_stats, with tokens_generated counting every token the search sampled (pruned beams and particles
    dropped by resampling included: the compute spent), and kept_tokens those of the returned rows."""
    stats = base_stats(cfg, lengths_B, R, record, model_calls=1 + calls, decode_steps=calls, flops=flops,
                       max_len=max_len, rollback_window=rollback_window, overflow_X=overflow_X, state_read=read)
    return stats | {"tokens_generated": tokens, "flops_per_token": flops / jnp.maximum(tokens, 1),
                    "kept_tokens": stats["tokens_generated"]}


# ------------------------------------------------------------------------------------------------ beam search
@flax.struct.dataclass
class BeamGeneration(Generation):
    """Generation with R = beam hypotheses per prompt, best first. stats: Generation's keys, tokens_generated
    counting every token of every beam expansion kept for a step, plus kept_tokens (Σ lengths_BR)."""

    scores_BR: jax.Array  # float32: Σ logp / len^α (α = length_penalty), descending along R


def beam_search(model, params, prompts, *, beam: int, max_new_tokens: int, stop_tokens=(),
                length_penalty: float = 1.0, max_len: int | None = None, pad_id: int = 0) -> BeamGeneration:
    """Length-normalised beam search over the model's log-probs (untempered), K = `beam` hypotheses per prompt.

    A hypothesis finishes at a stop token (kept, counted in its length) or at max_new_tokens. Each step the
    pool is: for every live hypothesis its K most likely extensions, and every finished hypothesis as it is;
    the K best by score = Σ logp / len^α survive (the finished ones compete under the same normalisation, so
    search ends when the K best are all finished). beam=1 is greedy decoding.
    prompts, stop_tokens, max_len, pad_id: as in `generate`. One jit call, cached like generate's.
    """
    beam = _int_at_least("beam", beam, 1)
    if beam > model.cfg.vocab_size:
        raise ValueError(f"beam={beam} exceeds the vocabulary size {model.cfg.vocab_size}")
    alpha = float(length_penalty)
    if not math.isfinite(alpha):
        raise ValueError(f"length_penalty={length_penalty!r} must be finite")
    p = prepare(model.cfg, prompts, max_new_tokens=max_new_tokens, sampler=Greedy(), stop_tokens=stop_tokens,
                rng=None, num_samples=beam, stop_when=AllFinished(), max_len=max_len, pad_id=pad_id)
    fn = _beam_compiled(model, p.stop_tokens, beam, p.max_new_tokens, p.max_len, p.pad_id, alpha)
    return fn(decode_params(model, params), p.tokens_BT, p.lengths_B)


@functools.lru_cache(maxsize=32)
def _beam_compiled(model, stop_tokens, K, max_new_tokens, max_len, pad_id, alpha):
    cfg, stop_S = model.cfg, np.array(stop_tokens, np.int32)

    def normalised(sum_X, len_X):
        return sum_X / jnp.maximum(len_X, 1).astype(jnp.float32) ** alpha

    def choose(record: Record, sum_X, state, logits_XV):
        """One step: the K best of (live rows' top-K extensions, non-live rows as they are) per prompt."""
        X = sum_X.shape[0]
        B = X // K
        top_XK, tok_XK = jax.lax.top_k(jax.nn.log_softmax(logits_XV.astype(jnp.float32)), K)
        alive_X = record.alive()
        grow_XK = normalised(sum_X[:, None] + top_XK, record.lengths_X[:, None] + 1)
        stay_XK = jnp.where(jnp.arange(K) == 0, normalised(sum_X, record.lengths_X)[:, None], -jnp.inf)
        cand_BC = jnp.where(alive_X[:, None], grow_XK, stay_XK).reshape(B, K * K)
        _, pick_BK = jax.lax.top_k(cand_BC, K)  # ties: the lower index (earlier row, likelier token)
        parent_X = (jnp.arange(B)[:, None] * K + pick_BK // K).reshape(X)
        j_X = (pick_BK % K).reshape(X)
        grows_X = alive_X[parent_X]
        tok_X, logp_X = tok_XK[parent_X, j_X], top_XK[parent_X, j_X]
        sum_X = jnp.where(grows_X, sum_X[parent_X] + logp_X, sum_X[parent_X])
        record, taken_X = gather_rows(record, parent_X).append(tok_X[:, None], logp_X[:, None],
                                                               grows_X.astype(jnp.int32), stop_S, pad_id)
        return record, sum_X, select(state, parent_X), tok_X, jnp.sum(taken_X)

    def run(params, tokens_BT, lengths_B) -> BeamGeneration:
        B = tokens_BT.shape[0]
        X = B * K
        logits_BV, state = prefill(model, params, tokens_BT, lengths_B, init_state(cfg, B, max_len,
                                                                                  rollback_window=0))
        # Copy each prompt K ways, but only row 0 of each prompt is live at first, so the first step proposes K
        # distinct tokens rather than K copies of the same one.
        sum_X = jnp.where(jnp.arange(X) % K == 0, 0.0, -jnp.inf)
        record, sum_X, state, tok_X, tokens = choose(Record.empty(X, max_new_tokens, pad_id), sum_X, repeat(state, K),
                                                     jnp.repeat(logits_BV, K, axis=0))

        def body(c):
            calls, flops, read, tokens, state, tok_X, record, sum_X = c
            # Every row is fed (static shapes); only live rows' positions are counted, as generate counts them.
            n_X, live_X = state.lengths_B, record.alive()
            flops += jnp.sum(jnp.where(live_X, cost.forward_flops(cfg, n_X, n_X + 1), 0.0))
            read += jnp.sum(jnp.where(live_X, cost.state_bytes_read(cfg, n_X, n_X + 1), 0.0))
            logits_XV, state = decode_step(model, params, tok_X, state)
            record, sum_X, state, tok_X, taken = choose(record, sum_X, state, logits_XV)
            return calls + 1, flops, read, tokens + taken, state, tok_X, record, sum_X

        init = (jnp.int32(0), jnp.sum(cost.forward_flops(cfg, 0, lengths_B)),
                jnp.sum(cost.state_bytes_read(cfg, 0, lengths_B)), tokens, state, tok_X, record, sum_X)
        calls, flops, read, tokens, state, _, record, sum_X = jax.lax.while_loop(
            lambda c: keep_going(c[6], AllFinished(), B), body, init)

        score_BK = normalised(sum_X, record.lengths_X).reshape(B, K)
        order_BK = jnp.argsort(-score_BK, axis=1, stable=True)
        rank_X = (jnp.arange(B)[:, None] * K + order_BK).reshape(X)
        record = gather_rows(record, rank_X)
        stats = _stats(cfg, lengths_B, K, record, calls=calls, flops=flops, read=read, tokens=tokens,
                       max_len=max_len, rollback_window=0, overflow_X=state.overflow_B[rank_X])
        g = to_generation(record, B, stats)
        return BeamGeneration(g.tokens_BRT, g.lengths_BR, g.logprobs_BRT, g.finished_BR, g.stats,
                              jnp.take_along_axis(score_BK, order_BK, axis=1))

    return jax.jit(run)


# ------------------------------------------------------------------------------------------- particle filtering
@flax.struct.dataclass
class ParticleGeneration(Generation):
    """Generation with R = the final N particles per prompt (resampled: rows may repeat). stats: Generation's keys,
    tokens_generated counting every sampled token (particles later dropped included), plus kept_tokens
    (Σ lengths_BR), pf_steps (scoring rounds) and resamples."""

    rewards_BR: jax.Array  # float32: the scorer's reward for each final particle (its whole completion)


class _Pool(NamedTuple):
    """The carry between a particle filter's jitted calls."""

    state: object  # DecodeState: each row has consumed its prompt and every token it generated
    logits_XV: jax.Array  # next-token logits of each row
    record: Record
    step: jax.Array  # tokens sampled so far (the next token's key index)
    calls: jax.Array  # decode calls
    tokens: jax.Array  # tokens sampled by any particle
    flops: jax.Array
    read: jax.Array  # decode-state bytes read (cost.state_bytes_read)


def particle_filter(model, params, prompts, *, num_particles: int, step_token, scorer, max_new_tokens: int,
                    rng, sampler: Sampler = Sampler(), stop_tokens=(),  # noqa: B008 (frozen dataclass)
                    score_temperature: float = 1.0, max_len: int | None = None,
                    pad_id: int = 0) -> ParticleGeneration:
    """Particle filtering (arXiv 2502.01618) with N = `num_particles` particles per prompt.

    A step is generation up to a step delimiter: every unfinished particle samples until it emits one of
    `step_token` (an id or ids; the delimiter is kept in its text) or a stop token or runs out of budget. Then
    `scorer(tokens_BNT, lengths_BN) -> r_BN` (numpy in, array-like [B, N] in [0, 1] out; clipped into (0, 1))
    scores every particle's generated prefix, and each prompt's N particles are resampled multinomially with
    replacement by w = softmax(logit(r) / T_s), T_s = `score_temperature`. Finished particles stay in the pool
    (scored and resampled like the rest) and take no more tokens. Steps repeat until no particle can take a
    token (at most max_new_tokens steps: each step gives every live particle at least one token).

    rng: token t is drawn with fold_in(rng, t), as in `generate`, so before its first delimiter each particle
    samples exactly what `generate(..., num_samples=N, rng=rng)` samples. `lmx.data.tasks.process.prefix_scorer`
    makes a scorer from the built-in tasks' exact process verifiers.
    """
    N = _int_at_least("num_particles", num_particles, 1)
    if not isinstance(sampler, Sampler) or sampler.is_greedy:
        raise ValueError(f"particle filtering samples; sampler must be a non-greedy Sampler, got {sampler!r}")
    if not callable(scorer):
        raise TypeError(f"scorer must be callable (tokens_BNT, lengths_BN) -> r_BN, got {scorer!r}")
    T_s = float(score_temperature)
    if not 0 < T_s < math.inf:
        raise ValueError(f"score_temperature={score_temperature!r} must be finite and > 0")
    steps = _step_ids(step_token, model.cfg.vocab_size)
    p = prepare(model.cfg, prompts, max_new_tokens=max_new_tokens, sampler=sampler, stop_tokens=stop_tokens,
                rng=rng, num_samples=N, stop_when=AllFinished(), max_len=max_len, pad_id=pad_id)
    start, segment, resample, _ = _step_compiled(model, sampler, p.stop_tokens, steps, N, p.max_new_tokens,
                                                 p.max_len, p.pad_id)
    dparams = decode_params(model, params)
    pool = start(dparams, p.tokens_BT, p.lengths_B)
    B = len(p.lengths_B)
    resample_rng = jax.random.fold_in(rng, RESAMPLE_SALT)
    every_X = jnp.ones((B * N,), bool)
    for s in range(p.max_new_tokens + 1):
        pool = segment(dparams, pool, rng, every_X)
        record = jax.device_get(pool.record)
        r_BN = _check_rewards(scorer(record.tokens_XT.reshape(B, N, -1), record.lengths_X.reshape(B, N)), (B, N))
        if not np.any(~record.finished_X & (record.lengths_X < p.max_new_tokens)):
            break
        pool = resample(pool, jnp.asarray(r_BN, jnp.float32), jax.random.fold_in(resample_rng, s), T_s)
    stats = _stats(model.cfg, p.lengths_B, N, pool.record, calls=pool.calls, flops=pool.flops, read=pool.read,
                   tokens=pool.tokens, max_len=p.max_len, rollback_window=ROLLBACK, overflow_X=pool.state.overflow_B)
    stats |= {"pf_steps": jnp.int32(s + 1), "resamples": jnp.int32(s)}
    g = to_generation(pool.record, B, stats)
    return ParticleGeneration(g.tokens_BRT, g.lengths_BR, g.logprobs_BRT, g.finished_BR, g.stats,
                              jnp.asarray(r_BN, jnp.float32))


def _step_ids(step_token, vocab_size: int) -> tuple[int, ...]:
    steps = (step_token,) if np.ndim(step_token) == 0 else tuple(step_token)
    if not steps:
        raise ValueError("step_token must name at least one delimiter id")
    steps = tuple(sorted({operator.index(t) for t in steps}))
    check_tokens(np.array(steps), vocab_size, what=f"step_token={step_token!r}")
    return steps


def _check_rewards(r, shape) -> np.ndarray:
    r = np.asarray(r, np.float64)
    if r.shape != shape:
        raise ValueError(f"scorer returned shape {r.shape}, expected {shape} (prompts, particles)")
    bad = ~((r >= 0) & (r <= 1))  # NaN fails too
    if bad.any():
        raise ValueError(f"scorer rewards must lie in [0, 1]; got {r[bad][:8].tolist()}")
    return np.clip(r, MIN_REWARD, 1 - MIN_REWARD)


@functools.lru_cache(maxsize=32)
def _step_compiled(model, sampler, stop_tokens, step_tokens, N, max_new_tokens, max_len, pad_id):
    """The step-level search pieces over N rows per prompt: start (prefill, copy N ways), segment (every row of
    active_X samples one step), resample (particle filtering's), gather (move rows: state, logits, record)."""
    cfg = model.cfg
    stop_S, step_S = np.array(stop_tokens, np.int32), np.array(step_tokens, np.int32)

    def start(params, tokens_BT, lengths_B) -> _Pool:
        B = tokens_BT.shape[0]
        logits_BV, state = prefill(model, params, tokens_BT, lengths_B, init_state(cfg, B, max_len,
                                                                                  rollback_window=ROLLBACK))
        zero = jnp.int32(0)
        return _Pool(repeat(state, N), jnp.repeat(logits_BV, N, axis=0), Record.empty(B * N, max_new_tokens, pad_id),
                     zero, zero, zero, jnp.sum(cost.forward_flops(cfg, 0, lengths_B)),
                     jnp.sum(cost.state_bytes_read(cfg, 0, lengths_B, ROLLBACK)))

    def segment(params, pool: _Pool, rng, active_X) -> _Pool:
        """Sample → feed until every row of active_X has emitted a delimiter in this call, or stopped, or used its
        budget. The other rows take no tokens."""

        def body(c):
            pool, ended_X = c
            active_X = pool.record.alive() & ~ended_X
            tok_X = sample(sampler, pool.logits_XV, jax.random.fold_in(rng, pool.step))
            logp_X = token_logprobs(sampler, pool.logits_XV, tok_X)
            record, taken_X = pool.record.append(tok_X[:, None], logp_X[:, None], active_X.astype(jnp.int32), stop_S,
                                                 pad_id)
            ended_X |= active_X & jnp.isin(tok_X, step_S)
            # A row that took a token and may take more is fed it (a delimiter too: the next step starts from its
            # logits). The others are fed as well (static shapes) and rolled back to where they were; when no row
            # needs feeding (all stopped) the call is skipped.
            fed_X = active_X & record.alive()
            before_X = pool.state.lengths_B

            def feed(state):
                logits_XV, state = decode_step(model, params, tok_X, state)
                state = truncate(state, jnp.where(fed_X, state.lengths_B, before_X))
                return jnp.where(fed_X[:, None], logits_XV, pool.logits_XV), state

            any_fed = jnp.any(fed_X)
            logits_XV, state = jax.lax.cond(any_fed, feed, lambda state: (pool.logits_XV, state), pool.state)
            flops = pool.flops + jnp.sum(jnp.where(fed_X, cost.forward_flops(cfg, before_X, before_X + 1), 0.0))
            read = pool.read + jnp.sum(jnp.where(fed_X, cost.state_bytes_read(cfg, before_X, before_X + 1, ROLLBACK),
                                                 0.0))
            return _Pool(state, logits_XV, record, pool.step + 1, pool.calls + any_fed.astype(jnp.int32),
                         pool.tokens + jnp.sum(taken_X), flops, read), ended_X

        cond = lambda c: jnp.any(c[0].record.alive() & ~c[1])
        return jax.lax.while_loop(cond, body, (pool, ~active_X))[0]

    def resample(pool: _Pool, r_BN, key, T_s) -> _Pool:
        B = r_BN.shape[0]
        logw_BN = (jnp.log(r_BN) - jnp.log1p(-r_BN)) / T_s
        pick_BN = jax.random.categorical(key, logw_BN[:, None, :], axis=-1, shape=(B, N))
        return gather(pool, (jnp.arange(B)[:, None] * N + pick_BN).reshape(-1))

    def gather(pool: _Pool, idx_X) -> _Pool:
        return pool._replace(state=select(pool.state, idx_X), logits_XV=gather_rows(pool.logits_XV, idx_X),
                             record=gather_rows(pool.record, idx_X))

    # The pool is donated: each call reuses the previous call's buffers (the KV cache is not held twice).
    return (jax.jit(start), jax.jit(segment, donate_argnums=1), jax.jit(resample, donate_argnums=0),
            jax.jit(gather, donate_argnums=0))


# ------------------------------------------------------------------------------------------ A*-style step search
@flax.struct.dataclass
class AStarGeneration(Generation):
    """Generation with R = 1: the path each prompt's search returned. stats: Generation's keys, tokens_generated
    counting every sampled token (all expansions), kept_tokens (Σ lengths_BR), expansions (all prompts') and
    scorer_calls."""

    rewards_BR: jax.Array  # float32: the scorer's reward for the returned path (clipped into (0, 1))
    priorities_BR: jax.Array  # float32: its priority log r + (times expanded)·log retry_discount
    expansions_B: jax.Array  # int32: rounds each prompt's search ran
    reached_goal_B: jax.Array  # bool: the path was popped as a goal (not cut off by the token budget)


def astar_search(model, params, prompts, *, expand: int, frontier: int, step_token, scorer, token_budget: int,
                 max_new_tokens: int, rng, sampler: Sampler = Sampler(),  # noqa: B008 (frozen dataclass)
                 stop_tokens=(), retry_discount: float = 0.5, max_len: int | None = None,
                 pad_id: int = 0) -> AStarGeneration:
    """A*-style best-first search over reasoning steps (A*-decoding, arXiv 2505.13672) under a token budget.

    Each prompt keeps a frontier of up to `frontier` partial paths, the root (the bare prompt) first. A round
    pops the path of highest priority f = log r (r: the scorer's prefix reward, the estimated chance that the
    path ends correct; ties go to the longer path, the one nearer a goal, then the older slot), samples `expand`
    children of it, each up to the next step delimiter (as `particle_filter` does), scores them, and keeps the
    best `frontier` of the old frontier and the children. Expansions are samples, so the popped path stays in
    the frontier with its reward discounted by `retry_discount` (in [0, 1]; 0 closes it as classic A* does):
    when all its children fail, it is tried again only while no other path looks as good.
    The search ends for a prompt when it pops a goal (a finished path, or one at
    max_new_tokens): that path is returned, as A* returns the first goal it expands. Once the prompt's sampled
    tokens reach `token_budget` no further round starts: the best goal in the frontier is returned if there is
    one, else its best path (unfinished; `reached_goal_B` says which). A round may overshoot the budget by at most
    expand · max_new_tokens tokens.

    scorer(tokens_BKT, lengths_BK) -> r_BK in [0, 1], as particle_filter's (the children of every prompt, the
    prompts whose search ended included: their rewards are ignored). rng: token t is drawn with fold_in(rng, t).
    Rows: expand + frontier per prompt, one jitted call per round to sample, the scorer on the host between.
    """
    K = _int_at_least("expand", expand, 1)
    F = _int_at_least("frontier", frontier, 1)
    budget = _int_at_least("token_budget", token_budget, 1)
    gamma = float(retry_discount)
    if not 0 <= gamma <= 1:  # NaN fails too
        raise ValueError(f"retry_discount={retry_discount!r} must lie in [0, 1]")
    log_gamma = math.log(gamma) if gamma > 0 else -math.inf
    if not isinstance(sampler, Sampler) or sampler.is_greedy:
        raise ValueError(f"A* search samples its expansions; sampler must be a non-greedy Sampler, got {sampler!r}")
    if not callable(scorer):
        raise TypeError(f"scorer must be callable (tokens_BKT, lengths_BK) -> r_BK, got {scorer!r}")
    steps = _step_ids(step_token, model.cfg.vocab_size)
    M = K + F  # rows b·M + j: j < K the children being sampled, K + i frontier slot i
    p = prepare(model.cfg, prompts, max_new_tokens=max_new_tokens, sampler=sampler, stop_tokens=stop_tokens,
                rng=rng, num_samples=M, stop_when=AllFinished(), max_len=max_len, pad_id=pad_id)
    start, segment, _, gather = _step_compiled(model, sampler, p.stop_tokens, steps, M, p.max_new_tokens, p.max_len,
                                               p.pad_id)
    dparams = decode_params(model, params)
    pool = start(dparams, p.tokens_BT, p.lengths_B)
    B, T = len(p.lengths_B), p.max_new_tokens
    base_BM = np.arange(B)[:, None] * M
    f_BF = np.full((B, F), -np.inf)  # -inf: an empty slot
    f_BF[:, 0] = 0.0  # the root
    r_BF, len_BF, goal_BF = np.ones((B, F)), np.zeros((B, F), np.int64), np.zeros((B, F), bool)
    spent_B, expansions_B = np.zeros(B, np.int64), np.zeros(B, np.int32)
    answer_B, reached_B = np.full(B, -1), np.zeros(B, bool)
    calls = 0
    while True:
        order_BF = np.lexsort((np.broadcast_to(np.arange(F), (B, F)), -len_BF, -f_BF), axis=1)
        best_B = order_BF[:, 0]
        best_goal_B = goal_BF[np.arange(B), best_B]
        for b in np.flatnonzero(answer_B < 0):
            if best_goal_B[b]:
                answer_B[b], reached_B[b] = best_B[b], True
            elif spent_B[b] >= budget:
                goals = order_BF[b][goal_BF[b][order_BF[b]]]
                answer_B[b] = goals[0] if goals.size else best_B[b]
        active_B = answer_B < 0
        if not active_B.any():
            break
        # Pop: every active prompt's K child rows become copies of its best path (discounted, or closed).
        idx_BM = base_BM + np.arange(M)
        idx_BM[active_B, :K] = (base_BM[:, 0] + K + best_B)[active_B, None]
        f_BF[active_B, best_B[active_B]] += log_gamma
        pool = gather(pool, jnp.asarray(idx_BM.reshape(-1), jnp.int32))
        parent_B = len_BF[np.arange(B), best_B]
        active_X = np.zeros((B, M), bool)
        active_X[:, :K] = active_B[:, None]
        pool = segment(dparams, pool, rng, jnp.asarray(active_X.reshape(-1)))
        record = jax.device_get(pool.record)
        tokens_BMT, len_BM = record.tokens_XT.reshape(B, M, T), record.lengths_X.reshape(B, M)
        r_BK = _check_rewards(scorer(tokens_BMT[:, :K], len_BM[:, :K]), (B, K))
        calls += 1
        spent_B += np.where(active_B, (len_BM[:, :K] - parent_B[:, None]).sum(1), 0)
        expansions_B += active_B
        # Insert: the best F of the frontier and the children, by the pop order, into the frontier slots.
        child_goal_BK = record.finished_X.reshape(B, M)[:, :K] | (len_BM[:, :K] >= T)
        all_f = np.concatenate([np.log(r_BK), f_BF], 1)
        all_len = np.concatenate([len_BM[:, :K], len_BF], 1)
        keep_BF = np.lexsort((np.broadcast_to(np.arange(M), (B, M)), -all_len, -all_f), axis=1)[:, :F]
        keep_BF = np.where(active_B[:, None], keep_BF, K + np.arange(F))  # ended prompts keep their frontier
        rows = np.arange(B)[:, None]
        f_BF = all_f[rows, keep_BF]
        r_BF = np.concatenate([r_BK, r_BF], 1)[rows, keep_BF]
        len_BF = all_len[rows, keep_BF]
        goal_BF = np.concatenate([child_goal_BK, goal_BF], 1)[rows, keep_BF]
        idx_BM = base_BM + np.arange(M)
        idx_BM[:, K:] = base_BM + keep_BF  # source column j < K a child, K + i the old slot i
        pool = gather(pool, jnp.asarray(idx_BM.reshape(-1), jnp.int32))
    stats = _stats(model.cfg, p.lengths_B, M, pool.record, calls=pool.calls, flops=pool.flops, read=pool.read,
                   tokens=pool.tokens, max_len=p.max_len, rollback_window=ROLLBACK, overflow_X=pool.state.overflow_B)
    rows_B = base_BM[:, 0] + K + answer_B
    g = to_generation(gather_rows(pool.record, jnp.asarray(rows_B)), B, stats)
    stats |= {"kept_tokens": jnp.sum(g.lengths_BR), "expansions": jnp.int32(expansions_B.sum()),
              "scorer_calls": jnp.int32(calls)}
    pick = np.arange(B), answer_B
    return AStarGeneration(g.tokens_BRT, g.lengths_BR, g.logprobs_BRT, g.finished_BR, stats,
                           jnp.asarray(r_BF[pick][:, None], jnp.float32), jnp.asarray(f_BF[pick][:, None], jnp.float32),
                           jnp.asarray(expansions_B), jnp.asarray(reached_B))
