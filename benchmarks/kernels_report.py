"""python -m benchmarks.kernels_report kernels.jsonl: the JSON lines of `python -m benchmarks.kernels` as a
markdown section for benchmarks/RESULTS.md (device named from the environment line)."""

from __future__ import annotations

import json
import sys


def render(lines: list[dict]) -> str:
    envs = [r for r in lines if r.get("name") == "environment"] or [{}]
    env = envs[0]
    commands = "; ".join(f"`{e.get('command', 'python -m benchmarks.kernels')}`" for e in envs)
    out = [f"## Kernels on {env.get('device', '?')} (jax {env.get('jax', '?')}, backend {env.get('backend', '?')})",
           "", f"Commands: {commands}", "",
           "| op | metric | value | baseline | ratio | details |", "|---|---|---|---|---|---|"]
    for r in lines:
        if r.get("name") == "environment" or r.get("metric") == "wall_s":
            continue
        extra = {k: v for k, v in r.items() if k not in ("name", "metric", "value", "baseline", "ratio")}
        details = ", ".join(f"{k}={v}" for k, v in extra.items())
        out.append(f"| {r.get('name')} | {r.get('metric')} | {r.get('value')} | {r.get('baseline')} | "
                   f"{r.get('ratio')} | {details} |")
    return "\n".join(out) + "\n"


def main(path: str) -> None:
    lines = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    sys.stdout.write(render(lines))


if __name__ == "__main__":
    main(sys.argv[1])
