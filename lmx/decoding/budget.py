"""Thinking-budget control (ALGORITHMS.md §3) inside `generate`'s jitted loop, through its `forcing` hook.

- `BudgetForcing` (s1, arXiv 2501.19393). Cap: once a row has `max_thinking` thinking tokens, force the
  end-of-thinking delimiter, then the answer prefix. Extend: when the model draws end-of-thinking before
  `min_thinking` thinking tokens (or the first `extend_times` times), append the continuation ("Wait") instead.
- `no_thinking_prompts` (NoThinking, arXiv 2504.09858): prefill a closed thinking block, so the model decodes
  the answer directly.

Thinking tokens are those strictly after the opening delimiter, up to the closing one (the first block, like
lmx.train.rewards.count_between); a prompt that ends inside an open block (s1's prompts end in "<think>")
starts the row thinking, with the block's prompt tokens counted. Forced runs (close + answer prefix, or the
continuation) are several tokens long: each row keeps a pointer into one static table of forced tokens.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lmx.data.tokenizer import CharTokenizer
from lmx.decoding.generate import Record, _host_prompts

_CHAR = CharTokenizer()
OUTSIDE, THINKING, CLOSED = 0, 1, 2  # a row's phase; CLOSED is final (one thinking block per row)


def _token_id(name: str, value) -> int:
    try:
        out = operator.index(value)
    except TypeError:
        out = None
    if out is None or isinstance(value, bool) or out < 0:
        raise ValueError(f"BudgetForcing.{name}={value!r} must be a token id (an int >= 0)")
    return out


def _count(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    try:
        out = operator.index(value)
    except TypeError:
        out = None
    if out is None or isinstance(value, bool) or out < 0:
        raise ValueError(f"BudgetForcing.{name}={value!r} must be an int >= 0"
                         + (" (or None: no cap)" if allow_none else ""))
    return out


@flax.struct.dataclass
class BudgetState:
    """Per row: phase (OUTSIDE / THINKING / CLOSED), thinking tokens so far, extensions used, and the pending
    forced tokens: table positions [next_X, end_X)."""

    phase_X: jax.Array
    thinking_X: jax.Array
    extended_X: jax.Array
    next_X: jax.Array
    end_X: jax.Array


@dataclass(frozen=True)
class BudgetForcing:
    """s1 budget forcing, a `generate(..., forcing=...)` policy (lmx.decoding.generate.Forcing).

    max_thinking: the cap N (None: no cap). A row never holds more than N thinking tokens: at N the close
      delimiter is forced (at position open + N + 1), then `answer_prefix`; a pending continuation is dropped.
    min_thinking / extend_times (at most one of them > 0): while a row has fewer than min_thinking thinking
      tokens, or for its first extend_times attempts, a drawn close delimiter is replaced by `continuation`
      (its tokens count as thinking). A close the model draws after that ends thinking with no answer prefix.
    """

    max_thinking: int | None = None
    think_open: int = _CHAR.think_id
    think_close: int = _CHAR.end_think_id
    answer_prefix: tuple[int, ...] = (_CHAR.answer_id,)
    min_thinking: int = 0
    extend_times: int = 0
    continuation: tuple[int, ...] = ()

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # normalised: hashable plain ints
        put("max_thinking", _count("max_thinking", self.max_thinking, allow_none=True))
        put("min_thinking", _count("min_thinking", self.min_thinking))
        put("extend_times", _count("extend_times", self.extend_times))
        put("think_open", _token_id("think_open", self.think_open))
        put("think_close", _token_id("think_close", self.think_close))
        for name in ("answer_prefix", "continuation"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"BudgetForcing.{name}={value!r} must be a sequence of token ids")
            put(name, tuple(_token_id(f"{name}[{i}]", t) for i, t in enumerate(value)))
        if self.think_open == self.think_close:
            raise ValueError(f"BudgetForcing.think_open and think_close are both {self.think_open}")
        for name in ("answer_prefix", "continuation"):
            clash = sorted({self.think_open, self.think_close} & set(getattr(self, name)))
            if clash:
                raise ValueError(f"BudgetForcing.{name}={getattr(self, name)} contains the thinking delimiter(s) "
                                 f"{clash}")
        if self.min_thinking and self.extend_times:
            raise ValueError(f"BudgetForcing: set min_thinking={self.min_thinking} or extend_times="
                             f"{self.extend_times}, not both")
        if (self.min_thinking or self.extend_times) and not self.continuation:
            raise ValueError("BudgetForcing: extension (min_thinking or extend_times > 0) needs continuation "
                             "token(s), e.g. the ids of 'Wait'")
        if self.max_thinking is not None and self.min_thinking > self.max_thinking:
            raise ValueError(f"BudgetForcing.min_thinking={self.min_thinking} exceeds max_thinking="
                             f"{self.max_thinking}")

    @classmethod
    def from_tokenizer(cls, tok, max_thinking: int | None = None, *, min_thinking: int = 0, extend_times: int = 0,
                       continuation: str = "Wait", answer_prefix: str | None = None) -> BudgetForcing:
        """Delimiters from a tokenizer (think_id, end_think_id); answer prefix `answer_id` unless given as text."""
        prefix = (tok.answer_id,) if answer_prefix is None else tuple(tok.encode(answer_prefix))
        return cls(max_thinking, tok.think_id, tok.end_think_id, prefix, min_thinking, extend_times,
                   tuple(tok.encode(continuation)))

    @property
    def _table(self) -> tuple[int, ...]:
        """Every forced token: the cap's run [0, cap_len), then the continuation."""
        return (self.think_close, *self.answer_prefix, *self.continuation)

    def check(self, vocab_size: int, max_new_tokens: int) -> None:
        for name in ("think_open", "think_close", "answer_prefix", "continuation"):
            ids = np.atleast_1d(getattr(self, name))
            if ids.size and ids.max() >= vocab_size:
                raise ValueError(f"BudgetForcing.{name}={getattr(self, name)} has ids outside the vocabulary "
                                 f"(size {vocab_size})")
        cap_len = 1 + len(self.answer_prefix)
        if self.max_thinking is not None and max_new_tokens < cap_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} cannot hold the forced close delimiter and answer "
                             f"prefix ({cap_len} tokens)")

    def init(self, prompt_XT, prompt_lengths_X) -> BudgetState:
        """A row starts THINKING iff its prompt's last delimiter is an open one (its tokens after it count)."""
        t_T = jnp.arange(prompt_XT.shape[1])
        inside_XT = t_T < prompt_lengths_X[:, None]
        last = lambda tok: jnp.max(jnp.where((prompt_XT == tok) & inside_XT, t_T, -1), axis=1)
        open_X, close_X = last(self.think_open), last(self.think_close)
        thinking_X = open_X > close_X
        zeros_X = jnp.zeros_like(prompt_lengths_X, jnp.int32)
        return BudgetState(phase_X=jnp.where(thinking_X, THINKING, OUTSIDE).astype(jnp.int32),
                           thinking_X=jnp.where(thinking_X, prompt_lengths_X - 1 - open_X, 0).astype(jnp.int32),
                           extended_X=zeros_X, next_X=zeros_X, end_X=zeros_X)

    def __call__(self, s: BudgetState, record: Record, logits_XV, draw) -> tuple[BudgetState, jax.Array]:
        table_S = jnp.array(self._table, jnp.int32)
        cap_len, table_len = 1 + len(self.answer_prefix), len(self._table)
        drawn_X = draw(logits_XV)
        thinking_X = s.phase_X == THINKING
        # Priority: the cap, then a pending forced run, then an extension of a drawn close delimiter.
        cap_X = thinking_X & (s.thinking_X >= (jnp.inf if self.max_thinking is None else self.max_thinking))
        pending_X = ~cap_X & (s.next_X < s.end_X)
        more_X = (s.thinking_X < self.min_thinking) | (s.extended_X < self.extend_times)
        extend_X = thinking_X & ~cap_X & ~pending_X & (drawn_X == self.think_close) & more_X
        start_X = jnp.where(cap_X, 0, jnp.where(extend_X, cap_len, s.next_X))
        end_X = jnp.where(cap_X, cap_len, jnp.where(extend_X, table_len, s.end_X))
        forced_X = cap_X | pending_X | extend_X
        tok_X = jnp.where(forced_X, table_S[jnp.minimum(start_X, table_len - 1)], drawn_X)
        # Track the appended token (only rows that can still take one do).
        live_X = record.alive()
        opens_X = (s.phase_X == OUTSIDE) & (tok_X == self.think_open)
        closes_X = thinking_X & (tok_X == self.think_close)
        phase_X = jnp.where(opens_X, THINKING, jnp.where(closes_X, CLOSED, s.phase_X))
        return BudgetState(
            phase_X=jnp.where(live_X, phase_X, s.phase_X),
            thinking_X=s.thinking_X + (live_X & thinking_X & ~closes_X),
            extended_X=s.extended_X + (live_X & extend_X),
            next_X=start_X + forced_X, end_X=end_X,
        ), tok_X


def no_thinking_prompts(prompts, tok, filler: str = "") -> list[list[int]]:
    """NoThinking: each prompt (token-id lists, or generate's (tokens_BT, lengths_B)) followed by a closed
    thinking block, `<think>{filler}</think>` (the paper's filler: "Okay, I think I have finished thinking.");
    a prompt already ending in `<think>` gets only the filler and the close."""
    rows, _ = _host_prompts(prompts, tok.vocab_size)
    filler_ids = tok.encode(filler)
    if {tok.think_id, tok.end_think_id} & set(filler_ids):
        raise ValueError(f"no_thinking_prompts filler={filler!r} contains a thinking delimiter")
    return [row.tolist() + ([] if row[-1] == tok.think_id else [tok.think_id]) + filler_ids + [tok.end_think_id]
            for row in rows]
