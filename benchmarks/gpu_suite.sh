#!/usr/bin/env bash
# Every GPU kernel measurement of issue 13 in one run (< 5 minutes on one H100/H200), for the lent device machine:
#   bash benchmarks/gpu_suite.sh            # from the repository root; writes $OUT (or ./runs/gpu_suite)
# The machine's image has jax (CUDA), flax, optax and numpy; lmx.pallas and benchmarks.kernels need nothing else
# (lmx imports its subpackages lazily). Output: kernels.jsonl (the JSON lines), RESULTS_section.md (a table to
# paste into benchmarks/RESULTS.md, naming the device), and the log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu_suite}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia_smi.csv" 2>&1 || true
timeout 280 "$PY" -m benchmarks.kernels "$@" 2> "$out/stderr.log" | tee "$out/kernels.jsonl"
rc=${PIPESTATUS[0]}
"$PY" -m benchmarks.kernels_report "$out/kernels.jsonl" > "$out/RESULTS_section.md" || rc=1
cat "$out/RESULTS_section.md"
tail -20 "$out/stderr.log"
exit "$rc"
