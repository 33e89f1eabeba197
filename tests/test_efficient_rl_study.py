"""experiments.efficient_rl end to end at toy scale: one SFT run, the baseline and one length-aware run from it,
the unrunnable rewards skipped with a reason, and summary.json / report.md / both PNGs written."""

import json

from experiments.configs.efficient_rl import L1_BUDGET, get_config, run
from experiments.efficient_rl import reward_blocker, run_study, trace_reward_gap
from lmx.data import CharTokenizer, get_task
from lmx.train.rewards import available_rewards


def tiny_study_config():
    cfg = get_config()
    cfg.task.kwargs.num_digits = (2, 2)
    cfg.model.update({"d_model": 32, "num_layers": 1, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1,
                      "head_dim": 16})
    cfg.sft.train.update({"steps": 4, "batch_size": 8, "seq_len": 40, "ckpt_every": 4})
    cfg.runs["bogus"] = run("grpo", "correctness+no_such_reward")  # skipped, with the trainer's reason
    cfg.only = "kimi,bogus"  # the baseline (grpo) is always run
    cfg.rl.update({"batch_size": 2, "group_size": 2, "max_new_tokens": 8})
    cfg.train.update({"steps": 1, "ckpt_every": 1})
    cfg.eval.update({"num_problems": 8, "batch_size": 8, "max_new_tokens": 8})
    return cfg


def test_study_writes_summary_report_and_plots(tmp_path):
    summary = run_study(tiny_study_config(), tmp_path, progress=False)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["runs"][0]["name"] == "grpo" and {r["name"] for r in written["runs"]} == {"grpo", "kimi", "bogus"}
    grpo, kimi, bogus = sorted(written["runs"], key=lambda r: ["grpo", "kimi", "bogus"].index(r["name"]))
    for r in (grpo, kimi):
        assert r["status"] == "ok"
        assert {"reward", "loss", "accuracy", "gen_tokens", "token_change_pct", "accuracy_change_points",
                "wall_minutes", "short_trace_frac", "short_minus_full_reward", "meets_target"} <= set(r)
        assert 0 <= r["accuracy"] <= 1 and 0 < r["gen_tokens"] <= 8
        assert (tmp_path / r["name"] / "metrics.jsonl").exists()
    assert grpo["token_change_pct"] == 0 and not grpo["length_aware"] and kimi["length_aware"]
    assert bogus["status"] == "skipped" and "unknown reward 'no_such_reward'" in bogus["reason"]
    assert {"accuracy", "gen_tokens"} <= set(written["sft"]) and written["sft"]["trained_here"]
    assert {"met", "runs_meeting", "token_cut", "accuracy_points"} <= set(written["target"])
    assert written["trace_lengths"]["full_tokens"] > written["trace_lengths"]["short_tokens"]
    report = (tmp_path / "report.md").read_text()
    assert "| kimi |" in report and "**Target**" in report and "bogus" in report
    for png in ("accuracy_vs_tokens.png", "training.png", "sft/loss.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_reward_blocker_and_trace_reward_gap():
    task, tok = get_task("arithmetic", cot="mixed", short_frac=0.3), CharTokenizer()
    assert trace_reward_gap(task, tok, "correctness", 8, 40) == 0.0  # both traces are correct
    assert trace_reward_gap(task, tok, "correctness+kimi_length", 8, 40) == 1.0  # +0.5 shortest, -0.5 longest
    assert reward_blocker(task, tok, "correctness+kimi_length") is None
    assert "budgets_B" in reward_blocker(task, tok, "l1_max")  # L1 without cfg.budget
    assert reward_blocker(task, tok, "l1_max", budget=L1_BUDGET) is None
    assert reward_blocker(task, tok, "o1_pruner") is None  # reference statistics from π_ref
    assert reward_blocker(task, tok, "lead", {"lead": {"mode": "asymmetric"}}) is None
    assert "unknown reward" in reward_blocker(task, tok, "correctness+no_such_reward")
    assert "lead" in available_rewards()
