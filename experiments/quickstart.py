"""`make demo`: train a small transformer on arithmetic CoT, evaluate 200 held-out problems greedily, and
write runs/quickstart/<time>/report.md (accuracy, mean CoT tokens, loss curve, sample generations).

python -m experiments.quickstart [--config=experiments/configs/quickstart.py --config.train.steps=1000]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from lmx.data import CharTokenizer, batches, get_task
from lmx.train.loop import train
from lmx.train.report import quiet_orbax, write_report

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/quickstart.py", "Quickstart config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/quickstart/<timestamp>).")


def seen_in_training(cfg, prompts: set[str]) -> int:
    """How many eval prompts also occur in the training stream (batches are a pure function of the seed)."""
    tok, task = CharTokenizer(), get_task(cfg.task.name, **dict(cfg.task.kwargs))
    stream = batches(task, tok, int(cfg.train.batch_size), int(cfg.train.seq_len), seed=int(cfg.seed))
    seen = set()
    for _ in range(int(cfg.train.steps)):
        for row in next(stream)["tokens_BT"]:
            text = tok.decode(row.tolist(), skip_special=True)
            seen.add(text[: text.index("=") + 1])
    return len(prompts & seen)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax()
    cfg = _CONFIG.value
    run_dir = Path(_WORKDIR.value or Path("runs/quickstart") / time.strftime("%Y%m%d-%H%M%S"))
    t0 = time.time()
    result = train(cfg, run_dir)
    minutes = (time.time() - t0) / 60
    ev = result.eval
    overlap = seen_in_training(cfg, {s["prompt"] for s in ev["samples"]}) if cfg.task.name == "arithmetic" else None
    notes = [f"wall time (train + eval): {minutes:.1f} min"]
    if overlap is not None:
        notes.append(f"{overlap} of {len(ev['samples'])} eval prompts also occur in the training stream")
    write_report(run_dir, result.history, ev, title="Quickstart: SFT on arithmetic CoT", notes=notes)
    summary = {k: v for k, v in ev.items() if k != "samples"}
    print(json.dumps({"run_dir": str(run_dir), "minutes": round(minutes, 2), "eval_seen_in_train": overlap,
                      **summary}))
    print(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    app.run(main)
