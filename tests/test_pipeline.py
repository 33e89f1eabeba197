"""experiments.pipeline (`make demo`) end to end at toy scale: SFT → RL → greedy / majority@k / short-m@k for both
policies on one held-out set, with summary.json, report.md and both PNGs written."""

import json

from experiments.configs.pipeline import get_config
from experiments.pipeline import run_pipeline, thinking_tokens
from lmx.data import CharTokenizer, get_task
from lmx.train.rl_train import rl_held_out


def tiny_config():
    cfg = get_config()
    cfg.task.kwargs.num_digits = (2, 2)
    cfg.model.update({"d_model": 32, "num_layers": 1, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1,
                      "head_dim": 16})
    cfg.sft.train.update({"steps": 4, "batch_size": 8, "seq_len": 40, "ckpt_every": 4})
    cfg.rl.update({"batch_size": 2, "group_size": 2, "max_new_tokens": 8})
    cfg.train.update({"steps": 2, "ckpt_every": 2})
    cfg.eval.update({"num_problems": 6, "batch_size": 6, "max_new_tokens": 8})
    cfg.tts.update({"k": 3, "m": (1, 2), "samples_shown": 2})
    return cfg


def test_pipeline_writes_summary_report_and_plots(tmp_path):
    summary = run_pipeline(tiny_config(), tmp_path, progress=False)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["held_out"] == 6 and set(written["policies"]) == {"sft", "rl"}
    for rows in written["policies"].values():
        assert [r["method"] for r in rows] == ["greedy", "majority@3", "short-1@3", "short-2@3"]
        for r in rows:
            assert 0 <= r["accuracy"] <= 1 and 0 < r["gen_tokens"] <= r["k"] * 8 and r["eflops"] > 0
            assert 0 <= r["think_tokens"] <= r["gen_tokens"]
        greedy, majority, short1, short2 = rows
        assert majority["gen_tokens"] > greedy["gen_tokens"]
        assert short1["gen_tokens"] <= short2["gen_tokens"] <= majority["gen_tokens"]  # the same samples, cut
    # The evaluation set is the RL run's own held-out set (what train_rl evaluated greedily).
    cfg = json.loads((tmp_path / "rl" / "config.json").read_text())
    from ml_collections import ConfigDict
    assert len(rl_held_out(ConfigDict(cfg), tmp_path / "rl")) == 6
    logged = [h for h in map(json.loads, (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines())
              if "eval/accuracy" in h]
    assert [round(h["eval/accuracy"], 6) for h in logged] == [round(written["policies"][p][0]["accuracy"], 6)
                                                               for p in ("sft", "rl")]
    report = (tmp_path / "report.md").read_text()
    assert "| rl | short-2@3 |" in report and "## What we see" in report and "## Sample generations" in report
    assert len(written["headlines"]) == 8
    for png in ("accuracy_vs_tokens.png", "training.png", "sft/loss.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_thinking_tokens_count_inside_the_think_block():
    tok = CharTokenizer()
    assert thinking_tokens(tok, "<think>12;13</think><answer>5</answer>") == 5
    assert thinking_tokens(tok, "<think>12;1") == 4  # unclosed: to the end
    assert thinking_tokens(tok, "<answer>5</answer>") == 0
    assert get_task("arithmetic", cot="mixed").cot == "mixed"
