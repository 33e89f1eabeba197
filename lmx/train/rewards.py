"""Rewards for RL, registered by name: correctness, format and the length-aware (efficient-reasoning) family.

Contract (DESIGN §3 Training). A reward is `fn(inputs: RewardInputs, config) -> Float[B, R]`: B prompts, R samples
per prompt (the papers' group size G is R). `RewardInputs` carries `[B, R]` arrays — scores from `Task.score`
(computed on the host, see `score_completions`), token lengths, an optional validity mask — plus optional
per-prompt budgets `[B]`, thinking-span lengths `[B, R]`, completion tokens `[B, R, T]` and reference statistics.
Every reward is a pure jnp function of these, so `compute_rewards` can run under `jax.jit` (configs are frozen,
hashable dataclasses: pass them as static arguments).

Conventions every reward follows:
- **Lengths are tokens**, counted up to and including the stop token (the `lengths_BR` of `Generation`), never
  characters. A reward configured with `length="think"` uses `think_lengths_BR` instead: the number of tokens
  strictly between the opening and closing think delimiters (`count_between`), which `make_reward_inputs` fills in.
- **Correct** means `score >= correct_threshold` (default 1.0: the built-in verifiers return exactly 0 or 1).
- **Padding** (`mask_BR` False; by default rows of length 0) never enters a group mean, min, max, std or
  denominator, and gets reward 0 (every reward returns 0 there; `compute_rewards` enforces it for any reward).
- **NaN scores pass through**: a valid row whose score is NaN ("unscorable", e.g. the verifier failed) gets a NaN
  reward from every reward that uses the score, and `compute_rewards` keeps the NaN in the total. The advantage
  estimator treats NaN rewards as unscorable (advantage 0) and counts them. Unscorable rows are left out of the
  accuracy statistics (Ā, "shortest correct"); their lengths still count in length statistics.

Registered names: see `available_rewards()`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lmx.data.tokenizer import CharTokenizer

Array = jax.Array
RewardFn = Callable[["RewardInputs", Any], Array]

_CHAR = CharTokenizer()
THINK_ID, END_THINK_ID, ANSWER_ID, END_ANSWER_ID, EOS_ID = (
    _CHAR.think_id, _CHAR.end_think_id, _CHAR.answer_id, _CHAR.end_answer_id, _CHAR.eos_id)


# ----------------------------------------------------------------------------------------------------------------
# Inputs and host-side helpers


@flax.struct.dataclass
class RewardInputs:
    """What rewards see; a pytree, so it can cross `jax.jit`.

    scores_BR: `Task.score` per completion, in [0, 1]; NaN = unscorable.
    lengths_BR: completion length in tokens, stop token included.
    mask_BR: valid (non-padding) rows; None means `lengths_BR > 0`.
    budgets_B: per-prompt token budget n_gold (L1/LCPO "Think for N tokens.").
    think_lengths_BR: tokens strictly between the think delimiters (`count_between`).
    tokens_BRT: the completion tokens (the format reward reads them).
    ref_lengths_B, ref_accuracy_B: O1-Pruner's pre-sampled reference statistics L̄_ref, Ā_ref.
    """

    scores_BR: Array
    lengths_BR: Array
    mask_BR: Array | None = None
    budgets_B: Array | None = None
    think_lengths_BR: Array | None = None
    tokens_BRT: Array | None = None
    ref_lengths_B: Array | None = None
    ref_accuracy_B: Array | None = None

    @property
    def valid_BR(self) -> Array:
        lengths = jnp.asarray(self.lengths_BR)
        return lengths > 0 if self.mask_BR is None else jnp.asarray(self.mask_BR, bool)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.scores_BR))


def count_between(tokens_BRT, lengths_BR, open_id: int = THINK_ID, close_id: int = END_THINK_ID) -> Array:
    """Tokens strictly between the first `open_id` and the first `close_id` after it, within each row's length.

    No opening delimiter → 0. Opened but never closed (truncated mid-thought) → every token after the opening
    one up to the row's length. Returns int32 `[B, R]`."""
    tokens_BRT = jnp.asarray(tokens_BRT)
    T = tokens_BRT.shape[-1]
    t_T = jnp.arange(T)
    inside_BRT = t_T < jnp.asarray(lengths_BR)[..., None]
    first_open_BR = jnp.where((tokens_BRT == open_id) & inside_BRT, t_T, T).min(-1)
    after_open_BRT = t_T > first_open_BR[..., None]
    first_close_BR = jnp.where((tokens_BRT == close_id) & inside_BRT & after_open_BRT, t_T, T).min(-1)
    span_BRT = inside_BRT & after_open_BRT & (t_T < first_close_BR[..., None])
    return span_BRT.sum(-1).astype(jnp.int32)


def make_reward_inputs(scores_BR, tokens_BRT, lengths_BR, *, budgets_B=None, mask_BR=None,
                       ref_lengths_B=None, ref_accuracy_B=None,
                       think_ids: tuple[int, int] = (THINK_ID, END_THINK_ID)) -> RewardInputs:
    """`RewardInputs` from rollouts: thinking spans are counted in tokens between `think_ids` (`count_between`)."""
    return RewardInputs(
        scores_BR=jnp.asarray(scores_BR, jnp.float32), lengths_BR=jnp.asarray(lengths_BR, jnp.int32),
        mask_BR=None if mask_BR is None else jnp.asarray(mask_BR, bool),
        budgets_B=None if budgets_B is None else jnp.asarray(budgets_B, jnp.float32),
        think_lengths_BR=count_between(tokens_BRT, lengths_BR, *think_ids), tokens_BRT=jnp.asarray(tokens_BRT),
        ref_lengths_B=None if ref_lengths_B is None else jnp.asarray(ref_lengths_B, jnp.float32),
        ref_accuracy_B=None if ref_accuracy_B is None else jnp.asarray(ref_accuracy_B, jnp.float32))


def decode_completions(tokenizer, tokens_BRT, lengths_BR) -> list[list[str]]:
    """Host side: each completion's text, its first `lengths_BR[b, r]` tokens (stop token included)."""
    tokens_BRT, lengths_BR = np.asarray(tokens_BRT), np.asarray(lengths_BR)
    B, R = lengths_BR.shape
    return [[tokenizer.decode(tokens_BRT[b, r, : int(lengths_BR[b, r])].tolist()) for r in range(R)]
            for b in range(B)]


def score_completions(task, problems: Sequence, completions_BR: Sequence[Sequence[str]], *,
                      mask_BR=None, on_error: Literal["raise", "nan"] = "raise") -> np.ndarray:
    """Host side: `task.score(problems[b], completions_BR[b][r])` as a float32 `[B, R]` grid.

    Padding rows (`mask_BR` False) are not scored and get 0. `on_error="nan"` turns a verifier exception into a
    NaN score (unscorable, passed through by the rewards); a score outside [0, 1] is always an error."""
    B = len(problems)
    if len(completions_BR) != B:
        raise ValueError(f"score_completions: {B} problems but {len(completions_BR)} completion groups")
    R = len(completions_BR[0]) if B else 0
    out = np.zeros((B, R), np.float32)
    mask = np.ones((B, R), bool) if mask_BR is None else np.asarray(mask_BR, bool)
    for b, (problem, group) in enumerate(zip(problems, completions_BR, strict=True)):
        if len(group) != R:
            raise ValueError(f"score_completions: group {b} has {len(group)} completions, expected R={R}")
        for r, text in enumerate(group):
            if not mask[b, r]:
                continue
            try:
                s = float(task.score(problem, text))
            except Exception:
                if on_error == "raise":
                    raise
                s = math.nan
            if not (math.isnan(s) or 0.0 <= s <= 1.0):
                raise ValueError(f"{getattr(task, 'name', task)!r}.score returned {s!r} for row ({b}, {r}); "
                                 "scores must lie in [0, 1] (NaN = unscorable)")
            out[b, r] = s
    return out


# ----------------------------------------------------------------------------------------------------------------
# Registry

_REWARDS: dict[str, RewardFn] = {}
_CONFIGS: dict[str, type] = {}


def register_reward(name: str, config_cls: type):
    """Decorator: register `fn(inputs, config) -> [B, R]` under `name`, configured by `config_cls`."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in _REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        _REWARDS[name], _CONFIGS[name] = fn, config_cls
        fn.reward_name, fn.config_cls = name, config_cls
        return fn

    return wrap


def available_rewards() -> tuple[str, ...]:
    return tuple(sorted(_REWARDS))


def get_reward(name: str) -> RewardFn:
    if name not in _REWARDS:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {', '.join(available_rewards())}")
    return _REWARDS[name]


def reward_config(name: str, **overrides):
    """The registered config class of `name`, built with `overrides`."""
    get_reward(name)
    return _CONFIGS[name](**overrides)


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    """One summand of the total reward: `weight · get_reward(name)(inputs, config)`; config None = defaults.
    `label` names it in the per-reward outputs (defaults to `name`)."""

    name: str
    config: Any = None
    weight: float = 1.0
    label: str | None = None


def _check_inputs(inputs: RewardInputs) -> tuple[int, int]:
    shape = inputs.shape
    if len(shape) != 2:
        raise ValueError(f"scores_BR must be [B, R], got shape {shape}")
    B, R = shape
    for field, want in (("lengths_BR", (B, R)), ("mask_BR", (B, R)), ("think_lengths_BR", (B, R)),
                        ("budgets_B", (B,)), ("ref_lengths_B", (B,)), ("ref_accuracy_B", (B,))):
        value = getattr(inputs, field)
        if value is not None and tuple(np.shape(value)) != want:
            raise ValueError(f"RewardInputs.{field} has shape {tuple(np.shape(value))}, expected {want} "
                             f"(scores_BR is {shape})")
    if inputs.tokens_BRT is not None and tuple(np.shape(inputs.tokens_BRT))[:2] != (B, R):
        raise ValueError(f"RewardInputs.tokens_BRT has shape {tuple(np.shape(inputs.tokens_BRT))}, expected "
                         f"({B}, {R}, T)")
    return B, R


def compute_rewards(inputs: RewardInputs, terms: Sequence[RewardTerm | str]) -> tuple[Array, dict[str, Array]]:
    """Σ_k weight_k · reward_k, float32 `[B, R]`, and each term's unweighted reward by label (for per-reward metrics).

    A reward returning another shape than `[B, R]` is an error naming it and both shapes. Padding rows are 0 in
    every output. NaN rewards pass through into the total (the advantage estimator treats them as unscorable).
    jit-able with `terms` static."""
    B, R = _check_inputs(inputs)
    valid_BR = inputs.valid_BR
    total_BR = jnp.zeros((B, R), jnp.float32)
    parts: dict[str, Array] = {}
    for term in terms:
        term = RewardTerm(term) if isinstance(term, str) else term
        fn = get_reward(term.name)
        config = _CONFIGS[term.name]() if term.config is None else term.config
        if not isinstance(config, _CONFIGS[term.name]):
            raise TypeError(f"reward {term.name!r} takes a {_CONFIGS[term.name].__name__}, "
                            f"got {type(config).__name__}")
        out = fn(inputs, config)
        if tuple(np.shape(out)) != (B, R):
            raise ValueError(f"reward {term.name!r} returned shape {tuple(np.shape(out))}, expected [B, R] = "
                             f"{(B, R)}")
        out_BR = jnp.where(valid_BR, jnp.asarray(out, jnp.float32), 0.0)
        label = term.label or term.name
        if label in parts:
            raise ValueError(f"two reward terms share the label {label!r}; give one a distinct `label`")
        parts[label] = out_BR
        total_BR = total_BR + jnp.float32(term.weight) * out_BR
    return total_BR, parts


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces

LengthSource = Literal["completion", "think"]


def _scores(inputs: RewardInputs) -> Array:
    return jnp.asarray(inputs.scores_BR, jnp.float32)


def _correct(inputs: RewardInputs, threshold: float) -> Array:
    """1[correct] as bool; NaN scores compare False."""
    return _scores(inputs) >= threshold


def _lengths(inputs: RewardInputs, source: LengthSource, reward: str) -> Array:
    if source == "completion":
        return jnp.asarray(inputs.lengths_BR, jnp.float32)
    if source == "think":
        if inputs.think_lengths_BR is None:
            raise ValueError(f"reward {reward!r} with length='think' needs RewardInputs.think_lengths_BR "
                             "(make_reward_inputs counts the tokens between the think delimiters)")
        return jnp.asarray(inputs.think_lengths_BR, jnp.float32)
    raise ValueError(f"reward {reward!r}: length must be 'completion' or 'think', got {source!r}")


def _budgets(inputs: RewardInputs, reward: str) -> Array:
    if inputs.budgets_B is None:
        raise ValueError(f"reward {reward!r} needs RewardInputs.budgets_B (the per-prompt token budget n_gold)")
    return jnp.asarray(inputs.budgets_B, jnp.float32)[:, None]


def _finish(inputs: RewardInputs, r_BR: Array, uses_score: bool = True) -> Array:
    """float32; 0 on padding rows; NaN on valid rows whose score is NaN (when the reward uses the score)."""
    if uses_score:
        r_BR = jnp.where(jnp.isnan(_scores(inputs)), jnp.nan, r_BR)
    return jnp.where(inputs.valid_BR, r_BR, 0.0).astype(jnp.float32)


def _masked_mean(x, m, axis=None, keepdims=False):
    m = m.astype(jnp.float32)
    return (jnp.where(m > 0, x, 0.0) * m).sum(axis, keepdims=keepdims) / jnp.maximum(
        m.sum(axis, keepdims=keepdims), 1.0)


def _masked_std(x, m, axis=None, keepdims=False):
    """Population std (ddof 0) over the rows where m holds."""
    mu = _masked_mean(x, m, axis, keepdims=True)
    return jnp.sqrt(_masked_mean(jnp.square(x - mu), m, axis, keepdims=keepdims))


# ----------------------------------------------------------------------------------------------------------------
# Correctness and format


@dataclasses.dataclass(frozen=True)
class CorrectnessConfig:
    """r_i = A(y_i) = `Task.score` (in [0, 1]), computed on the host by `score_completions`.
    `binary=True` gives r_i = 1[score_i ≥ correct_threshold] instead. NaN scores stay NaN."""

    binary: bool = False
    correct_threshold: float = 1.0


@register_reward("correctness", CorrectnessConfig)
def correctness_reward(inputs: RewardInputs, config: CorrectnessConfig) -> Array:
    r_BR = _correct(inputs, config.correct_threshold).astype(jnp.float32) if config.binary else _scores(inputs)
    return _finish(inputs, r_BR)


@dataclasses.dataclass(frozen=True)
class FormatConfig:
    """r_i = 1 if completion i has the target structure of `lmx.data.tasks.base.format_target`, else 0:

        <think> … </think><answer> … </answer> [stop]

    read from `tokens_BRT[:, :, :lengths_BR]` (delimiters are single token ids): each of the four delimiters occurs
    exactly once, in that order, the answer is non-empty, and nothing but one stop token follows `</answer>`.
    `strict=True` also requires the completion to start with `<think>` and `<answer>` to follow `</think>`
    immediately (what the built-in tasks are trained on). Does not use the score, so it is never NaN."""

    think_id: int = THINK_ID
    end_think_id: int = END_THINK_ID
    answer_id: int = ANSWER_ID
    end_answer_id: int = END_ANSWER_ID
    stop_ids: tuple[int, ...] = (EOS_ID,)
    strict: bool = True


@register_reward("format", FormatConfig)
def format_reward(inputs: RewardInputs, config: FormatConfig) -> Array:
    if inputs.tokens_BRT is None:
        raise ValueError("reward 'format' needs RewardInputs.tokens_BRT")
    tokens_BRT = jnp.asarray(inputs.tokens_BRT)
    lengths_BR = jnp.asarray(inputs.lengths_BR)
    T = tokens_BRT.shape[-1]
    t_T = jnp.arange(T)
    inside_BRT = t_T < lengths_BR[..., None]

    def count_and_pos(tok):
        hit = (tokens_BRT == tok) & inside_BRT
        return hit.sum(-1), jnp.where(hit, t_T, T).min(-1)

    (n0, p0), (n1, p1), (n2, p2), (n3, p3) = (count_and_pos(t) for t in (
        config.think_id, config.end_think_id, config.answer_id, config.end_answer_id))
    ok = (n0 == 1) & (n1 == 1) & (n2 == 1) & (n3 == 1) & (p0 < p1) & (p1 < p2) & (p2 + 1 < p3)
    last_BR = jnp.take_along_axis(tokens_BRT, jnp.clip(lengths_BR - 1, 0, T - 1)[..., None], -1)[..., 0]
    ends_with_stop = jnp.isin(last_BR, jnp.asarray(config.stop_ids))
    ok &= (p3 == lengths_BR - 1) | ((p3 == lengths_BR - 2) & ends_with_stop)
    if config.strict:
        ok &= (p0 == 0) & (p2 == p1 + 1)
    return _finish(inputs, ok, uses_score=False)


# ----------------------------------------------------------------------------------------------------------------
# DAPO overlong shaping


@dataclasses.dataclass(frozen=True)
class DapoOverlongConfig:
    """DAPO soft overlong punishment (arXiv 2503.14476, ALGORITHMS §1 [code]), added to the task reward:

        R_length(y) = 0                               if |y| ≤ L_max − L_c
                      ((L_max − L_c) − |y|) / L_c     if L_max − L_c < |y| ≤ L_max
                      −1                              if |y| > L_max

    |y| = completion tokens, stop token included. L_max = `max_length`, L_c = `cache_length` (the punishment
    interval). Independent of the score, so never NaN."""

    max_length: int = 512
    cache_length: int = 128

    def __post_init__(self):
        if not 0 < self.cache_length <= self.max_length:
            raise ValueError(f"DapoOverlongConfig needs 0 < cache_length <= max_length, got cache_length="
                             f"{self.cache_length}, max_length={self.max_length}")


@register_reward("dapo_overlong", DapoOverlongConfig)
def dapo_overlong_reward(inputs: RewardInputs, config: DapoOverlongConfig) -> Array:
    y = jnp.asarray(inputs.lengths_BR, jnp.float32)
    soft = jnp.float32(config.max_length - config.cache_length)
    r = jnp.where(y <= soft, 0.0, (soft - y) / config.cache_length)
    return _finish(inputs, jnp.where(y > config.max_length, -1.0, r), uses_score=False)


# ----------------------------------------------------------------------------------------------------------------
# Length-aware rewards (ALGORITHMS §2)


@dataclasses.dataclass(frozen=True)
class O1PrunerConfig:
    """O1-Pruner length-harmonizing reward (arXiv 2501.12570, ALGORITHMS §2 [code]):

        R(y) = L̄_ref / L(y) − 1 + λ (A(y) − Ā_ref),   clipped to [clip_min, clip_max] = [−2, 4],  then z-normalised

    L(y) = tokens of y (`length`: whole completion or the thinking span), A(y) = score, λ = `lam` = 2.
    L̄_ref, Ā_ref: mean length and accuracy of K (= 12 in the paper) outputs per problem pre-sampled from the
    reference model, passed as `ref_lengths_B`, `ref_accuracy_B`. `ref_from_group=True` uses the current group's
    own means instead (an on-policy variant, not the paper's). Choices, as options since the sheet does not fix
    them: `normalize` = "batch" (z-score over every valid, scorable row), "group" (per prompt) or "none"; the std
    is the population std plus `eps`. L(y) is floored at 1 token."""

    lam: float = 2.0
    clip_min: float = -2.0
    clip_max: float = 4.0
    normalize: Literal["batch", "group", "none"] = "batch"
    eps: float = 1e-6
    ref_from_group: bool = False
    length: LengthSource = "completion"


@register_reward("o1_pruner", O1PrunerConfig)
def o1_pruner_reward(inputs: RewardInputs, config: O1PrunerConfig) -> Array:
    L = _lengths(inputs, config.length, "o1_pruner")
    A = _scores(inputs)
    valid = inputs.valid_BR
    scorable = valid & ~jnp.isnan(A)
    if config.ref_from_group:
        L_ref = _masked_mean(L, valid, axis=1, keepdims=True)
        A_ref = _masked_mean(A, scorable, axis=1, keepdims=True)
    else:
        if inputs.ref_lengths_B is None or inputs.ref_accuracy_B is None:
            raise ValueError("reward 'o1_pruner' needs RewardInputs.ref_lengths_B and ref_accuracy_B (L̄_ref, "
                             "Ā_ref from pre-sampling the reference model), or O1PrunerConfig(ref_from_group=True)")
        L_ref = jnp.asarray(inputs.ref_lengths_B, jnp.float32)[:, None]
        A_ref = jnp.asarray(inputs.ref_accuracy_B, jnp.float32)[:, None]
    r = L_ref / jnp.maximum(L, 1.0) - 1.0 + config.lam * (A - A_ref)
    r = jnp.clip(r, config.clip_min, config.clip_max)
    if config.normalize == "batch":
        r = (r - _masked_mean(r, scorable)) / (_masked_std(r, scorable) + config.eps)
    elif config.normalize == "group":
        r = (r - _masked_mean(r, scorable, 1, True)) / (_masked_std(r, scorable, 1, True) + config.eps)
    elif config.normalize != "none":
        raise ValueError(f"O1PrunerConfig.normalize must be 'batch', 'group' or 'none', got {config.normalize!r}")
    return _finish(inputs, r)


@dataclasses.dataclass(frozen=True)
class KimiLengthConfig:
    """Kimi k1.5 length penalty (arXiv 2501.12599; ALGORITHMS §2 [code: open-r1 len_reward]), within each group:

        λ_i = 0.5 − (len_i − min_len) / (max_len − min_len)
        r_i = λ_i if y_i is correct, min(0, λ_i) if wrong;   r_i = 0 for all i when max_len = min_len

    min_len, max_len over the group's valid rows (unscorable rows included: their lengths are known).
    `length` = "completion" or "think" tokens."""

    correct_threshold: float = 1.0
    length: LengthSource = "completion"


@register_reward("kimi_length", KimiLengthConfig)
def kimi_length_reward(inputs: RewardInputs, config: KimiLengthConfig) -> Array:
    L = _lengths(inputs, config.length, "kimi_length")
    valid = inputs.valid_BR
    lo = jnp.where(valid, L, jnp.inf).min(1, keepdims=True)
    hi = jnp.where(valid, L, -jnp.inf).max(1, keepdims=True)
    span = hi - lo
    lam = 0.5 - (L - lo) / jnp.where(span > 0, span, 1.0)
    r = jnp.where(_correct(inputs, config.correct_threshold), lam, jnp.minimum(0.0, lam))
    r = jnp.where(span > 0, r, 0.0)
    return _finish(inputs, r)


@dataclasses.dataclass(frozen=True)
class L1ExactConfig:
    """L1 / LCPO-Exact (arXiv 2503.04697, ALGORITHMS §2): the prompt carries a budget "Think for n_gold tokens."

        r(y, n_gold) = 1[y correct] − α |n_gold − n_y|,   α = 3e-4

    n_gold = `budgets_B` (per prompt), n_y = tokens of y (`length`: whole completion, as in the paper, or the
    thinking span)."""

    alpha: float = 3e-4
    correct_threshold: float = 1.0
    length: LengthSource = "completion"


@register_reward("l1_exact", L1ExactConfig)
def l1_exact_reward(inputs: RewardInputs, config: L1ExactConfig) -> Array:
    n_y = _lengths(inputs, config.length, "l1_exact")
    n_gold = _budgets(inputs, "l1_exact")
    r = _correct(inputs, config.correct_threshold).astype(jnp.float32) - config.alpha * jnp.abs(n_gold - n_y)
    return _finish(inputs, r)


@dataclasses.dataclass(frozen=True)
class L1MaxConfig:
    """L1 / LCPO-Max, the paper's form (arXiv 2503.04697, ALGORITHMS §2): budget n_gold is a maximum.

        r(y, n_gold) = 1[y correct] · clip(α (n_gold − n_y) + δ, 0, 1),   α = 0.01, δ = 0.5

    n_gold = `budgets_B`, n_y = tokens of y (`length`). Chosen explicitly over the public code's variant
    (correct · sigmoid(α(n_gold − n_y)) + 0.1 under budget), which is not implemented."""

    alpha: float = 0.01
    delta: float = 0.5
    correct_threshold: float = 1.0
    length: LengthSource = "completion"


@register_reward("l1_max", L1MaxConfig)
def l1_max_reward(inputs: RewardInputs, config: L1MaxConfig) -> Array:
    n_y = _lengths(inputs, config.length, "l1_max")
    n_gold = _budgets(inputs, "l1_max")
    correct = _correct(inputs, config.correct_threshold).astype(jnp.float32)
    r = correct * jnp.clip(config.alpha * (n_gold - n_y) + config.delta, 0.0, 1.0)
    return _finish(inputs, r)


@dataclasses.dataclass(frozen=True)
class ShorterBetterConfig:
    """ShorterBetter (arXiv 2504.21370, ALGORITHMS §2), within each group:

        SOL = min{ len_j : y_j correct }  (no correct sample → mean of the group's lengths)
        r_i = α · 1[y_i correct] − β · |len_i − SOL|,   α = 2.0, β = 0.001

    Group statistics over valid rows; "correct" never includes unscorable rows. `length` = "completion" or
    "think" tokens."""

    alpha: float = 2.0
    beta: float = 0.001
    correct_threshold: float = 1.0
    length: LengthSource = "completion"


@register_reward("shorter_better", ShorterBetterConfig)
def shorter_better_reward(inputs: RewardInputs, config: ShorterBetterConfig) -> Array:
    L = _lengths(inputs, config.length, "shorter_better")
    valid = inputs.valid_BR
    correct = _correct(inputs, config.correct_threshold) & valid
    any_correct = correct.any(1, keepdims=True)
    shortest = jnp.where(correct, L, jnp.inf).min(1, keepdims=True)
    sol = jnp.where(any_correct, shortest, _masked_mean(L, valid, 1, True))
    r = config.alpha * correct.astype(jnp.float32) - config.beta * jnp.abs(L - sol)
    return _finish(inputs, r)


@dataclasses.dataclass(frozen=True)
class LeadConfig:
    """LEAD's efficiency reward R_eff (arXiv 2605.09806, ALGORITHMS §2 [code]), within each group:

        L*_q = clamp(mean{ len_j : y_j correct }, L_min, B_max)   (no correct sample → L* = B_max)
        symmetric (paper):   R_eff = max(−1, 1 − |len − L*| / L*)
        asymmetric (code):   R_eff = max(0, 1 − len/L*) if correct, clip(1 − len/L*, −1, 0) if wrong

    L_min = `min_target` (tokens), B_max = `max_target` (None: the rollout budget, the width T of
    `tokens_BRT`). This is the efficiency stream only: under `lmx.train.rl_train`, a reward spec that names
    `lead` trains with LEAD's two-stream advantage (`lmx.train.rl.lead_advantages`): correctness stream = the
    spec's other terms (the verifier's score when there are none), efficiency stream = this reward.
    Unscorable rows: NaN; they never count as correct."""

    mode: Literal["symmetric", "asymmetric"] = "symmetric"
    min_target: float = 1.0
    max_target: float | None = None
    correct_threshold: float = 1.0
    length: LengthSource = "completion"


@register_reward("lead", LeadConfig)
def lead_reward(inputs: RewardInputs, config: LeadConfig) -> Array:
    L = _lengths(inputs, config.length, "lead")
    if config.max_target is not None:
        b_max = float(config.max_target)
    elif inputs.tokens_BRT is not None:
        b_max = float(np.shape(inputs.tokens_BRT)[-1])
    else:
        raise ValueError("reward 'lead' needs LeadConfig.max_target (B_max) or RewardInputs.tokens_BRT (whose "
                         "width T is the rollout budget)")
    if not 0 < config.min_target <= b_max:
        raise ValueError(f"LeadConfig.min_target={config.min_target!r} must lie in (0, B_max={b_max}]")
    correct = _correct(inputs, config.correct_threshold) & inputs.valid_BR
    n = correct.sum(1, keepdims=True)
    mean_correct = jnp.where(correct, L, 0.0).sum(1, keepdims=True) / jnp.maximum(n, 1)
    target = jnp.where(n > 0, jnp.clip(mean_correct, config.min_target, b_max), b_max)
    rel = 1.0 - L / target
    if config.mode == "symmetric":
        r = jnp.maximum(-1.0, 1.0 - jnp.abs(L - target) / target)
    elif config.mode == "asymmetric":
        r = jnp.where(correct, jnp.maximum(0.0, rel), jnp.clip(rel, -1.0, 0.0))
    else:
        raise ValueError(f"LeadConfig.mode must be 'symmetric' or 'asymmetric', got {config.mode!r}")
    return _finish(inputs, r)


__all__ = [
    "CorrectnessConfig", "DapoOverlongConfig", "FormatConfig", "KimiLengthConfig", "L1ExactConfig", "L1MaxConfig",
    "LeadConfig", "O1PrunerConfig", "RewardInputs", "RewardTerm", "ShorterBetterConfig", "available_rewards",
    "compute_rewards", "count_between", "decode_completions", "get_reward", "make_reward_inputs", "register_reward",
    "reward_config", "score_completions",
]
