"""experiments.recursive end to end at toy scale: a 2-layer base converted to 1 unique layer + rank-2 LoRA and
uptrained, the vanilla 1-layer model from scratch, and summary.json / report.md / the PNG written.

One rank and no vanilla_first_k: every further variant compiles its own train step and decode programs (~5 s here)."""

import json

from experiments.configs.recursive import get_config
from experiments.recursive import run_study


def tiny_study_config():
    cfg = get_config()
    cfg.task.kwargs.num_digits = (1, 1)
    cfg.model.update({"d_model": 16, "num_layers": 2, "mlp_dim": 32, "num_heads": 2, "num_kv_heads": 1,
                      "head_dim": 8, "max_seq_len": 32})
    cfg.base.train.update({"steps": 3, "batch_size": 4, "seq_len": 24, "ckpt_every": 3})
    cfg.recursion.update({"num_unique": 1, "lora_ranks": (2,)})
    cfg.uptrain.update({"steps": 2, "log_every": 1})
    cfg.vanilla_first_k = False
    cfg.eval.update({"num_problems": 4, "batch_size": 4, "max_new_tokens": 6})
    cfg.speed.update({"new_tokens": 4, "repeats": 1})
    return cfg


def test_study_writes_summary_report_and_plot(tmp_path):
    summary = run_study(tiny_study_config(), tmp_path, progress=False)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    names = [r["name"] for r in written["runs"]]
    assert names == ["base", "recursive_r2", "vanilla_scratch"]
    runs = dict(zip(names, written["runs"], strict=True))
    for r in written["runs"]:
        assert {"params", "accuracy", "loss", "decode_tokens_per_s", "accuracy_vs_base_points",
                "accuracy_vs_vanilla_scratch_points", "train_steps", "init"} <= set(r)
        assert 0 <= r["accuracy"] <= 1 and r["loss"] > 0 and r["decode_tokens_per_s"] > 0
    rec, vanilla = runs["recursive_r2"], runs["vanilla_scratch"]
    assert {"accuracy", "loss"} <= set(rec["init"]) and vanilla["init"] is None
    # The 1-layer vanilla model's params plus r·(in + out) per relaxed matrix and depth: 2 depths, r = 2, and
    # q, k, v, o, gate, up, down have (in + out) = 32, 24, 24, 32, 48, 48, 48 at d_model 16, mlp_dim 32.
    assert rec["params"] == vanilla["params"] + 2 * 2 * 256
    assert 0 < rec["residual_energy_kept"] <= 1
    assert rec["train_steps"] == vanilla["train_steps"] == 3 + 2
    assert written["full_rank_check"]["max_abs_logit_diff"] < 1e-3  # full rank reproduces the base
    assert runs["base"]["accuracy_vs_base_points"] == 0 and runs["base"]["depth"] == 2
    assert written["observations"] and written["held_out"]["problems"] == 4
    report = (tmp_path / "report.md").read_text()
    assert "| recursive_r2 |" in report and "## What we see" in report
    for png in ("recursive.png", "base/loss.png", "vanilla_scratch/loss.png"):
        assert (tmp_path / png).stat().st_size > 1000
