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

from lmx.data import CharTokenizer, get_task, held_out_problems
from lmx.models import build
from lmx.train.loop import model_config, train
from lmx.train.report import quiet_orbax, write_report
from lmx.train.sft import evaluate

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/quickstart.py", "Quickstart config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/quickstart/<timestamp>).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax()
    cfg = _CONFIG.value
    run_dir = Path(_WORKDIR.value or Path("runs/quickstart") / time.strftime("%Y%m%d-%H%M%S"))
    t0 = time.time()
    result = train(cfg, run_dir)  # cfg.eval.num_problems = 0: the held-out evaluation below replaces it
    train_min = (time.time() - t0) / 60
    tok, task = CharTokenizer(), get_task(cfg.task.name, **dict(cfg.task.kwargs))
    stream = (int(cfg.train.batch_size), int(cfg.seed), int(cfg.train.steps))
    problems, drawn = held_out_problems(task, [stream], int(cfg.eval.held_out), int(cfg.eval.seed))
    ev = evaluate(build(model_config(cfg.model, tok.vocab_size)), result.params, task, tok, problems,
                  int(cfg.eval.max_new_tokens), int(cfg.eval.batch_size))
    minutes = (time.time() - t0) / 60
    notes = [f"held-out set: {len(problems)} problems whose prompts never occur in training "
             f"({drawn - len(problems)} of {drawn} drawn candidates were seen in training or repeated)",
             f"wall time: {train_min:.1f} min training, {minutes:.1f} min in all"]
    write_report(run_dir, result.history, ev, title="Quickstart: SFT on arithmetic CoT", notes=notes)
    summary = {k: v for k, v in ev.items() if k != "samples"}
    print(json.dumps({"run_dir": str(run_dir), "train_minutes": round(train_min, 2),
                      "minutes": round(minutes, 2), "held_out": len(problems), **summary}))
    print(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    app.run(main)
