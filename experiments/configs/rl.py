"""RL (GRPO family) of a tiny decoder LM on procedural arithmetic, from an SFT checkpoint.

`--config=experiments/configs/rl.py` runs on a 2-core CPU in a few minutes: a short SFT (cfg.sft, skipped when
cfg.init_from names an SFT run directory), then cfg.train.steps RL steps. Top-level switches:
`--config.loss=dapo` (lmx.train.rl.available_losses()), `--config.advantage=group_centered`,
`--config.reward=correctness+kimi_length` ('+'-separated registered rewards, optional `w*` weights),
`--config.init_from=runs/sft/<time>` (or "random"). `:gpu` scales it up.
"""

from __future__ import annotations

import ml_collections
from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
    cfg = ConfigDict()
    cfg.seed = 0
    cfg.init_from = ""  # an SFT run directory; "" trains cfg.sft first (under <run_dir>/sft); "random": no SFT
    cfg.task = ConfigDict({"name": "arithmetic", "kwargs": {"num_digits": (1, 2), "ops": ("+",), "cot": "full"}})
    cfg.model = ConfigDict({
        "preset": "llama-tiny", "d_model": 64, "num_layers": 2, "mlp_dim": 256, "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 16, "max_seq_len": 96,
        "impl": "xla",  # lmx.pallas kernels: "auto" / "pallas" on a GPU
    })
    sft_steps = ml_collections.FieldReference(200)
    cfg.sft = ConfigDict({
        "train": {"steps": sft_steps, "batch_size": 32, "seq_len": 40, "log_every": 10, "eval_every": 0,
                  "ckpt_every": 200, "keep_checkpoints": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "total_steps": sft_steps, "min_lr_ratio": 0.1,
                  "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0},
    })
    cfg.loss = "grpo"  # lmx.train.rl.available_losses()
    cfg.loss_kwargs = ConfigDict()  # overrides of the loss's config dataclass (e.g. eps_low, eps_high)
    cfg.advantage = "group_normalized"  # lmx.train.rl.available_advantages()
    cfg.advantage_kwargs = ConfigDict()
    cfg.reward = "correctness"  # e.g. "correctness+kimi_length", "correctness+0.5*shorter_better"
    cfg.rl = ConfigDict({
        "batch_size": 16,  # prompts per step (B); B·G completions
        "group_size": 4,  # G
        "max_new_tokens": 32,
        "temperature": 1.0,
        "updates_per_rollout": 1,  # μ
        "dynamic_rounds": 1,  # DAPO dynamic sampling: generation rounds per step (1: off)
        "micro_batches": 1,  # gradient accumulation: row slices per update
        # TreePO segment-tree rollouts (with --config.advantage=treepo): segment_len > 0 turns them on; the
        # product of branching must equal group_size, e.g. segment_len=8, branching=(1, 2, 2) for G=4.
        "tree": {"segment_len": 0, "branching": (1, 2, 2)},
    })
    rl_steps = ml_collections.FieldReference(100)
    cfg.train = ConfigDict({"steps": rl_steps, "log_every": 1, "ckpt_every": 25, "keep_checkpoints": 2})
    # total_steps counts optimizer updates: steps · updates_per_rollout when μ > 1.
    cfg.optim = ConfigDict({
        "lr": 1e-4, "warmup_steps": 0, "total_steps": rl_steps, "min_lr_ratio": 1.0, "weight_decay": 0.0,
        "b1": 0.9, "b2": 0.99, "eps": 1e-8, "clip_norm": 1.0,
    })
    cfg.eval = ConfigDict({"num_problems": 128, "batch_size": 64, "max_new_tokens": 32, "seed": 1234})

    if arg == "gpu":
        cfg.task.kwargs.num_digits = (1, 3)
        cfg.model.update({"d_model": 256, "num_layers": 6, "mlp_dim": 1024, "num_heads": 8, "num_kv_heads": 4,
                          "head_dim": 32, "max_seq_len": 192})
        sft_steps.set(3000)
        cfg.sft.train.update({"batch_size": 256, "seq_len": 64, "log_every": 50, "ckpt_every": 1000})
        cfg.rl.update({"batch_size": 64, "group_size": 8, "max_new_tokens": 64})
        rl_steps.set(200)
        cfg.train.update({"ckpt_every": 50})
        cfg.eval.update({"num_problems": 512, "batch_size": 256, "max_new_tokens": 64})
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; use '' (CPU default) or 'gpu'")
    return cfg
