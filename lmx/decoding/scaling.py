"""Test-time scaling: turn B prompts × R samples of a `Generation` into one answer per prompt (ALGORITHMS §3).

Generation is the jitted part (`generate`, with `MOfRFinished(m)` for first-finish and short-m@k); aggregating
R decoded answers is host-side numpy. Every aggregator takes the Generation, a tokenizer and a task (only its
`extract_answer` is used) plus what the method needs, and returns a `ScalingResult`. `run_method` generates and
aggregates in one call and scores the result against the problems.

Rules shared by every method:
- An answer is `task.extract_answer(decoded completion)`; None = unanswerable. Answers compare as exact strings.
- Unanswerable samples never win a vote (or best-of-n / BoM) unless every eligible sample is unanswerable; then the
  answer is None and `chosen_B` is -1. (FFS alone returns its first finisher, answerable or not.)
- Ties are exact equality of the aggregated value and are broken deterministically:
  majority / weighted majority / RPC: the answer whose first sample (lowest index r) comes first;
  best-of-n / BoM: the lowest sample index among the best; FFS: the fewest tokens, then the lowest index;
  short-m@k: the answer with the shortest sample (fewest tokens), then the lowest index.
- `chosen_B[b]` is the sample the answer was taken from: for votes the winning answer's tie-break sample
  (first occurrence; the shortest for short-m@k).
- Cost is `gen.stats` as Python numbers: tokens_generated counts the tokens actually generated (early-stopped
  loops leave unfinished rows short), model_calls, decode_steps and flops of the whole batch. Scorer calls
  (a verifier or reward model) are not counted.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable

import numpy as np

from lmx.decoding.generate import AllFinished, Generation, MOfRFinished, generate
from lmx.decoding.sampling import Greedy, Sampler

METHODS = ("greedy", "majority", "weighted_majority", "best_of_n", "bom", "rpc", "ffs", "short_m_at_k")
# A scorer maps (gen, completions_BR) to [B, R] floats: a verifier, an outcome reward model, ... Named ones:
# "mean_logprob" (mean token log-prob) and "mean_prob" (its exp, RPC's p_i). An array [B, R] is used as is.
Scorer = str | Callable[[Generation, list[list[str]]], np.ndarray] | np.ndarray


@dataclasses.dataclass(frozen=True)
class ScalingResult:
    """One aggregation over B prompts.

    answers: B answers (None = no answer). chosen_B: int, the sample each answer came from, -1 if none.
    used_BR: bool, the samples that entered the aggregation (RPC: not pruned; BoM: answer in S; short-m@k: the m
      shortest finished; FFS: the chosen one). scores_BR: the per-sample weights / scores the method used (None for
      plain votes). lengths_BR, finished_BR: as generated. stats: gen.stats as Python numbers, also read as
      tokens_generated, model_calls, decode_steps, flops; tokens_B: tokens generated per prompt.
    task_scores_B: task.score of each chosen completion (0 where chosen is -1); set by `run_method`.
    """

    method: str
    answers: list[str | None]
    chosen_B: np.ndarray
    used_BR: np.ndarray
    answers_BR: list[list[str | None]]
    completions_BR: list[list[str]]
    lengths_BR: np.ndarray
    finished_BR: np.ndarray
    scores_BR: np.ndarray | None
    stats: dict[str, float | int]
    task_scores_B: np.ndarray | None = None

    tokens_generated = property(lambda self: self.stats["tokens_generated"])
    model_calls = property(lambda self: self.stats["model_calls"])
    decode_steps = property(lambda self: self.stats["decode_steps"])
    flops = property(lambda self: self.stats["flops"])
    tokens_B = property(lambda self: self.lengths_BR.sum(-1))  # tokens generated for each prompt's R samples

    @property
    def accuracy(self) -> float | None:
        return None if self.task_scores_B is None else float(np.mean(self.task_scores_B))


@dataclasses.dataclass(frozen=True)
class _Samples:
    """A Generation on the host, decoded."""

    gen: Generation
    completions_BR: list[list[str]]
    answers_BR: list[list[str | None]]
    tokens_BRT: np.ndarray
    lengths_BR: np.ndarray
    finished_BR: np.ndarray
    logprobs_BRT: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.lengths_BR.shape

    def mean_logprob_BR(self) -> np.ndarray:
        return self.logprobs_BRT.sum(-1) / np.maximum(self.lengths_BR, 1)  # logprobs are 0 past each length

    def result(self, method, answers, chosen_B, used_BR, scores_BR=None) -> ScalingResult:
        stats = {k: np.asarray(v).item() for k, v in self.gen.stats.items()}
        return ScalingResult(method, answers, np.asarray(chosen_B, np.int64), np.asarray(used_BR, bool),
                             self.answers_BR, self.completions_BR, self.lengths_BR, self.finished_BR,
                             None if scores_BR is None else np.asarray(scores_BR, np.float64), stats)


def _samples(gen: Generation, tok, task) -> _Samples:
    from lmx.train.rewards import decode_completions  # lazily: lmx.train imports lmx.decoding

    tokens_BRT, lengths_BR = np.asarray(gen.tokens_BRT), np.asarray(gen.lengths_BR)
    completions = decode_completions(tok, tokens_BRT, lengths_BR)
    answers = [[task.extract_answer(text) for text in row] for row in completions]
    return _Samples(gen, completions, answers, tokens_BRT, lengths_BR, np.asarray(gen.finished_BR, bool),
                    np.asarray(gen.logprobs_BRT, np.float64))


def _scores(spec: Scorer, s: _Samples, what: str) -> np.ndarray:
    if isinstance(spec, str):
        if spec == "mean_logprob":
            return s.mean_logprob_BR()
        if spec == "mean_prob":
            return np.exp(s.mean_logprob_BR())
        raise ValueError(f"unknown {what} {spec!r}; named scorers: 'mean_logprob', 'mean_prob' (or pass a callable "
                         "(gen, completions_BR) -> [B, R], e.g. verifier_scorer(task, problems), or a [B, R] array)")
    out = np.asarray(spec(s.gen, s.completions_BR) if callable(spec) else spec, np.float64)
    if out.shape != s.shape:
        raise ValueError(f"{what} gave shape {out.shape}, expected [B, R] = {s.shape}")
    return out


def verifier_scorer(task, problems) -> Callable:
    """A scorer from the task's own verifier: task.score(problems[b], completion) (an oracle; NaN if it fails)."""
    from lmx.train.rewards import score_completions  # lazily: lmx.train imports lmx.decoding

    return lambda gen, completions_BR: score_completions(task, problems, completions_BR, on_error="nan")


def _vote(answers_R, weights_R, eligible_R, order_R) -> tuple[str | None, int]:
    """argmax_a Σ_{i eligible, a_i = a} w_i over answerable samples, visiting samples in `order_R`; ties go to the
    answer seen first in that order, and its first sample there is the one returned. None, -1 if no answer."""
    total, first = {}, {}
    for i in order_R:
        a = answers_R[i]
        if not eligible_R[i] or a is None:
            continue
        total[a] = total.get(a, 0) + weights_R[i]
        first.setdefault(a, int(i))
    if not total:
        return None, -1
    best = max(total.values())
    winner = next(a for a in first if total[a] == best)  # dicts keep insertion (= visiting) order
    return winner, first[winner]


def _answers_at(s: _Samples, chosen_B) -> list[str | None]:
    return [s.answers_BR[b][c] if c >= 0 else None for b, c in enumerate(np.asarray(chosen_B).tolist())]


def _votes(s: _Samples, method, weights_BR=None, eligible_BR=None, order_BR=None, scores_BR=None):
    B, R = s.shape
    weights_BR = np.ones((B, R), np.int64) if weights_BR is None else weights_BR  # integer counts: exact ties
    eligible_BR = np.ones((B, R), bool) if eligible_BR is None else eligible_BR
    picks = [_vote(s.answers_BR[b], weights_BR[b].tolist(), eligible_BR[b],
                   range(R) if order_BR is None else order_BR[b]) for b in range(B)]
    return s.result(method, [a for a, _ in picks], [c for _, c in picks], eligible_BR, scores_BR)


def majority_vote(gen: Generation, tok, task) -> ScalingResult:
    """Self-consistency: argmax_a Σ_i 1[a_i = a]; ties to the answer that occurs first."""
    return _votes(_samples(gen, tok, task), "majority")


def weighted_majority(gen: Generation, tok, task, weights: Scorer = "mean_prob") -> ScalingResult:
    """argmax_a Σ_i 1[a_i = a] · w_i; w a [B, R] array or a scorer. NaN weights (unscorable) count 0; negative
    weights are refused. Ties to the answer that occurs first."""
    s = _samples(gen, tok, task)
    w_BR = _scores(weights, s, "weights")
    if (w_BR < 0).any():
        raise ValueError(f"weighted_majority needs weights >= 0, got min {np.nanmin(w_BR)!r}")
    return _votes(s, "weighted_majority", np.nan_to_num(w_BR, nan=0.0), scores_BR=w_BR)


def _best(s: _Samples, method, scores_BR, eligible_BR) -> ScalingResult:
    """argmax_i score_i over answerable eligible samples (NaN never wins unless all are); ties to the lowest i."""
    B, R = s.shape
    chosen = np.full(B, -1)
    for b in range(B):
        ok_R = eligible_BR[b] & np.array([a is not None for a in s.answers_BR[b]])
        if ok_R.any():
            key_R = np.where(ok_R, np.nan_to_num(scores_BR[b], nan=-np.inf), -np.inf)
            chosen[b] = np.flatnonzero(ok_R & (key_R == key_R[ok_R].max()))[0]
    return s.result(method, _answers_at(s, chosen), chosen, eligible_BR, scores_BR)


def best_of_n(gen: Generation, tok, task, scorer: Scorer = "mean_logprob") -> ScalingResult:
    """argmax_i score(y_i) over answerable samples; scorer a verifier / reward callable, a name or a [B, R] array."""
    s = _samples(gen, tok, task)
    return _best(s, "best_of_n", _scores(scorer, s, "scorer"), np.ones(s.shape, bool))


def _check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"best_of_majority alpha={alpha!r} must be a number in [0, 1]")


def best_of_majority(gen: Generation, tok, task, alpha: float, scorer: Scorer = "mean_logprob") -> ScalingResult:
    """BoM (arXiv 2510.03199), top-1: π̂(y) = count(y) / R (R = all samples, unanswerable ones included);
    S = {y answerable: π̂(y) ≥ α}; return the highest-reward sample whose answer is in S (ties: lowest index).
    If no answer reaches α, S is the most frequent answer(s) (our rule, so BoM always answers when any sample does).
    α ∈ [0, 1] is the caller's choice (the paper's setting is unverified)."""
    _check_alpha(alpha)
    s = _samples(gen, tok, task)
    B, R = s.shape
    in_S_BR = np.zeros((B, R), bool)
    for b in range(B):
        counts = {}
        for a in s.answers_BR[b]:
            if a is not None:
                counts[a] = counts.get(a, 0) + 1
        if counts:
            S = {a for a, c in counts.items() if c / R >= alpha - 1e-12} or {
                a for a, c in counts.items() if c == max(counts.values())}
            in_S_BR[b] = [a in S for a in s.answers_BR[b]]
    return _best(s, "bom", _scores(scorer, s, "scorer"), in_S_BR)


# ----------------------------------------------------------------------------------------------------------------
# RPC: reasoning pruning (2-component Weibull mixture) + perplexity consistency


@dataclasses.dataclass(frozen=True)
class WeibullMixture:
    """w_0 f(x; k_0, λ_0) + w_1 f(x; k_1, λ_1), f(x; k, λ) = (k/λ)(x/λ)^{k-1} exp(-(x/λ)^k); component 0 is the
    lower one (smaller mean λ Γ(1 + 1/k)). Fields are (component 0, component 1) pairs."""

    weights: tuple[float, float]
    shapes: tuple[float, float]
    scales: tuple[float, float]

    def log_joint(self, x_N) -> np.ndarray:
        """[2, N]: log w_c + log f(x; k_c, λ_c)."""
        w, k, lam = (np.asarray(v, np.float64)[:, None] for v in (self.weights, self.shapes, self.scales))
        z = np.log(np.asarray(x_N, np.float64))[None] - np.log(lam)
        return np.log(w) + np.log(k) - np.log(lam) + (k - 1) * z - np.exp(k * z)

    def lower_posterior(self, x_N) -> np.ndarray:
        """P(component 0 | x) for each x."""
        lj = self.log_joint(x_N)
        return np.exp(lj[0] - np.logaddexp(lj[0], lj[1]))


def _weibull_mle(logx_N, r_N, k_lo, k_hi, iters=60):
    """Weighted Weibull MLE. The shape solves g(k) = E_q[ln x] − E_r[ln x] − 1/k = 0 with q ∝ r·x^k (g increases
    in k, so bisection on log k is safe; clamped to [k_lo, k_hi]); then λ = (Σ r x^k / Σ r)^{1/k}, in log space."""
    r = r_N / r_N.sum()
    mean_logx = r @ logx_N

    def q_mean_logx(k):
        e = k * logx_N + np.log(r)
        q = np.exp(e - e.max())
        return (q @ logx_N) / q.sum()

    lo, hi = math.log(k_lo), math.log(k_hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        k = math.exp(mid)
        lo, hi = (lo, mid) if q_mean_logx(k) - mean_logx - 1 / k > 0 else (mid, hi)
    k = math.exp(0.5 * (lo + hi))
    e = k * logx_N + np.log(r)
    log_lam = (e.max() + math.log(np.exp(e - e.max()).sum())) / k
    return k, math.exp(log_lam)


def fit_weibull_mixture(x_N, *, min_weight: float = 0.2, max_iters: int = 200, tol: float = 1e-9,
                        shape_bounds: tuple[float, float] = (1e-2, 1e3)) -> WeibullMixture:
    """EM fit of a 2-component Weibull mixture to positive samples x_N.

    Init: lower / upper half of the sorted data. E-step: responsibilities. M-step: each component's weighted
    Weibull MLE (`_weibull_mle`), the mixing weight clipped to [min_weight, 1 − min_weight] (as RPC's reference fit
    bounds it to [0.2, 0.8]: neither component may vanish on a handful of samples). Shapes are clamped to
    `shape_bounds`, which keeps the likelihood finite when a component collapses onto tied points. Stops when the
    log-likelihood improves by less than tol·(1 + |ll|)."""
    x_N = np.asarray(x_N, np.float64).ravel()
    if x_N.size < 2 or not np.all(np.isfinite(x_N)) or (x_N <= 0).any():
        raise ValueError(f"fit_weibull_mixture needs >= 2 finite positive samples, got {x_N!r:.80}")
    logx_N = np.log(x_N)
    r0_N = (np.argsort(np.argsort(x_N, kind="stable"), kind="stable") < x_N.size / 2).astype(np.float64)
    r_2N = np.stack([r0_N, 1 - r0_N])
    ll_prev, mix = -np.inf, None
    for _ in range(max_iters):
        r_2N = r_2N + 1e-12  # no component with zero total responsibility
        w0 = float(np.clip(r_2N[0].sum() / r_2N.sum(), min_weight, 1 - min_weight))
        (k0, l0), (k1, l1) = (_weibull_mle(logx_N, r_2N[c], *shape_bounds) for c in range(2))
        mix = WeibullMixture((w0, 1 - w0), (k0, k1), (l0, l1))
        lj_2N = mix.log_joint(x_N)
        norm_N = np.logaddexp(lj_2N[0], lj_2N[1])
        r_2N = np.exp(lj_2N - norm_N)
        ll = float(norm_N.sum())
        if ll - ll_prev < tol * (1 + abs(ll)):
            break
        ll_prev = ll
    means = [lam * math.gamma(1 + 1 / k) for k, lam in zip(mix.shapes, mix.scales, strict=True)]
    if means[0] > means[1]:  # order: component 0 is the lower one
        mix = WeibullMixture(mix.weights[::-1], mix.shapes[::-1], mix.scales[::-1])
    return mix


def rpc_pruned(p_R: np.ndarray) -> np.ndarray:
    """RPC's reasoning pruning of one prompt's p_i: in the lower Weibull component (posterior > 1/2) and p_i <
    mean(p). The largest p_i is never pruned; fewer than 2 samples or all p_i equal (up to rounding, where
    `p_i < mean` would be noise): nothing pruned."""
    p_R = np.asarray(p_R, np.float64)
    if p_R.size < 2 or np.ptp(p_R) <= 1e-9 * np.abs(p_R).max():
        return np.zeros(p_R.shape, bool)
    mix = fit_weibull_mixture(np.maximum(p_R, np.finfo(np.float64).tiny))
    return (mix.lower_posterior(p_R) > 0.5) & (p_R < p_R.mean())


def rpc(gen: Generation, tok, task) -> ScalingResult:
    """RPC: p_i = exp(mean token log-prob); prune (`rpc_pruned`); score(a) = Σ p_i over the unique completions
    (identical token sequences count once) with answer a among the kept; argmax, ties to the answer that occurs
    first. If pruning removed every answerable sample, the vote runs over all samples."""
    s = _samples(gen, tok, task)
    B, R = s.shape
    p_BR = np.exp(s.mean_logprob_BR())
    kept_BR, w_BR = np.ones((B, R), bool), p_BR.copy()
    for b in range(B):
        kept = ~rpc_pruned(p_BR[b])
        answerable = np.array([a is not None for a in s.answers_BR[b]])
        kept_BR[b] = kept if (kept & answerable).any() else True
        seen = set()
        for r in np.flatnonzero(kept_BR[b]):
            seq = tuple(s.tokens_BRT[b, r, : s.lengths_BR[b, r]].tolist())
            if seq in seen:
                w_BR[b, r] = 0.0  # a duplicate completion adds nothing
            seen.add(seq)
    return _votes(s, "rpc", w_BR, kept_BR, scores_BR=p_BR)


# ----------------------------------------------------------------------------------------------------------------
# Early-stopping methods: read a Generation made with stop_when=MOfRFinished(m)


def first_finish(gen: Generation, tok, task) -> ScalingResult:
    """FFS (arXiv 2505.18149): the finished sample with the fewest tokens (ties: lowest index), answerable or not;
    None, -1 if none finished. Generate with stop_when=MOfRFinished(1) so the loop stops at the first finish (on a
    full Generation the choice is the same, only the cost differs)."""
    s = _samples(gen, tok, task)
    B, R = s.shape
    chosen = np.where(s.finished_BR.any(-1),  # argmin returns the first minimum: ties to the lowest index
                      np.argmin(np.where(s.finished_BR, s.lengths_BR, s.lengths_BR.max() + 1), axis=-1), -1)
    used_BR = np.zeros((B, R), bool)
    used_BR[np.flatnonzero(chosen >= 0), chosen[chosen >= 0]] = True
    return s.result("ffs", _answers_at(s, chosen), chosen, used_BR)


def short_m_at_k(gen: Generation, tok, task, m: int) -> ScalingResult:
    """short-m@k (arXiv 2505.17813): majority vote over the m shortest finished samples (length ties: lowest index;
    so exactly m even when more finished on the same step or the loop ran on for other prompts; fewer if fewer
    finished); count ties go to the answer with the shortest sample, then the lowest index. Generate with
    num_samples=k, stop_when=MOfRFinished(m)."""
    s = _samples(gen, tok, task)
    B, R = s.shape
    m = _int_in("m", m, 1, R, f"the samples per prompt R={R}")
    order_BR = np.lexsort((np.broadcast_to(np.arange(R), (B, R)), s.lengths_BR), axis=-1)  # by length, then index
    used_BR = np.zeros((B, R), bool)
    for b in range(B):
        used_BR[b, [i for i in order_BR[b] if s.finished_BR[b, i]][:m]] = True
    return _votes(s, "short_m_at_k", eligible_BR=used_BR, order_BR=order_BR)


# ----------------------------------------------------------------------------------------------------------------
# Generate + aggregate + score


def _int_in(name, value, low, high=None, high_name=""):
    try:
        out = operator.index(value)
    except TypeError:
        out = None
    if out is None or isinstance(value, bool) or out < low or (high is not None and out > high):
        bound = f"an int >= {low}" + (f" and <= {high_name}" if high is not None else "")
        raise ValueError(f"{name}={value!r} must be {bound}")
    return out


def run_method(name: str, model, params, prompts, *, k: int, m: int | None = None, tok, task, problems,
               sampler: Greedy | Sampler = Sampler(), rng=None, max_new_tokens: int,  # noqa: B008 (frozen)
               stop_tokens=None, pad_id: int | None = None, max_len: int | None = None,
               scorer: Scorer | None = None, alpha: float | None = None) -> ScalingResult:
    """Generate for `prompts` with what method `name` needs, aggregate, and score against `problems`.

    name: one of METHODS. "greedy" decodes one sample with Greedy() (k and sampler unused); "ffs" runs k samples
      with stop_when=MOfRFinished(1), "short_m_at_k" with MOfRFinished(m); the others run k samples to the end.
    scorer: best_of_n / bom (default "mean_logprob") and weighted_majority weights (default "mean_prob"); the name
      "verifier" uses the task's own verifier on `problems` (an oracle). alpha: BoM's frequency threshold (required).
    Options a method does not use (m, scorer, alpha) are validated when given but ignored, so one call sweeps
    every method. stop_tokens default (tok.eos_id,), pad_id default tok.pad_id.
    Returns the ScalingResult with task_scores_B = task.score(problems[b], chosen completion) (0 if none) and
    `accuracy` their mean.
    """
    if name not in METHODS:
        raise ValueError(f"unknown test-time scaling method {name!r}; known: {', '.join(METHODS)}")
    k = _int_in("k", k, 1)
    if m is not None:
        m = _int_in("m", m, 1, k, f"k={k}")
    elif name == "short_m_at_k":
        raise ValueError("short_m_at_k needs m (the number of finished samples to vote over), 1 <= m <= k")
    if alpha is None and name == "bom":
        raise ValueError("bom needs alpha, the frequency threshold in [0, 1]")
    if alpha is not None:
        _check_alpha(alpha)
    if isinstance(scorer, str) and scorer not in ("mean_logprob", "mean_prob", "verifier"):
        raise ValueError(f"unknown scorer {scorer!r}; named scorers: 'mean_logprob', 'mean_prob', 'verifier'")
    B = len(prompts[0]) if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2 \
        else len(prompts)
    if len(problems) != B:
        raise ValueError(f"{len(problems)} problems for {B} prompts")
    if isinstance(scorer, str) and scorer == "verifier":
        scorer = verifier_scorer(task, problems)

    stop_when = {"ffs": MOfRFinished(1), "short_m_at_k": MOfRFinished(m or 1)}.get(name, AllFinished())
    gen = generate(model, params, prompts, max_new_tokens=max_new_tokens,
                   sampler=Greedy() if name == "greedy" else sampler,
                   stop_tokens=(tok.eos_id,) if stop_tokens is None else stop_tokens, rng=rng,
                   num_samples=1 if name == "greedy" else k, stop_when=stop_when, max_len=max_len,
                   pad_id=tok.pad_id if pad_id is None else pad_id)

    if name in ("greedy", "majority"):
        res = majority_vote(gen, tok, task)
    elif name == "weighted_majority":
        res = weighted_majority(gen, tok, task, "mean_prob" if scorer is None else scorer)
    elif name == "best_of_n":
        res = best_of_n(gen, tok, task, "mean_logprob" if scorer is None else scorer)
    elif name == "bom":
        res = best_of_majority(gen, tok, task, alpha, "mean_logprob" if scorer is None else scorer)
    elif name == "rpc":
        res = rpc(gen, tok, task)
    elif name == "ffs":
        res = first_finish(gen, tok, task)
    else:
        res = short_m_at_k(gen, tok, task, m)
    task_scores_B = np.array([float(task.score(p, res.completions_BR[b][c])) if c >= 0 else 0.0
                              for b, (p, c) in enumerate(zip(problems, res.chosen_B.tolist(), strict=True))])
    return dataclasses.replace(res, method=name, task_scores_B=task_scores_B)


__all__ = [
    "METHODS", "ScalingResult", "Scorer", "WeibullMixture", "best_of_majority", "best_of_n", "first_finish",
    "fit_weibull_mixture", "majority_vote", "rpc", "rpc_pruned", "run_method", "short_m_at_k", "verifier_scorer",
    "weighted_majority",
]
