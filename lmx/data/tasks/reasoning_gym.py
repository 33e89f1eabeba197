"""Adapter that turns any reasoning-gym generator into a `Task` (reasoning-gym is imported lazily)."""

from __future__ import annotations

from typing import Any

import numpy as np

from lmx.data.tasks.base import Problem, TaskBase


class ReasoningGymTask(TaskBase):
    """`ReasoningGymTask("chain_sum", min_terms=2)` wraps `reasoning_gym.create_dataset(name, **kwargs)`.

    Each `sample` call builds a dataset seeded from `rng`, so sampling is deterministic given the rng.
    reasoning-gym has no chains of thought: `cot` is "". The verifier is the dataset's own `score_answer`
    applied to the text inside the last <answer>...</answer>; the raw entry is kept in `meta["entry"]`.
    """

    def __init__(self, name: str, **kwargs: Any):
        import reasoning_gym  # noqa: F401  (fail at construction, not at the first sample, if missing)

        self.dataset_name, self.kwargs = name, kwargs
        self.name = f"rg:{name}"
        self._scorer = None

    def _dataset(self, size: int, seed: int):
        import reasoning_gym

        return reasoning_gym.create_dataset(self.dataset_name, size=size, seed=seed, **self.kwargs)

    def sample(self, rng: np.random.Generator, n: int) -> list[Problem]:
        ds = self._dataset(size=n, seed=int(rng.integers(2**31 - 1)))
        out = []
        for i in range(n):
            entry = ds[i]
            problem = Problem(prompt=entry["question"], answer=str(entry["answer"]), meta={"entry": entry})
            out.append(problem)
        return out

    def score(self, problem: Problem, completion: str) -> float:
        if self._scorer is None:  # score_answer reads only the dataset config, not its items
            self._scorer = self._dataset(size=1, seed=0)
        try:
            value = float(self._scorer.score_answer(self.extract_answer(completion), problem.meta["entry"]))
        except Exception:  # arbitrary model text must never crash an RL step: it just scores 0
            return 0.0
        return min(max(value, 0.0), 1.0)
