"""experiments.early_exit end to end at toy scale: SFT with exits (the LayerSkip loss through lmx.train.loop),
a threshold sweep, batch-1 timings, summary.json / report.md / PNG written."""

import json

from ml_collections import ConfigDict

from experiments.configs.early_exit import get_config
from experiments.early_exit import run_study


def tiny_config():
    cfg = get_config()
    cfg.task.kwargs.num_digits = (1, 1)
    cfg.model.update({"d_model": 32, "num_layers": 2, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1,
                      "head_dim": 16, "max_seq_len": 48, "exits": {"layers": (1,)}})
    cfg.train.update({"steps": 3, "batch_size": 4, "seq_len": 24, "ckpt_every": 3})
    cfg.eval.update({"max_new_tokens": 12})
    # One problem: greedy and early exit are compiled once, at batch 1, and reused by the timings; no
    # self-speculation (its exactness is tested in tests/decoding/test_early_exit.py; compiling it here costs more
    # than the rest).
    cfg.study.update({"held_out": 1, "timed_problems": 1, "repeats": 1, "draft_layers": ()})
    cfg.study.thresholds = ConfigDict({"softmax": (0.5,)})  # replaced, not merged into the default sweep
    return cfg


def test_study_writes_summary_report_and_plot(tmp_path):
    run_study(tiny_config(), tmp_path, progress=False)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert [r["measure"] for r in s["thresholds"]] == ["full depth", "softmax"]
    for r in s["thresholds"]:
        assert 0 <= r["accuracy"] <= 1 and 1 <= r["layers_per_token"] <= 2
    speed = s["wall_clock_batch1"]
    assert speed[0]["method"] == "full-depth greedy" and speed[0]["speedup"] == 1.0
    assert all(r["seconds_per_problem"] > 0 for r in speed)
    metrics = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("ce_exit1" in m for m in metrics)  # trained with the LayerSkip loss
    assert "**Target**" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "accuracy_vs_layers.png").stat().st_size > 1000
