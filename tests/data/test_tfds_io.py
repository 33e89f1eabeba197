import sys

import pytest

from lmx.data.tasks import Countdown, ShortestPath, format_target
from lmx.data.tfds import build_task_dataset, load_task_source, sample_split


def test_round_trip_through_data_source(tmp_path):
    task = Countdown(max_trace_steps=8)
    path = build_task_dataset(task, tmp_path, num_train=300, num_test=40, seed=3)
    assert path == tmp_path / "lmx_countdown" / "1.0.0" and list(path.glob("*.array_record*"))
    for split, n in [("train", 300), ("test", 40)]:
        source = load_task_source("lmx_countdown", tmp_path, split)
        want = sample_split(task, n, seed=3, split=split)
        assert len(source) == n
        assert [source.problem(i) for i in range(n)] == want  # same order, exact text and meta
        record = source[0]
        assert set(record) == {"prompt", "answer", "cot", "meta"} and isinstance(record["cot"], str)
        assert task.score(source.problem(0), format_target(want[0])) == 1.0
    train, test = (sample_split(task, 40, 3, s) for s in ("train", "test"))
    assert train != test
    assert "tensorflow" not in sys.modules  # written and read without TensorFlow


def test_existing_dataset_is_reused_never_overwritten(tmp_path):
    task = ShortestPath()
    first = build_task_dataset(task, tmp_path, num_train=20, seed=0, name="graphs")
    stamp = sorted((p.name, p.stat().st_mtime_ns) for p in first.iterdir())
    assert build_task_dataset(task, tmp_path, num_train=20, seed=0, name="graphs") == first
    with pytest.raises(ValueError, match="different dataset"):
        build_task_dataset(task, tmp_path, num_train=20, seed=1, name="graphs")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in first.iterdir()) == stamp
    assert load_task_source("graphs", tmp_path)[2]["prompt"] == sample_split(task, 20, 0, "train")[2].prompt

