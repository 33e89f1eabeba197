"""Data for lmx: procedural reasoning tasks with verifiers, a char tokenizer, batching, TFDS I/O.

`lmx.data.tfds` (and with it tensorflow_datasets) is imported only when used, keeping `import lmx.data`
light for training and decoding code.
"""

from lmx.data.batching import (
    batches,
    encode_example,
    held_out_problems,
    make_batch,
    pack_examples,
    prompt_batch,
    step_rng,
)
from lmx.data.tasks import (
    TASKS,
    Arithmetic,
    Countdown,
    Problem,
    ReasoningGymTask,
    ShortestPath,
    Task,
    extract_answer,
    format_target,
    get_task,
)
from lmx.data.tokenizer import CharTokenizer

_LAZY = {"build_task_dataset", "load_task_source", "sample_split", "TaskSource"}


def __getattr__(name: str):
    if name in _LAZY:
        from lmx.data import tfds

        return getattr(tfds, name)
    raise AttributeError(f"module 'lmx.data' has no attribute {name!r}")


__all__ = [
    "TASKS", "Arithmetic", "CharTokenizer", "Countdown", "Problem", "ReasoningGymTask", "ShortestPath",
    "Task", "TaskSource", "batches", "held_out_problems", "build_task_dataset", "encode_example", "extract_answer",
    "format_target", "get_task", "load_task_source", "make_batch", "pack_examples", "prompt_batch",
    "sample_split", "step_rng",
]
