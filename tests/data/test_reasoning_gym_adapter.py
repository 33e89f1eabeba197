import numpy as np
import pytest

from lmx.data.tasks import ReasoningGymTask, Task, format_target, get_task

pytest.importorskip("reasoning_gym")


@pytest.mark.parametrize("name", ["basic_arithmetic", "chain_sum"])
def test_adapter_scores_its_own_answers(name):
    task = get_task(f"rg:{name}")
    assert isinstance(task, ReasoningGymTask) and isinstance(task, Task) and task.name == f"rg:{name}"
    problems = task.sample(np.random.default_rng(0), 8)
    assert problems == task.sample(np.random.default_rng(0), 8)  # deterministic given the rng
    assert problems != task.sample(np.random.default_rng(1), 8)
    for p in problems:
        assert p.cot == "" and p.prompt and p.meta["entry"]["question"] == p.prompt
        assert task.score(p, format_target(p)) == 1.0
        assert task.score(p, "<answer>not a number</answer>") < 1.0
        assert task.score(p, "no answer at all") == 0.0


def test_adapter_passes_generator_options():
    task = get_task("rg:chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    for p in task.sample(np.random.default_rng(0), 5):
        assert p.meta["entry"]["metadata"]["num_terms"] == 2
