"""Countdown: combine given numbers with + - * / (each at most once) to hit a target.

The reference CoT is a depth-first search trace, so it shows dead ends before the solution (Stream of
Search style). One step per expansion, steps joined by ';':
  "a op b=c|rest"  the numbers left after the move (the new one last)
  "a op b=c|x"     nothing left and the target was missed: a dead end, the search backtracks
  "a op b=c|!"     c is the target: done
Moves keep intermediate values positive integers (larger op smaller, division only when exact). The
search explores dead ends only while `max_trace_steps` leaves room to finish; after that it follows moves
that a solver knows to be solvable, so every trace ends at a solution within the cap.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction
from typing import NamedTuple

import numpy as np

from lmx.data.tasks.base import Problem, TaskBase


class _Item(NamedTuple):
    value: int
    expr: str
    prec: int  # 3 atom, 2 * /, 1 + -: decides where the answer needs parentheses


def _wrap(item: _Item, min_prec: int) -> str:
    return item.expr if item.prec >= min_prec else f"({item.expr})"


def _combine(a: _Item, b: _Item, op: str) -> _Item | None:
    """a op b with a.value >= b.value, or None when the result is not a positive integer."""
    x, y = a.value, b.value
    if op == "+":
        return _Item(x + y, f"{a.expr}+{b.expr}", 1)
    if op == "-":
        return _Item(x - y, f"{a.expr}-{_wrap(b, 2)}", 1) if x > y else None
    if op == "*":
        return _Item(x * y, f"{_wrap(a, 2)}*{_wrap(b, 2)}", 2)
    return _Item(x // y, f"{_wrap(a, 2)}/{_wrap(b, 3)}", 2) if y > 0 and x % y == 0 else None


def _moves(state: tuple[_Item, ...]):
    """All (a, op, b, child_state) reachable in one step; the new number goes last."""
    for i in range(len(state)):
        for j in range(i + 1, len(state)):
            a, b = sorted((state[i], state[j]), key=lambda it: it.value, reverse=True)
            rest = tuple(s for k, s in enumerate(state) if k not in (i, j))
            for op in "+-*/":
                c = _combine(a, b, op)
                if c is not None:
                    yield a, op, b, rest + (c,)


def _reachable(values: tuple[int, ...], memo: dict) -> frozenset[int]:
    """Every value that appears in some state reachable from `values` (including `values`)."""
    key = tuple(sorted(values))
    if key not in memo:
        out = set(key)
        for _, _, _, child in _moves(tuple(_Item(v, "", 3) for v in key)):
            out |= _reachable(tuple(c.value for c in child), memo)
        memo[key] = frozenset(out)
    return memo[key]


# -------------------------------------------------------------------------------------- verifier
_TOKEN_RE = re.compile(r"\s*(\d+|[-+*/()])")
MAX_EXPR_CHARS = 256  # bounds recursion depth and integer sizes in the parser


class _Parser:
    """expr := term (('+'|'-') term)* ; term := atom (('*'|'/') atom)* ; atom := INT | '(' expr ')'.
    Exact rational arithmetic; raises ValueError on anything else (unary minus, junk, division by 0)."""

    def __init__(self, text: str):
        pos, self.tokens = 0, []
        text = text.rstrip()
        while pos < len(text):
            m = _TOKEN_RE.match(text, pos)
            if m is None:
                raise ValueError(f"unexpected character at {pos} in {text!r}")
            self.tokens.append(m.group(1))
            pos = m.end()
        self.i, self.numbers = 0, []

    def _peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _next(self) -> str:
        tok = self._peek()
        if tok is None:
            raise ValueError("unexpected end of expression")
        self.i += 1
        return tok

    def parse(self) -> Fraction:
        value = self._expr()
        if self._peek() is not None:
            raise ValueError(f"trailing token {self._peek()!r}")
        return value

    def _expr(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            value = value + self._term() if self._next() == "+" else value - self._term()
        return value

    def _term(self) -> Fraction:
        value = self._atom()
        while self._peek() in ("*", "/"):
            if self._next() == "*":
                value *= self._atom()
            else:
                divisor = self._atom()
                if divisor == 0:
                    raise ValueError("division by zero")
                value /= divisor
        return value

    def _atom(self) -> Fraction:
        tok = self._next()
        if tok == "(":
            value = self._expr()
            if self._next() != ")":
                raise ValueError("missing ')'")
            return value
        if not tok.isdigit():
            raise ValueError(f"expected a number, got {tok!r}")
        self.numbers.append(int(tok))
        return Fraction(int(tok))


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """Value of an arithmetic expression and the integer literals it uses; ValueError if malformed."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    parser = _Parser(expr)
    return parser.parse(), parser.numbers


# ------------------------------------------------------------------------------------------ task
class Countdown(TaskBase):
    """Numbers drawn from [1, max_number]; the target is drawn uniformly from the values in
    [min_target, max_target] that some expression reaches (so every instance is solvable) and that are
    not already among the numbers."""

    def __init__(self, num_numbers: int = 4, max_number: int = 25, min_target: int = 10,
                 max_target: int = 100, max_trace_steps: int = 16, partial_credit: float = 0.1):
        if num_numbers < 2 or max_number < 1 or not 1 <= min_target <= max_target:
            raise ValueError(f"invalid Countdown sizes: num_numbers={num_numbers}, max_number={max_number}, "
                             f"target range=[{min_target}, {max_target}]")
        if max_trace_steps < num_numbers - 1:
            raise ValueError(f"max_trace_steps={max_trace_steps} < num_numbers-1; no solution would fit")
        self.num_numbers, self.max_number = num_numbers, max_number
        self.min_target, self.max_target = min_target, max_target
        self.max_trace_steps, self.partial_credit = max_trace_steps, partial_credit
        self.name = "countdown"

    def sample(self, rng: np.random.Generator, n: int) -> list[Problem]:
        return [self._sample_one(rng) for _ in range(n)]

    def _sample_one(self, rng: np.random.Generator) -> Problem:
        while True:  # rarely more than one draw: most number sets reach many targets
            numbers = [int(v) for v in rng.integers(1, self.max_number + 1, size=self.num_numbers)]
            memo: dict = {}
            reach = _reachable(tuple(numbers), memo)
            targets = sorted(v for v in reach if self.min_target <= v <= self.max_target and v not in numbers)
            if targets:
                target = targets[int(rng.integers(len(targets)))]
                return self.make(numbers, target, rng, memo)

    def make(self, numbers: list[int], target: int, rng: np.random.Generator,
             memo: dict | None = None) -> Problem:
        """The instance (numbers, target) with a search trace whose move order is drawn from `rng`."""
        memo = {} if memo is None else memo
        if target not in _reachable(tuple(numbers), memo):
            raise ValueError(f"target {target} is not reachable from {numbers}")
        steps: list[str] = []
        reserve = self.num_numbers - 1  # steps that finishing from anywhere may still need

        def dfs(state: tuple[_Item, ...]) -> _Item | None:
            moves = list(_moves(state))
            for k in rng.permutation(len(moves)):
                a, op, b, child = moves[int(k)]
                c = child[-1]
                solvable = target in _reachable(tuple(it.value for it in child), memo)
                if not solvable and len(steps) + 1 + reserve > self.max_trace_steps:
                    continue  # out of budget for exploring: only moves known to lead to a solution
                head = f"{a.value}{op}{b.value}={c.value}|"
                if c.value == target:
                    steps.append(head + "!")
                    return c
                if len(child) == 1:
                    steps.append(head + "x")
                    continue
                steps.append(head + ",".join(str(it.value) for it in child))
                found = dfs(child)
                if found is not None:
                    return found
            return None

        if target in numbers:
            raise ValueError(f"target {target} is already one of the numbers {numbers}")
        found = dfs(tuple(_Item(v, str(v), 3) for v in numbers))
        assert found is not None, "solvable instance must yield a solution"
        nums = ",".join(map(str, numbers))
        meta = {"numbers": numbers, "target": target, "dead_ends": sum(s.endswith("|x") for s in steps),
                "trace_steps": len(steps)}
        return Problem(prompt=f"Make {target} from {nums} using + - * /:", answer=found.expr,
                       cot=";".join(steps), meta=meta)

    def score(self, problem: Problem, completion: str) -> float:
        """1 for an expression equal to the target using each given number at most once; `partial_credit`
        for any other well-formed expression (wrong value or illegal numbers, as in TinyZero); else 0.
        Values are exact rationals, so "6/4*2" is 3."""
        expr = self.extract_answer(completion)
        if not expr:
            return 0.0
        try:
            value, used = evaluate(expr)
        except ValueError:
            return 0.0
        allowed = Counter(problem.meta["numbers"])
        legal = all(allowed[v] >= k for v, k in Counter(used).items())
        return 1.0 if legal and value == problem.meta["target"] else self.partial_credit
