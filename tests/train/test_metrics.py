import glob
import struct

import numpy as np
from tensorboardX.proto import event_pb2

from lmx.train import MetricsWriter, read_metrics


def read_tb_scalars(logdir):
    """(tag, step, value) from every event file under logdir (TFRecord framing, Event protos)."""
    out = []
    for path in sorted(glob.glob(f"{logdir}/**/events.out.tfevents.*", recursive=True)):
        data = open(path, "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path) as w:
        rec = w.write(1, {"loss": np.float32(2.5), "tokens": np.int32(7), "samples": ["skipped"]})
        w.write(2, {"loss": 1.5, "eval/accuracy": 0.25})
    assert rec == {"step": 1, "loss": 2.5, "tokens": 7}
    assert read_metrics(tmp_path) == [rec, {"step": 2, "loss": 1.5, "eval/accuracy": 0.25}]
    scalars = read_tb_scalars(tmp_path / "tb")
    assert ("loss", 1, 2.5) in scalars and ("eval/accuracy", 2, 0.25) in scalars


def test_resume_drops_later_records(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 6):
            w.write(step, {"loss": float(step)})
    with MetricsWriter(tmp_path, resume_step=3) as w:  # the checkpoint was at 3; steps 4, 5 rerun
        w.write(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
