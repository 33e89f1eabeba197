"""Test-time scaling study (issue 11 item 6): one deliberately under-trained SFT model, every decoding method.

3+3-digit addition with the full column trace; a short SFT (`cfg.sft.train.steps`) leaves held-out greedy
accuracy in the middle of [0, 1] so that spending more samples can help. `--config.init_from=<sft run dir>`
reuses an SFT run (its task and model then define the study).
"""

from __future__ import annotations

import ml_collections
from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    cfg = ConfigDict()
    cfg.seed = 0
    cfg.init_from = ""  # an SFT run directory to reuse; "" trains cfg.sft under <workdir>/sft
    cfg.task = ConfigDict({"name": "arithmetic", "kwargs": {"num_digits": (3, 3), "ops": ("+",), "cot": "full"}})
    cfg.model = ConfigDict({
        "preset": "llama-tiny", "d_model": 64, "num_layers": 2, "mlp_dim": 256, "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 16, "max_seq_len": 64,
        "impl": "xla",  # lmx.pallas kernels: "auto" / "pallas" on a GPU
    })
    sft_steps = ml_collections.FieldReference(200)
    cfg.sft = ConfigDict({
        "train": {"steps": sft_steps, "batch_size": 48, "seq_len": 48, "log_every": 10, "eval_every": 0,
                  "ckpt_every": sft_steps, "keep_checkpoints": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 50, "total_steps": sft_steps, "min_lr_ratio": 0.1,
                  "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0},
    })
    cfg.eval = ConfigDict({
        "num_problems": 128, "seed": 1234, "max_new_tokens": 48,
        "temperature": 0.7,  # the sampler of every sampling method (τ = 1 samples are far worse than greedy here)
        "ks": (1, 2, 4, 8, 16),
        "bom_alpha": 0.25,  # BoM's frequency threshold (its scorer: mean token log-prob, no oracle)
        "short_m": "half",  # short-m@k's m: "half" = ceil(k/2), or an int (capped at k)
        "budgets": (8, 16, 24, 32),  # budget forcing caps (thinking tokens); the full 3-digit trace has 26
        "soft_temperature": 0.5,
        "skip": "",  # comma-separated method names not to run (e.g. "particle_filter")
        "max_k": {},  # per-method cap on k, e.g. {"particle_filter": 8}, when a method is too slow
    })
    cfg.hardware = "h100-sxm"  # eFLOPs = flops + I·bytes_moved at this preset's arithmetic intensity
    return cfg
