"""Tasks materialised as TFDS datasets (array_record files, written and read without TensorFlow).

`build_task_dataset` writes `<data_dir>/<name>/1.0.0/` with features prompt/answer/cot/meta (text; meta
is JSON) in generation order, and `load_task_source` reads any split back through `tfds.data_source` as
random-access records of python values. Works with TensorFlow absent: TFDS 4.9 encodes `Text` features
with its own numpy path and writes array_record through the `array_record` package; GCS lookups are off
by default, so nothing is downloaded. The same loader reads any prepared TFDS text dataset.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from lmx.data.tasks.base import Problem, Task

VERSION = "1.0.0"
FIELDS = ("prompt", "answer", "cot", "meta")
SPLITS = ("train", "test")


def dataset_name(task_name: str) -> str:
    """TFDS-safe name for a task: "rg:chain_sum" -> "lmx_rg_chain_sum"."""
    return "lmx_" + re.sub(r"[^a-z0-9]+", "_", task_name.lower()).strip("_")


def sample_split(task: Task, n: int, seed: int, split: str) -> list[Problem]:
    """The problems `build_task_dataset` writes for `split`: one independent rng stream per split."""
    return task.sample(np.random.default_rng([seed, SPLITS.index(split)]), n)


def _record(p: Problem) -> dict[str, str]:
    # default=str: reasoning-gym metadata may hold values JSON cannot represent; they come back as text.
    return {"prompt": p.prompt, "answer": p.answer, "cot": p.cot, "meta": json.dumps(p.meta, default=str)}


def _builder_class(name: str, task: Task, sizes: dict[str, int], seed: int) -> type:
    """A GeneratorBasedBuilder subclass named `name`, not added to the global TFDS registry (tasks are
    parameterised at run time, and re-defining a registered name would raise)."""

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"lmx task {task!r}, seed {seed}",
            features=tfds.features.FeaturesDict({f: tfds.features.Text() for f in FIELDS}),
            disable_shuffling=True,  # index i is the i-th sampled problem
            metadata=tfds.core.MetadataDict(task=repr(task), seed=seed, sizes=sizes),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split=split, n=n) for split, n in sizes.items()}

    def _generate_examples(self, split: str, n: int):
        for i, problem in enumerate(sample_split(task, n, seed, split)):
            yield i, _record(problem)

    namespace = {"name": name, "VERSION": tfds.core.Version(VERSION), "_info": _info,
                 "_split_generators": _split_generators, "_generate_examples": _generate_examples}
    return type(f"LmxTaskBuilder_{name}", (tfds.core.GeneratorBasedBuilder,), namespace,
                skip_registration=True)


def build_task_dataset(task: Task, data_dir: str | pathlib.Path, num_train: int, num_test: int = 0,
                       seed: int = 0, name: str | None = None) -> pathlib.Path:
    """Sample `num_train`/`num_test` problems (deterministic in `seed`) and write them as a TFDS dataset.
    Returns the dataset directory. An existing dataset built with the same task, seed and sizes is
    reused; one built differently is never overwritten (ValueError)."""
    name = name or dataset_name(task.name)
    sizes = {"train": num_train, "test": num_test} if num_test else {"train": num_train}
    builder = _builder_class(name, task, sizes, seed)(data_dir=str(data_dir), file_format="array_record")
    if builder.is_prepared():
        want = {"task": repr(task), "seed": seed, "sizes": sizes}
        have = {k: builder.info.metadata.get(k) for k in want}
        if have != want:
            raise ValueError(f"{builder.data_path} already holds a different dataset ({have}, asked for "
                             f"{want}); pass another data_dir or name")
    else:
        builder.download_and_prepare()
    return pathlib.Path(str(builder.data_path))


def _to_python(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_to_python(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


class TaskSource(Sequence):
    """Random access over one split: `source[i]` is a dict of python values (text decoded to str)."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return {k: _to_python(v) for k, v in self._source[i].items()}

    def problem(self, i: int) -> Problem:
        """The record as a `Problem` (only for datasets written by `build_task_dataset`). `meta` went
        through JSON: tuples come back as lists, and values JSON cannot hold as strings."""
        r = self[i]
        return Problem(prompt=r["prompt"], answer=r["answer"], cot=r["cot"], meta=json.loads(r["meta"]))


def load_task_source(name: str, data_dir: str | pathlib.Path, split: str = "train") -> TaskSource:
    """Read a prepared split through `tfds.data_source` (never downloads or generates)."""
    return TaskSource(tfds.data_source(name, data_dir=str(data_dir), split=split, download=False))
