"""Exact process verifiers for the built-in tasks: a score per chain-of-thought step, and a prefix reward that a
particle filter (`lmx.decoding.search.particle_filter`) can weight partial completions by.

A completion's thought is the text after its first `<think>` (all of it when the prompt already opened the block)
up to `</think>`; `<answer>` or `<eos>` close it too. Steps are separated by ';'. A step is complete once a ';'
follows it or the thought is closed; the unfinished last piece is not scored.

What a valid step is, per task (each the task's own generator, so every reference trace scores all ones):
- arithmetic: the column step the operands and the true previous carry / borrow give, in the task's CoT form
  ("7+5+0=12" full, "12" short, the "neg" flag of a negative difference, "*" partial products and running sums).
  cot="mixed" accepts either form; a trace keeps the form of its first column step.
- shortest_path: the node the BFS dequeues next with exactly its newly discovered neighbours, alphabetical.
- countdown: a move "a op b=c|rest" the task's depth-first search could make next, for any move order: from the
  state it is expanding (or, once that state's untried moves are all pruned by the trace budget, from the state
  it backtracks to), numbers available, c = a op b with the generator's legality (a >= b, positive, exact
  division), the rest list in the generator's order, "|!" exactly when c is the target, "|x" exactly when no
  number is left, and, past `max_trace_steps`' exploring budget, only moves from which the target is reachable.
Arithmetic and BFS steps are each judged against the correct state, so one wrong step scores one 0. A countdown
search has no defined state after an illegal move, so every step after one scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lmx.data.tasks.arithmetic import _OPS, Arithmetic
from lmx.data.tasks.base import Problem
from lmx.data.tasks.countdown import Countdown, _Item, _moves, _reachable
from lmx.data.tasks.shortest_path import ShortestPath, bfs
from lmx.data.tokenizer import ANSWER, END_ANSWER, END_THINK, EOS, THINK, CharTokenizer

DEFAULT_EPS = 0.01
_REACHABLE: dict = {}  # countdown's reachable-value sets by sorted state, shared by calls (a particle filter
_REACHABLE_MAX = 200_000  # rescores the same problems every step); cleared when it grows past this


def split_steps(text: str) -> tuple[list[str], bool]:
    """(the complete steps of `text`'s thought, whether the thought is closed) — see the module docstring."""
    start = text.find(THINK)
    start = 0 if start < 0 else start + len(THINK)
    ends = [i for i in (text.find(tag, start) for tag in (END_THINK, ANSWER, EOS)) if i >= 0]
    closed = bool(ends)
    body = text[start: min(ends)] if closed else text[start:]
    if not body:
        return [], closed
    pieces = body.split(";")
    return (pieces if closed else pieces[:-1]), closed


# ------------------------------------------------------------------------------------------- per task
def _arithmetic_refs(task: Arithmetic, problem: Problem, steps: list[str]) -> list[str]:
    """The reference steps in the form this completion is judged in."""
    full, short = _OPS[problem.meta["op"]][1](problem.meta["a"], problem.meta["b"])
    if task.cot == "full":
        return full
    if task.cot == "short":
        return short
    if task.cot == "none":
        return []
    if task.cot != "mixed":
        raise ValueError(f"no process verifier for Arithmetic(cot={task.cot!r})")
    first = 1 if full[:1] == ["neg"] else 0  # the forms share the "neg" flag; the first column step decides
    return full if len(steps) > first and "=" in steps[first] else short


def _match(steps: list[str], refs: list[str]) -> list[float]:
    return [float(i < len(refs) and s == refs[i]) for i, s in enumerate(steps)]


def _bfs_refs(task: ShortestPath, problem: Problem) -> list[str]:
    if not task.cot:
        return []
    m = problem.meta
    found = bfs([tuple(e) for e in m["edges"]], m["source"], m["target"])
    return [] if found is None else found[0]


def _countdown_frame(values: tuple[int, ...], target: int, memo: dict) -> list[tuple[str, tuple, bool, str]]:
    """Every move from `values` as the generator writes it: (step text, child values, target reachable, kind)."""
    out = []
    for a, op, b, child in _moves(tuple(_Item(v, "", 3) for v in values)):
        vals = tuple(it.value for it in child)
        head = f"{a.value}{op}{b.value}={vals[-1]}|"
        kind = "!" if vals[-1] == target else ("x" if len(vals) == 1 else "rest")
        text = head + {"!": "!", "x": "x"}.get(kind, ",".join(map(str, vals)))
        out.append((text, vals, target in _reachable(vals, memo), kind))
    return out


def _countdown_scores(task: Countdown, problem: Problem, steps: list[str]) -> tuple[list[float], bool]:
    """(scores, solved: the last scored step reached the target). Simulates Countdown.make's DFS: a stack of
    states with their untried moves; the generator prunes a move it considers at step i iff the target is not
    reachable from it and i + 1 + reserve > max_trace_steps, and a pruned move stays pruned (i only grows), so a
    state may be left exactly when none of its untried moves is still allowed."""
    if len(_REACHABLE) > _REACHABLE_MAX:
        _REACHABLE.clear()
    target, memo = problem.meta["target"], _REACHABLE
    reserve = task.num_numbers - 1
    stack = [_countdown_frame(tuple(problem.meta["numbers"]), target, memo)]
    scores, state = [], "search"  # -> "solved" after '!', "broken" after an illegal step
    for i, s in enumerate(steps):
        allowed = lambda move, i=i: move[2] or i + 1 + reserve <= task.max_trace_steps
        while stack and not any(allowed(m) for m in stack[-1]):
            stack.pop()  # every untried move here is pruned: the search backtracks
        hit = None
        if state == "search" and stack:
            hit = next((k for k, m in enumerate(stack[-1]) if m[0] == s and allowed(m)), None)
        if hit is None:
            scores.append(0.0)
            state = "broken"
            continue
        _, vals, _, kind = stack[-1].pop(hit)
        scores.append(1.0)
        if kind == "!":
            state = "solved"
        elif kind == "rest":
            stack.append(_countdown_frame(vals, target, memo))
    return scores, state == "solved"


def _scores_and_complete(task, problem: Problem, steps: list[str]) -> tuple[list[float], bool]:
    """(step scores, whether these steps are a whole trace)."""
    if isinstance(task, Arithmetic):
        refs = _arithmetic_refs(task, problem, steps)
        return _match(steps, refs), len(steps) == len(refs)
    if isinstance(task, ShortestPath):
        refs = _bfs_refs(task, problem)
        return _match(steps, refs), len(steps) == len(refs)
    if isinstance(task, Countdown):
        return _countdown_scores(task, problem, steps)
    raise TypeError(f"no process verifier for task {task!r}; built-in tasks: Arithmetic, Countdown, ShortestPath")


# ---------------------------------------------------------------------------------------------- public
def step_scores(task, problem: Problem, completion_text: str) -> list[float]:
    """One score in {0, 1} per complete CoT step of `completion_text` (see the module docstring)."""
    return _scores_and_complete(task, problem, split_steps(completion_text)[0])[0]


def prefix_reward(task, problem: Problem, text: str, *, final: bool = False, eps: float = DEFAULT_EPS) -> float:
    """A particle-filter reward r ∈ (0, 1) for a partial completion: 1 − ε while every complete step is valid, ε
    otherwise. A closed thought must also be a whole trace (all columns / BFS to the target / a solved search).
    A completion that is done — `final` (it will take no more tokens: out of budget), or it holds `<eos>` or a
    written-out answer (`</answer>`) — scores 1 − ε only if, besides, `task.score` gives it 1.
    With weights ∝ r/(1 − r) (softmax of logit r), a valid prefix outweighs an invalid one ((1 − ε)/ε)² to one;
    ε > 0 keeps every weight finite, so a pool with no valid particle still resamples uniformly."""
    if not 0 < eps < 0.5:
        raise ValueError(f"eps={eps!r} must lie in (0, 0.5)")
    steps, closed = split_steps(text)
    scores, complete = _scores_and_complete(task, problem, steps)
    ok = all(s == 1.0 for s in scores) and (complete or not closed)
    answer_at = text.find(ANSWER, max(text.find(END_THINK), 0))
    done = final or EOS in text or (answer_at >= 0 and text.find(END_ANSWER, answer_at) >= 0)
    if ok and done:
        ok = task.score(problem, text) == 1.0
    return 1.0 - eps if ok else eps


def prefix_scorer(task, problems: Sequence[Problem], *, tokenizer=None, eps: float = DEFAULT_EPS):
    """A `particle_filter` scorer: (tokens_BNT, lengths_BN) -> r_BN, decoding each particle's generated tokens
    with `tokenizer` (default: the character tokenizer) and scoring row b against problems[b] by `prefix_reward`; a
    row whose length is the budget (tokens_BNT's last axis) is final. A row the tokenizer cannot decode (a model
    whose vocabulary is padded past the tokenizer's) scores ε."""
    tokenizer = CharTokenizer() if tokenizer is None else tokenizer
    problems = list(problems)

    def scorer(tokens_BNT, lengths_BN):
        tokens_BNT, lengths_BN = np.asarray(tokens_BNT), np.asarray(lengths_BN)
        if tokens_BNT.shape[0] != len(problems):
            raise ValueError(f"prefix_scorer holds {len(problems)} problems but got {tokens_BNT.shape[0]} prompts")
        out, budget = np.empty(lengths_BN.shape, np.float64), tokens_BNT.shape[-1]
        for (b, n), length in np.ndenumerate(lengths_BN):
            try:
                text = tokenizer.decode(tokens_BNT[b, n, :length])
            except ValueError:
                out[b, n] = eps
                continue
            out[b, n] = prefix_reward(task, problems[b], text, final=length == budget, eps=eps)
        return out

    return scorer
