"""lmx.sharding: mesh construction errors, and sharded generate == unsharded on 8 fake CPU devices."""

import pytest

from lmx.sharding import make_mesh
from tests.fake_devices import run_on_8_devices


def test_make_mesh_errors_name_the_sizes():
    with pytest.raises(ValueError, match="data=-1, fsdp=-1"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh(data=2, fsdp=2, tensor=1)


def test_sharded_generate_matches_unsharded():
    out = run_on_8_devices("tests.sharded_generate_check")
    assert out["gate_shards"] == 8  # params really are distributed
    assert out["mamba3_in_x_spec"] == [None, "fsdp", "tensor", None]  # in_x [L, D, N, H]: heads over tensor
    for name in ("sampled", "mamba3", "pallas"):
        assert out[name + "_same_tokens"], out
        assert out[name + "_logprob_diff"] < 1e-4, out
