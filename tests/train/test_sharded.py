"""Sharded == unsharded training on 8 fake CPU devices. The device count is fixed when jax starts, and
other test modules import jax normally, so the check runs in a fresh interpreter (sharded_check.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sharded_train_step_matches_unsharded():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "tests.train.sharded_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["init_diff"] < 1e-6
    # Adam turns rounding differences in near-zero gradients into steps of up to ~lr (1e-3 here, 3 steps),
    # so params get a looser bound than metrics; a sharding bug moves them by ~lr, i.e. 1e-3.
    assert out["param_diff"] < 5e-5 and out["opt_diff"] < 1e-5 and out["metric_diff"] < 1e-5, out
    assert out["step"] == 3 and out["losses"][-1] < out["losses"][0]
    # The state really is distributed: gate [L, D, F] is split over fsdp (D) and tensor (F), and Adam's
    # moments follow their param.
    assert out["gate_spec"] == [None, "fsdp", "tensor"] and out["gate_mu_spec"] == out["gate_spec"]
    assert out["gate_shards"] == 8
    assert out["embedding_spec"] == ["tensor", "fsdp"]
