"""`python -m benchmarks.kernels --quick` (the CPU smoke run of the GPU benchmark): an op pushes a tiny shape
through its kernel (interpret mode) and its reference and reports their difference, no timings; the report renders
the lines as the RESULTS.md table, naming the device. Every op's module has the runner's interface."""

import importlib
import json

from benchmarks.kernels.__main__ import OPS, main
from benchmarks.kernels_report import render


def test_quick_run_reports_small_errors_and_renders_the_table(capsys):
    """One op (decode attention, the cheapest to interpret) through the runner; the other ops' quick paths are the
    same calls their kernel tests make."""
    assert main(["--quick", "--only", "decode_attention"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    env = lines[0]
    assert env["name"] == "environment" and env["quick"] is True and env["device"]
    errors = [(r["name"], r["value"]) for r in lines if r.get("metric") == "max_abs_err"]
    assert errors and {name.split("/")[0] for name, _ in errors} == {"decode_attention"}, errors
    assert all(0 <= v < 1e-3 for _, v in errors), errors
    assert not any(r.get("metric") in ("seconds", "tflops", "gbps") for r in lines)  # no speed figures off a GPU
    table = render(lines)
    assert table.startswith(f"## Kernels on {env['device']}") and table.count("| max_abs_err |") == len(errors)


def test_every_op_has_a_benchmark_module_that_times_only_on_a_gpu():
    """Off a GPU a timed (not quick) run emits only `<op>/skipped`: no figure that interpret mode would make up."""
    for op in OPS:
        lines = []
        importlib.import_module(f"benchmarks.kernels.{op}").run(lambda *a, _l=lines, **kw: _l.append(a), quick=False)
        assert lines == [(f"{op}/skipped", "info", None)], (op, lines)
