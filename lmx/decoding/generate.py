"""`generate`: one jitted program that prefills every prompt once, shares that prefix across R samples, then
decodes in a `lax.while_loop` that exits as soon as a stop predicate holds.

It is assembled from pieces that every other decoding loop (speculative decoding, search, RL rollouts) reuses:
- host side: `prepare_prompts` (validate, pad, size the cache) before anything is traced;
- `prefill` (prompts once, right-padded, rolled back to their true lengths) and `decode_step` (one token per row)
  on params split once per params object (`lmx.models.decode_params`);
- `Record` with `append`: each row's generated tokens and log-probs, written at the row's own length, a stop
  token ending the row, the max_new_tokens budget respected;
- stop predicates (`AllFinished`, `MOfRFinished`) and `keep_going`;
- an optional `forcing` policy (`Forcing`), the one hook that steers the sampled tokens (budget forcing,
  lmx.decoding.budget) without a second copy of the loop;
- `base_stats`: the stats every algorithm reports (listed on `Generation`).
Inside the program the B prompts × R samples are flattened into X = B·R rows, row b·R + r (the order of
`lmx.models.repeat`).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lmx.decoding import cost
from lmx.decoding.sampling import Greedy, Sampler, sample, token_logprobs
from lmx.models.lm import DecodeParams, check_tokens, decode_params, forward
from lmx.models.state import DecodeState, init_state, repeat, truncate

PROMPT_BUCKET = 16  # prompts are padded to a multiple of this, so nearby lengths share one compilation


@dataclass(frozen=True)
class AllFinished:
    """Stop when every sample of every prompt has emitted a stop token."""

    def __call__(self, finished_BR):
        return jnp.all(finished_BR)

    def settled(self, finished_BR):
        """Prompts whose samples may stop (all of them finished: nothing left to freeze)."""
        return jnp.all(finished_BR, axis=-1)


@dataclass(frozen=True)
class MOfRFinished:
    """Stop when every prompt has at least m finished samples: m=1 is first-finish search, m>1 short-m@k."""

    m: int

    def __post_init__(self):
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ValueError(f"MOfRFinished.m={self.m!r} must be an int >= 1")

    def __call__(self, finished_BR):
        return jnp.all(self.settled(finished_BR))

    def settled(self, finished_BR):
        """Prompts with m finished samples: their other samples stop taking tokens (`Record.settle`), so a batch
        of prompts costs what each prompt's own first m finishes cost."""
        return jnp.sum(finished_BR, axis=-1) >= self.m


@flax.struct.dataclass
class Generation:
    tokens_BRT: jax.Array  # int32 [B, R, max_new_tokens]; pad_id after a sample finished or the loop stopped
    lengths_BR: jax.Array  # int32: tokens generated per sample, the stop token included
    logprobs_BRT: jax.Array  # float32: log-prob of each token (see sampling.token_logprobs); 0 where padded
    finished_BR: jax.Array  # bool: the sample emitted a stop token
    # 0-d arrays, the same keys in every decoding algorithm (speculative decoding adds its own):
    # tokens_generated, model_calls (prefill = 1), decode_steps, prompt_tokens (once per prompt);
    # flops: forward FLOPs the generation needs (each prompt once, then the positions the model was run on;
    # excludes padding and the masked work on finished rows), flops_per_token = flops / tokens_generated;
    # kv_bytes: bytes of the KV cache allocated for all B·R rows; ssm_state_bytes: the SSM layers' state for all
    # rows (constant in length; its rings as the algorithm sized them); state_bytes: their sum (lmx.decoding.cost);
    # overflow: rows whose state ran out of positions (0 unless max_len was too small; their tokens are garbage);
    # weight_bytes_read, state_bytes_read, bytes_moved: the memory traffic of lmx.decoding.cost (eFLOPs = flops +
    # I·bytes_moved: cost.eflops).
    stats: dict[str, jax.Array]


@flax.struct.dataclass
class Record:
    """Each row's generated tokens so far: tokens_XT (pad_id past the row's length), logprobs_XT (0 there),
    lengths_X, finished_X (emitted a stop token), stopped_X (takes no more tokens although unfinished: its
    prompt's stop predicate already holds, see `settle`)."""

    tokens_XT: jax.Array
    logprobs_XT: jax.Array
    lengths_X: jax.Array
    finished_X: jax.Array
    stopped_X: jax.Array

    @classmethod
    def empty(cls, X: int, max_new_tokens: int, pad_id: int) -> Record:
        return cls(jnp.full((X, max_new_tokens), pad_id, jnp.int32), jnp.zeros((X, max_new_tokens), jnp.float32),
                   jnp.zeros((X,), jnp.int32), jnp.zeros((X,), bool), jnp.zeros((X,), bool))

    def alive(self) -> jax.Array:
        """Rows that may still take tokens: not finished, not stopped, budget left."""
        return ~self.finished_X & ~self.stopped_X & (self.lengths_X < self.tokens_XT.shape[1])

    def settle(self, stop_when, B: int) -> Record:
        """Stop the rows of every prompt that `stop_when.settled` says is done (short-m@k, first-finish: once a
        prompt has its m finished samples, its others take no more tokens, while other prompts go on)."""
        settled_B = stop_when.settled(self.finished_X.reshape(B, -1))
        return self.replace(stopped_X=self.stopped_X | jnp.repeat(settled_B, self.finished_X.shape[0] // B))

    def append(self, tokens_XK, logprobs_XK, count_X, stop_S, pad_id: int) -> tuple[Record, jax.Array]:
        """Append each row's first count_X of K candidate tokens, stopping after a stop token and at the budget;
        finished rows take none. Returns (record, tokens taken per row)."""
        X, K = tokens_XK.shape
        j_K = jnp.arange(K)
        take_XK = (j_K < count_X[:, None]) & self.alive()[:, None] & (
            self.lengths_X[:, None] + j_K < self.tokens_XT.shape[1])
        stop_XK = (jnp.isin(tokens_XK, stop_S) if stop_S.size else jnp.zeros_like(take_XK)) & take_XK
        take_XK &= jnp.cumsum(stop_XK, axis=1) - stop_XK == 0  # nothing after the first stop token
        taken_X = jnp.sum(take_XK, axis=1, dtype=jnp.int32)
        rows_XK, pos_XK = jnp.broadcast_to(jnp.arange(X)[:, None], (X, K)), self.lengths_X[:, None] + j_K
        # Positions past a row's taken tokens still hold pad / 0, so writing pad / 0 there changes nothing;
        # positions past the buffer are dropped.
        tokens_XT = self.tokens_XT.at[rows_XK, pos_XK].set(jnp.where(take_XK, tokens_XK, pad_id), mode="drop")
        logprobs_XT = self.logprobs_XT.at[rows_XK, pos_XK].set(jnp.where(take_XK, logprobs_XK, 0.0), mode="drop")
        return Record(tokens_XT, logprobs_XT, self.lengths_X + taken_X,
                      self.finished_X | jnp.any(stop_XK & take_XK, axis=1), self.stopped_X), taken_X


class Forcing(Protocol):
    """A policy that steers which token each row appends: a frozen dataclass (hashable: a static jit argument,
    part of the compile-cache key) with its own state pytree, which `generate` threads through the loop carry.

    check(vocab_size, max_new_tokens): host side, before tracing; raise ValueError naming a bad value.
    init(prompt_XT, prompt_lengths_X) -> state: from each row's right-padded prompt (rows b·R + r).
    __call__(state, record, logits_XV, draw) -> (state, tokens_X): called once per step, first on the prefill's
      logits. `record` holds the tokens appended so far (this step's not yet); `draw(logits_XV) -> tokens_X` is
      the sampler with this step's key, so a policy may mask logits before drawing, replace the drawn token
      (force), or both. `tokens_X` is appended as if sampled, on the rows `record.alive()` (the others take
      none). Its log-prob is recorded from the unmasked logits (`token_logprobs`), forced or not: the model's
      own log-prob, what a teacher-forced forward recomputes, so RL ratios compare against the model, not the
      policy (a forced token may be very unlikely under it).
    """

    def check(self, vocab_size: int, max_new_tokens: int) -> None: ...

    def init(self, prompt_XT: jax.Array, prompt_lengths_X: jax.Array) -> Any: ...

    def __call__(self, state, record: Record, logits_XV: jax.Array, draw) -> tuple[Any, jax.Array]: ...


class Stepper(Protocol):
    """A replacement for generate's one-token decode step (early-exit decoding): a frozen dataclass (hashable:
    part of the compile-cache key) with an accumulator pytree that rides in the loop carry.

    check(cfg): host side, before tracing; raise ValueError naming a bad value.
    init(cfg, X) -> acc: the accumulators for X rows.
    __call__(model, params, tokens_X, state, acc, alive_X) -> (logits_XV, state, acc): feed each row its last
      token (as `decode_step`); alive_X marks rows that still take tokens.
    stats(cfg, stats, acc, lengths_B) -> stats: generate's stats (`sequential_stats`, full-depth FLOPs), amended.
    """

    def check(self, cfg) -> None: ...

    def init(self, cfg, X: int) -> Any: ...

    def __call__(self, model, params, tokens_X, state, acc, alive_X) -> tuple[jax.Array, Any, Any]: ...

    def stats(self, cfg, stats: dict, acc, lengths_B) -> dict: ...


def gather_rows(tree, idx_X):
    """Rows idx_X (axis 0) of every leaf — a Record, logits, per-row ids — as `select` gathers the decode state:
    the loops that branch or reorder rows (tree rollouts, beam search, particle resampling) move both together."""
    return jax.tree.map(lambda x: jnp.take(x, idx_X, axis=0), tree)


def keep_going(record: Record, stop_when, B: int) -> jax.Array:
    """Some row can still take tokens, and the stop predicate does not hold yet."""
    return jnp.any(record.alive()) & ~stop_when(record.finished_X.reshape(B, -1))


def prefill(model, params: DecodeParams, tokens_BT, lengths_B, state: DecodeState):
    """Run right-padded prompts once: (each row's last-position logits [B, V], the state at the true lengths)."""
    out = forward(model, params, tokens_BT, state, logits_at_B=lengths_B - 1)
    return out.logits_BTV[:, 0], truncate(out.state, lengths_B)


def decode_step(model, params: DecodeParams, tokens_X, state: DecodeState, embeds_XD=None, use_embeds_X=None):
    """One token per row: (logits_XV of the next position, state). embeds_XD, on the rows use_embeds_X marks,
    replaces the token's input embedding (soft tokens, lmx.decoding.latent); without it the same program as
    ever."""
    embeds_BTD = None if embeds_XD is None else embeds_XD[:, None]
    use_embeds_BT = None if use_embeds_X is None else use_embeds_X[:, None]
    out = forward(model, params, tokens_X[:, None], state, embeds_BTD=embeds_BTD, use_embeds_BT=use_embeds_BT)
    return out.logits_BTV[:, 0], out.state


def base_stats(cfg, lengths_B, R: int, record: Record, *, model_calls, decode_steps, flops, max_len: int,
               rollback_window: int, overflow_X, state_read=None) -> dict[str, jax.Array]:
    """The stats every decoding algorithm reports (see Generation). state_read: the decode-state bytes the
    positions the loop processed read (lmx.decoding.cost.state_bytes_read summed like the flops); with it the
    stats carry weight_bytes_read (each model call reads the weights once), state_bytes_read and bytes_moved."""
    X = lengths_B.shape[0] * R
    tokens_generated = jnp.sum(record.lengths_X)
    kv_bytes = X * max_len * cost.kv_bytes_per_token(cfg)
    ssm_bytes = X * cost.ssm_state_bytes_per_row(cfg, rollback_window=rollback_window)
    return {
        "tokens_generated": tokens_generated,
        "model_calls": jnp.int32(model_calls),
        "decode_steps": jnp.int32(decode_steps),
        "prompt_tokens": jnp.sum(lengths_B),
        "flops": flops,
        "flops_per_token": flops / jnp.maximum(tokens_generated, 1),
        "kv_bytes": jnp.float32(kv_bytes),
        "ssm_state_bytes": jnp.float32(ssm_bytes),
        "state_bytes": jnp.float32(kv_bytes + ssm_bytes),
        "overflow": jnp.sum(overflow_X, dtype=jnp.int32),
    } | ({} if state_read is None else bytes_stats(cfg, model_calls, state_read))


def sequential_stats(cfg, lengths_B, R: int, record: Record, model_calls, max_len: int, overflow_X):
    """base_stats of a loop that prefills each prompt once, then feeds every row one token per call (generate,
    latent decoding): flops and state bytes of each prompt's positions and of each row's fed tokens (all but its
    last). No rollback window."""
    prompt_len_X = jnp.repeat(lengths_B, R)
    end_X = prompt_len_X + record.lengths_X - 1
    flops = jnp.sum(cost.forward_flops(cfg, 0, lengths_B)) + jnp.sum(cost.forward_flops(cfg, prompt_len_X, end_X))
    read = jnp.sum(cost.state_bytes_read(cfg, 0, lengths_B)) + jnp.sum(cost.state_bytes_read(cfg, prompt_len_X, end_X))
    return base_stats(cfg, lengths_B, R, record, model_calls=model_calls, decode_steps=model_calls - 1, flops=flops,
                      max_len=max_len, rollback_window=0, overflow_X=overflow_X, state_read=read)


def bytes_stats(cfg, model_calls, state_read) -> dict[str, jax.Array]:
    """weight_bytes_read (model_calls · the weights), state_bytes_read, bytes_moved (their sum), float32."""
    weights = jnp.float32(cost.weight_bytes(cfg)) * jnp.asarray(model_calls, jnp.float32)
    state_read = jnp.asarray(state_read, jnp.float32)
    return {"weight_bytes_read": weights, "state_bytes_read": state_read, "bytes_moved": weights + state_read}


def to_generation(record: Record, B: int, stats) -> Generation:
    R, T = record.tokens_XT.shape[0] // B, record.tokens_XT.shape[1]
    return Generation(record.tokens_XT.reshape(B, R, T), record.lengths_X.reshape(B, R),
                      record.logprobs_XT.reshape(B, R, T), record.finished_X.reshape(B, R), stats)


def _int_at_least(name: str, value, low: int) -> int:
    try:
        out = operator.index(value)
    except TypeError:
        out = None
    if out is None or isinstance(value, bool) or out < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    return out


def _host_prompts(prompts, vocab_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Validated prompt rows (true lengths only) and their lengths, from either accepted form."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
        tokens_BT, lengths_B = np.asarray(jax.device_get(prompts[0])), np.asarray(jax.device_get(prompts[1]))
        if tokens_BT.dtype.kind not in "iu" or lengths_B.dtype.kind not in "iu":
            raise ValueError(f"prompt tokens and lengths must be integer arrays, got {tokens_BT.dtype} and "
                             f"{lengths_B.dtype}")
        if lengths_B.shape != tokens_BT.shape[:1]:
            raise ValueError(f"prompt lengths have shape {lengths_B.shape}, expected ({tokens_BT.shape[0]},)")
        T = tokens_BT.shape[1]
        for i, n in enumerate(lengths_B.tolist()):
            if not 1 <= n <= T:
                raise ValueError(f"prompt {i} has length {n}; lengths must lie in [1, {T}] (none empty)")
        rows = [tokens_BT[i, :n] for i, n in enumerate(lengths_B.tolist())]
    else:
        if isinstance(prompts, (str, bytes)) or not len(prompts):
            raise ValueError(f"prompts must be a non-empty list of token-id lists, got {prompts!r:.80}")
        rows = []
        for i, p in enumerate(prompts):
            row = np.asarray(p)
            if row.ndim != 1 or row.size == 0:
                raise ValueError(f"prompt {i} must be a non-empty 1-D list of token ids, got {row.shape=}")
            if row.dtype.kind not in "iu":
                raise ValueError(f"prompt {i} must hold integer token ids, got dtype {row.dtype}")
            rows.append(row)
    if not rows:
        raise ValueError("prompts is empty")
    for i, row in enumerate(rows):
        check_tokens(row, vocab_size, what=f"prompt {i} tokens")
    return rows, np.array([len(r) for r in rows], np.int32)


@dataclass(frozen=True)
class Prepared:
    """Host-side, validated arguments of a decoding call: right-padded prompts (padded to a multiple of
    PROMPT_BUCKET, so nearby lengths share one compilation), their true lengths and the cache size."""

    tokens_BT: np.ndarray
    lengths_B: np.ndarray
    max_new_tokens: int
    num_samples: int
    stop_tokens: tuple[int, ...]
    pad_id: int
    max_len: int


def prepare(cfg, prompts, *, max_new_tokens, sampler, stop_tokens, rng, num_samples, stop_when, max_len, pad_id,
            extra_positions: int = 0) -> Prepared:
    """Validate a decoding call's arguments (clear errors naming the values) and pad its prompts. A loop whose
    calls run up to `extra_positions` past the last kept token (speculative verification) reserves them."""
    max_new_tokens = _int_at_least("max_new_tokens", max_new_tokens, 1)
    num_samples = _int_at_least("num_samples", num_samples, 1)
    if not isinstance(sampler, (Greedy, Sampler)):
        raise TypeError(f"sampler must be Greedy() or Sampler(...), got {sampler!r}")
    if rng is None and not sampler.is_greedy:
        raise ValueError(f"rng is required for {sampler}; only greedy decoding may pass rng=None")
    if not callable(stop_when):
        raise TypeError(f"stop_when must be callable (AllFinished(), MOfRFinished(m)), got {stop_when!r}")
    if isinstance(stop_when, MOfRFinished) and stop_when.m > num_samples:
        raise ValueError(f"MOfRFinished(m={stop_when.m}) can never hold with num_samples={num_samples}")
    stop_tokens = tuple(sorted({operator.index(t) for t in stop_tokens}))
    check_tokens(np.array(stop_tokens, np.int64), cfg.vocab_size, what="stop_tokens")
    pad_id = operator.index(pad_id)
    check_tokens(np.array([pad_id]), cfg.vocab_size, what=f"pad_id={pad_id}")

    rows, lengths_B = _host_prompts(prompts, cfg.vocab_size)
    longest = int(lengths_B.max())
    bucketed = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    need = longest + max_new_tokens + extra_positions
    if max_len is None:
        max_len, origin = min(bucketed + max_new_tokens + extra_positions, cfg.max_seq_len), "the model's max_seq_len"
    else:
        max_len, origin = _int_at_least("max_len", max_len, 1), "max_len"
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
    if need > max_len:
        i = int(np.argmax(lengths_B))
        extra = f" (+{extra_positions} for verification)" if extra_positions else ""
        raise ValueError(f"prompt {i} has {longest} tokens; with max_new_tokens={max_new_tokens}{extra} it needs "
                         f"{need} cache positions, but the cache holds max_len={max_len} ({origin})")
    tokens_BT = np.full((len(rows), min(bucketed, max_len)), pad_id, np.int32)
    for i, row in enumerate(rows):
        tokens_BT[i, : len(row)] = row
    return Prepared(tokens_BT, lengths_B, max_new_tokens, num_samples, stop_tokens, pad_id, max_len)


def generate(
    model, params, prompts, *, max_new_tokens: int,
    sampler: Greedy | Sampler = Greedy(),  # noqa: B008 (frozen dataclasses: immutable defaults)
    stop_tokens=(), rng=None, num_samples: int = 1,
    stop_when=AllFinished(),  # noqa: B008
    max_len: int | None = None, pad_id: int = 0, forcing: Forcing | None = None, stepper: Stepper | None = None,
) -> Generation:
    """Sample `num_samples` continuations of each prompt, up to `max_new_tokens` tokens each.

    prompts: a list of token-id lists (unequal lengths allowed) or a tuple (tokens_BT, lengths_B) of a
      right-padded array and the true lengths.
    stop_tokens: a sample finishes when it emits one of these (it is kept, and counted in lengths_BR).
    rng: a PRNG key; per-step keys are `fold_in(rng, step)`, so the same key gives the same Generation.
      Only greedy samplers may pass None.
    stop_when: a hashable callable finished_BR -> bool scalar, checked after every step (AllFinished,
      MOfRFinished(m)); decoding also stops after max_new_tokens.
    max_len: KV-cache positions; default the bucketed prompt length + max_new_tokens (capped at the model's
      max_seq_len).
    forcing: None, or a `Forcing` policy that may mask or replace each step's token (e.g.
      lmx.decoding.budget.BudgetForcing); None runs exactly the unforced program.
    stepper: None, or a `Stepper` that replaces the one-token decode step (e.g.
      lmx.decoding.early_exit.EarlyExit); None runs exactly the plain program.

    One jit call; compilations are cached on (model, sampler, stop tokens, num_samples, stop_when,
    max_new_tokens, max_len, pad_id, forcing, stepper) and the padded shapes. The params are split per layer once per
    params object (lmx.models.decode_params), not per call.
    """
    p = prepare(model.cfg, prompts, max_new_tokens=max_new_tokens, sampler=sampler, stop_tokens=stop_tokens,
                rng=rng, num_samples=num_samples, stop_when=stop_when, max_len=max_len, pad_id=pad_id)
    if forcing is not None:
        _check_forcing(forcing, model.cfg.vocab_size, p.max_new_tokens)
    if stepper is not None:
        _check_hashable("stepper", stepper, ("check", "init", "__call__", "stats"), "Stepper")
        stepper.check(model.cfg)
    fn = _compiled(model, sampler, p.stop_tokens, p.num_samples, stop_when, p.max_new_tokens, p.max_len, p.pad_id,
                   forcing, stepper)
    return fn(decode_params(model, params), p.tokens_BT, p.lengths_B, jax.random.key(0) if rng is None else rng)


def _check_hashable(what: str, policy, methods: tuple[str, ...], kind: str):
    if not all(callable(getattr(policy, name, None)) for name in methods):
        raise TypeError(f"{what} must be a {kind} ({', '.join(methods)}), got {policy!r:.80}")
    try:
        hash(policy)
    except TypeError:
        raise TypeError(f"{what} must be hashable (a frozen dataclass; it keys the compile cache), got "
                        f"{policy!r:.80}") from None


def _check_forcing(forcing, vocab_size: int, max_new_tokens: int):
    _check_hashable("forcing", forcing, ("check", "init", "__call__"), "Forcing policy")
    forcing.check(vocab_size, max_new_tokens)


_trace_count = 0  # bumped each time the program is traced; tests use it to prove there is no recompilation


@functools.lru_cache(maxsize=64)
def _compiled(model, sampler, stop_tokens, num_samples, stop_when, max_new_tokens, max_len, pad_id, forcing=None,
              stepper=None):
    cfg, R = model.cfg, num_samples
    stop_S = np.array(stop_tokens, np.int32)

    # A stop predicate that settles prompts one by one (MOfRFinished) stops their rows as they settle; AllFinished
    # has nothing to stop early, and keeps the program it always had.
    per_prompt_stop = hasattr(stop_when, "settled") and not isinstance(stop_when, AllFinished)

    def sample_into(record: Record, logits_XV, key, policy_state):
        draw = functools.partial(sample, sampler, rng=key)
        if forcing is None:
            tok_X = draw(logits_XV)
        else:
            policy_state, tok_X = forcing(policy_state, record, logits_XV, draw)
        logprob_X = token_logprobs(sampler, logits_XV, tok_X)  # the model's, unmasked (see Forcing)
        record, _ = record.append(tok_X[:, None], logprob_X[:, None], jnp.ones_like(tok_X), stop_S, pad_id)
        if per_prompt_stop:
            record = record.settle(stop_when, record.finished_X.shape[0] // R)
        return record, tok_X, policy_state

    def run(params, tokens_BT, lengths_B, rng) -> Generation:
        global _trace_count
        _trace_count += 1
        B = tokens_BT.shape[0]
        X = B * R
        # Prefill each prompt once, then share it R ways. No rollback window: generate never rolls back past its
        # prefill, so each SSM layer keeps one state slot, updated in place every step.
        logits_BV, state = prefill(model, params, tokens_BT, lengths_B, init_state(cfg, B, max_len,
                                                                                  rollback_window=0))
        # The forcing policy's state rides in the carry; () (no leaves) without one, so that program is unchanged.
        policy_state = () if forcing is None else forcing.init(jnp.repeat(tokens_BT, R, axis=0),
                                                               jnp.repeat(lengths_B, R))
        record, last_X, policy_state = sample_into(Record.empty(X, max_new_tokens, pad_id),
                                                   jnp.repeat(logits_BV, R, axis=0), jax.random.fold_in(rng, 0),
                                                   policy_state)

        def body(carry):
            step, state, last_X, record, policy_state, step_state = carry
            # Finished rows are fed too (static shapes); `append` ignores what they sample.
            if stepper is None:
                logits_XV, state = decode_step(model, params, last_X, state)
            else:
                logits_XV, state, step_state = stepper(model, params, last_X, state, step_state, record.alive())
            record, last_X, policy_state = sample_into(record, logits_XV, jax.random.fold_in(rng, step),
                                                       policy_state)
            return step + 1, state, last_X, record, policy_state, step_state

        cond = lambda carry: keep_going(carry[3], stop_when, B)
        step_state = () if stepper is None else stepper.init(cfg, X)
        step, state, _, record, _, step_state = jax.lax.while_loop(
            cond, body, (jnp.int32(1), repeat(state, R), last_X, record, policy_state, step_state))

        stats = sequential_stats(cfg, lengths_B, R, record, step, max_len, state.overflow_B)
        if stepper is not None:
            stats = stepper.stats(cfg, stats, step_state, lengths_B)
        return to_generation(record, B, stats)

    return jax.jit(run)
