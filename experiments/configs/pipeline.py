"""`make demo`, the efficient-reasoning pipeline: SFT on a CoT task → RL with a length-aware reward → greedy and
two test-time-scaling methods before and after RL.

The task and model are the efficient-RL study's (experiments/configs/efficient_rl.py): 3+3-digit addition with two
chains of thought per answer (the full column trace, or a short one with about half the tokens), SFT on a 70/30
full/short mix so the SFT policy mostly writes the long trace; RL with correctness + Kimi's length reward. The
test-time-scaling methods sample k completions at τ = cfg.tts.temperature: majority@k and short-m@k for each m in
cfg.tts.m (a vote over the first m finished, ties to the shortest), which stops each problem once m have finished.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.configs import efficient_rl


def get_config(arg: str | None = None) -> ConfigDict:
    cfg = efficient_rl.get_config(arg)
    cfg.runs = ConfigDict({"rl": efficient_rl.run("grpo", "correctness+kimi_length")})
    cfg.baseline, cfg.only = "rl", ""
    del cfg.target  # the pipeline reports; the study (experiments.efficient_rl) holds the RL target
    cfg.eval.num_problems = 256  # held out from SFT and RL; greedy and the test-time-scaling methods share them
    cfg.tts = ConfigDict({"k": 8, "m": (1, 3), "temperature": 1.0, "hardware": "h100-sxm", "samples_shown": 4})
    return cfg
