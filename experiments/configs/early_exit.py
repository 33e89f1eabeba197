"""Early-exit study (issue 12 item 4): a transformer with exits trained with the LayerSkip loss on arithmetic CoT,
then early-exit decoding per confidence measure and threshold, and self-speculation with an exit as the draft.

Up-to-3-digit addition with the full column trace (quickstart's task), a 4-layer d=128 model with exits after
layers 1, 2 and 3 sharing the final norm and LM head. Wall-clock figures are at batch 1, one problem at a time.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.configs import quickstart


def get_config(arg: str | None = None) -> ConfigDict:
    cfg = quickstart.get_config(arg)
    cfg.model.update({"num_layers": 4, "exits": {"layers": (1, 2, 3)}})
    cfg.train.update({"batch_size": 48, "ckpt_every": 400})
    cfg.train.steps = 400  # a FieldReference shared with optim.total_steps
    cfg.study = ConfigDict({
        "held_out": 200,  # greedy accuracy and layers per token, batched
        "thresholds": {"softmax": (0.99, 0.95, 0.9, 0.8, 0.6, 0.4), "state": (0.999, 0.995, 0.99, 0.98, 0.95)},
        "timed_problems": 24,  # batch-1 wall clock: each problem decoded alone, after a warm-up
        "repeats": 2,  # the timing loop over the problems runs this often; the fastest pass counts
        "draft_layers": (1, 2),  # self-speculation drafts with these exits
        "gamma": 4,
        "accuracy_points": 1.0,  # the target: >= 1.5x wall clock at <= this many points lost
        "speedup": 1.5,
    })
    return cfg
