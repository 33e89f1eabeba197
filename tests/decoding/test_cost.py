import jax
import numpy as np
import pytest

import lmx.models as lm
from lmx.decoding import cost


@pytest.mark.parametrize("name", lm.preset_names())
def test_param_count_and_kv_bytes_match_the_model(name):
    cfg = lm.preset(name)
    shapes = jax.eval_shape(lambda: lm.init_params(lm.build(cfg), jax.random.PRNGKey(0)))
    assert cost.param_count(cfg) == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    state = jax.eval_shape(lambda: lm.init_state(cfg, 2, 8))
    kv_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.kv))
    assert cost.kv_bytes_per_token(cfg) == kv_bytes // (2 * 8)


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
