"""SFT study: `python -m experiments.sft --config=experiments/configs/sft.py --config.model.num_layers=4`.

Writes runs/sft/<timestamp>/ (or --workdir): config.json, metrics.jsonl, tb/, checkpoints/,
eval_samples.jsonl, report.md and loss.png. Re-running with the same --workdir resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from lmx.train.loop import train
from lmx.train.report import quiet_orbax, write_report

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/sft.py", "SFT config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/sft/<timestamp>); reused to resume.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax()
    run_dir = Path(_WORKDIR.value or Path("runs/sft") / time.strftime("%Y%m%d-%H%M%S"))
    result = train(_CONFIG.value, run_dir)
    write_report(run_dir, result.history, result.eval, title="SFT")
    summary = {k: v for k, v in (result.eval or {}).items() if k != "samples"}
    print(json.dumps({"run_dir": str(run_dir), **summary}))


if __name__ == "__main__":
    app.run(main)
