#!/usr/bin/env bash
# Every GPU kernel measurement of issue 13 in one run (< 5 minutes on one H100/H200, then up to 4 more for the
# kernel tests compiled on the GPU), for the lent device machine:
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
rc=0
: > "$out/kernels.jsonl"
# One process per op with its own time limit, so a slow or failing op costs no other op its figures.
for spec in decode_attention:60 quant_matmul:50 ssd:60 flash_attention:80 models:50; do  # 300 s at most
  op="${spec%%:*}"
  timeout "${spec##*:}" "$PY" -m benchmarks.kernels --only "$op" "$@" 2>> "$out/stderr.log" | tee -a "$out/kernels.jsonl"
  status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || { echo "{\"name\": \"$op\", \"metric\": \"exit_status\", \"value\": $status}" | tee -a "$out/kernels.jsonl"; rc=1; }
done
"$PY" -m benchmarks.kernels_report "$out/kernels.jsonl" > "$out/RESULTS_section.md" || rc=1
# The kernel-vs-reference tests with the kernels compiled (tests/pallas/hw.py: interpreted only off a GPU), if the
# image has pytest: every ragged / GQA / segment / window / state case of make test, on the real Triton compiler.
if "$PY" -c "import pytest" 2> /dev/null; then
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/pallas -k matches_reference > "$out/pallas_tests.log" 2>&1
  echo "kernel tests compiled on the GPU: exit $? ($(tail -1 "$out/pallas_tests.log"))" | tee -a "$out/RESULTS_section.md"
else
  echo "kernel tests: pytest is not installed on this machine" | tee -a "$out/RESULTS_section.md"
fi
cat "$out/RESULTS_section.md"
tail -20 "$out/stderr.log"
exit "$rc"
