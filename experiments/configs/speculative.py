"""Speculative decoding study: a target and a several-times-smaller draft, both trained briefly on the quickstart
arithmetic task, then `speculative_generate` at each γ in `gammas` (a model draft and a self-draft of the
target's first layers) against plain `generate` on held-out prompts.

`cfg.target` / `cfg.draft` are quickstart training configs (`--config.target.train.steps=600`,
`--config.draft.model.d_model=32`); trained params are cached in `model_dir` under a key of the whole training
config, so reruns (and `benchmarks.speculative`) reuse them.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.configs import quickstart


def get_config(arg: str | None = None) -> ConfigDict:
    if arg not in (None, "", "gpu"):
        raise ValueError(f"unknown config arg {arg!r}; use '' (CPU default) or 'gpu'")
    gpu = arg == "gpu"
    cfg = ConfigDict()
    # Target: the quickstart model at twice its depth (4 layers, so the self-draft can take 2); 300 steps.
    cfg.target = quickstart.get_config("gpu" if gpu else None)
    cfg.target.model.num_layers = 8 if gpu else 4
    cfg.target.train.steps = 3000 if gpu else 300
    cfg.target.eval.num_problems = 0  # no periodic eval inside the loop; summary.json has held-out accuracy
    # Draft: 1 layer at half the width (~1/16 of the target's non-embedding parameters at the CPU size).
    cfg.draft = quickstart.get_config("gpu" if gpu else None)
    cfg.draft.model.update({"d_model": 128 if gpu else 64, "num_layers": 1, "mlp_dim": 512 if gpu else 256,
                            "num_heads": 2, "num_kv_heads": 2, "head_dim": 64 if gpu else 32})
    cfg.draft.train.steps = 3000 if gpu else 600
    cfg.draft.eval.num_problems = 0
    cfg.model_dir = "runs/speculative/models"  # trained-params cache, keyed by each training config

    cfg.gammas = (1, 2, 3, 4, 6, 8)
    cfg.adaptive_gamma = 8  # the largest γ of the adaptive run (one extra table row per draft)
    cfg.self_draft_layers = 0  # SelfDraft(num_layers=E); 0: half the target's layers
    cfg.eval = ConfigDict({
        "num_prompts": 64 if gpu else 8,  # held-out prompts, unseen by either training stream
        "batch_size": 1,  # prompts per call (the calls run one after another)
        "temperature": 0.0,  # 0: greedy (tokens checked equal to generate's); > 0: exact rejection sampling
        "max_new_tokens": 40,
        "rounds": 5,  # timed rounds per side after a warm-up call, speculative and generate interleaved
        "accuracy_problems": 256 if gpu else 100,  # held-out greedy accuracy of target and draft
        "seed": 1234,
    })
    return cfg
