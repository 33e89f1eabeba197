"""RL study: `python -m experiments.rl --config=experiments/configs/rl.py --config.loss=dapo`.

Writes runs/rl/<timestamp>/ (or --workdir): config.json, metrics.jsonl, tb/, checkpoints/, sft/ (the SFT run it
starts from, unless --config.init_from names one), report.md and loss.png. Re-running with the same --workdir
resumes exactly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from lmx.train.report import quiet_orbax, write_report
from lmx.train.rl_train import train_rl

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/rl.py", "RL config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/rl/<timestamp>); reused to resume.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax()
    cfg = _CONFIG.value
    run_dir = Path(_WORKDIR.value or Path("runs/rl") / time.strftime("%Y%m%d-%H%M%S"))
    t0 = time.time()
    result = train_rl(cfg, run_dir)
    minutes = (time.time() - t0) / 60
    steps = [r for r in result.history if "reward_mean" in r]
    notes = [f"loss {cfg.loss}, advantage {cfg.advantage}, reward {cfg.reward}, G={cfg.rl.group_size}, "
             f"B={cfg.rl.batch_size} prompts per step, init from {cfg.init_from or 'an SFT run trained first'}"]
    if steps:
        k = min(5, len(steps))
        mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        first_last = lambda key, f: f"first {mean(steps[:k], key):{f}}, last {mean(steps[-k:], key):{f}}"  # noqa: E731
        notes.append(f"train reward (mean of {k} steps): {first_last('reward_mean', '.3f')}; sample accuracy "
                     f"{first_last('accuracy', '.3f')}; completion tokens {first_last('completion_len_mean', '.1f')}")
    init = next((r for r in result.history if r["step"] == 0 and "eval/accuracy" in r), None)
    if init:
        notes.append(f"held-out accuracy before RL: {init['eval/accuracy']:.3f} ({init['eval/gen_tokens']:.1f} "
                     "generated tokens)")
    notes.append(f"wall time: {minutes:.1f} min")
    write_report(run_dir, result.history, result.eval, title=f"RL ({cfg.loss})", notes=notes)
    summary = {k: v for k, v in (result.eval or {}).items() if k != "samples"}
    if init:
        summary["init_accuracy"] = init["eval/accuracy"]
    if steps:
        summary["final_reward_mean"] = steps[-1]["reward_mean"]
    print(json.dumps({"run_dir": str(run_dir), "minutes": round(minutes, 2), **summary}))
    print(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    app.run(main)
