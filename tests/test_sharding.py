"""lmx.sharding: mesh construction errors, and sharded generate == unsharded on 8 fake CPU devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmx.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]


def test_make_mesh_errors_name_the_sizes():
    with pytest.raises(ValueError, match="data=-1, fsdp=-1"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh(data=2, fsdp=2, tensor=1)


def test_sharded_generate_matches_unsharded():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "tests.sharded_generate_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["gate_shards"] == 8  # params really are distributed
    for name in ("greedy", "sampled"):
        assert out[name + "_same_tokens"], out
        assert out[name + "_logprob_diff"] < 1e-4, out
