"""Efficient-reasoning RL study (issue 10 item 9): one SFT run, then correctness-only GRPO and length-aware runs
from the same checkpoint and seed.

The task has two chains of thought per answer (arithmetic cot="mixed": the full column trace or its short form,
about half the tokens), and the SFT mix `short_frac` = 0.3 makes the SFT model prefer the long one under greedy
decoding, so a length-aware reward has something to remove. Every run in `cfg.runs` shares `cfg.rl`, `cfg.train`,
`cfg.optim` and `cfg.eval` and sets its own loss, reward spec ('+'-separated registered rewards, optional `w*`
weights) and loss/advantage kwargs. `--config.only=grpo,kimi` runs a subset; `--config.init_from=<sft run dir>`
reuses an SFT run (its task and model then define the study).
"""

from __future__ import annotations

import ml_collections
from ml_collections import ConfigDict


def run(loss: str, reward: str, advantage: str = "group_normalized", reward_kwargs=None, budget=None,
        **loss_kwargs) -> ConfigDict:
    """One run: its loss (+ kwargs), reward spec (+ per-reward config fields), and the L1 prompt budget."""
    return ConfigDict({"loss": loss, "reward": reward, "advantage": advantage,
                       "loss_kwargs": ConfigDict(loss_kwargs), "advantage_kwargs": ConfigDict(),
                       "reward_kwargs": ConfigDict(reward_kwargs or {}), "budget": ConfigDict(budget or {})})


# L1/LCPO: each prompt carries its budget n_gold, drawn between the short (~17) and full (~35) trace lengths; the
# SFT model never saw such prompts, so the budget text is short ("[24]347+285=").
L1_BUDGET = {"min": 16, "max": 36, "template": "[{n}]{prompt}"}


def get_config(arg: str | None = None) -> ConfigDict:
    cfg = ConfigDict()
    cfg.seed = 0
    cfg.init_from = ""  # an SFT run directory to reuse; "" trains cfg.sft first, under <workdir>/sft
    # 3+3-digit addition: one operand width, so the short trace (no operand copies) is learnable by a 2-layer
    # model; full ≈ 34.6, short ≈ 16.6 completion tokens (think + answer + stop), a 52% gap.
    cfg.task = ConfigDict({"name": "arithmetic",
                           "kwargs": {"num_digits": (3, 3), "ops": ("+",), "cot": "mixed", "short_frac": 0.3}})
    cfg.model = ConfigDict({
        "preset": "llama-tiny", "d_model": 64, "num_layers": 2, "mlp_dim": 256, "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 16, "max_seq_len": 64,
        "impl": "xla",  # lmx.pallas kernels: "auto" / "pallas" on a GPU
    })
    sft_steps = ml_collections.FieldReference(1000)
    cfg.sft = ConfigDict({
        "train": {"steps": sft_steps, "batch_size": 48, "seq_len": 48, "log_every": 10, "eval_every": 0,
                  "ckpt_every": sft_steps, "keep_checkpoints": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 50, "total_steps": sft_steps, "min_lr_ratio": 0.1,
                  "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0},
    })
    cfg.baseline = "grpo"  # the run token and accuracy changes are measured against
    cfg.runs = ConfigDict({
        "grpo": run("grpo", "correctness"),
        "dapo": run("dapo", "correctness"),  # the correctness-only baseline of kimi_dapo
        "kimi": run("grpo", "correctness+kimi_length"),
        "kimi_dapo": run("dapo", "correctness+kimi_length"),
        "shorter_better": run("grpo", "shorter_better"),  # α·1[correct] − β|len − SOL|: correctness included
        "lead": run("grpo", "lead"),  # LEAD's paper (symmetric) efficiency reward: pulls toward the mean length
        "lead_asym": run("grpo", "lead", reward_kwargs={"lead": {"mode": "asymmetric"}}),  # LEAD code's variant
        "l1_max": run("grpo", "l1_max", budget=L1_BUDGET),
        "l1_exact": run("grpo", "l1_exact", budget=L1_BUDGET),
        "o1_pruner": run("grpo", "o1_pruner"),  # L̄_ref, Ā_ref: G samples per prompt from π_ref each step
    })
    cfg.only = ""  # comma-separated names of cfg.runs to run ("" = all); the baseline is always run
    cfg.rl = ConfigDict({"batch_size": 16, "group_size": 8, "max_new_tokens": 40, "temperature": 1.0,
                         "updates_per_rollout": 1, "dynamic_rounds": 1})
    rl_steps = ml_collections.FieldReference(60)
    cfg.train = ConfigDict({"steps": rl_steps, "log_every": 1, "ckpt_every": rl_steps, "keep_checkpoints": 1})
    cfg.optim = ConfigDict({
        "lr": 1e-4, "warmup_steps": 0, "total_steps": rl_steps, "min_lr_ratio": 1.0, "weight_decay": 0.0,
        "b1": 0.9, "b2": 0.99, "eps": 1e-8, "clip_norm": 1.0,
    })
    # Greedy held-out accuracy: 512 problems put one point at 5 problems (binomial sd ≈ 0.4 points near 0.99).
    cfg.eval = ConfigDict({"num_problems": 512, "batch_size": 128, "max_new_tokens": 40, "seed": 1234})
    # The target of issue 10 item 9: some length-aware run cuts mean generated tokens by ≥ 40% against the
    # baseline at held-out accuracy within 1 point of it.
    cfg.target = ConfigDict({"token_cut": 0.40, "accuracy_points": 1.0})

    if arg == "gpu":
        cfg.task.kwargs.num_digits = (5, 5)  # untested at this scale
        cfg.model.update({"d_model": 256, "num_layers": 6, "mlp_dim": 1024, "num_heads": 8, "num_kv_heads": 4,
                          "head_dim": 32, "max_seq_len": 128})
        sft_steps.set(3000)
        cfg.sft.train.update({"batch_size": 256, "seq_len": 80})
        cfg.rl.update({"batch_size": 64, "group_size": 8, "max_new_tokens": 64})
        rl_steps.set(200)
        cfg.eval.update({"num_problems": 1024, "batch_size": 256, "max_new_tokens": 64})
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; use '' (CPU default) or 'gpu'")
    return cfg
