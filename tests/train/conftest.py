"""Shared fixtures: a config small enough that a whole `train` call takes seconds on a 2-core CPU."""

import pytest

from experiments.configs.sft import get_config


def tiny_config(steps: int = 8):
    cfg = get_config()
    cfg.task.kwargs.num_digits = (1, 1)  # "3+4=" and a ~15-token chain of thought: rows of <= 32 tokens
    cfg.model.update({"d_model": 32, "num_layers": 1, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1,
                      "head_dim": 16, "max_seq_len": 64})
    cfg.train.update({"steps": steps, "batch_size": 8, "seq_len": 32, "log_every": 1, "eval_every": 0,
                      "ckpt_every": 3, "keep_checkpoints": 3})
    cfg.optim.update({"lr": 3e-3, "warmup_steps": 2})
    cfg.eval.num_problems = 0  # no generation in loop tests; evaluate() has its own test
    cfg.mesh.update({"data": 1, "fsdp": 1, "tensor": 1})
    return cfg


@pytest.fixture
def tiny_cfg():
    return tiny_config()
