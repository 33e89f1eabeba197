"""`python -m benchmarks.kernels --quick` (the CPU smoke run of the GPU benchmark): every op pushes a tiny shape
through its kernel (interpret mode) and its reference and reports their difference, no timings; the report renders
the lines as the RESULTS.md table, naming the device."""

import json

from benchmarks.kernels.__main__ import OPS, main
from benchmarks.kernels_report import render


def test_quick_run_reports_small_errors_for_every_op(capsys):
    assert main(["--quick"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    env = lines[0]
    assert env["name"] == "environment" and env["quick"] is True and env["device"]
    errors = [(r["name"], r["value"]) for r in lines if r.get("metric") == "max_abs_err"]
    assert {name.split("/")[0] for name, _ in errors} == set(OPS), errors
    assert all(0 <= v < 1e-3 for _, v in errors), errors
    assert not any(r.get("metric") in ("seconds", "tflops", "gbps") for r in lines)  # no speed figures off a GPU
    table = render(lines)
    assert table.startswith(f"## Kernels on {env['device']}") and table.count("| max_abs_err |") == len(errors)
