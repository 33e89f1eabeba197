"""Sharded == unsharded training on 8 fake CPU devices. The device count is fixed when jax starts, and
other test modules import jax normally, so the check runs in a fresh interpreter (sharded_check.py)."""

from tests.fake_devices import run_on_8_devices


def test_sharded_train_step_matches_unsharded():
    out = run_on_8_devices("tests.train.sharded_check")
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
    # Kernels under a mesh run per shard and equal the unsharded model: flash attention forward and backward in a
    # train step (3 pallas_calls in shard_maps), Mamba-2's SSD forward (3 kernels) on rows split 4 ways.
    assert out["pallas_calls"] == 3 and out["pallas_shard_maps"] >= 2, out
    assert out["pallas_metric_diff"] < 1e-5 and out["pallas_param_diff"] < 5e-5, out
    assert out["ssd_calls"] == 3 and out["ssd_shard_maps"] >= 1 and out["ssd_logits_diff"] < 1e-5, out
    assert out["ssd_logits_spec"][0] == ["data", "fsdp"], out
    assert out["gqa_per_shard_diffs"] == [0.0, 0.0], out  # query and kv heads split together or not at all
