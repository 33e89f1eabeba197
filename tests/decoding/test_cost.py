import dataclasses

import jax
import numpy as np
import pytest

import lmx.models as lm
from lmx.decoding import cost
from tests.tiny import HYBRID_2X2


def _config(name):
    """A preset, or one of two Mamba-3 configs beyond the presets: MIMO rank 2 with every state channel rotating
    (the "halves" layout), and the hybrid pattern with Mamba-3 SSM layers."""
    if name == "mamba3-mimo":
        base = lm.preset("mamba3-tiny")
        return base.replace(ssm=dataclasses.replace(base.ssm, mimo_rank=2, rope_fraction=1.0))
    if name == "hybrid-mamba3":
        return lm.preset("hybrid-tiny", ssm=lm.SSMConfig(variant="mamba3", num_heads=8, head_dim=16, state_size=16))
    return lm.preset(name)


@pytest.mark.parametrize("name", lm.preset_names() + ["mamba3-mimo", "hybrid-mamba3"])
def test_param_count_and_kv_bytes_match_the_model(name):
    cfg = _config(name)
    shapes = jax.eval_shape(lambda: lm.init_params(lm.build(cfg), jax.random.PRNGKey(0)))
    assert cost.param_count(cfg) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    state = jax.eval_shape(lambda: lm.init_state(cfg, 2, 8))
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    kv_bytes = sum(nbytes(x) for x in state.layers if isinstance(x, lm.KVState))
    assert cost.kv_bytes_per_token(cfg) == kv_bytes // (2 * 8)
    # The SSM layers' rings (floor_B, one int per row and layer, is bookkeeping).
    ring_bytes = lambda st: sum(nbytes(x.replace(floor_B=None)) for x in st.layers
                                if not isinstance(x, lm.KVState)) // 2
    assert cost.ssm_state_bytes_per_row(cfg) == ring_bytes(state)
    for window in (0, 2):  # init_state's override of cfg.ssm.rollback_window
        state = jax.eval_shape(lambda w=window: lm.init_state(cfg, 2, 8, rollback_window=w))
        assert cost.ssm_state_bytes_per_row(cfg, rollback_window=window) == ring_bytes(state)


@pytest.mark.parametrize("name", ["llama-tiny", "swa-tiny"])
def test_forward_flops_sums_flops_per_token(name):
    cfg = lm.preset(name)
    for start, stop in [(0, 1), (0, 5), (3, 20), (8, 9), (0, 30)]:
        want = sum(cost.flops_per_token(cfg, p + 1) for p in range(start, stop))
        np.testing.assert_allclose(float(cost.forward_flops(cfg, start, stop)), want, rtol=1e-6)
    a = cfg.attention
    attention_per_key = 4 * cfg.num_layers * a.num_heads * a.head_dim
    assert cost.flops_per_token(cfg, 1) == 2 * cost.matmul_params(cfg) + attention_per_key
    # A sliding window caps the attention term.
    if a.sliding_window:
        assert cost.flops_per_token(cfg, 100) == cost.flops_per_token(cfg, a.sliding_window)


def test_generation_stats_flops(tiny):
    from lmx.decoding import generate

    model, params = tiny("llama-tiny")
    prompts = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2, 6, 53, 58, 97], [42]]  # as test_generate's: compiled once
    g = generate(model, params, prompts, max_new_tokens=8)
    cfg = model.cfg
    want = sum(cost.flops_per_token(cfg, p + 1) for n in (3, 11, 1) for p in range(n + 8 - 1))
    np.testing.assert_allclose(float(g.stats["flops"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(g.stats["flops_per_token"]), want / 24, rtol=1e-5)
    assert float(g.stats["kv_bytes"]) == 3 * (16 + 8) * cost.kv_bytes_per_token(cfg)
    assert float(g.stats["ssm_state_bytes"]) == 0 and g.stats["state_bytes"] == g.stats["kv_bytes"]


def test_generation_stats_count_ssm_state(tiny):
    """A hybrid's state_bytes = its KV cache (grows with max_len) + SSM rings (constant), for all B·R rows.
    generate keeps no rollback window (one state slot per SSM layer: it never rolls back past its prefill)."""
    from lmx.decoding import Sampler, generate

    model, params = tiny("hybrid-tiny", **HYBRID_2X2)
    g = generate(model, params, [[5, 9, 17], [42]], max_new_tokens=4, num_samples=2, rng=jax.random.key(0),
                 sampler=Sampler(temperature=1.0))
    cfg, rows = model.cfg, 2 * 2
    s = cfg.ssm
    assert s.rollback_window == 4
    per_layer = (s.conv_width - 1) * s.conv_dim * 4 + 8 * 16 * 16 * 4
    assert float(g.stats["ssm_state_bytes"]) == rows * cfg.num_ssm_layers * per_layer
    assert float(g.stats["kv_bytes"]) == rows * (16 + 4) * cost.kv_bytes_per_token(cfg)
    assert float(g.stats["state_bytes"]) == float(g.stats["kv_bytes"]) + float(g.stats["ssm_state_bytes"])


@pytest.mark.parametrize("name", ["llama-tiny", "swa-tiny", "hybrid-tiny"])
def test_bytes_moved_by_hand(name):
    cfg = lm.preset(name)
    a = cfg.attention
    assert cost.weight_bytes(cfg) == cost.param_count(cfg) * np.dtype(cfg.param_dtype).itemsize
    kv_entry = 2 * a.num_kv_heads * a.head_dim * np.dtype(cfg.dtype).itemsize  # k and v of one key, one layer
    for start, stop in [(0, 1), (0, 7), (5, 19)]:
        keys = sum(min(p + 1, a.sliding_window or p + 1) for p in range(start, stop))  # attended, own key included
        ssm = cost.ssm_state_bytes_per_row(cfg, 0) * (stop - start)
        want = cfg.num_attn_layers * kv_entry * keys + ssm
        np.testing.assert_allclose(float(cost.state_bytes_read(cfg, start, stop)), want, rtol=1e-6)


def test_eflops_intensity_and_cost_of_pass():
    h100 = cost.HARDWARE["h100-sxm"]
    assert abs(cost.intensity_of("h100-sxm") - 989e12 / 3.35e12) < 1e-9 and abs(h100.intensity - 295.2) < 0.1
    stats = {"flops": 1e9, "bytes_moved": 2e6}
    assert cost.eflops(stats, 100.0) == 1e9 + 100.0 * 2e6
    assert cost.eflops(stats, "h200") == 1e9 + 989e12 / 4.8e12 * 2e6
    assert cost.cost_of_pass(10.0, 0.5) == 20.0 and cost.cost_of_pass(10.0, 0.0) == float("inf")
    with pytest.raises(ValueError, match=r"unknown hardware 'h1000'"):
        cost.eflops(stats, "h1000")
    with pytest.raises(ValueError, match=r"accuracy=1.5"):
        cost.cost_of_pass(1.0, 1.5)


@pytest.mark.parametrize("name", ["llama-tiny", "hybrid-tiny"])
def test_generation_bytes_moved_by_hand(tiny, name):
    from lmx.decoding import generate

    model, params = tiny(name, **(HYBRID_2X2 if name == "hybrid-tiny" else {}))
    cfg = model.cfg
    prompts = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2, 6, 53, 58, 97], [42]]
    g = generate(model, params, prompts, max_new_tokens=8, stop_tokens=(7, 11), num_samples=2,
                 sampler=lm_sampler(), rng=jax.random.PRNGKey(0))
    a = cfg.attention
    kv_key = cfg.num_attn_layers * 2 * a.num_kv_heads * a.head_dim * np.dtype(cfg.dtype).itemsize
    ssm_row = cost.ssm_state_bytes_per_row(cfg, 0)
    lengths = np.asarray(g.lengths_BR)
    read = 0
    for b, prompt in enumerate(prompts):
        positions = list(range(len(prompt)))  # the prefill, once per prompt
        for r in range(2):  # each sample processes its tokens but the last (never fed back)
            positions += list(range(len(prompt), len(prompt) + lengths[b, r] - 1))
        read += sum(kv_key * (p + 1) + ssm_row for p in positions)
    weights = cost.param_count(cfg) * 4 * int(g.stats["model_calls"])
    assert float(g.stats["weight_bytes_read"]) == weights
    np.testing.assert_allclose(float(g.stats["state_bytes_read"]), read, rtol=1e-6)
    np.testing.assert_allclose(float(g.stats["bytes_moved"]), weights + read, rtol=1e-6)
    np.testing.assert_allclose(cost.eflops(g.stats, 10.0), float(g.stats["flops"]) + 10.0 * (weights + read),
                               rtol=1e-6)


def lm_sampler():
    from lmx.decoding import Sampler

    return Sampler(temperature=1.0)
