"""`generate`: one jitted program that prefills every prompt once, shares that prefix across R samples, then
decodes in a `lax.while_loop` that exits as soon as a stop predicate holds.

Inside the program the B prompts × R samples are flattened into X = B·R rows, row b·R + r (the order of
`lmx.models.repeat`). The host side (plain Python) validates and pads prompts before anything is traced.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lmx.decoding import cost
from lmx.decoding.sampling import Greedy, Sampler, sample, token_logprobs
from lmx.models.lm import check_tokens, unstack_layers
from lmx.models.state import init_state, repeat, truncate

PROMPT_BUCKET = 16  # prompts are padded to a multiple of this, so nearby lengths share one compilation


@dataclass(frozen=True)
class AllFinished:
    """Stop when every sample of every prompt has emitted a stop token."""

    def __call__(self, finished_BR):
        return jnp.all(finished_BR)


@dataclass(frozen=True)
class MOfRFinished:
    """Stop when every prompt has at least m finished samples: m=1 is first-finish search, m>1 short-m@k."""

    m: int

    def __post_init__(self):
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ValueError(f"MOfRFinished.m={self.m!r} must be an int >= 1")

    def __call__(self, finished_BR):
        return jnp.all(jnp.sum(finished_BR, axis=-1) >= self.m)


@flax.struct.dataclass
class Generation:
    tokens_BRT: jax.Array  # int32 [B, R, max_new_tokens]; pad_id after a sample finished or the loop stopped
    lengths_BR: jax.Array  # int32: tokens generated per sample, the stop token included
    logprobs_BRT: jax.Array  # float32: log-prob of each token (see sampling.token_logprobs); 0 where padded
    finished_BR: jax.Array  # bool: the sample emitted a stop token
    # 0-d arrays. tokens_generated, model_calls (prefill = 1), decode_steps, prompt_tokens (once per prompt);
    # flops: forward FLOPs the generation needs (each prompt once, then one position per generated token
    # but the last; excludes padding and the masked work on finished rows), flops_per_token = flops /
    # tokens_generated; kv_bytes: bytes of the KV cache allocated for all B·R rows; ssm_state_bytes: the SSM
    # layers' state for all rows (constant in length; one state slot per layer, no rollback window);
    # state_bytes: their sum (see lmx.decoding.cost).
    stats: dict[str, jax.Array]


@flax.struct.dataclass
class _Loop:
    step: jax.Array  # tokens sampled so far (per row, all rows move together)
    state: object  # DecodeState over X rows
    last_X: jax.Array  # the token fed to the next model call
    tokens_XT: jax.Array
    logprobs_XT: jax.Array
    lengths_X: jax.Array
    finished_X: jax.Array


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


def generate(
    model, params, prompts, *, max_new_tokens: int,
    sampler: Greedy | Sampler = Greedy(),  # noqa: B008 (frozen dataclasses: immutable defaults)
    stop_tokens=(), rng=None, num_samples: int = 1,
    stop_when=AllFinished(),  # noqa: B008
    max_len: int | None = None, pad_id: int = 0,
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

    One jit call; compilations are cached on (model, sampler, stop tokens, num_samples, stop_when,
    max_new_tokens, max_len, pad_id) and the padded shapes.
    """
    cfg = model.cfg
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
    if max_len is None:
        max_len, origin = min(bucketed + max_new_tokens, cfg.max_seq_len), "the model's max_seq_len"
    else:
        max_len, origin = _int_at_least("max_len", max_len, 1), "max_len"
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
    if longest + max_new_tokens > max_len:
        i = int(np.argmax(lengths_B))
        raise ValueError(f"prompt {i} has {longest} tokens; with max_new_tokens={max_new_tokens} it needs "
                         f"{longest + max_new_tokens} cache positions, but the cache holds max_len={max_len} "
                         f"({origin})")
    tokens_BT = np.full((len(rows), min(bucketed, max_len)), pad_id, np.int32)
    for i, row in enumerate(rows):
        tokens_BT[i, : len(row)] = row

    fn = _compiled(model, sampler, stop_tokens, num_samples, stop_when, max_new_tokens, max_len, pad_id)
    return fn(params, tokens_BT, lengths_B, jax.random.key(0) if rng is None else rng)


_trace_count = 0  # bumped each time the program is traced; tests use it to prove there is no recompilation


@functools.lru_cache(maxsize=64)
def _compiled(model, sampler, stop_tokens, num_samples, stop_when, max_new_tokens, max_len, pad_id):
    cfg, R = model.cfg, num_samples
    stop_S = np.array(stop_tokens, np.int32)

    def record(loop: _Loop, logits_XV, rng) -> _Loop:
        """Sample position `loop.step` for every row; rows already finished record pad and log-prob 0."""
        tok_X = sample(sampler, logits_XV, jax.random.fold_in(rng, loop.step))
        logprob_X = token_logprobs(sampler, logits_XV, tok_X)
        alive_X = ~loop.finished_X
        tok_X = jnp.where(alive_X, tok_X, pad_id)
        stopped_X = jnp.isin(tok_X, stop_S) if stop_tokens else jnp.zeros_like(alive_X)
        return loop.replace(
            step=loop.step + 1,
            last_X=tok_X,
            tokens_XT=loop.tokens_XT.at[:, loop.step].set(tok_X),
            logprobs_XT=loop.logprobs_XT.at[:, loop.step].set(jnp.where(alive_X, logprob_X, 0.0)),
            lengths_X=loop.lengths_X + alive_X,
            finished_X=loop.finished_X | (alive_X & stopped_X),
        )

    def run(params, tokens_BT, lengths_B, rng) -> Generation:
        global _trace_count
        _trace_count += 1
        B = tokens_BT.shape[0]
        X = B * R

        # Prefill each prompt once (right-padded, so roll back to the true lengths), then share it R ways.
        # The decode layout (see unstack_layers) serves the prefill and the loop; params already in it are not
        # copied. No rollback_window: generate never rolls back past its prefill (the truncate below folds the
        # pending prefill), so each SSM layer keeps one state slot, updated in place every step.
        step_params = unstack_layers(params)
        out = model.apply({"params": step_params}, tokens_BT, state=init_state(cfg, B, max_len, rollback_window=0),
                          logits_at_B=lengths_B - 1)
        last_logits_BV = out.logits_BTV[:, 0]
        state = repeat(truncate(out.state, lengths_B), R)
        loop = _Loop(
            step=jnp.int32(0), state=state, last_X=jnp.zeros((X,), jnp.int32),
            tokens_XT=jnp.full((X, max_new_tokens), pad_id, jnp.int32),
            logprobs_XT=jnp.zeros((X, max_new_tokens), jnp.float32),
            lengths_X=jnp.zeros((X,), jnp.int32), finished_X=jnp.zeros((X,), bool),
        )
        loop = record(loop, jnp.repeat(last_logits_BV, R, axis=0), rng)

        def keep_going(loop: _Loop):
            return (loop.step < max_new_tokens) & ~stop_when(loop.finished_X.reshape(B, R))

        def decode_step(loop: _Loop) -> _Loop:
            # Finished rows are fed too (static shapes); their outputs are masked in `record`.
            out = model.apply({"params": step_params}, loop.last_X[:, None], state=loop.state)
            return record(loop.replace(state=out.state), out.logits_BTV[:, 0], rng)

        loop = jax.lax.while_loop(keep_going, decode_step, loop)

        prompt_len_X = jnp.repeat(lengths_B, R)
        tokens_generated = jnp.sum(loop.lengths_X)
        flops = (jnp.sum(cost.forward_flops(cfg, 0, lengths_B))
                 + jnp.sum(cost.forward_flops(cfg, prompt_len_X, prompt_len_X + loop.lengths_X - 1)))
        kv_bytes = X * max_len * cost.kv_bytes_per_token(cfg)
        ssm_bytes = X * cost.ssm_state_bytes_per_row(cfg, rollback_window=0)
        stats = {
            "tokens_generated": tokens_generated,
            "model_calls": loop.step,  # the prefill, then one call per token after the first
            "decode_steps": loop.step - 1,
            "prompt_tokens": jnp.sum(lengths_B),
            "flops": flops,
            "flops_per_token": flops / jnp.maximum(tokens_generated, 1),
            "kv_bytes": jnp.float32(kv_bytes),
            "ssm_state_bytes": jnp.float32(ssm_bytes),
            "state_bytes": jnp.float32(kv_bytes + ssm_bytes),
        }
        return Generation(
            tokens_BRT=loop.tokens_XT.reshape(B, R, max_new_tokens),
            lengths_BR=loop.lengths_X.reshape(B, R),
            logprobs_BRT=loop.logprobs_XT.reshape(B, R, max_new_tokens),
            finished_BR=loop.finished_X.reshape(B, R),
            stats=stats,
        )

    return jax.jit(run)
