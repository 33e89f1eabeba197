"""ParScale study (issue 12 item 4): P ∈ {1, 2, 4} streams at equal base (non-ParScale) parameters, over a few
model sizes, each trained from scratch for the same steps and tokens; held-out loss vs P, the fitted scaling law
L = E + (A / (N (k ln P + 1)))^α of ALGORITHMS.md §5, and decode throughput / memory vs P beside the larger base
models of the size grid.

Sizes are d_model values; every size shares cfg.model (2 layers, head_dim 16) with num_heads = num_kv_heads =
d_model / head_dim and mlp_dim = mlp_ratio · d_model, so the widths 32 / 48 / 64 have about 1× / 2.1× / 3.7× the
base parameters of the smallest (embeddings included): the P = 1 models of the larger widths are the "P×-wider"
comparison for P = 2 and P = 4 streams of the smallest.
"""

from __future__ import annotations

import ml_collections
from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
    cfg = ConfigDict()
    cfg.seed = 0  # every run: the same batches (seed, step) and the same held-out set
    # 2-digit multiplication with the full trace (partial products, then their running sum): the partial
    # products are real computation for a 2-layer model, so the loss is far from saturated after a few hundred
    # steps and the sizes stay apart.
    cfg.task = ConfigDict({"name": "arithmetic", "kwargs": {"num_digits": (2, 2), "ops": ("*",), "cot": "full"}})
    # Fields shared by every size (d_model, heads and mlp_dim are set per size; see the module docstring).
    cfg.model = ConfigDict({"preset": "llama-tiny", "num_layers": 2, "head_dim": 16, "max_seq_len": 128,
                           "impl": "xla"})  # lmx.pallas kernels: "auto" / "pallas" on a GPU
    cfg.sizes = (32, 48, 64)
    cfg.mlp_ratio = 4
    cfg.streams = (1, 2, 4)
    cfg.parscale = ConfigDict({"n_prefix": 8, "eps": 0.01})  # the paper's n_prefix is 48; 8 suits 50-token rows
    steps = ml_collections.FieldReference(150)
    cfg.train = ConfigDict({"steps": steps, "batch_size": 16, "seq_len": 52, "log_every": 10, "eval_every": 0,
                            "ckpt_every": steps, "keep_checkpoints": 1})
    cfg.optim = ConfigDict({"lr": 3e-3, "warmup_steps": 30, "total_steps": steps, "min_lr_ratio": 0.1,
                            "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0})
    # The training loop's own periodic evaluation is off; the study evaluates problems unseen in training:
    # teacher-forced cross-entropy on the target tokens of `held_out` problems (in batches of `batch_size`) and
    # greedy exact-answer accuracy on `greedy_problems` of them, decoding max_new_tokens tokens with no stop token
    # at the largest throughput batch size (the program the throughput measurement times: one compilation).
    cfg.eval = ConfigDict({"num_problems": 0, "batch_size": 128, "max_new_tokens": 48, "seed": 1234,
                           "samples_logged": 0, "held_out": 256, "greedy_problems": 128})
    # Decode throughput: fixed-length greedy decoding (eval.max_new_tokens tokens, no stop token) of held-out
    # prompts at each batch size, one warm-up call, then the best of `repeats` timed calls.
    cfg.throughput = ConfigDict({"batch_sizes": (1, 8), "repeats": 5})
    # The fit: for each (k, α) of the grid, E and c = A^α by linear least squares (E, c >= 0); then the grid is
    # zoomed around the best point `zoom` times.
    cfg.fit = ConfigDict({"alpha_min": 0.01, "alpha_max": 3.0, "k_min": -0.7, "k_max": 5.0, "grid": 121, "zoom": 3})
    # Seed noise: the runs of `streams` at the smallest size retrained with these seeds (other init and batches),
    # so the loss differences between P can be read against the seed-to-seed spread. () = off.
    cfg.noise = ConfigDict({"seeds": (1, 2), "streams": (1,)})
    cfg.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    if arg == "gpu":  # untested at this scale
        cfg.task.kwargs.num_digits = (3, 3)
        cfg.sizes = (64, 128, 256)
        cfg.model.update({"num_layers": 4, "head_dim": 32, "max_seq_len": 160})
        cfg.parscale.n_prefix = 48
        steps.set(3000)
        cfg.train.update({"batch_size": 128, "seq_len": 96, "log_every": 50})
        cfg.eval.update({"held_out": 1024, "greedy_problems": 512, "batch_size": 256, "max_new_tokens": 80})
        cfg.throughput.batch_sizes = (1, 8, 64)
    elif arg:
        raise ValueError(f"unknown config arg {arg!r}; use '' (CPU default) or 'gpu'")
    return cfg
