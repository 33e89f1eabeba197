"""Multi-digit arithmetic with column-by-column chains of thought (the `make demo` task).

CoT formats (steps joined by ';', columns least significant first, operands zero-padded to one width):
  +  full  "7+5+0=12;4+8+1=13;3+2+1=06"   a+b+carry_in = carry_out digit   (347+285=632)
     short "12;13;06"                     just the two-digit column results
  -  full  "7-5-0=02;4-8-0=16;3-2-1=00"   a-b-borrow_in = borrow_out digit (347-285=62)
     short "02;16;00"                     a < b is computed as -(b-a), flagged by a leading "neg;"
  *  full  "347*5=1735;347*80=27760;347*200=69400;1735+27760=29495;29495+69400=98895"
     short "1735;27760;69400"             partial products, one per digit of b (347*285=98895)
  mixed  (any op) each problem `sample` draws gets the short trace with probability `short_frac`, the full one
         otherwise (meta["cot_form"] says which; `make` stays deterministic: full unless given `form=`). One answer
         then has a long and a short trace, an SFT model samples both, and length-aware RL can prefer the short one
         (2-3 digit "+": about half the completion tokens).
Every step has a fixed shape so a tiny character-level model can learn it in minutes.
"""

from __future__ import annotations

import numpy as np

from lmx.data.tasks.base import Problem, TaskBase, parse_int

COT_MODES = ("full", "short", "none", "mixed")


def _digits(x: int, width: int) -> list[int]:
    """Least-significant-first digits of x, zero-padded to `width`."""
    return [int(c) for c in reversed(str(x).zfill(width))]


def _add_steps(a: int, b: int) -> tuple[list[str], list[str]]:
    width = max(len(str(a)), len(str(b)))
    full, short, carry = [], [], 0
    for x, y in zip(_digits(a, width), _digits(b, width), strict=True):
        s = x + y + carry
        full.append(f"{x}+{y}+{carry}={s:02d}")
        short.append(f"{s:02d}")
        carry = s // 10
    return full, short


def _sub_steps(a: int, b: int) -> tuple[list[str], list[str]]:
    prefix = ["neg"] if a < b else []
    a, b = max(a, b), min(a, b)
    width = len(str(a))
    full, short, borrow = list(prefix), list(prefix), 0
    for x, y in zip(_digits(a, width), _digits(b, width), strict=True):
        d = x - y - borrow
        out = int(d < 0)
        col = f"{out}{d + 10 * out}"
        full.append(f"{x}-{y}-{borrow}={col}")
        short.append(col)
        borrow = out
    return full, short


def _mul_steps(a: int, b: int) -> tuple[list[str], list[str]]:
    shifted = [d * 10**k for k, d in enumerate(_digits(b, len(str(b))))]  # 285 -> 5, 80, 200
    partials = [a * s for s in shifted]
    full = [f"{a}*{s}={p}" for s, p in zip(shifted, partials, strict=True)]
    total = partials[0]
    for p in partials[1:]:  # running sum, one binary addition per step
        full.append(f"{total}+{p}={total + p}")
        total += p
    return full, [str(p) for p in partials]


_OPS = {"+": (lambda a, b: a + b, _add_steps), "-": (lambda a, b: a - b, _sub_steps),
        "*": (lambda a, b: a * b, _mul_steps)}


class Arithmetic(TaskBase):
    """`a op b =` with a, b of `num_digits` (inclusive range) digits each and op drawn from `ops`."""

    def __init__(self, num_digits: tuple[int, int] = (1, 3), ops: tuple[str, ...] = ("+",),
                 cot: str = "full", short_frac: float | None = None):
        lo, hi = num_digits
        if not 1 <= lo <= hi:
            raise ValueError(f"num_digits must satisfy 1 <= lo <= hi, got {num_digits!r}")
        if not ops or any(op not in _OPS for op in ops):
            raise ValueError(f"ops must be a non-empty subset of {tuple(_OPS)}, got {ops!r}")
        if cot not in COT_MODES:
            raise ValueError(f"cot must be one of {COT_MODES}, got {cot!r}")
        if short_frac is not None and cot != "mixed":
            raise ValueError(f"short_frac={short_frac!r} only applies to cot='mixed', got cot={cot!r}")
        short_frac = 0.5 if short_frac is None else float(short_frac)
        if not 0.0 <= short_frac <= 1.0:
            raise ValueError(f"short_frac must lie in [0, 1], got {short_frac!r}")
        self.num_digits, self.ops, self.cot, self.short_frac = (lo, hi), tuple(ops), cot, short_frac
        self.name = "arithmetic"

    def _number(self, rng: np.random.Generator) -> int:
        d = int(rng.integers(self.num_digits[0], self.num_digits[1] + 1))
        return int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10**d))

    def make(self, a: int, b: int, op: str, form: str | None = None) -> Problem:
        """The problem `a op b` with the trace `form` ("full" | "short" | "none"; default: the task's `cot`, and
        "full" for cot="mixed", whose random choice is made in `sample`)."""
        if form is None:
            form = "full" if self.cot == "mixed" else self.cot
        if form not in ("full", "short", "none"):
            raise ValueError(f"form must be 'full', 'short' or 'none', got {form!r}")
        fn, steps = _OPS[op]
        full, short = steps(a, b)
        cot = {"full": ";".join(full), "short": ";".join(short), "none": ""}[form]
        meta = {"a": a, "b": b, "op": op}
        if self.cot == "mixed":
            meta["cot_form"] = form
        return Problem(prompt=f"{a}{op}{b}=", answer=str(fn(a, b)), cot=cot, meta=meta)

    def sample(self, rng: np.random.Generator, n: int) -> list[Problem]:
        out = []
        for _ in range(n):
            op = self.ops[int(rng.integers(len(self.ops)))]
            a, b = self._number(rng), self._number(rng)
            form = None
            if self.cot == "mixed":  # the only mode that draws more: the other modes' streams stay as they were
                form = "short" if rng.random() < self.short_frac else "full"
            out.append(self.make(a, b, op, form))
        return out

    def score(self, problem: Problem, completion: str) -> float:
        got = parse_int(self.extract_answer(completion))
        return float(got is not None and got == int(problem.answer))
