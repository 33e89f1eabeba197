"""`make demo`: SFT of a 2-layer transformer on up-to-3-digit addition with column-by-column CoT.

See README for measured accuracy and time. Scale up with e.g. `--config.train.steps=2000`.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.configs import sft


def get_config(arg: str | None = None) -> ConfigDict:
    cfg = sft.get_config(arg)
    if arg:  # the larger configs of the SFT study apply unchanged
        return cfg
    cfg.task.kwargs = {"num_digits": (1, 3), "ops": ("+",), "cot": "full"}
    cfg.model.update({"d_model": 128, "num_layers": 2, "mlp_dim": 512, "num_heads": 4, "num_kv_heads": 4,
                      "head_dim": 32, "max_seq_len": 128})
    cfg.train.update({"batch_size": 64, "seq_len": 48, "log_every": 10, "eval_every": 0, "ckpt_every": 250})
    cfg.train.steps = 600  # a FieldReference shared with optim.total_steps
    cfg.optim.update({"lr": 3e-3, "warmup_steps": 100, "weight_decay": 0.01, "b2": 0.98})
    # The loop's own periodic eval is off; quickstart evaluates `held_out` problems unseen in training.
    cfg.eval.update({"num_problems": 0, "batch_size": 100, "max_new_tokens": 40, "held_out": 200})
    return cfg
