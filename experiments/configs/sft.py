"""SFT of a tiny decoder LM on procedural arithmetic (with chains of thought).

`--config=experiments/configs/sft.py` trains in a few minutes on a 2-core CPU;
`--config=experiments/configs/sft.py:gpu` is a larger run for one accelerator.
"""

from __future__ import annotations

import ml_collections
from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
    cfg = ConfigDict()
    cfg.seed = 0
    cfg.task = ConfigDict({"name": "arithmetic", "kwargs": {"num_digits": (1, 2), "ops": ("+",), "cot": "full"}})
    # ModelConfig fields over a preset (attention fields are flattened: num_heads, num_kv_heads, head_dim,
    # rope_theta, ...); vocab_size always comes from the tokenizer.
    cfg.model = ConfigDict({
        "preset": "llama-tiny", "d_model": 64, "num_layers": 2, "mlp_dim": 256, "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 16, "max_seq_len": 128,
        "impl": "xla",  # lmx.pallas kernels: "auto" / "pallas" on a GPU
    })
    steps = ml_collections.FieldReference(600)  # also the optimizer's decay horizon
    cfg.train = ConfigDict({
        "steps": steps, "batch_size": 32, "seq_len": 64, "log_every": 10, "eval_every": 200,
        "ckpt_every": 200, "keep_checkpoints": 2,
    })
    cfg.optim = ConfigDict({
        "lr": 3e-3, "warmup_steps": 50, "total_steps": steps, "min_lr_ratio": 0.1, "weight_decay": 0.1,
        "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0,
    })
    cfg.eval = ConfigDict({"num_problems": 128, "batch_size": 64, "max_new_tokens": 48, "seed": 1234,
                           "samples_logged": 8})
    cfg.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # -1: all devices on that axis

    if arg == "gpu":
        cfg.task.kwargs.num_digits = (1, 4)
        cfg.task.kwargs.ops = ("+", "-")
        cfg.model.update({"d_model": 256, "num_layers": 6, "mlp_dim": 1024, "num_heads": 8, "num_kv_heads": 4,
                          "head_dim": 32, "max_seq_len": 256})
        cfg.train.update({"batch_size": 256, "seq_len": 96, "log_every": 50, "eval_every": 1000,
                          "ckpt_every": 1000})
        steps.set(5000)
        cfg.eval.update({"num_problems": 512, "batch_size": 256, "max_new_tokens": 80})
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; use '' (CPU default) or 'gpu'")
    return cfg
