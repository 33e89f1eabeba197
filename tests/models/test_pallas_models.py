"""Models with impl="pallas" (lmx.pallas's kernels, interpreted on the CPU) equal impl="xla": teacher-forced logits
and one train step's gradients (flash attention / SSD forward and backward), and cached greedy decoding (decode
attention in every step, flash attention in the prefill). Off a GPU, "auto" runs the references (kernel tests)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmx.models as lm
from lmx.decoding.generate import generate
from lmx.models.state import truncate
from tests.tiny import tiny_model

T = 20  # one full and one partial kernel block of 16: interpret mode pads the partial block with NaN


def _with_impl(cfg, impl):
    if cfg.layer_pattern[0] == "attn":
        return cfg.replace(attention=dataclasses.replace(cfg.attention, impl=impl))
    return cfg.replace(ssm=dataclasses.replace(cfg.ssm, impl=impl))


def _models(name, **overrides):
    base, params = tiny_model(name, **overrides)
    return {impl: lm.build(_with_impl(base.cfg, impl)) for impl in ("xla", "pallas")}, params


CASES = {
    "llama": ("llama-tiny", {}),  # GQA 4 query / 2 kv heads, head dim 16
    "mamba2": ("mamba2-tiny", {"ssm": lm.SSMConfig(num_heads=8, head_dim=16, state_size=16, n_groups=2,
                                                   chunk_size=16)}),  # the kernels need chunks >= 16
}


def _loss(model, params, tokens_BT, segment_ids_BT):
    out = model.apply({"params": params}, tokens_BT, segment_ids_BT=segment_ids_BT,
                      positions_BT=None if segment_ids_BT is None else _positions(segment_ids_BT))
    logp_BTV = jax.nn.log_softmax(out.logits_BTV[:, :-1])
    return -jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], -1).mean(), out.logits_BTV


def _positions(seg_BT):
    start_BT = jnp.concatenate([jnp.ones_like(seg_BT[:, :1], bool), seg_BT[:, 1:] != seg_BT[:, :-1]], 1)
    idx_BT = jnp.broadcast_to(jnp.arange(seg_BT.shape[1]), seg_BT.shape)
    return idx_BT - jax.lax.cummax(jnp.where(start_BT, idx_BT, 0), axis=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_gradients_equal_xla(case):
    models, params = _models(CASES[case][0], **CASES[case][1])
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 128, (2, T)), jnp.int32)
    seg = jnp.asarray([[0] * 7 + [1] * 13, [0] * T], jnp.int32)  # a packed row (reset inside a block) and a plain one
    got = {}
    for impl, model in models.items():
        fn = jax.value_and_grad(lambda p, m=model: _loss(m, p, tokens, seg), has_aux=True)
        calls = str(jax.make_jaxpr(fn)(params)).count("pallas_call")
        assert calls >= (3 if impl == "pallas" else 0) and (calls == 0) == (impl == "xla")  # fwd + bwd kernels ran
        (loss, logits), grads = jax.jit(fn)(params)
        got[impl] = (np.asarray(loss), np.asarray(logits), jax.tree.map(np.asarray, grads))
    (lx, gx_logits, gx), (lp, gp_logits, gp) = got["xla"], got["pallas"]
    assert np.isfinite(gp_logits).all()
    np.testing.assert_allclose(gp_logits, gx_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(lp, lx, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gp), jax.tree.leaves(gx), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-3, err_msg=jax.tree_util.keystr(path))


def test_cached_greedy_decode_equals_xla():
    """Llama: the decode step runs decode attention, the prefill flash attention. (Mamba-2's decode step is its
    recurrence; its prefill's SSD with a state is the kernel tests' initial_state case.)"""
    case = "llama"
    models, params = _models(CASES[case][0], **CASES[case][1])
    prompts = [[5, 9, 17, 3, 8, 21, 2, 11, 4, 30, 6, 7, 1, 12, 13, 14, 15], [3, 4, 5]]  # ragged lengths
    for T_ in (1, 6):  # a decode step runs the decode-attention kernel, a prefill flash attention (in a cond)
        step = lambda p, s, T_=T_: models["pallas"].apply({"params": p}, jnp.zeros((2, T_), jnp.int32), state=s)
        assert "pallas_call" in str(jax.make_jaxpr(step)(params, lm.init_state(models["pallas"].cfg, 2, 24)))
    gens = {impl: generate(model, params, prompts, max_new_tokens=5) for impl, model in models.items()}
    np.testing.assert_array_equal(gens["pallas"].tokens_BRT, gens["xla"].tokens_BRT)
    np.testing.assert_allclose(gens["pallas"].logprobs_BRT, gens["xla"].logprobs_BRT, atol=1e-4)
    # Three tokens onto a non-empty cache of ragged rows (a speculative verification, a continued prefill): decode
    # attention's T queries per row (the cond's other branch).
    tokens = jnp.asarray([[5, 9, 17, 3, 8, 21], [3, 4, 5, 6, 7, 8]], jnp.int32)
    logits = {}
    for impl, model in models.items():
        def continued(p, m=model):  # one program: prefill 6, keep 6 and 2, then 3 more tokens
            state = m.apply({"params": p}, tokens, state=lm.init_state(m.cfg, 2, 24)).state
            state = truncate(state, jnp.asarray([6, 2], jnp.int32))
            return m.apply({"params": p}, tokens[:, :3], state=state).logits_BTV

        logits[impl] = jax.jit(continued)(params)
    assert np.isfinite(logits["pallas"]).all()
    np.testing.assert_allclose(logits["pallas"], logits["xla"], atol=1e-4, rtol=1e-4)
