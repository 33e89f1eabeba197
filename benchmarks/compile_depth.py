"""Compile time of `generate`'s program vs depth: a call with a decode state runs the layers unrolled (fast
decode steps, see RESULTS.md), so decode compile time grows with depth while training (nn.scan) stays flat.

    python -m benchmarks.compile_depth                       # hybrid-tiny at 4, 8, 16, 32 layers
    python -m benchmarks.compile_depth --preset llama-tiny --depths 2,8,32
"""

from __future__ import annotations

import argparse
import importlib
import time

import jax
import numpy as np

from benchmarks._common import emit, environment
from lmx.decoding import Greedy
from lmx.models import build, init_params, preset


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="hybrid-tiny")
    p.add_argument("--depths", default="4,8,16,32", help="comma-separated num_layers (multiples of the unit)")
    args = p.parse_args(argv)
    emit("compile_depth/env", "info", None, **environment("benchmarks.compile_depth"))
    g = importlib.import_module("lmx.decoding.generate")
    for depth in [int(d) for d in args.depths.split(",")]:
        model = build(preset(args.preset, num_layers=depth))
        params = init_params(model, jax.random.key(0))
        fn = g._compiled(model, Greedy(), (), 1, g.AllFinished(), 16, 48, 0)  # what generate(...) jits
        tokens_BT, lengths_B = np.zeros((2, 32), np.int32), np.full((2,), 32, np.int32)
        t0 = time.perf_counter()
        lowered = fn.lower(params, tokens_BT, lengths_B, jax.random.key(0))
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        emit(f"compile_depth/{args.preset}/L{depth}", "seconds", t2 - t0, trace_lower_s=t1 - t0, compile_s=t2 - t1,
             note="generate's program: batch 2, prompt 32, 16 new tokens, greedy")


if __name__ == "__main__":
    main()
