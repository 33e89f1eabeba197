"""Relaxed Recursive Transformer study (issue 12 item 4): an L-layer model SFT'd on arithmetic CoT, converted to
K = L/2 unique layers + per-depth LoRA (ranks `recursion.lora_ranks`), uptrained; against the original and
same-size vanilla K-layer models.

The base sees SFT batches 0..base.steps-1 of the seed's stream, every uptraining run the next `uptrain.steps`
batches (the same ones for every variant), and the vanilla K-layer model trained from scratch all
base.steps + uptrain.steps of them, so every model has seen the same examples. `vanilla_first_k` adds a K-layer
model initialised from the base's first K layers and uptrained like the recursive ones.
"""

from __future__ import annotations

import ml_collections
from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
    cfg = ConfigDict()
    cfg.seed = 0
    cfg.task = ConfigDict({"name": "arithmetic", "kwargs": {"num_digits": (1, 3), "ops": ("+",), "cot": "full"}})
    cfg.model = ConfigDict({
        "preset": "llama-tiny", "d_model": 64, "num_layers": 4, "mlp_dim": 256, "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 16, "max_seq_len": 64,
        "impl": "xla",  # lmx.pallas kernels: "auto" / "pallas" on a GPU
    })
    base_steps = ml_collections.FieldReference(500)
    cfg.base = ConfigDict({
        "train": {"steps": base_steps, "batch_size": 32, "seq_len": 48, "log_every": 10, "eval_every": 0,
                  "ckpt_every": base_steps, "keep_checkpoints": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 50, "total_steps": base_steps, "min_lr_ratio": 0.1,
                  "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0},
    })
    # K unique layers (CYCLE sharing: depth l runs layer l mod K); rank 0 is the plain looped model.
    cfg.recursion = ConfigDict({"num_unique": 2, "lora_ranks": (0, 4, 16)})
    up_steps = ml_collections.FieldReference(100)
    cfg.uptrain = ConfigDict({
        "steps": up_steps, "log_every": 5,  # batch size and sequence length: cfg.base.train's
        "optim": {"lr": 1e-3, "warmup_steps": 10, "total_steps": up_steps, "min_lr_ratio": 0.1,
                  "weight_decay": 0.0, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0},
    })
    cfg.vanilla_first_k = True  # also uptrain a K-layer model initialised from the base's first K layers
    # Greedy accuracy and teacher-forced loss on problems whose prompts occur in no training batch.
    cfg.eval = ConfigDict({"num_problems": 256, "batch_size": 128, "max_new_tokens": 40, "seed": 1234})
    # Decode tokens/s at batch 1: `new_tokens` greedy tokens after one prompt (no stop token), after a warm-up
    # call; the median of `repeats` timed calls, the models interleaved so load changes hit them alike.
    cfg.speed = ConfigDict({"new_tokens": 40, "repeats": 20})

    if arg == "gpu":  # untested at this scale
        cfg.task.kwargs.num_digits = (1, 4)
        cfg.model.update({"d_model": 256, "num_layers": 8, "mlp_dim": 1024, "num_heads": 8, "num_kv_heads": 4,
                          "head_dim": 32, "max_seq_len": 128})
        base_steps.set(3000)
        cfg.base.train.update({"batch_size": 256, "seq_len": 64})
        cfg.recursion.update({"num_unique": 4, "lora_ranks": (0, 8, 64)})
        up_steps.set(500)
        cfg.eval.update({"num_problems": 1024, "batch_size": 256, "max_new_tokens": 56})
        cfg.speed.update({"new_tokens": 64})
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; use '' (CPU default) or 'gpu'")
    return cfg
