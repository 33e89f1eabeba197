"""Weight-only quantization of the quickstart model: held-out greedy accuracy and weight bytes at f32, int8, int4,
2-bit and the mixed 2/4-bit scheme (lmx.models.quantize_params; the XLA reference path on a CPU).

`--config.init_from=<a quickstart run dir>` reuses that run's latest checkpoint (its config.json defines the task
and the model); "" trains the quickstart config first, under <workdir>/quickstart.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.configs import quickstart


def get_config(arg: str | None = None) -> ConfigDict:
    cfg = quickstart.get_config(arg)
    cfg.init_from = ""
    # formats: a comma-separated subset of int8, int4, int2, mixed (f32 is always the baseline). Groups of 32 input
    # rows; the quickstart model's 128-wide inputs have 4 groups per column, so the mixed scheme's 4-bit share is
    # 1 in 4 there (frac4 = 0.25; 4 in 16 for the 512-wide MLP down projection) rather than the paper's ~10%.
    cfg.quant = ConfigDict({"formats": "int8,int4,int2,mixed", "group": 32, "frac4": 0.25, "head": True})
    return cfg
