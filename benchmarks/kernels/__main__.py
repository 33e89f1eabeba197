"""python -m benchmarks.kernels [--quick] [--only flash_attention,decode_attention,ssd,quant_matmul,models]

On a GPU: each op's kernel against its baselines (cuDNN / XLA attention, the XLA SSD reference, the bf16 XLA dot,
the device's copy bandwidth), measured side by side in one run, as JSON lines; `models`: whole models with
impl="pallas" against impl="xla" (outputs compared, train step and generate timed). With --quick (what the CPU test
runs): one tiny shape per op through the kernel in interpret mode and the reference, correctness only; no timing
is printed off a GPU, since interpret mode says nothing about speed."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback

from benchmarks._common import emit

OPS = ("flash_attention", "decode_attention", "ssd", "quant_matmul", "models")


def device_line(argv: list[str]) -> dict:
    import jax

    d = jax.devices()[0]
    return {"name": "environment", "jax": jax.__version__, "backend": jax.default_backend(),
            "device": getattr(d, "device_kind", str(d)), "python": platform.python_version(),
            "command": " ".join(["python", "-m", "benchmarks.kernels", *argv])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny shapes, correctness only (CPU smoke test)")
    p.add_argument("--only", default=",".join(OPS), help="comma-separated ops")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    import jax

    quick = args.quick or jax.default_backend() != "gpu"
    print(json.dumps({**device_line(argv), "quick": quick}), flush=True)
    failed = []
    for op in args.only.split(","):
        t0 = time.perf_counter()
        try:  # one op's failure (a lowering error on a new jax) must not cost the other ops' figures
            importlib.import_module(f"benchmarks.kernels.{op}").run(emit, quick)
        except Exception:  # noqa: BLE001 - reported, and the exit code says so
            failed.append(op)
            traceback.print_exc()
            emit(op, "error", traceback.format_exc(limit=3).splitlines()[-1])
        print(json.dumps({"name": op, "metric": "wall_s", "value": round(time.perf_counter() - t0, 2)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
