"""Shared helpers: JSON-line output, environment description, interleaved timing, memory bandwidth."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np


def add_model_args(p) -> None:
    """The benchmark Llama's shape (~58M params in f32 by default), shared by decode.py and train.py."""
    for name, default in [("hidden", 512), ("layers", 8), ("heads", 8), ("kv_heads", 4), ("intermediate", 1536),
                          ("vocab", 32000)]:
        p.add_argument(f"--{name}", type=int, default=default)


def emit(name: str, metric: str, value, baseline=None, ratio=None, **extra) -> dict:
    """Print one result line: {"name", "metric", "value", "baseline", "ratio", ...extra}."""
    rec = {"name": name, "metric": metric, "value": _plain(value), "baseline": _plain(baseline),
           "ratio": _plain(ratio), **{k: _plain(v) for k, v in extra.items()}}
    print(json.dumps(rec), flush=True)
    return rec


def _plain(v):
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float):
        return float(f"{v:.6g}")
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(module: str) -> dict:
    """Machine and library versions, for the first line of every benchmark's output."""
    import jax
    import torch
    import transformers

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "loadavg_1_5_15": load, "command": " ".join(["python", "-m", module, *sys.argv[1:]])}


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call (fn must block until its result is ready)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(sides: dict[str, Callable[[], object]], rounds: int, pause: float = 0.2) -> dict[str, list[float]]:
    """Time each side once per round, alternating the order every round (A,B then B,A, ...), so that
    background load and thermal drift fall on both sides alike. Returns the per-round times of each side.
    The short pause lets the other runtime's worker threads stop spinning before the next side starts."""
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            time.sleep(pause)
            times[n].append(timed(sides[n]))
    return times


def op_profile(fn: Callable[[], object], per_call: int) -> dict[str, float]:
    """XLA:CPU op time of one call of fn, from a jax.profiler trace: for each kind of compiled op (the op's name
    without its numeric suffix: `ynn_fusion` = matmuls and reductions handed to XLA's ynn library, `dot`,
    `..._fusion` = fused elementwise loops, `copy`, `wrapped_scatter`, ...), the microseconds summed over the ops
    that ran at least `per_call` times (the body of a loop of that many iterations), divided by `per_call`.
    Includes the profiler's own overhead per op, so compare kinds within one profile, not with wall times."""
    import gzip
    import re

    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            fn()
        path = next(os.path.join(d, f) for d, _, fs in os.walk(tmp) for f in fs if f.endswith(".trace.json.gz"))
        with gzip.open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    not_ops = ("$", "end:")
    events = [e for e in events if not e["name"].startswith(not_ops)
              and not any(w in e["name"] for w in ("Thunk", "Slinky", "Pjit", "Threadpool", "PjRt"))]
    counts: dict[str, int] = {}
    for e in events:
        counts[e["name"]] = counts.get(e["name"], 0) + 1
    kinds: dict[str, float] = {}
    for e in events:
        if counts[e["name"]] >= per_call:
            kind = re.sub(r"\.\d+$", "", e["name"])
            kinds[kind] = kinds.get(kind, 0.0) + e["dur"] / per_call
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def median(xs) -> float:
    return float(statistics.median(xs))


def memory_bandwidth(gbytes: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Streaming memory bandwidth of this machine, in bytes/s, measured several ways (best of `repeats`
    each): single-threaded numpy copy and multi-threaded torch copy into preallocated buffers (bytes read +
    written), torch and jax sums (bytes read). "best" is the maximum: the most favourable figure for
    the hardware, hence the most conservative roofline for lmx."""
    import jax
    import jax.numpy as jnp
    import torch

    nbytes = 4 * (int(gbytes * 1e9) // 4)
    best = lambda fn: min(timed(fn) for _ in range(repeats))  # the first call also warms up
    out: dict[str, float] = {}

    def numpy_copy(src):
        dst = np.empty_like(src)
        return 2 * nbytes / best(lambda: np.copyto(dst, src))

    def torch_probes(src):
        ts = torch.from_numpy(src)
        td = torch.empty_like(ts)
        return 2 * nbytes / best(lambda: td.copy_(ts)), nbytes / best(lambda: ts.sum().item())

    def jax_sum(src):
        x = jnp.asarray(src)
        jsum = jax.jit(jnp.sum)
        return nbytes / best(lambda: jsum(x).block_until_ready())

    src = np.ones(nbytes // 4, np.float32)
    out["numpy_copy"] = numpy_copy(src)
    out["torch_copy"], out["torch_sum"] = torch_probes(src)
    out["jax_sum"] = jax_sum(src)
    out["best"] = max(out.values())
    return out


def llama_pair(*, vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
               attn_implementation: str = "sdpa", seed: int = 0):
    """(hf_model, lmx_model, lmx_params): one random-weight f32 `transformers` LlamaForCausalLM (HF's own
    init), written with `save_pretrained` and read back with `lmx.models.load_hf`, so both hold the same
    weights. The HF config has no bos/eos/pad ids, so HF generation never stops early."""
    import jax
    import torch
    import transformers

    from lmx.models import load_hf

    hf_cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.float32)
    set_attn_implementation(hf, attn_implementation)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, params = load_hf(tmp, dtype="float32")
    return hf, model, jax.device_put(params)


def set_attn_implementation(hf, name: str):
    """Switch a transformers model between "eager" and "sdpa" attention in place."""
    if hasattr(hf, "set_attn_implementation"):
        hf.set_attn_implementation(name)
    else:
        hf.config._attn_implementation = name
    if hf.config._attn_implementation != name:
        raise RuntimeError(f"could not switch transformers attention to {name!r}")
