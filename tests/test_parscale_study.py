"""experiments.parscale end to end at toy scale (one size, P ∈ {1, 2}, two steps: ParScale's programs take seconds to
compile) writing summary.json / report.md / the PNGs; the comparison with larger models, the fit (it recovers a known
law) and the fit-free equivalent parameters on numbers given here."""

import json

import numpy as np

from experiments.configs.parscale import get_config
from experiments.parscale import comparisons, equivalent_params, fit_scaling_law, run_study


def tiny_study_config():
    cfg = get_config()
    cfg.sizes = (16,)
    cfg.streams = (1, 2)
    cfg.model.update({"num_layers": 1, "max_seq_len": 64})
    cfg.parscale.n_prefix = 2
    cfg.train.update({"steps": 2, "batch_size": 4, "log_every": 1, "ckpt_every": 2})
    cfg.eval.update({"held_out": 6, "greedy_problems": 2, "batch_size": 4, "max_new_tokens": 4})
    cfg.throughput.update({"batch_sizes": (2,), "repeats": 1})
    cfg.fit.update({"grid": 11, "zoom": 1})
    cfg.noise.seeds = (1,)  # the P = 1 run again: its train step is compiled already
    return cfg


def test_study_writes_summary_report_and_plots(tmp_path):
    summary = run_study(tiny_study_config(), tmp_path, progress=False)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    runs = {r["name"]: r for r in written["runs"]}
    assert set(runs) == {"d16_P1", "d16_P2"}
    for r in runs.values():
        assert {"params", "held_out_loss", "held_out_token_accuracy", "accuracy", "fit_loss", "fit_residual",
                "loss_change_vs_P1_pct", "weight_bytes", "train_minutes", "throughput"} <= set(r)
        assert np.isfinite(r["held_out_loss"]) and r["held_out_loss"] > 0 and 0 <= r["accuracy"] <= 1
        assert set(r["throughput"]) == {"2"} and r["throughput"]["2"]["tokens_per_s"] > 0
        assert (tmp_path / r["name"] / "metrics.jsonl").exists()
    # equal base parameters across P; ParScale adds its own (prefixes, aggregation) and P× the KV cache
    p1, p2 = runs["d16_P1"], runs["d16_P2"]
    assert p1["params"] == p2["params"] and p1["parscale_params"] == 0 < p2["parscale_params"]
    assert p2["throughput"]["2"]["kv_bytes"] == 2 * p1["throughput"]["2"]["kv_bytes"]
    assert p2["train_flops_per_token"] > 2 * p1["train_flops_per_token"] * 0.9
    assert p1["loss_change_vs_P1_pct"] == 0 and p1["held_out_loss"] != p2["held_out_loss"]
    fit = written["fit"]
    assert {"E", "log10_A", "k", "alpha", "rmse", "r2", "residuals", "param_multiplier"} <= set(fit)
    assert fit["points"] == 2 and fit["E"] >= 0 and written["comparisons"] == []  # one size: no larger model
    noise = written["seed_noise"]["by_P"]["1"]
    assert noise["losses"][0] == p1["held_out_loss"] and len(noise["losses"]) == 2 and noise["std"] >= 0
    assert (tmp_path / "d16_P1_seed1" / "metrics.jsonl").exists()
    assert written["what_we_see"] and written["held_out"]["loss_problems"] == 6
    report = (tmp_path / "report.md").read_text()
    assert "| d16_P2 |" in report and "## What we see" in report and "## Fit" in report
    for png in ("loss_vs_P.png", "throughput.png", "training.png"):
        assert (tmp_path / png).stat().st_size > 1000


def _row(d, P, params, loss, ms, mem):
    tp = {"tokens_per_s": 1e3 / ms, "ms_per_step": ms, "memory_bytes": mem, "kv_bytes": 0}
    return {"name": f"d{d}_P{P}", "d_model": d, "P": P, "params": params, "held_out_loss": loss,
            "throughput": {"1": tp}}


def test_comparisons_match_the_cheapest_larger_model_that_reaches_the_loss():
    rows = [_row(16, 1, 100, 2.0, 1.0, 1000), _row(16, 2, 100, 1.8, 1.2, 1100), _row(16, 4, 100, 1.5, 1.5, 1300),
            _row(24, 1, 200, 1.7, 1.6, 2000), _row(32, 1, 400, 1.6, 2.0, 4000)]
    comps = {c["parscale"]: c for c in comparisons(rows, [1])}
    assert set(comps) == {"d16_P2", "d16_P4"}
    assert comps["d16_P2"]["matched"] == "d24_P1" and comps["d16_P2"]["matched_reaches_loss"]
    assert comps["d16_P4"]["matched"] == "d32_P1" and not comps["d16_P4"]["matched_reaches_loss"]  # closest loss
    pb = comps["d16_P2"]["per_batch"]["1"]
    assert pb["memory_increase_parscale"] == 100 and pb["memory_increase_matched"] == 1000
    assert np.isclose(pb["latency_ratio_parscale"], 1.2) and np.isclose(pb["latency_ratio_matched"], 1.6)


def test_fit_recovers_a_known_law_and_equivalent_params():
    N, P = np.repeat([3e4, 6e4, 1.2e5], 3), np.tile([1, 2, 4], 3)
    L = 1.2 + (5e3 / (N * (0.4 * np.log(P) + 1))) ** 0.6
    fit = fit_scaling_law(N, P, L)
    assert abs(fit["E"] - 1.2) < 1e-3 and abs(fit["k"] - 0.4) < 1e-2 and abs(fit["alpha"] - 0.6) < 1e-2
    assert abs(fit["log10_A"] - np.log10(5e3)) < 1e-2 and fit["rmse"] < 1e-4
    assert fit["param_multiplier"]["2"] == fit["k"] * np.log(2) + 1
    flat = fit_scaling_law(N, P, np.tile([2.0, 2.1, 2.2], 3))  # loss rising with P: no k > 0 fits
    assert flat["k"] < 0 and flat["r2"] < 0.9
    assert np.isclose(equivalent_params([3e4, 6e4], [2.0, 1.8], 1.9)[0], np.sqrt(3e4 * 6e4))
    assert equivalent_params([3e4, 6e4], [2.0, 1.8], 1.7) == (None, "lower")
    assert equivalent_params([3e4, 6e4], [1.8, 2.0], 1.9) == (None, "non-monotone")
