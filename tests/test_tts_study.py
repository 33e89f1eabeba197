"""experiments.tts end to end at toy scale: a 2-step SFT run, every method at k = 2 (rpc cut by max_k), and
summary.json / report.md / both PNGs written."""

import json

from experiments.configs.tts import get_config
from experiments.tts import METHODS, run_study, short_m


def tiny_config():
    cfg = get_config()
    cfg.task.kwargs.num_digits = (1, 1)
    cfg.model.update({"d_model": 32, "num_layers": 1, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1,
                      "head_dim": 16, "max_seq_len": 32})
    cfg.sft.train.update({"steps": 2, "batch_size": 4, "seq_len": 24, "ckpt_every": 2})
    cfg.eval.update({"num_problems": 4, "max_new_tokens": 12, "ks": (2,), "budgets": (4,),
                     "max_k": {"rpc": 1},  # one k: fewer compiles; rpc cut by max_k
                     "skip": "particle_filter,astar"})  # each compiles its own loop; tested in tests/decoding
    return cfg


def test_study_writes_summary_report_and_plots(tmp_path):
    run_study(tiny_config(), tmp_path, progress=False)
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert all(set(r) == {"method", "k", "accuracy", "gen_tokens", "eflops"} for r in rows)
    names = {r["method"] for r in rows}
    assert names == {m for m, _ in METHODS} - {"budget_forcing", "rpc", "particle_filter", "astar"} | {
        "budget_forcing@4"}
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["gen_tokens"] > 0 and r["eflops"] > 0
    by = {(r["method"], r["k"]): r for r in rows}
    assert by["majority", 2]["gen_tokens"] > by["greedy", None]["gen_tokens"]  # k samples cost more than one
    assert by["majority", 2]["eflops"] > by["greedy", None]["eflops"]
    report = (tmp_path / "report.md").read_text()
    assert "| short_m_at_k | 2 |" in report and "## What we see" in report and "short-m@k" in report
    for png in ("accuracy_vs_tokens.png", "accuracy_vs_eflops.png", "sft/loss.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert [short_m("half", k) for k in (1, 2, 4, 16)] == [1, 1, 2, 8] and short_m(3, 2) == 2
