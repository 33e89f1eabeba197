"""Distillation (M1-style): a trained tiny transformer teacher -> a hybrid (SSM + attention) or pure-SSM
student on the quickstart arithmetic task; compares exact-answer accuracy and greedy decode tokens/s.

`cfg.teacher` is the quickstart config unchanged (used only when no `--teacher_dir` is given);
`--config.teacher.steps` sets its training steps (and its optimizer's decay horizon).
The student trains on the teacher's task; `--config.student.model.preset=mamba2-tiny` picks a pure SSM.
"""

from __future__ import annotations

import ml_collections
from ml_collections import ConfigDict

from experiments.configs import quickstart


def get_config(arg: str | None = None) -> ConfigDict:
    cfg = ConfigDict()
    cfg.seed = 0
    teacher = quickstart.get_config(arg)
    teacher.steps = teacher.train.get_ref("steps")  # shortcut: --config.teacher.steps=600
    if not arg:
        teacher.steps = 300  # CPU default: measured 0.970 held-out accuracy at 300 teacher + 300 student steps
    cfg.teacher = teacher

    steps = ml_collections.FieldReference(300)  # student steps, also its optimizer's decay horizon
    cfg.student = ConfigDict({
        # A preset plus ModelConfig / attention overrides (see lmx.train.loop.model_config); vocab from
        # the tokenizer. hybrid-tiny: ("ssm", "ssm", "ssm", "attn") x 2 at d_model 64.
        "model": {"preset": "hybrid-tiny", "max_seq_len": 128, "impl": "xla"},  # "auto" / "pallas": kernels
        "steps": steps, "batch_size": 64, "seq_len": 48, "log_every": 10, "seed": 1,
        # Loss: τ² · KL(teacher_τ ‖ student_τ) + ce_weight · CE(data tokens).
        "temperature": 1.0, "ce_weight": 0.0,
    })
    cfg.student.optim = ConfigDict({
        "lr": 3e-3, "warmup_steps": 100, "total_steps": steps, "min_lr_ratio": 0.1, "weight_decay": 0.01,
        "b1": 0.9, "b2": 0.98, "eps": 1e-8, "clip_norm": 1.0,
    })
    # Held-out problems (prompts unseen by teacher and student training), greedy; decode speed is timed
    # on the first `batch_size` of them, teacher and student interleaved, median of `speed_rounds`.
    cfg.eval = ConfigDict({"held_out": 200, "batch_size": 100, "max_new_tokens": 40, "seed": 1234,
                           "speed_rounds": 3})

    if arg == "gpu":
        cfg.student.update({"batch_size": 256, "seq_len": 96, "log_every": 50})
        cfg.student.model.max_seq_len = 256
        steps.set(5000)
        cfg.eval.update({"held_out": 512, "batch_size": 256, "max_new_tokens": 80})
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; use '' (CPU default) or 'gpu'")
    return cfg
