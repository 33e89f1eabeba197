"""Procedural reasoning tasks with exact verifiers, and a registry to build them by name."""

from __future__ import annotations

from typing import Any

from lmx.data.tasks.arithmetic import Arithmetic
from lmx.data.tasks.base import Problem, Task, extract_answer, format_target
from lmx.data.tasks.countdown import Countdown
from lmx.data.tasks.reasoning_gym import ReasoningGymTask
from lmx.data.tasks.shortest_path import ShortestPath

TASKS = {"arithmetic": Arithmetic, "countdown": Countdown, "shortest_path": ShortestPath}


def get_task(name: str, **kwargs: Any) -> Task:
    """`get_task("arithmetic", ops=("+", "-"))`; `"rg:<name>"` wraps a reasoning-gym generator."""
    if name.startswith("rg:"):
        return ReasoningGymTask(name[3:], **kwargs)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)} or 'rg:<reasoning-gym name>'")
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "Arithmetic", "Countdown", "Problem", "ReasoningGymTask", "ShortestPath", "Task",
           "extract_answer", "format_target", "get_task"]
