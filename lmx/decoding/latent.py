"""Latent reasoning (ALGORITHMS.md §5): decode the thinking span with soft tokens, mixtures of input embeddings.

- `SoftThinking` (soft tokens, arXiv 2509.19170), quoting §5: "input h̃_t = softmax(logits_{t−1}/τ)·E + σN(0,I)".
  While a row is inside its thinking block each step feeds h̃_t (E the input embedding table) instead of the
  sampled token's embedding.
- `ThinkRouter` (arXiv 2602.11683), quoting §5: "emit a discrete token if p_max < τ, else feed the soft
  embedding Σ p_v e_v". Per thinking step: p_max < `threshold` feeds the sampler's token, p_max >= `threshold`
  the soft embedding (p = softmax(logits/τ), the distribution h̃ mixes).

`latent_generate` is one jitted program built from generate.py's pieces (prepare, prefill, decode_step with its
embeddings, Record, keep_going, base_stats, to_generation); outside the thinking block it decodes exactly like
`generate`, with the sampler and the same per-step keys.

What the Record holds for a soft step: the argmax token of that step's logits (ties: the lowest id), and its
log-prob under the sampler's tempered, untruncated distribution (sampling.token_logprobs; log_softmax(logits) for
Greedy), as for any token. The model was fed h̃, not that token, so a teacher-forced forward on the recorded
tokens does not recompute these log-probs. The closing delimiter is fed as its token (it ends the span), and a
row's thinking block is the first one, as in lmx.decoding.budget (a prompt ending inside an open block starts the
row thinking).
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from lmx.data.tokenizer import CharTokenizer
from lmx.decoding.budget import CLOSED, OUTSIDE, THINKING, BudgetForcing
from lmx.decoding.generate import (
    AllFinished,
    Generation,
    Record,
    decode_step,
    keep_going,
    prefill,
    prepare,
    sequential_stats,
    to_generation,
)
from lmx.decoding.sampling import Greedy, Sampler, sample, token_logprobs
from lmx.models.lm import decode_params
from lmx.models.state import init_state, repeat

_CHAR = CharTokenizer()


@dataclass(frozen=True, kw_only=True)
class SoftThinking:
    """Soft tokens inside the thinking block: feed h̃_t = softmax(logits_{t−1}/τ)·E + σN(0,I).

    temperature: τ > 0 (τ → 0 feeds the argmax token's embedding: greedy decoding).
    noise_std: σ >= 0 of the Gaussian input noise (0: none), drawn from the call's rng, per step.
    think_open / think_close: the delimiter ids of the thinking block.
    """

    temperature: float = 0.5
    noise_std: float = 0.0
    think_open: int = _CHAR.think_id
    think_close: int = _CHAR.end_think_id

    def __post_init__(self):
        name = type(self).__name__

        def put(field, cast, ok, rule):
            value = getattr(self, field)
            try:
                out = cast(value)
            except (TypeError, ValueError):
                out = None
            if out is None or isinstance(value, (bool, str)) or not ok(out):  # written so that NaN fails
                raise ValueError(f"{name}.{field}={value!r} must be {rule}")
            object.__setattr__(self, field, out)  # plain Python numbers: hashable static arguments

        put("temperature", float, lambda t: 0 < t < math.inf, "finite and > 0")
        put("noise_std", float, lambda s: 0 <= s < math.inf, "finite and >= 0")
        put("think_open", operator.index, lambda i: i >= 0, "a token id (an int >= 0)")
        put("think_close", operator.index, lambda i: i >= 0, "a token id (an int >= 0)")
        if self.think_open == self.think_close:
            raise ValueError(f"{name}.think_open and think_close are both {self.think_open}")

    def check(self, vocab_size: int) -> None:
        for field in ("think_open", "think_close"):
            if getattr(self, field) >= vocab_size:
                raise ValueError(f"{type(self).__name__}.{field}={getattr(self, field)} is outside the vocabulary "
                                 f"[0, {vocab_size})")

    def route_soft(self, p_XV):
        """Which thinking rows feed the soft embedding this step: all of them."""
        return jnp.ones(p_XV.shape[:1], bool)


@dataclass(frozen=True, kw_only=True)
class ThinkRouter(SoftThinking):
    """ThinkRouter: a thinking step feeds the sampler's discrete token if p_max < threshold, else the soft
    embedding (p = softmax(logits/τ)). threshold = 0 routes every step soft (SoftThinking); > 1 every step
    discrete (plain decoding)."""

    threshold: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        try:
            value = float(self.threshold)
        except (TypeError, ValueError):
            value = None
        if value is None or isinstance(self.threshold, (bool, str)) or not 0 <= value < math.inf:
            raise ValueError(f"ThinkRouter.threshold={self.threshold!r} must be finite and >= 0")
        object.__setattr__(self, "threshold", value)

    def route_soft(self, p_XV):
        return jnp.max(p_XV, axis=-1) >= self.threshold


def latent_generate(
    model, params, prompts, *, max_new_tokens: int,
    mode: SoftThinking = SoftThinking(),  # noqa: B008 (frozen dataclasses: immutable defaults)
    sampler: Greedy | Sampler = Greedy(),  # noqa: B008
    stop_tokens=(), rng=None, num_samples: int = 1,
    stop_when=AllFinished(),  # noqa: B008
    max_len: int | None = None, pad_id: int = 0,
) -> Generation:
    """`generate` with the thinking span decoded by `mode` (SoftThinking or ThinkRouter); the arguments are
    generate's. rng is required when the sampler is not greedy or mode.noise_std > 0.

    Generation.stats: generate's keys (see Generation) plus soft_steps, the recorded tokens that were fed as soft
    embeddings (flops exclude the p·E mixing, 2·V·D per soft step).
    """
    if not isinstance(mode, SoftThinking):
        raise TypeError(f"mode must be SoftThinking(...) or ThinkRouter(...), got {mode!r:.80}")
    mode.check(model.cfg.vocab_size)
    if rng is None and mode.noise_std > 0:
        raise ValueError(f"rng is required for noise_std={mode.noise_std}")
    p = prepare(model.cfg, prompts, max_new_tokens=max_new_tokens, sampler=sampler, stop_tokens=stop_tokens,
                rng=rng, num_samples=num_samples, stop_when=stop_when, max_len=max_len, pad_id=pad_id)
    fn = _compiled(model, mode, sampler, p.stop_tokens, p.num_samples, stop_when, p.max_new_tokens, p.max_len,
                   p.pad_id)
    return fn(decode_params(model, params), p.tokens_BT, p.lengths_B, jax.random.key(0) if rng is None else rng)


@functools.lru_cache(maxsize=32)
def _compiled(model, mode, sampler, stop_tokens, num_samples, stop_when, max_new_tokens, max_len, pad_id):
    cfg, R = model.cfg, num_samples
    stop_S = np.array(stop_tokens, np.int32)

    def choose(params, record, phase_X, soft_steps, logits_XV, key):
        """Record this step's token; return what the next step feeds (token, embedding, which rows use it)."""
        p_XV = jax.nn.softmax(logits_XV / mode.temperature, axis=-1)
        routed_X = (phase_X == THINKING) & mode.route_soft(p_XV)
        # The sampler draws with generate's key on every row, so discrete steps match generate's exactly.
        tok_X = jnp.where(routed_X, jnp.argmax(logits_XV, axis=-1).astype(jnp.int32), sample(sampler, logits_XV,
                                                                                              key))
        soft_X = routed_X & (tok_X != mode.think_close)  # the close delimiter ends the span: fed as a token
        logprob_X = token_logprobs(sampler, logits_XV, tok_X)
        record, taken_X = record.append(tok_X[:, None], logprob_X[:, None], jnp.ones_like(tok_X), stop_S, pad_id)
        took_X = taken_X > 0
        opens_X = (phase_X == OUTSIDE) & (tok_X == mode.think_open)
        closes_X = (phase_X == THINKING) & (tok_X == mode.think_close)
        phase_X = jnp.where(took_X & opens_X, THINKING, jnp.where(took_X & closes_X, CLOSED, phase_X))
        E_VD = params.rest["embed"]["embedding"].astype(jnp.float32)
        e_XD = jnp.einsum("XV,VD->XD", p_XV, E_VD, precision=jax.lax.Precision.HIGHEST)
        if mode.noise_std > 0:  # static: no noise, no draw
            e_XD = e_XD + mode.noise_std * jax.random.normal(jax.random.fold_in(key, 1), e_XD.shape)
        soft_steps = soft_steps + jnp.sum(soft_X & took_X, dtype=jnp.int32)
        return record, phase_X, soft_steps, (tok_X, e_XD.astype(jnp.dtype(cfg.dtype)), soft_X)

    def run(params, tokens_BT, lengths_B, rng) -> Generation:
        B = tokens_BT.shape[0]
        X = B * R
        logits_BV, state = prefill(model, params, tokens_BT, lengths_B, init_state(cfg, B, max_len,
                                                                                  rollback_window=0))
        phase_X = BudgetForcing(think_open=mode.think_open, think_close=mode.think_close).init(
            jnp.repeat(tokens_BT, R, axis=0), jnp.repeat(lengths_B, R)).phase_X
        record, phase_X, soft_steps, feed = choose(params, Record.empty(X, max_new_tokens, pad_id), phase_X,
                                                   jnp.int32(0), jnp.repeat(logits_BV, R, axis=0),
                                                   jax.random.fold_in(rng, 0))

        def body(carry):
            step, state, feed, record, phase_X, soft_steps = carry
            logits_XV, state = decode_step(model, params, feed[0], state, feed[1], feed[2])
            record, phase_X, soft_steps, feed = choose(params, record, phase_X, soft_steps, logits_XV,
                                                       jax.random.fold_in(rng, step))
            return step + 1, state, feed, record, phase_X, soft_steps

        cond = lambda carry: keep_going(carry[3], stop_when, B)
        step, state, _, record, _, soft_steps = jax.lax.while_loop(
            cond, body, (jnp.int32(1), repeat(state, R), feed, record, phase_X, soft_steps))

        stats = sequential_stats(cfg, lengths_B, R, record, step, max_len, state.overflow_B)  # as generate's
        return to_generation(record, B, stats | {"soft_steps": soft_steps})

    return jax.jit(run)
