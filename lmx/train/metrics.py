"""Metrics: one JSON object per logged step in metrics.jsonl, and TensorBoard scalars (tensorboardX)."""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _scalar(v) -> float | int | None:
    """A Python number for scalar values (jax / numpy / Python); None for anything else."""
    if isinstance(v, bool | numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if hasattr(v, "shape") and np.ndim(v) == 0 and np.issubdtype(np.asarray(v).dtype, np.number):
        a = np.asarray(v)
        return int(a) if np.issubdtype(a.dtype, np.integer) else float(a)
    return None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path: str | Path, max_step: int):
    """Drop the records of a JSONL file whose "step" exceeds `max_step` (left by an interrupted run)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= max_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)  # atomic: the old file stays whole until the new one is complete


class MetricsWriter:
    """Appends to `run_dir/metrics.jsonl` and `run_dir/tb/`. With `resume_step=k` (a run restarting from
    its step-k checkpoint), records after step k, left by the interrupted run, are dropped from the JSONL
    and purged from TensorBoard, so every step appears once."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        self._file = self.path.open("a")
        purge = resume_step + 1 if resume_step else None
        self._tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=purge) if tensorboard else None

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Log the scalar entries of `metrics` at `step` (others are skipped); returns the record."""
        record: dict[str, Any] = {"step": int(step)}
        for k, v in metrics.items():
            x = _scalar(v)
            if x is not None and k != "step":
                record[k] = x
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
        return record

    def flush(self):
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
