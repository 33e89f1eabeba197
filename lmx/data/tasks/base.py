"""What every task shares: the `Problem` record, the `Task` protocol and the target text format."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lmx.data.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK


@dataclasses.dataclass(frozen=True)
class Problem:
    """One task instance. `prompt` is what the model sees; `cot` is a reference chain of thought;
    `meta` holds what the verifier needs (python builtins only, so it serialises to JSON)."""

    prompt: str
    answer: str
    cot: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str

    def sample(self, rng: np.random.Generator, n: int) -> list[Problem]: ...

    def score(self, problem: Problem, completion: str) -> float: ...

    def extract_answer(self, text: str) -> str | None: ...


def format_target(problem: Problem, cot: bool = True) -> str:
    """The completion a model is trained to emit after the prompt (eos is added by the batcher).
    `cot=False` keeps empty think tags, so "thinking" and "no thinking" targets share one format."""
    thought = problem.cot if cot else ""
    return f"{THINK}{thought}{END_THINK}{ANSWER}{problem.answer}{END_ANSWER}"


def extract_answer(text: str) -> str | None:
    """The stripped text between the last `<answer>` and the `</answer>` after it; None if absent."""
    start = text.rfind(ANSWER)
    if start < 0:
        return None
    start += len(ANSWER)
    end = text.find(END_ANSWER, start)
    return None if end < 0 else text[start:end].strip()


_INT_RE = re.compile(r"-?\d+")


def parse_int(text: str | None) -> int | None:
    """An integer written plainly (optional minus, digits only), else None."""
    if text is None or not _INT_RE.fullmatch(text):
        return None
    return int(text)


class TaskBase:
    """Default `extract_answer` shared by the built-in tasks."""

    name = "task"

    def extract_answer(self, text: str) -> str | None:
        return extract_answer(text)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
